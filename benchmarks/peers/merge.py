"""Merge result rows into ``benchmarks/results/quality.json`` without dropping other rows.

Several runners write that file (the rate-distortion harness, the peers here), each
owning the rows it measured. The file is ``{"rows": [...], "runs": {run id: facts}}``:
rows are keyed by ``(method, target_ratio)`` and name their run; a merge replaces the rows
with the keys it brings and keeps every other row and run. A file from the earlier
single-run ``benchmarks/quality.py`` (run facts at the top level) is read as one run
named ``legacy``. This is the file model of the rate-distortion harness's
``benchmarks/rd/rows.py`` (branch ``rd``), so either can read what the other wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _key(row: dict) -> tuple[str, float | None]:
    r = row.get("target_ratio")
    return row["method"], None if r is None else float(r)


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
    doc = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("rows", []), list):
        raise TypeError(f"{path} is not a results document with a 'rows' list")
    old, runs = doc.get("rows", []), doc.get("runs")
    if runs is None:  # legacy single-run file: its facts sit at the top level
        runs = {"legacy": {k: v for k, v in doc.items() if k != "rows"}}
        old = [{**r, "run": r.get("run", "legacy")} for r in old]
    new = {_key(r): {**r, "run": run_id} for r in rows}
    merged = [r for r in old if _key(r) not in new] + list(new.values())
    runs = {**runs, run_id: run_meta}
    used = {r.get("run") for r in merged}
    doc = {"rows": merged, "runs": {k: v for k, v in runs.items() if k in used}}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return doc
