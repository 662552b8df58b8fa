"""``benchmarks/results/quality.json``: result rows keyed by (method, target ratio).

Several runs write into one file: a run replaces the rows it measured and keeps every
other row (another method's, another branch's peers), so runs split by ``--methods`` (or
made on other machines) merge. Each row names its run (``run``) and the device it ran on;
``runs`` holds each referenced run's command, machine, date and suite settings.

Row fields (issue 3): ``method``, ``target_ratio`` (None for methods without one),
``honest_ratio`` (chunk ratio), ``ppl_change_pct``, ``kl``, ``top1_agreement``,
``retrieval_delta_pts``, ``greedy_agreement``; extra fields are kept as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KIND_ORDER = {"reference": 0, "ours": 1, "ablation": 2, "baseline": 3}


def row_key(row: dict) -> tuple[str, float | None]:
    """``(method, target ratio as float or None)``."""
    r = row.get("target_ratio")
    return row["method"], None if r is None else float(r)


def _sort_key(row: dict):
    method, ratio = row_key(row)
    return (KIND_ORDER.get(row.get("kind", ""), 4), method, -1.0 if ratio is None else ratio)


def load(path: Path) -> dict:
    """``{"rows": [...], "runs": {id: meta}}`` from ``path`` (empty when absent).

    A file from the earlier single-run ``benchmarks/quality.py`` (run facts at the top
    level) becomes one run named ``legacy``.
    """
    if not path.is_file():
        return {"rows": [], "runs": {}}
    doc = json.loads(path.read_text())
    rows = doc.get("rows", [])
    runs = doc.get("runs")
    if runs is None:  # legacy: one run, facts at the top level
        meta = {k: v for k, v in doc.items() if k != "rows"}
        runs = {"legacy": meta}
        for row in rows:
            row.setdefault("run", "legacy")
            row.setdefault("kind", "ours" if row.get("method") == "kvtc" else "baseline")
            row.setdefault("device", meta.get("machine", "unknown"))
    return {"rows": rows, "runs": runs}


def merge(doc: dict, rows: list[dict], run_id: str, run_meta: dict) -> dict:
    """``doc`` with ``rows`` (all from run ``run_id``) replacing rows of the same key.

    Runs that no row references any more are dropped.
    """
    new = {row_key(r): {**r, "run": run_id} for r in rows}
    kept = [r for r in doc["rows"] if row_key(r) not in new]
    merged = sorted(kept + list(new.values()), key=_sort_key)
    runs = {**doc["runs"], run_id: run_meta}
    used = {r.get("run") for r in merged}
    return {"rows": merged, "runs": {k: v for k, v in runs.items() if k in used}}


def merge_docs(doc: dict, other: dict) -> dict:
    """``doc`` with every row of ``other`` (another results file) merged in, each row
    keeping its own run; ``other``'s rows win on equal keys."""
    for run_id, meta in other["runs"].items():
        mine = [r for r in other["rows"] if r.get("run") == run_id]
        if mine:
            doc = merge(doc, mine, run_id, meta)
    return doc


def save(path: Path, doc: dict) -> None:
    """Write ``doc`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
