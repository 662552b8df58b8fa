"""The targets of issue 17, checked on the genre rows of ``quality.json``.

They gate on the **worst genre**: a quality target holds only when it holds on every
evaluation genre (:data:`.genres.GENRES`), so a target whose method row lacks a genre is
"not measured" (its detail still gives the value over the genres that were). KL is the
primary gate (perplexity alone is too noisy below ~1%). "Ours" is the ``kvtc`` rows.

- worst genre at target 16: honest chunk ratio >= 15, KL <= 0.010, perplexity change <= 1%;
- worst genre at target 24: honest chunk ratio >= 22, KL <= 0.015;
- every genre: lower KL than int4-g64 at >= 3x its ratio, and than fp8 at >= 5x its ratio;
- retrieval within 1 point of uncompressed at target 16, pooled over the genres and lengths
  where the uncompressed model scores >= 80% (the ``all`` row);
- rate control: |honest / target - 1| <= 5% on every genre, at every target measured.

The demo's whole-context target is measured by ``kvtc-store demo``, not here. Rows of the
earlier two-text suite (genre ``suite-v1``) are not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .genres import GENRES

RATE_TOLERANCE = 0.05
WORST_TARGETS = (  # (target ratio, honest >=, KL <=, ppl change <= or None)
    (16, 15.0, 0.010, 1.0),
    (24, 22.0, 0.015, None),
)
BEAT = (("int4-g64", 3), ("fp8", 5))  # lower KL than baseline at >= k x its ratio


@dataclass
class Target:
    """One target: ``met`` is True, False, or None when the rows cannot tell."""

    text: str
    met: bool | None
    detail: str

    def line(self) -> str:
        mark = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[self.met]
        return f"[{mark}] {self.text}: {self.detail}"


def _genre_rows(rows: list[dict], method: str, ratio: float | None = None) -> dict[str, dict]:
    """``{genre: row}`` of one method (and target ratio) over the evaluation genres."""
    return {
        r["genre"]: r
        for r in rows
        if r.get("method") == method
        and r.get("genre") in GENRES
        and not r.get("derived")
        and (ratio is None or r.get("target_ratio") == ratio)
    }


def _missing(have: dict[str, dict]) -> str:
    lost = [g for g in GENRES if g not in have]
    return f"; not measured on {', '.join(lost)}" if lost else ""


def _worst_target(rows, ratio, min_honest, max_kl, max_ppl) -> Target:
    bounds = [("honest_ratio", min_honest, False, "honest", ".2f", "x")]
    bounds += [("kl", max_kl, True, "KL", ".4f", "")]
    if max_ppl is not None:
        bounds += [("ppl_change_pct", max_ppl, True, "ppl", "+.2f", "%")]
    text = f"worst genre at target {ratio}: " + ", ".join(
        f"{label} {'<=' if high else '>='} {bound:g}{'%' if unit == '%' else ''}"
        for _, bound, high, label, _, unit in bounds
    )
    have = _genre_rows(rows, "kvtc", ratio)
    if not have:
        return Target(text, None, f"no kvtc {ratio} rows")
    ok, parts, lost = True, [], []
    for f, bound, high, label, fmt, unit in bounds:
        vals = [(r[f], g) for g, r in have.items() if r.get(f) is not None]
        lost += [f"{label} on {g}" for g, r in have.items() if r.get(f) is None]
        if not vals:
            ok = False
            continue
        v, g = (max if high else min)(vals, key=lambda x: x[0])
        ok = ok and (v <= bound if high else v >= bound)
        parts.append(f"worst {label} {format(v, fmt)}{unit} ({g})")
        if f == "honest_ratio":
            parts[-1] += f", whole-context {have[g].get('context_ratio')}x"
    missing = _missing(have) + (f"; no {', '.join(lost)}" if lost else "")
    return Target(text, None if missing else ok, "; ".join(parts) + missing)


def _beat_target(rows, baseline: str, factor: int) -> Target:
    text = f"every genre: lower KL than {baseline} at >= {factor}x its ratio"
    base = _genre_rows(rows, baseline)
    ours = [r for r in rows if r.get("method") == "kvtc" and r.get("genre") in GENRES]
    if not base or not ours:
        return Target(text, None, f"needs {baseline} and kvtc rows")
    fails, notes = [], []
    for g, b in base.items():
        need = factor * b["honest_ratio"]
        far = [
            r
            for r in ours
            if r["genre"] == g and (r.get("honest_ratio") or 0) >= need and r.get("kl") is not None
        ]
        good = [r for r in far if r["kl"] < b["kl"]]
        if good:
            best = max(good, key=lambda r: r["honest_ratio"])
            notes.append(f"{g}: kvtc {best['target_ratio']:g} {best['honest_ratio']:.1f}x KL "
                         f"{best['kl']:.4f} < {b['kl']:.4f}")  # fmt: skip
        else:
            closest = min(far, key=lambda r: r["kl"]) if far else None
            fails.append(
                f"{g}: needs >= {need:.1f}x at KL < {b['kl']:.4f}, "
                + (
                    f"closest kvtc {closest['target_ratio']:g} KL {closest['kl']:.4f}"
                    if closest
                    else "no kvtc row that far"
                )
            )
    missing = _missing(base)
    detail = "; ".join(fails or notes) + missing
    return Target(text, False if fails else (None if missing else True), detail)


def _retrieval_target(rows) -> Target:
    text = (
        "retrieval within 1 point of uncompressed at target 16, pooled over genres and "
        "lengths where uncompressed >= 80%"
    )
    r = next(
        (
            r
            for r in rows
            if r.get("method") == "kvtc" and r.get("target_ratio") == 16 and r.get("genre") == "all"
        ),
        None,
    )
    if r is None or r.get("retrieval_delta_pts") is None:
        return Target(text, None, "no retrieval of kvtc 16 on the genres")
    d = r["retrieval_delta_pts"]
    genres = sorted({g.split(":")[0] for g in r["retrieval_groups"]})
    detail = (
        f"{d:+.2f} points over {r['retrieval_prompts']} prompts ({len(r['retrieval_groups'])} "
        f"groups of {', '.join(genres)}; {100 * r['retrieval_accuracy']:.2f}% against "
        f"{100 * r['retrieval_exact_accuracy']:.2f}%)"
    )
    return Target(text, d >= -1.0, detail)


def _rate_target(rows) -> Target:
    text = f"rate control: |honest/target - 1| <= {100 * RATE_TOLERANCE:g}% on every genre"
    ours = [
        r
        for r in rows
        if r.get("method") == "kvtc"
        and r.get("genre") in GENRES
        and not r.get("derived")
        and r.get("target_ratio")
        and r.get("honest_ratio")
    ]
    if not ours:
        return Target(text, None, "no kvtc rows")
    err = {id(r): abs(r["honest_ratio"] / r["target_ratio"] - 1) for r in ours}
    worst = max(ours, key=lambda r: err[id(r)])
    bad = sorted({f"{r['target_ratio']:g}" for r in ours if err[id(r)] > RATE_TOLERANCE})
    detail = (
        f"worst: target {worst['target_ratio']:g} on {worst['genre']} at "
        f"{worst['honest_ratio']:.2f}x ({100 * (worst['honest_ratio'] / worst['target_ratio'] - 1):+.1f}%)"
        + (f"; off at targets {', '.join(bad)}" if bad else "")
    )
    missing = _missing({r["genre"]: r for r in ours})
    return Target(text, False if bad else (None if missing else True), detail + missing)


def check(rows: list[dict]) -> list[Target]:
    """Every issue-17 target against ``rows`` (``quality.json``'s, derived rows included)."""
    out = [_worst_target(rows, *t) for t in WORST_TARGETS]
    out += [_beat_target(rows, b, k) for b, k in BEAT]
    out += [_retrieval_target(rows), _rate_target(rows)]
    return out
