"""Merge result rows into ``benchmarks/results/quality.json`` without dropping other rows.

Several runners write that file (the rate-distortion harness, the peers here), each
owning the rows it measured. The file is ``{"rows": [...], "runs": {run id: facts}}``:
rows are keyed by ``(method, target_ratio)`` and name their run; a merge replaces the rows
with the keys it brings and keeps every other row and run. A file from the earlier
single-run ``benchmarks/quality.py`` (run facts at the top level) is read as one run
named ``legacy``. The file model is the rate-distortion harness's
(``benchmarks/rd/rows.py``); this module checks the rows and hands them to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: rd.rows

from rd import rows as rd_rows


def merge_rows(path: Path, rows: list[dict], run_id: str, run_meta: dict) -> dict:
    """Put ``rows`` (all from run ``run_id``) into the file at ``path``.

    Args:
        path: the results file (created if missing).
        rows: dicts with at least ``method`` (and ``target_ratio``, None if the method has
            none).
        run_id: the run's name; each row gets ``run: run_id``.
        run_meta: the run's command, machine, date..., stored under ``runs[run_id]``.

    Returns:
        The document written. Runs no row refers to any more are dropped.

    Raises:
        ValueError: a row without ``method``.
        TypeError: the file is not a JSON object with a ``rows`` list.
    """
    if any("method" not in r for r in rows):
        raise ValueError("every row needs a 'method'")
    try:
        doc = rd_rows.load(path)
    except AttributeError as exc:  # a JSON list or scalar: no .get
        raise TypeError(f"{path} is not a results document with a 'rows' list") from exc
    if not isinstance(doc["rows"], list):
        raise TypeError(f"{path} is not a results document with a 'rows' list")
    doc = rd_rows.merge(doc, rows, run_id, run_meta)
    rd_rows.save(path, doc)
    return doc
