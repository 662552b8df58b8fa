"""``benchmarks/results/rate_distortion.md`` from the rows of ``quality.json``.

The experiment log at the end of the file (after :data:`LOG_MARKER`) belongs to whoever
tunes the codec: regenerating the report keeps it as it is.
"""

from __future__ import annotations

from pathlib import Path

from .plots import PLOTS
from .targets import check

LOG_MARKER = "<!-- experiment log: kept when this file is regenerated -->"
LOG_PLACEHOLDER = """## Experiment log

One row per experiment (setting -> honest ratio, quality), newest first; see
[experiments.md](experiments.md) for the earlier log of the first codec.

| date | setting changed | target | honest chunk ratio | mean KL | ppl change | top-1 | kept? |
|---|---|---|---|---|---|---|---|
"""

SUITE = """\
- (a) continuation quality: {windows} windows of 1,536 context + 256 continuation tokens,
  half from Python's reference docs, half from Shakespeare's tragedies (calibration used
  the comedies and histories, with NumPy's docstrings by default since 2026-11-30); mean KL of next-token distributions against the exact run,
  top-1 agreement, perplexity change.
- (b) retrieval, RULER-style (passkey; multi-key with 3 needles), haystacks of the same
  held-out texts, the answer's needle at depths 10-90%; {samples} prompts per task and
  length; the stored part of a prompt of nominal length N is N - 256 tokens and each
  method round-trips it, the question is prefilled on top. Methods run only on the
  (task, length) groups where the uncompressed model scores >= {min_acc:.0%}.
- (c) greedy agreement: from each window's decoded context, fed its first continuation
  token, {greedy} greedy tokens; the share identical to the exact run's.
- Exact KV (float32, as the model computes it) is computed once per window and haystack and
  is the reference; every method round-trips it as 256-token chunks (compress -> stored
  bytes -> decompress). Honest ratio = bf16 bytes / every stored byte (headers, scales,
  exact tokens), over the middle chunks (no sink, no token of the last 128); the
  whole-context ratio counts every chunk of a 1,536-token context."""


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _retrieval_table(exact: dict | None) -> list[str]:
    if not exact or not exact.get("retrieval"):
        return ["Retrieval was not measured in the run that wrote these rows.", ""]
    groups = exact["retrieval"]
    tasks = sorted({g.split("@")[0] for g in groups})
    lengths = sorted({int(g.split("@")[1]) for g in groups})
    qual = set(exact.get("retrieval_groups", []))
    lines = [
        "Uncompressed model (exact KV); a cell marked * reaches the threshold and is used:",
        "",
        "| task | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for t in tasks:
        cells = []
        for n in lengths:
            a = groups.get(f"{t}@{n}")
            cells.append(
                "-" if a is None else f"{100 * a:.1f}%" + (" *" if f"{t}@{n}" in qual else "")
            )
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    used = ", ".join(sorted(qual)) or "none: no retrieval delta is reported"
    lines += ["", f"Qualifying (task@length): {used}.", ""]
    return lines


def render(doc: dict, skipped: list[str] | None = None, old_text: str = "") -> str:
    """The Markdown report of ``doc`` (``quality.json``'s content).

    Args:
        skipped: messages for methods this run could not measure (default: the latest
            run's, from its metadata).
        old_text: the report being replaced (its experiment log is kept).
    """
    rows, runs = doc["rows"], doc["runs"]
    exact = next((r for r in rows if r.get("method") == "exact"), None)
    latest = max(runs.values(), key=lambda m: m.get("date", ""), default={})
    if skipped is None:
        skipped = latest.get("skipped", [])
    lines = [
        "# Rate-distortion on SmolLM2-135M-Instruct (issue 3)",
        "",
        "Produced by `benchmarks/rate_distortion.py` (`make bench-rd`); the JSON twin is",
        "[quality.json](quality.json). Rows merge across runs keyed by (method, target",
        "ratio); each row names the run and device it came from.",
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
    lines += ["", "## Suite", ""]
    if "windows" in latest and latest.get("retrieval_samples") is None:
        lines.append(
            f"- the latest run measured continuation quality only ({latest['windows']} "
            "windows of 1,536 context + 256 continuation tokens of held-out text; the first "
            "quality benchmark, before this suite): no retrieval, no greedy agreement."
        )
    elif "windows" in latest:
        lines.append(
            SUITE.format(
                windows=latest.get("windows"),
                samples=latest.get("retrieval_samples"),
                min_acc=latest.get("retrieval_min_accuracy", 0.8),
                greedy=latest.get("greedy_tokens"),
            )
        )
    lines += ["", "## Retrieval: which lengths qualify", ""] + _retrieval_table(exact)
    lines += [
        "## Results",
        "",
        (
            "| method | target | honest chunk ratio | whole-context ratio | ppl change | mean KL "
            "| top-1 | retrieval | Δ retrieval (pts) | greedy agreement | greedy prefix | run |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("method") == "exact":
            continue
        ret = r.get("retrieval_accuracy")
        lines.append(
            f"| {r['method']} | {_f(r.get('target_ratio'), 'g')} "
            f"| {_f(r.get('honest_ratio'), '.2f')} | {_f(r.get('context_ratio'), '.2f')} "
            f"| {_f(r.get('ppl_change_pct'), '+.2f')}% | {_f(r.get('kl'), '.4f')} "
            f"| {_f(r.get('top1_agreement'), '.3f')} "
            f"| {'-' if ret is None else f'{100 * ret:.1f}%'} "
            f"| {_f(r.get('retrieval_delta_pts'), '+.1f')} "
            f"| {_f(r.get('greedy_agreement'), '.3f')} | {_f(r.get('greedy_prefix_mean'), '.1f')} "
            f"| {r.get('run', '?')} |"
        )
    pooled = [r for r in rows if r.get("retrieval_pooled")]
    if pooled:
        lines += [
            "",
            (
                "Retrieval pooled over more prompts (`--pool-retrieval`: the row's own "
                "prompts and retrieval runs over further prompts; groups where the "
                "uncompressed model scores >= 80% over all of them):"
            ),
            "",
            "| method | target | prompts | groups | accuracy | uncompressed | Δ (pts) | runs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in pooled:
            p = r["retrieval_pooled"]
            lines.append(
                f"| {r['method']} | {_f(r.get('target_ratio'), 'g')} | {p['prompts']} "
                f"| {', '.join(p['groups'])} | {_f(p['accuracy'] and 100 * p['accuracy'], '.2f')}% "
                f"| {_f(p['exact_accuracy'] and 100 * p['exact_accuracy'], '.2f')}% "
                f"| {_f(p['delta_pts'], '+.2f')} | {len(p['parts'])} |"
            )
    lines += ["", "## Targets (issue 3)", ""]
    lines += [f"- {t.line()}" for t in check(rows)]
    if skipped:
        lines += ["", "## Not measured in the latest run", ""] + [f"- {s}" for s in skipped]
    lines += ["", "## Plots", ""]
    for name, (field, label, _) in PLOTS.items():
        if any(r.get(field) is not None for r in rows if r.get("method") != "exact"):
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
