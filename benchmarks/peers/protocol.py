"""What the peer runners share across their virtual environments (torch + safetensors only).

The peers run in their own environments (``.venv-lmcache``, ``.venv-kvpress``: their pins
clash with the main one), so nothing crosses a process boundary as a pickle: token ids and
tensors go in safetensors files, results come back as JSON.

Contract with the rate-distortion harness (``benchmarks/rate_distortion.py``), for every
method on the same windows (``benchmarks/quality.py``'s ``windows(tok, n)``, tokenised
once in the main environment):

- the context is the first 1,536 tokens of a window; the continuation the last 256;
- KL, top-1 agreement and perplexity change come from ``kvtc_store.evaluate.compare_logits``
  on the continuation logits, exact context KV as the reference;
- greedy: from the context's KV, feed the first continuation token at position 1,536 and
  decode 64 tokens greedily; a window agrees when all 64 equal the exact-KV run's.
  ``greedy_continue`` here stops a compressed run at its first differing token (the
  outcome is then known) and reports the common prefix length.

Positions are passed explicitly: an eviction press leaves fewer cached tokens than the
context had, and the next token's position must stay 1,536, not the cache length.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CTX, CONT, GREEDY = 1536, 256, 64


def save_windows(path: Path, ids: torch.Tensor, names: list[str]) -> None:
    """Write windows for another environment.

    Args:
        path: a ``.safetensors`` file to write.
        ids: int64 ``(n, CTX + CONT)`` token ids.
        names: ``n`` text names (stored in the file's metadata, ``|``-separated).
    """
    if ids.ndim != 2 or ids.shape[1] != CTX + CONT or len(names) != ids.shape[0]:
        raise ValueError(f"windows must be (n, {CTX + CONT}) with n names, got {tuple(ids.shape)}")
    save_file({"ids": ids.to(torch.int64).contiguous()}, str(path), {"names": "|".join(names)})


def load_windows(path: Path) -> tuple[torch.Tensor, list[str]]:
    """Read what :func:`save_windows` wrote: ``(ids (n, CTX + CONT) int64, names)``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = f.metadata()["names"].split("|")
        ids = f.get_tensor("ids")
    return ids, names


def save_kv(path: Path, keys: torch.Tensor, values: torch.Tensor, **extra: torch.Tensor) -> None:
    """Keys and values ``(L, H, T, D)`` (any float dtype) and extra tensors to safetensors."""
    save_file(
        {"keys": keys.contiguous(), "values": values.contiguous(), **extra},
        str(path),
    )


def load_kv(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file written by :func:`save_kv`."""
    return load_file(str(path))


@functools.lru_cache(maxsize=8)
def _cache_kw(cls) -> str:
    # transformers 5.24 calls the argument ``cache`` (``past_key_values`` warns there);
    # kvpress's pinned transformers (< 5.3) knows only ``past_key_values``.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@torch.no_grad()
def forward_at(model, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Run ``ids`` int64 ``(n,)`` at positions ``start .. start + n - 1`` on ``cache``.

    Returns:
        float32 logits ``(n, V)``; ``cache`` grows by ``n`` tokens.
    """
    pos = torch.arange(start, start + ids.numel())[None]
    out = model(
        ids.reshape(1, -1), position_ids=pos, use_cache=True, **{_cache_kw(type(model)): cache}
    )
    return out.logits[0].float()


@torch.no_grad()
def continue_and_greedy(
    model,
    cache,
    cont: torch.Tensor,
    reference: torch.Tensor | None = None,
    start: int = CTX,
    steps: int = GREEDY,
):
    """Continuation logits, then the greedy run, from a cache holding a context's KV.

    Args:
        model: the causal LM.
        cache: a transformers ``DynamicCache`` holding the context (``start`` positions,
            possibly fewer tokens after eviction). It is consumed.
        cont: int64 ``(n,)`` continuation tokens (at positions ``start ..``).
        reference: int64 ``(steps,)`` greedy tokens of the exact run, or None (this is
            the exact run: decode all ``steps`` tokens).
        start: position of ``cont[0]`` (the context length before any eviction).
        steps: greedy tokens to decode.

    Returns:
        ``(logits (n, V) float32, greedy int64 (m,), matched)``: ``m = steps`` unless
        it stopped at its first token differing from ``reference``; ``matched`` is the
        length of the common prefix with ``reference`` (``steps`` for the exact run).
    """
    kept = cache.get_seq_length()
    logits = forward_at(model, cont, cache, start)
    for layer in cache.layers:  # keep the context and the first continuation token
        layer.keys, layer.values = layer.keys[:, :, : kept + 1], layer.values[:, :, : kept + 1]
    out = [int(logits[0].argmax())]
    while len(out) < steps:
        if reference is not None and out[-1] != int(reference[len(out) - 1]):
            break
        step = forward_at(model, torch.tensor([out[-1]]), cache, start + len(out))
        out.append(int(step[-1].argmax()))
    greedy = torch.tensor(out, dtype=torch.long)
    if reference is None:
        return logits, greedy, steps
    same = (greedy == reference[: greedy.numel()]).long()
    matched = int(same.cumprod(0).sum())
    return logits, greedy, matched


def score_record(scores, matched: int) -> dict:
    """A window's pooled sums (``kvtc_store.evaluate.ContinuationScores``) as a JSON dict."""
    return {
        "positions": scores.positions,
        "kl_sum": scores.kl_sum,
        "agree": scores.agree,
        "nll_ref_sum": scores.nll_ref_sum,
        "nll_got_sum": scores.nll_got_sum,
        "greedy_matched": matched,
    }
