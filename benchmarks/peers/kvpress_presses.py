"""Eviction presses from NVIDIA's kvpress, scored on the shared windows.

Runs in ``.venv-kvpress`` (``make peers-env``: ``kvpress==0.5.5``, which pins
transformers < 5.3, torch 2.13 CPU, and kvtc-store itself for its scores). For each window
it prefills the 1,536-token context once without a press, as kvpress's own pipeline does
(``model.model(input_ids, past_key_values=cache)``), continues over the 256 continuation
tokens and decodes the 64-token greedy run (the reference). Then, for each (press, memory
ratio), the press compresses the context cache and the same continuation and greedy run
follow at their true positions (``protocol.continue_and_greedy``), scored with
``kvtc_store.evaluate.compare_logits``.

One prefill serves every press: a kvpress press acts in a forward hook after each
attention layer of the prefill, from that layer's inputs (hidden states, position
embeddings, cache positions), its output and its cached K/V only, and the hook changes
nothing the later layers see. So the reference prefill records each layer's hook
arguments (:class:`PrefillCapture`) and :func:`replay` calls the press's own
``forward_hook`` with them, inside ``with press(model):``, on a fresh cache holding the
exact context KV. ``tests/test_peers.py`` checks that this yields the same cache, tensor
for tensor, as a prefill run under ``with press(model):``; it saves 9 of 10 prefills.

Presses (each evicts the same share of tokens in every layer and KV head):

- ``snapkv``: SnapKV (Li et al., arXiv 2404.14469): attention of the last 64 context
  queries, pooled; window 64, kernel 5 (kvpress defaults).
- ``knorm``: keep the keys of smallest L2 norm (Devoto et al., arXiv 2406.11430).
- ``expected_attention``: attention expected from future queries' statistics (kvpress,
  Devoto et al., arXiv 2510.00636); 4 sink tokens kept.
- ``streaming_llm``: attention sinks + recent window (Xiao et al., arXiv 2309.17453); 4 sinks.
- ``tova``: token omission via attention, last query's attention (Oren et al., arXiv 2401.06104).

Matching ratios: kvpress's ``compression_ratio`` is the share of context tokens evicted,
and it keeps ``int(1536 * (1 - compression_ratio))`` per layer and head; a memory ratio
``m`` is ``compression_ratio = 1 - 1 / m`` (2, 4, 8 -> 768, 384, 192 tokens kept). The
honest ratio reported is the measured one: context tokens x layers / kept tokens summed
over layers, read from the cache after the press (bf16 bytes per kept token are those of
an uncompressed token, and the keys keep RoPE, so no extra metadata is stored).

Usage: ``.venv-kvpress/bin/python benchmarks/peers/kvpress_presses.py --model DIR
--windows ids.safetensors --out results.jsonl [--presses ...] [--ratios 2 4 8] [--limit N]
[--threads N]`` (``--check-replay TOKENS`` instead of ``--out``: the replay check only).
Writes one JSON line per (window, method, ratio), the reference (``method: "exact"``) first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from protocol import CTX, continue_and_greedy, load_windows, score_record

PRESSES = {
    "snapkv": ("SnapKVPress", {}),
    "knorm": ("KnormPress", {}),
    "expected_attention": ("ExpectedAttentionPress", {}),
    "streaming_llm": ("StreamingLLMPress", {}),
    "tova": ("TOVAPress", {}),
}
# TOVA is left out by default: on 2 shared cores it cost 10.8 s per ratio and window.
DEFAULT_PRESSES = ["snapkv", "knorm", "expected_attention", "streaming_llm"]


def make_press(name: str, memory_ratio: float):
    """The kvpress press ``name`` evicting ``1 - 1 / memory_ratio`` of the context."""
    import kvpress

    cls, kw = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=1.0 - 1.0 / memory_ratio, **kw)


@torch.no_grad()
def prefill(model, ctx: torch.Tensor, press=None):
    """The context's cache, built the way kvpress's pipeline builds it (no LM head)."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else nullcontext():
        model.model(input_ids=ctx[None], past_key_values=cache)
    return cache


