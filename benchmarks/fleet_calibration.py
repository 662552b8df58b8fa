"""Fleet calibration against single-process calibration (issue 19): wall time of
``kvtc-store calibrate``'s path (:func:`kvtc_store.calibration.calibrate`) and of
:func:`kvtc_store.ray_jobs.calibrate.calibrate_fleet` with 1 and 2 workers on the same
windows, and whether the artifacts agree (same bit plan, bases within 1e-4).

Each run starts from an empty cache home (nothing reused); each fleet run starts its own
local Ray (its start-up is in the time: that is the overhead a user pays). Results go to
``benchmarks/results/fleet_calibration.{md,json}`` (``--out``)::

    .venv/bin/python benchmarks/fleet_calibration.py --windows 8 --workers 1 2

The GPU half of the issue (the Llama-3.1-8B shape, ``gpu_8b_*``) belongs to issue 23's
run on the lent GPU; its keys are null here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _same(a, b, tol: float = 1e-4) -> bool:
    """Same bit plan and bases within ``tol`` relative."""
    if a.plan != b.plan:
        return False
    for x, y in zip(a.bases, b.bases):
        if x.shape != y.shape:
            return False
        if x.numel() and float((x - y).norm() / x.norm()) >= tol:
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="as kvtc-store calibrate (default SmolLM2)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-tokens", type=int, default=2048)
    p.add_argument("--corpus", default="shakespeare+numpy", help="no model sampling by default")
    p.add_argument("--ratio", type=float, default=16.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_calibration"))
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from kvtc_store.calibration import CalibrationSettings, calibrate
    from kvtc_store.model import load_model
    from kvtc_store.ray_jobs.calibrate import calibrate_fleet

    settings = CalibrationSettings(
        windows=args.windows, window_tokens=args.window_tokens, corpus=args.corpus
    )
    result: dict = {
        "command": "python benchmarks/fleet_calibration.py " + " ".join(sys.argv[1:]),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"windows": args.windows, "window_tokens": args.window_tokens},
        "gpu_8b_total_s": None,
        "gpu_8b_stages": None,
    }
    with tempfile.TemporaryDirectory() as home:
        os.environ["KVTC_STORE_HOME"] = home
        t0 = time.perf_counter()
        model, tok, info = load_model(args.model)
        single = calibrate(model, tok, info, [args.ratio], settings)[0]
        result["single_process_s"] = round(time.perf_counter() - t0, 1)
        del model
    same = True
    for n in args.workers:
        with tempfile.TemporaryDirectory() as home:
            os.environ["KVTC_STORE_HOME"] = home
            t0 = time.perf_counter()
            arts, report = calibrate_fleet(
                args.model, [args.ratio], settings, address="local", workers=n
            )
            result[f"cpu_workers_{n}_s"] = round(time.perf_counter() - t0, 1)
            result[f"cpu_workers_{n}_stages"] = {
                k: round(getattr(report, k), 2)
                for k in ("connect_s", "ids_s", "collect_s", "merge_s", "fit_s", "total_s")
            }
            same = same and _same(single, arts[0])
    result["shards_equal_single"] = same
    if 1 in args.workers:
        result["ray_overhead_1_worker"] = round(
            result["cpu_workers_1_s"] / result["single_process_s"] - 1, 3
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Fleet calibration on this CPU",
        "",
        (
            f"`{result['command']}` on {result['device']}, {result['date']}; torch "
            f"{torch.__version__}. Same windows for every run, empty cache home each."
        ),
        "",
        "| run | seconds | stages (s) |",
        "|---|---:|---|",
        f"| single process | {result['single_process_s']} | |",
    ]
    for n in args.workers:
        st = ", ".join(f"{k[:-2]} {v}" for k, v in result[f"cpu_workers_{n}_stages"].items())
        lines.append(f"| Ray, {n} worker(s) | {result[f'cpu_workers_{n}_s']} | {st} |")
    lines += ["", f"Artifacts equal to the single process's: {same}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
