"""PNG plots of quality against honest ratio, one line or point per method.

matplotlib is imported here only (the ``bench`` extra), so a run on a machine without it
still writes the JSON and the Markdown; ``--plot-only`` draws the plots later.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PLOTS = {
    "rd_ppl.png": ("ppl_change_pct", "perplexity change (%)", False),
    "rd_kl.png": ("kl", "mean KL divergence (nats)", True),
    "rd_retrieval.png": ("retrieval_accuracy", "retrieval accuracy (%)", False),
}


def plot_rows(rows: list[dict]) -> list[dict]:
    """The rows a plot draws: the pooled genre rows (``all``), or the earlier suite's
    (``suite-v1``) when there are none (one point per method and ratio, never mixed)."""
    pooled = [r for r in rows if r.get("genre") == "all"]
    return pooled or [r for r in rows if r.get("genre", "suite-v1") == "suite-v1"]


def _series(rows: list[dict], field: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in plot_rows(rows):
        x, y = r.get("honest_ratio"), r.get(field)
        if r.get("method") == "exact" or x is None or y is None:
            continue
        if field == "retrieval_accuracy":
            y = 100 * y
        out.setdefault(r["method"], []).append((x, y))
    return {m: sorted(p) for m, p in out.items()}


def draw(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write :data:`PLOTS` under ``out_dir``; returns the paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no plots (install the `bench` extra)")
        return []
    exact = next((r for r in plot_rows(rows) if r.get("method") == "exact"), None)
    written = []
    for name, (field, label, log_y) in PLOTS.items():
        series = _series(rows, field)
        if not series:
            (out_dir / name).unlink(missing_ok=True)  # no stale plot of rows now gone
            continue
        fig, ax = plt.subplots(figsize=(10, 5))
        colors = plt.get_cmap("tab20").colors
        for i, (method, pts) in enumerate(series.items()):
            xs, ys = zip(*pts)
            ours = method == "kvtc"
            # one colour per method; eviction baselines dashed, ours thick and on top
            line = "--" if method.startswith("kvpress") else "-"
            ax.plot(
                xs,
                ys,
                ("o" + line) if len(pts) > 1 else "s",
                label=method,
                markersize=5 if ours else 4,
                lw=2.5 if ours else 1.2,
                color="k" if ours else colors[i % len(colors)],
                zorder=3 if ours else 2,
            )
        if field == "retrieval_accuracy" and exact and exact.get("retrieval_accuracy") is not None:
            ax.axhline(
                100 * exact["retrieval_accuracy"], color="k", ls="--", lw=1, label="uncompressed"
            )
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("honest compression ratio (bf16 bytes / stored bytes, middle chunks)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.set_title(f"SmolLM2-135M-Instruct: {label} vs honest ratio")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