class PrefillCapture:
    """Records every attention layer's forward-hook arguments during one prefill.

    ``with PrefillCapture(model) as cap: prefill(model, ctx)``; then ``cap.calls`` holds
    ``(module, kwargs, output)`` per layer in order (kwargs: ``hidden_states``
    ``(1, T, hidden)``, ``position_embeddings``, ``cache_position``, ...).
    """

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple] = []
        self._hooks: list = []

    def _hook(self, module, args, kwargs, output):
        self.calls.append((module, dict(kwargs), output))

    def __enter__(self):
        for layer in self.model.model.layers:
            self._hooks.append(layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@torch.no_grad()
def replay(model, capture: PrefillCapture, context_kv: list, press):
    """The cache ``press`` leaves after the captured prefill.

    Args:
        model: the model the prefill ran on.
        capture: the reference prefill's :class:`PrefillCapture`.
        context_kv: per layer ``(keys, values)`` ``(1, H, T, D)`` of that prefill.
        press: a kvpress press.

    Returns:
        A ``DynamicCache`` holding what the press kept (the inputs are not modified).
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=list(context_kv))
    with press(model):
        for module, kwargs, output in capture.calls:
            press.forward_hook(module, (), {**kwargs, "past_key_values": cache}, output)
    return cache


def check_replay(model, ctx: torch.Tensor, presses: list[str], ratio: float) -> dict:
    """For each press: is the replayed cache identical to one from a prefill under the press?

    Returns:
        ``{press: {"same": bool, "kept": tokens kept in layer 0}}``.
    """
    with PrefillCapture(model) as capture:
        cache = prefill(model, ctx)
    context_kv = [(layer.keys, layer.values) for layer in cache.layers]
    out = {}
    for name in presses:
        got = replay(model, capture, context_kv, make_press(name, ratio))
        real = prefill(model, ctx, make_press(name, ratio))
        same = all(
            torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            for a, b in zip(got.layers, real.layers)
        )
        out[name] = {"same": same, "kept": got.layers[0].keys.shape[2]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="converted transformers model folder")
    p.add_argument("--windows", required=True, type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES)
    p.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    p.add_argument("--limit", type=int, default=None, help="first N windows only")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--check-replay",
        type=int,
        metavar="TOKENS",
        help="only check replay against real pressed prefills on the first window's first "
        "TOKENS context tokens at the first ratio; print JSON; exit 1 on a mismatch",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from kvtc_store.evaluate import compare_logits

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids, names = load_windows(args.windows)
    if args.check_replay:
        res = check_replay(model, ids[0, : args.check_replay], args.presses, args.ratios[0])
        print(json.dumps(res))
        return 0 if all(r["same"] for r in res.values()) else 1
    if args.out is None:
        p.error("--out is required")
    n = ids.shape[0] if args.limit is None else min(args.limit, ids.shape[0])
    layers = model.config.num_hidden_layers
    with args.out.open("w") as out:
        for wi in range(n):
            ctx, cont = ids[wi, :CTX], ids[wi, CTX:]
            t0 = time.perf_counter()
            with PrefillCapture(model) as capture:
                cache = prefill(model, ctx)
            context_kv = [(layer.keys, layer.values) for layer in cache.layers]
            ref, ref_greedy, _ = continue_and_greedy(model, cache, cont)
            base = {"window": wi, "text": names[wi]}
            rec = {**base, "method": "exact", "target_ratio": 1.0, "honest_ratio": 1.0}
            rec["greedy"] = ref_greedy.tolist()
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            out.write(json.dumps(rec) + "\n")
            for name in args.presses:
                for ratio in args.ratios:
                    t0 = time.perf_counter()
                    cache = replay(model, capture, context_kv, make_press(name, ratio))
                    kept = sum(layer.keys.shape[2] for layer in cache.layers)
                    got, _, matched = continue_and_greedy(model, cache, cont, ref_greedy)
                    s = compare_logits(ref, got, cont)
                    rec = {
                        **base,
                        "method": f"kvpress-{name}",
                        "target_ratio": ratio,
                        "honest_ratio": CTX * layers / kept,
                        "kept_tokens_per_layer": kept / layers,
                        **score_record(s, matched),
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
            del capture, context_kv
            print(f"kvpress window {wi + 1}/{n} done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
