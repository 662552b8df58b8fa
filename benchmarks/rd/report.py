"""``benchmarks/results/rate_distortion.md`` from the rows of ``quality.json``.

The experiment log at the end of the file (after :data:`LOG_MARKER`) belongs to whoever
tunes the codec: regenerating the report keeps it as it is.
"""

from __future__ import annotations

from pathlib import Path

from .genres import GENRES
from .plots import PLOTS, plot_rows
from .rows import LEGACY_GENRE
from .targets import check
from .validation import VALIDATION_GENRES

LOG_MARKER = "<!-- experiment log: kept when this file is regenerated -->"
LOG_PLACEHOLDER = """## Experiment log

One row per experiment (setting -> honest ratio, quality), newest first; see
[experiments.md](experiments.md) for the earlier log of the first codec.

| date | setting changed | target | honest chunk ratio | mean KL | ppl change | top-1 | kept? |
|---|---|---|---|---|---|---|---|
"""

SUITE = """\
- Genres (issue 17, `benchmarks/rd/genres.py`; fetched by `make corpora` from pinned
  packages, never read by calibration): {genres}.
- (a) continuation quality: {windows} windows per genre of 1,536 context + 256
  continuation tokens, evenly spaced through each genre's text; mean KL of next-token
  distributions against the exact run, top-1 agreement, perplexity change.
- (b) retrieval, RULER-style (passkey; multi-key with 3 needles), haystacks of the
  genres {retrieval_genres}, the answer's needle at depths 10-90%; {samples} prompts per
  genre, task and length; the stored part of a prompt of nominal length N is N - 256 tokens
  and each method round-trips it, the question is prefilled on top. Methods run only on
  the (genre, task, length) groups where the uncompressed model scores >= {min_acc:.0%}.
- (c) greedy agreement: from each window's decoded context, fed its first continuation
  token, {greedy} greedy tokens; the share identical to the exact run's.
- Exact KV (float32, as the model computes it) is computed once per window and haystack and
  is the reference; every method round-trips it as 256-token chunks (compress -> stored
  bytes -> decompress). Honest chunk ratio = bf16 bytes / every stored byte (headers,
  scales), over the middle chunks (no sink, no token of the last 128); the whole-context
  ratio counts every stored byte of a 1,536-token context, exact sinks and last 128 tokens
  included.
- Pooled rows (`all`) add the genres' sums; the worst-genre rows take each measure's worst
  genre (named beside it). The targets gate on the worst genre."""

