"""``benchmarks/results/quality.json``: result rows keyed by (method, target ratio, genre).

Several runs write into one file: a run replaces the rows it measured and keeps every
other row (another method's, another branch's peers), so runs split by ``--methods`` (or
made on other machines) merge. Each row names its run (``run``) and the device it ran on;
``runs`` holds each referenced run's command, machine, date and suite settings.

Row fields (issue 3): ``method``, ``target_ratio`` (None for methods without one),
``honest_ratio`` (chunk ratio), ``context_ratio`` (whole-context ratio), ``ppl_change_pct``,
``kl``, ``top1_agreement``, ``retrieval_delta_pts``, ``greedy_agreement``; extra fields are
kept as they are.

Issue 17 adds ``genre``: a run writes one row per method, ratio and genre (:mod:`.genres`,
or a validation text of :mod:`.validation`) with the sums it pooled (``scores``, ``bytes``,
``greedy``, ``retrieval_counts``), and :func:`derive` adds, per method and ratio, the pooled
row ``all`` (every evaluation genre measured, sums added) and the row ``worst`` (each
measure's worst genre, named in ``worst_genre``); ``validation-all`` and
``validation-worst`` likewise over the validation texts. Derived rows carry
``derived: true`` and are rebuilt on every load and merge. Rows written before the genres
(Python's docs and Shakespeare's tragedies pooled) read as genre :data:`LEGACY_GENRE` and
are never pooled with the genres.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .genres import GENRES
from .validation import VALIDATION_GENRES

KIND_ORDER = {"reference": 0, "ours": 1, "ablation": 2, "baseline": 3}
LEGACY_GENRE = "suite-v1"
# pooled genre -> (its member genres, the worst-genre row's name)
POOLS = {
    "all": (GENRES, "worst"),
    "validation-all": (VALIDATION_GENRES, "validation-worst"),
}
GENRE_ORDER = {
    g: i
    for i, g in enumerate(
        [*GENRES, "all", "worst", *VALIDATION_GENRES, "validation-all", "validation-worst"]
    )
}
# worst-genre measures: field -> True when higher is worse
WORST_FIELDS = {
    "honest_ratio": False,
    "context_ratio": False,
    "kl": True,
    "ppl_change_pct": True,
    "top1_agreement": False,
    "greedy_agreement": False,
    "retrieval_delta_pts": False,
    "rate_error": True,
}


def row_key(row: dict) -> tuple[str, float | None, str]:
    """``(method, target ratio as float or None, genre)``."""
    r = row.get("target_ratio")
    return row["method"], None if r is None else float(r), row.get("genre", LEGACY_GENRE)


def _sort_key(row: dict):
    method, ratio, genre = row_key(row)
    return (
        KIND_ORDER.get(row.get("kind", ""), 4),
        method,
        -1.0 if ratio is None else ratio,
        GENRE_ORDER.get(genre, len(GENRE_ORDER)),
        genre,
    )


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
    for row in rows:
        row.setdefault("genre", LEGACY_GENRE)
    return derive({"rows": rows, "runs": runs})


# the uncompressed model's retrieval on a genre (prompts are seeded by genre, task, length
# and index, so every run that measured it measured the same answers)
_EXACT_RETRIEVAL_FIELDS = (
    "retrieval",
    "retrieval_wrong",
    "retrieval_counts",
    "retrieval_groups",
    "retrieval_accuracy",
)


def merge(doc: dict, rows: list[dict], run_id: str, run_meta: dict) -> dict:
    """``doc`` with ``rows`` (all from run ``run_id``) replacing rows of the same key; an
    ``exact`` row measured without retrieval keeps the retrieval of the row it replaces.

    Runs that no row references any more are dropped; derived rows are rebuilt
    (:func:`derive`).
    """
    new = {
        row_key(r): {"genre": LEGACY_GENRE, **r, "run": run_id}
        for r in rows
        if not r.get("derived")
    }
    old = {row_key(r): r for r in doc["rows"] if not r.get("derived")}
    for key, r in new.items():  # a run without retrieval keeps the reference's retrieval
        o = old.get(key)
        if r.get("method") == "exact" and not r.get("retrieval_counts") and o:
            r |= {f: o[f] for f in _EXACT_RETRIEVAL_FIELDS if o.get(f)}
    kept = [r for r in doc["rows"] if row_key(r) not in new and not r.get("derived")]
    merged = sorted(kept + list(new.values()), key=_sort_key)
    runs = {**doc["runs"], run_id: run_meta}
    used = {r.get("run") for r in merged}
    return derive({"rows": merged, "runs": {k: v for k, v in runs.items() if k in used}})


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

    def exacts(d: dict) -> dict[str, dict]:
        return {r["genre"]: r for r in d["rows"] if r["method"] == "exact" and not r.get("derived")}

    exact_of = exacts(doc)
    by_key = {row_key(r): r for r in doc["rows"] if r["method"] != "exact" and not r.get("derived")}
    pools: dict[tuple, dict] = {}
    for sl in slices:
        s_exacts = exacts(sl)
        for r in sl["rows"]:
            key = row_key(r)
            if r["method"] == "exact" or key not in by_key or not r.get("retrieval"):
                continue
            if r.get("derived"):
                continue
            if key[2] not in s_exacts or key[2] not in exact_of:
                raise ValueError(
                    f"a retrieval slice or the file has no uncompressed (exact) row of {key[2]}"
                )
            s_exact, exact = s_exacts[key[2]], exact_of[key[2]]
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
    return derive(doc)


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


def _group_counts(row: dict) -> dict[str, tuple[int, int, int] | tuple[int, int]]:
    """Per retrieval group of a genre row: ``(correct, total)`` from ``retrieval_counts``,
    or ``(correct, exact correct, total)`` from ``retrieval_pooled`` when there is one."""
    p = row.get("retrieval_pooled")
    if p:
        return {g: (p["correct"][g], p["exact_correct"][g], p["n"][g]) for g in p["groups"]}
    return {g: tuple(c) for g, c in (row.get("retrieval_counts") or {}).items()}


def _derived_head(first: dict, name: str, genre_rows: list[dict]) -> dict:
    """The fields every derived row ``name`` starts with (``first``'s method and ratio)."""
    return {
        "method": first["method"],
        "target_ratio": first.get("target_ratio"),
        "kind": first.get("kind"),
        "genre": name,
        "derived": True,
        "run": "derived",
        "genres": [r["genre"] for r in genre_rows],
    }


def _pooled_row(method_rows: list[dict], exact: dict[str, dict], name: str) -> dict:
    """The pooled row ``name`` of one method and ratio from its genre rows (sums added)."""
    first = method_rows[0]
    keys = ("positions", "kl_sum", "agree", "nll_ref_sum", "nll_got_sum")
    sc = {k: sum(r["scores"][k] for r in method_rows if r.get("scores")) for k in keys}
    by = {
        k: sum(r["bytes"][k] for r in method_rows if r.get("bytes"))
        for k in ("chunk_raw", "chunk_stored", "ctx_raw", "ctx_stored")
    }
    gr = {
        k: sum(r["greedy"][k] for r in method_rows if r.get("greedy"))
        for k in ("same", "total", "prefix_sum")
    }
    n = max(sc["positions"], 1)
    row = {
        **_derived_head(first, name, method_rows),
        "runs": sorted({r.get("run", "?") for r in method_rows}),
        "devices": sorted({r.get("device", "?") for r in method_rows}),
        "windows": sum(r.get("windows") or 0 for r in method_rows),
    }
    if sc["positions"]:
        row |= {
            "honest_ratio": round(by["chunk_raw"] / by["chunk_stored"], 3)
            if by["chunk_stored"]
            else None,
            "context_ratio": round(by["ctx_raw"] / by["ctx_stored"], 3)
            if by["ctx_stored"]
            else None,
            "kl": round(sc["kl_sum"] / n, 5),
            "top1_agreement": round(sc["agree"] / n, 4),
            "ppl_change_pct": round(
                100 * (math.exp((sc["nll_got_sum"] - sc["nll_ref_sum"]) / n) - 1), 3
            ),
            "greedy_agreement": round(gr["same"] / gr["total"], 4) if gr["total"] else None,
            "greedy_prefix_mean": (
                round(gr["prefix_sum"] / gr["total"], 2) if gr["total"] else None
            ),
            "scores": sc,
            "bytes": by,
            "greedy": gr,
        }
    correct = exact_correct = total = 0
    groups = []
    for r in method_rows:
        ex = _group_counts(exact.get(r["genre"], {}))
        for g, c in _group_counts(r).items():
            if len(c) == 3:
                ok, ex_ok, t = c
            elif g in ex:
                (ok, t), ex_ok = c, ex[g][0]
            else:
                continue
            correct, exact_correct, total = correct + ok, exact_correct + ex_ok, total + t
            groups.append(f"{r['genre']}:{g}")
    if total:
        row |= {
            "retrieval_accuracy": round(correct / total, 4),
            "retrieval_exact_accuracy": round(exact_correct / total, 4),
            "retrieval_delta_pts": round(100 * (correct - exact_correct) / total, 2),
            "retrieval_prompts": total,
            "retrieval_groups": groups,
        }
    return row


def _worst_row(method_rows: list[dict], name: str) -> dict:
    """Each measure's worst value over a method's genre rows, and which genre gave it."""
    row = {**_derived_head(method_rows[0], name, method_rows), "worst_genre": {}}
    for f, higher_worse in WORST_FIELDS.items():
        have = [(r[f], r["genre"]) for r in method_rows if r.get(f) is not None]
        if have:
            v, g = (max if higher_worse else min)(have, key=lambda x: x[0])
            row[f] = v
            row["worst_genre"][f] = g
    return row


def derive(doc: dict) -> dict:
    """``doc`` with its derived rows rebuilt: per method and target ratio, the pooled and
    worst-genre rows of each of :data:`POOLS` over the genre rows present (their member
    genres measured are listed in ``genres``), and a pooled ``exact`` row whose
    ``retrieval`` names each group ``genre:task@length``. Genre rows gain ``rate_error``
    (``|honest / target - 1|``) where they have a target."""
    base = [r for r in doc["rows"] if not r.get("derived")]
    for r in base:
        if r.get("target_ratio") and r.get("honest_ratio"):
            r["rate_error"] = round(abs(r["honest_ratio"] / r["target_ratio"] - 1), 4)
    derived = []
    for pool, (members, worst_name) in POOLS.items():
        mine = [r for r in base if r.get("genre") in members]
        exact = {r["genre"]: r for r in mine if r["method"] == "exact"}
        by_method: dict[tuple, list[dict]] = {}
        for r in mine:
            if r["method"] != "exact":
                by_method.setdefault(row_key(r)[:2], []).append(r)
        for rs in by_method.values():
            rs.sort(key=_sort_key)
            derived += [_pooled_row(rs, exact, pool), _worst_row(rs, worst_name)]
        if exact:
            ex = sorted(exact.values(), key=_sort_key)
            qual = [f"{r['genre']}:{g}" for r in ex for g in r.get("retrieval_groups", [])]
            counts = [
                r["retrieval_counts"][g]
                for r in ex
                for g in r.get("retrieval_groups", [])
                if g in r.get("retrieval_counts", {})
            ]
            total = sum(t for _, t in counts)
            derived.append(
                {
                    **_derived_head(ex[0], pool, ex),
                    "retrieval": {
                        f"{r['genre']}:{g}": a
                        for r in ex
                        for g, a in r.get("retrieval", {}).items()
                    },
                    "retrieval_groups": qual,
                    "retrieval_accuracy": round(sum(c for c, _ in counts) / total, 4)
                    if total
                    else None,
                }
            )
    return {"rows": sorted(base + derived, key=_sort_key), "runs": doc["runs"]}
