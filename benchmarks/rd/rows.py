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


def _correct(row: dict, group: str, samples: int) -> int:
    return samples - len(row.get("retrieval_wrong", {}).get(group, []))


def pool_retrieval(doc: dict, slices: list[dict], min_accuracy: float = 0.8) -> dict:
    """``doc`` with the retrieval of its rows pooled with runs over other prompts.

    Each of ``slices`` is a results file of one retrieval run (``--retrieval-first`` N,
    ``--retrieval-min-accuracy 0``) over prompts the row's own run did not use. A row of
    ``doc`` with the same (method, target ratio) gets ``retrieval_pooled``: per group the
    correct answers of the row and of the uncompressed model summed over its own prompts
    and every slice's (from ``retrieval_wrong`` and each run's ``retrieval_samples``), the
    groups where the uncompressed model scores at least ``min_accuracy`` over all of
    them, and the change in points over those groups. The row's own fields stay as they
    are.

    Raises:
        ValueError: a slice repeats prompts already pooled, or lacks a group or the
            uncompressed row.
    """

    def run_meta(d: dict, row: dict) -> dict:
        return d["runs"].get(row.get("run"), {})

    exact = next(r for r in doc["rows"] if r["method"] == "exact")
    by_key = {row_key(r): r for r in doc["rows"] if r["method"] != "exact"}
    pools: dict[tuple, dict] = {}
    for sl in slices:
        s_exact = next((r for r in sl["rows"] if r["method"] == "exact"), None)
        if s_exact is None:
            raise ValueError("a retrieval slice has no uncompressed (exact) row")
        for r in sl["rows"]:
            key = row_key(r)
            if r["method"] == "exact" or key not in by_key or not r.get("retrieval"):
                continue
            base = by_key[key]
            if key not in pools:
                m = run_meta(doc, base)
                if run_meta(doc, exact).get("retrieval_first", 0) != m.get("retrieval_first", 0):
                    raise ValueError(f"{key}: the uncompressed row covers other prompts")
                pools[key] = {"parts": [], "n": {}, "correct": {}, "exact_correct": {}}
                _pool_add(pools[key], base, exact, m, base["retrieval_groups"])
            _pool_add(pools[key], r, s_exact, run_meta(sl, r), base["retrieval_groups"])
    for key, p in pools.items():
        groups = [g for g in p["n"] if p["exact_correct"][g] >= min_accuracy * p["n"][g]]
        n = sum(p["n"][g] for g in groups)
        c = sum(p["correct"][g] for g in groups)
        e = sum(p["exact_correct"][g] for g in groups)
        by_key[key]["retrieval_pooled"] = {
            **p,
            "groups": groups,
            "prompts": n,
            "accuracy": round(c / n, 4) if n else None,
            "exact_accuracy": round(e / n, 4) if n else None,
            "delta_pts": round(100 * (c - e) / n, 2) if n else None,
        }
    return doc


def _pool_add(pool: dict, row: dict, exact: dict, meta: dict, groups: list[str]) -> None:
    first, samples = meta.get("retrieval_first", 0), meta["retrieval_samples"]
    end = first + samples
    part = {"run": row.get("run"), "first": first, "samples": samples, "groups": []}
    for g in groups:
        if g not in row.get("retrieval", {}) or g not in exact.get("retrieval", {}):
            continue
        for q in pool["parts"]:
            if g in q["groups"] and first < q["first"] + q["samples"] and q["first"] < end:
                raise ValueError(f"{g}: prompts {first}-{end - 1} pooled twice")
        part["groups"].append(g)
        pool["n"][g] = pool["n"].get(g, 0) + samples
        pool["correct"][g] = pool["correct"].get(g, 0) + _correct(row, g, samples)
        pool["exact_correct"][g] = pool["exact_correct"].get(g, 0) + _correct(exact, g, samples)
    pool["parts"].append(part)
