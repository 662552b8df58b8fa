"""Per-token KV reconstruction error of the codec on retrieval prompts: the passkey's
digits against the haystack around them.

For each passkey prompt (``benchmarks/rd/retrieval.py``'s ``build_sample``), the stored
part's exact KV from SmolLM2 on the CPU, a round trip through the codec at ``--ratio``
(the cached or newly calibrated artifact of the default settings, or ``--corpus``), and
the relative squared error per token (summed over layers, heads and dims, divided by the
token's own energy), averaged over the tokens that decode to digits and over the rest
(sinks and the exact last 128 tokens left out).

The haystacks are of one evaluation genre (``--genre``, default ``technical``; ``make
corpora``). Before issue 17 they alternated Python's docs and Shakespeare's tragedies, so
the default indices (chosen then) name other prompts now.

Usage: ``python benchmarks/token_error.py [--ratio 16] [--length 4096] [--genre technical]
[--indices 32 33 ...]``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: rd

from rd.retrieval import build_sample

from kvtc_store.calibration import CalibrationSettings, load_or_calibrate
from kvtc_store.codec import KVTCCodec
from kvtc_store.model import kv_from_cache, lm_forward, load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=16.0)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--indices", type=int, nargs="+", default=[32, 33, 53, 63, 34, 35, 44, 45])
    p.add_argument("--corpus", default=CalibrationSettings.corpus)
    p.add_argument("--genre", default="technical", help="haystack genre (benchmarks/rd/genres.py)")
    a = p.parse_args(argv)
    model, tok, info = load_model()
    settings = dataclasses.replace(CalibrationSettings(), corpus=a.corpus)
    (art,) = load_or_calibrate(model, tok, info, [a.ratio], settings)
    codec = KVTCCodec(art, coder="none")
    print(f"artifact {art.artifact_id}: {art.stored_params():,} parameters, corpus {a.corpus}")
    for idx in a.indices:
        s = build_sample(tok, "passkey", a.length, idx, a.genre)
        with torch.no_grad():
            _, cache = lm_forward(model, s.stored[None], None, last_only=True)
        k, v = kv_from_cache(cache)
        chunks, err = codec.decode_prefix(codec.encode_sequence(k, v, 0, chunk_tokens=256))
        if err is not None:
            raise err
        t = sum(c.keys.shape[2] for c in chunks)
        kh = torch.cat([c.keys for c in chunks], 2).float()
        vh = torch.cat([c.values for c in chunks], 2).float()
        rel = [
            (((x - y[:, :, :t]) ** 2).sum((0, 1, 3)) / (y[:, :, :t] ** 2).sum((0, 1, 3))).numpy()
            for x, y in ((kh, k), (vh, v))
        ]
        digit = np.array([tok.decode([i]).strip().isdigit() for i in s.stored[:t].tolist()])
        inner = np.zeros(t, bool)
        inner[art.n_sink : t - art.window] = True
        parts = [(r[inner & ~digit].mean(), r[inner & digit].mean()) for r in rel]
        print(
            f"prompt {idx} ({s.text}): keys {parts[0][0]:.4f} haystack / {parts[0][1]:.4f} "
            f"digits; values {parts[1][0]:.4f} / {parts[1][1]:.4f} ({int((inner & digit).sum())} digit tokens)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