SUITE_V1 = """\
Rows of the earlier suite (genre `suite-v1`, before issue 17): continuation windows half
from Python's reference docs, half from Shakespeare's tragedies, retrieval haystacks of the
same texts. They are not pooled with the genres and no target reads them."""


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _retrieval_table(exacts: list[dict]) -> list[str]:
    """Uncompressed accuracy per (genre, task) and length; qualifying cells marked."""
    exacts = [e for e in exacts if e.get("retrieval")]
    if not exacts:
        return ["Retrieval was not measured in the runs that wrote these rows.", ""]
    lengths = sorted({int(g.split("@")[1]) for e in exacts for g in e["retrieval"]})
    lines = [
        "Uncompressed model (exact KV); a cell marked * reaches the threshold and is used:",
        "",
        "| genre | task | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for e in exacts:
        groups, qual = e["retrieval"], set(e.get("retrieval_groups", []))
        for t in sorted({g.split("@")[0] for g in groups}):
            cells = []
            for n in lengths:
                a, g = groups.get(f"{t}@{n}"), f"{t}@{n}"
                cells.append("-" if a is None else f"{100 * a:.1f}%" + (" *" if g in qual else ""))
            lines.append(f"| {e.get('genre', '?')} | {t} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _quality_cells(r: dict) -> str:
    ret = r.get("retrieval_accuracy")
    return (
        f"| {_f(r.get('honest_ratio'), '.2f')} | {_f(r.get('context_ratio'), '.2f')} "
        f"| {_f(r.get('ppl_change_pct'), '+.2f')}% | {_f(r.get('kl'), '.4f')} "
        f"| {_f(r.get('top1_agreement'), '.3f')} | {_pct(ret)} "
        f"| {_f(r.get('retrieval_delta_pts'), '+.1f')} "
    )


QUALITY_HEAD = (
    "honest chunk ratio | whole-context ratio | ppl change | mean KL | top-1 | retrieval "
    "| Δ retrieval (pts)"
)


def _results_table(rows: list[dict], with_genre: bool) -> list[str]:
    g_head, g_rule = ("genre | ", "---|") if with_genre else ("", "")
    lines = [
        f"| method | target | {g_head}{QUALITY_HEAD} | greedy agreement | greedy prefix | run |",
        f"|---|---|{g_rule}" + "---|" * 10,
    ]
    for r in rows:
        g = f"| {r.get('genre')} " if with_genre else ""
        lines.append(
            f"| {r['method']} | {_f(r.get('target_ratio'), 'g')} {g}{_quality_cells(r)}"
            f"| {_f(r.get('greedy_agreement'), '.3f')} | {_f(r.get('greedy_prefix_mean'), '.1f')} "
            f"| {r.get('run', '?')} |"
        )
    return lines + [""]


def _worst_cell(r: dict, f: str, fmt: str, suffix: str = "") -> str:
    """A worst-genre row's value of ``f`` and, in brackets, the genre that gave it."""
    if r.get(f) is None:
        return "-"
    return f"{format(r[f], fmt)}{suffix} ({r.get('worst_genre', {}).get(f)})"


def _worst_table(rows: list[dict]) -> list[str]:
    lines = [
        (
            "Each measure's worst genre over the genres measured (in brackets); rate error "
            "is |honest / target - 1|."
        ),
        "",
        (
            "| method | target | honest chunk ratio | whole-context ratio | ppl change "
            "| mean KL | top-1 | Δ retrieval (pts) | rate error | genres |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_f(r.get('target_ratio'), 'g')} "
            f"| {_worst_cell(r, 'honest_ratio', '.2f')} | {_worst_cell(r, 'context_ratio', '.2f')} "
            f"| {_worst_cell(r, 'ppl_change_pct', '+.2f', '%')} | {_worst_cell(r, 'kl', '.4f')} "
            f"| {_worst_cell(r, 'top1_agreement', '.3f')} "
            f"| {_worst_cell(r, 'retrieval_delta_pts', '+.1f')} "
            f"| {_worst_cell(r, 'rate_error', '.1%')} | {len(r.get('genres', []))} |"
        )
    return lines + [""]


def _pooled_retrieval_table(rows: list[dict]) -> list[str]:
    pooled = [r for r in rows if r.get("retrieval_pooled")]
    if not pooled:
        return []
    lines = [
        (
            "Retrieval pooled over more prompts (`--pool-retrieval`: the row's own "
            "prompts and retrieval runs over further prompts; groups where the "
            "uncompressed model scores >= 80% over all of them):"
        ),
        "",
        "| method | target | genre | prompts | groups | accuracy | uncompressed | Δ (pts) | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pooled:
        p = r["retrieval_pooled"]
        lines.append(
            f"| {r['method']} | {_f(r.get('target_ratio'), 'g')} | {r.get('genre')} "
            f"| {p['prompts']} | {', '.join(p['groups'])} "
            f"| {_f(p['accuracy'] and 100 * p['accuracy'], '.2f')}% "
            f"| {_f(p['exact_accuracy'] and 100 * p['exact_accuracy'], '.2f')}% "
            f"| {_f(p['delta_pts'], '+.2f')} | {len(p['parts'])} |"
        )
    return lines + [""]


def _suite_text(latest: dict) -> list[str]:
    if "windows" not in latest:
        return []
    if latest.get("genres") is None:
        return ["The latest run is of the earlier suite (`suite-v1`, below).", ""]
    return [
        SUITE.format(
            genres=", ".join(latest["genres"]),
            windows=latest.get("windows_per_genre"),
            retrieval_genres=", ".join(latest.get("retrieval_genres") or []) or "(none)",
            samples=latest.get("retrieval_samples"),
            min_acc=latest.get("retrieval_min_accuracy", 0.8),
            greedy=latest.get("greedy_tokens"),
        ),
        "",
    ]


def render(doc: dict, skipped: list[str] | None = None, old_text: str = "") -> str:
    """The Markdown report of ``doc`` (``quality.json``'s content, derived rows included:
    :func:`.rows.derive`).

    Args:
        skipped: messages for methods this run could not measure (default: the latest
            run's, from its metadata).
        old_text: the report being replaced (its experiment log is kept).
    """
    rows, runs = doc["rows"], doc["runs"]
    latest = max(runs.values(), key=lambda m: m.get("date", ""), default={})
    if skipped is None:
        skipped = latest.get("skipped", [])

    def pick(genres, method=None, derived=None):
        return [
            r
            for r in rows
            if r.get("genre") in genres
            and (method is None or (r.get("method") == "exact") == (method == "exact"))
            and (derived is None or bool(r.get("derived")) == derived)
        ]

    lines = [
        "# Rate-distortion on SmolLM2-135M-Instruct (issues 3 and 17)",
        "",
        "Produced by `benchmarks/rate_distortion.py` (`make bench-rd`); the JSON twin is",
        "[quality.json](quality.json). Rows merge across runs keyed by (method, target",
        "ratio, genre); each row names the run and device it came from.",
        "",
        "## Runs",
        "",
        "| run | device | model dtype | date | seconds | command |",
        "|---|---|---|---|---|---|",
    ]
    for rid, m in sorted(runs.items(), key=lambda kv: kv[1].get("date", "")):
        lines.append(
            f"| {rid} | {m.get('device') or m.get('machine', '?')} | {m.get('model_dtype', '?')} "
            f"| {m.get('date', '?')} | {m.get('seconds', '?')} | `{m.get('command', '?')}` |"
        )
    lines += ["", "## Suite", ""] + _suite_text(latest)
    for title, members, pool, worst in (
        ("Evaluation genres", GENRES, "all", "worst"),
        ("Validation texts (calibration's held-out parts)", VALIDATION_GENRES, "validation-all",
         "validation-worst"),
    ):  # fmt: skip
        per_genre = pick(members, "method", derived=False)
        if not per_genre:
            continue
        lines += [f"## {title}", "", "### Retrieval: which lengths qualify", ""]
        lines += _retrieval_table(pick(members, "exact", derived=False))
        lines += [f"### Pooled over the genres measured (`{pool}`)", ""]
        lines += _results_table(pick([pool], "method"), with_genre=False)
        lines += [f"### Worst genre (`{worst}`)", ""] + _worst_table(pick([worst], "method"))
        lines += ["### Per genre", ""] + _results_table(per_genre, with_genre=True)
        lines += _pooled_retrieval_table(per_genre)
    lines += ["## Targets (issue 17, worst genre)", ""]
    lines += [f"- {t.line()}" for t in check(rows)]
    legacy = pick([LEGACY_GENRE], "method")
    if legacy:
        lines += ["", "## Earlier suite (`suite-v1`)", "", SUITE_V1, ""]
        lines += _retrieval_table(pick([LEGACY_GENRE], "exact"))
        lines += _results_table(legacy, with_genre=False) + _pooled_retrieval_table(legacy)
    if skipped:
        lines += ["", "## Not measured in the latest run", ""] + [f"- {s}" for s in skipped]
    lines += ["", "## Plots", "", "Pooled rows (`all`; `suite-v1` rows when there are none).", ""]
    for name, (field, label, _) in PLOTS.items():
        if any(r.get(field) is not None for r in plot_rows(rows) if r.get("method") != "exact"):
            lines.append(f"![{label} vs honest ratio]({name})")
    lines += ["", LOG_MARKER, ""]
    log = (
        old_text.split(LOG_MARKER, 1)[1].lstrip("\n") if LOG_MARKER in old_text else LOG_PLACEHOLDER
    )
    return "\n".join(lines) + log


def write(doc: dict, path: Path, skipped: list[str] | None = None) -> str:
    """Render and write the report at ``path`` (keeping its experiment log); returns it."""
    old = path.read_text() if path.is_file() else ""
    text = render(doc, skipped, old)
    path.write_text(text)
    return text
