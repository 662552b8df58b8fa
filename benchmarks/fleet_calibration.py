"""Fleet calibration against single-process calibration (issue 19): wall time of
``kvtc-store calibrate``'s path (:func:`kvtc_store.calibration.calibrate`) and of
:func:`kvtc_store.ray_jobs.calibrate.calibrate_fleet` with 1 and 2 workers on the same
windows, and whether the artifacts agree (same bit plan, bases within 1e-4).

Each run starts from an empty cache home (nothing reused); each fleet run starts its own
local Ray (its start-up is in the time: that is the overhead a user pays). Results go to
``benchmarks/results/fleet_calibration.{md,json}`` (``--out``)::

    .venv/bin/python benchmarks/fleet_calibration.py --windows 8 --workers 1 2

The GPU half (``--gpu-8b``, :mod:`fleet_gpu`): the Llama-3.1-8B architecture with random
weights in bf16, 256k tokens of real text, ratios 8/16/24, stage by stage, through the
Ray job on a local Ray (``--mode ray``; ``auto`` falls back to the same functions in one
process where Ray is not installed, and says so); ``--workers 2 --gpus-per-worker 0.5``
is issue 23's one-GPU path (two actors sharing the GPU); ``--check-eigh-f64`` compares
float32 and float64 eigendecompositions on one group covariance of the 8B shape. Results
go to ``<out>.{json,md}`` (default ``benchmarks/results/fleet_calibration_gpu``; keys
``gpu_8b_total_s``, ``gpu_8b_stages``, ``mode``, ``device``, ``date``). The lent GPU's calls
are in ``benchmarks/gpu_fleet.sh``; a CPU dry run of the same code on a tiny shape::

    python benchmarks/fleet_calibration.py --build-model /tmp/tiny-llama --tiny
    python benchmarks/fleet_calibration.py --make-ids /tmp/ids.npy --ids-tokens 20000
    python benchmarks/fleet_calibration.py --gpu-8b --model-dir /tmp/tiny-llama \
        --data /tmp/ids.npy --tokens 8192 --window-tokens 1024 --out /tmp/dry
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
    p.add_argument("--out", default=None, help="results prefix (<out>.json, <out>.md)")
    gpu = p.add_argument_group("GPU mode (fleet_gpu.py)")
    gpu.add_argument("--gpu-8b", action="store_true", help="the 8B shape's run (see above)")
    gpu.add_argument("--build-model", default=None, metavar="DIR", help="write the model")
    gpu.add_argument("--tiny", action="store_true", help="with --build-model: 2 layers")
    gpu.add_argument("--make-ids", default=None, metavar="NPY", help="tokenize real text")
    gpu.add_argument("--ids-tokens", type=int, default=300_000)
    gpu.add_argument("--model-dir", default="/tmp/llama31-8b-random")
    gpu.add_argument("--data", default=None, help="token ids (.npy)")
    gpu.add_argument("--tokens", type=int, default=262_144, help="calibration tokens")
    gpu.add_argument("--ratios", type=float, nargs="+", default=[8.0, 16.0, 24.0])
    gpu.add_argument("--mode", choices=["auto", "ray", "inprocess"], default="auto")
    gpu.add_argument("--gpus-per-worker", type=float, default=None)
    gpu.add_argument("--layers-per-group", type=int, default=None)
    gpu.add_argument("--object-store-gb", type=float, default=20.0)
    gpu.add_argument("--check-eigh-f64", action="store_true", help="float32 vs float64 eigh")
    gpu.add_argument("--check-windows", type=int, default=16)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.build_model or args.make_ids or args.gpu_8b or args.check_eigh_f64:
        gpu_main(args)
        return
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "fleet_calibration")

    from kvtc_store.calibration import CalibrationSettings, calibrate
    from kvtc_store.model import load_model
    from kvtc_store.ray_jobs.calibrate import calibrate_fleet

    settings = CalibrationSettings(
        windows=args.windows, window_tokens=args.window_tokens, corpus=args.corpus
    )
    cuda = torch.cuda.is_available()  # the lent GPU: every run on it (module doc)
    where = "gpu" if cuda else "cpu"
    result: dict = {
        "command": "python benchmarks/fleet_calibration.py " + " ".join(sys.argv[1:]),
        "device": (
            f"GPU: {torch.cuda.get_device_name()}, {os.cpu_count()} cores"
            if cuda
            else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        ),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"windows": args.windows, "window_tokens": args.window_tokens},
        "gpu_8b_total_s": None,
        "gpu_8b_stages": None,
    }
    with tempfile.TemporaryDirectory() as home:
        os.environ["KVTC_STORE_HOME"] = home
        t0 = time.perf_counter()
        model, tok, info = load_model(args.model)
        if cuda:
            model = model.to("cuda")
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
            result[f"{where}_workers_{n}_s"] = round(time.perf_counter() - t0, 1)
            result[f"{where}_workers_{n}_stages"] = {
                k: round(getattr(report, k), 2)
                for k in ("connect_s", "ids_s", "collect_s", "merge_s", "fit_s", "total_s")
            }
            same = same and _same(single, arts[0])
    result["shards_equal_single"] = same
    if 1 in args.workers:
        result["ray_overhead_1_worker"] = round(
            result[f"{where}_workers_1_s"] / result["single_process_s"] - 1, 3
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Fleet calibration on this {where.upper()}",
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
        st = ", ".join(f"{k[:-2]} {v}" for k, v in result[f"{where}_workers_{n}_stages"].items())
        lines.append(f"| Ray, {n} worker(s) | {result[f'{where}_workers_{n}_s']} | {st} |")
    lines += ["", f"Artifacts equal to the single process's: {same}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def gpu_main(args) -> None:
    """The GPU mode (see the module doc): build, tokenize, calibrate or check."""
    import fleet_gpu as g

    if args.build_model:  # torch and transformers only (kvtc-store not installed yet)
        g.build_model(args.build_model, tiny=args.tiny)
    if args.make_ids:
        g.make_ids(args.make_ids, args.ids_tokens)
    if not (args.gpu_8b or args.check_eigh_f64):
        return
    from kvtc_store.calibration import CalibrationSettings

    settings = CalibrationSettings(
        windows=args.tokens // args.window_tokens,
        window_tokens=args.window_tokens,
        layers_per_group=args.layers_per_group,
    )
    out = Path(args.out or ROOT / "benchmarks" / "results" / "fleet_calibration_gpu")
    result: dict = {
        "command": "python benchmarks/fleet_calibration.py " + " ".join(sys.argv[1:]),
        "device": g.device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "settings": {
            "windows": settings.windows,
            "window_tokens": settings.window_tokens,
            "calibration_tokens": settings.windows * settings.window_tokens,
            "layers_per_group": settings.layers_per_group,
            "ratios": args.ratios,
        },
    }
    build = Path(args.model_dir) / "build.json"
    if build.is_file():
        result["model_build"] = json.loads(build.read_text())
    if args.check_eigh_f64:
        g.say("float32 against float64 eigh")
        result["eigh_check"] = g.check_eigh(args.model_dir, args.data, settings, args.check_windows)
    if args.gpu_8b:
        mode = args.mode
        if mode == "auto":
            try:
                import ray

                mode = "ray"
            except ImportError:
                mode = "inprocess"
        g.say(f"calibrating {settings.windows} windows of {args.window_tokens} ({mode})")
        if mode == "ray":
            import ray

            result["ray"] = ray.__version__
            try:
                arts, stages = g.run_fleet(
                    args.model_dir,
                    args.data,
                    settings,
                    args.ratios,
                    workers=args.workers[0],
                    gpus_per_worker=args.gpus_per_worker,
                    object_store_gb=args.object_store_gb,
                )
            except Exception as exc:  # Ray broken on this machine: say so, go on without
                if args.mode == "ray":
                    raise
                g.say(f"the Ray job failed ({exc!r}); the same functions in one process")
                result["ray_error"] = repr(exc)[:2000]
                mode = "inprocess"
        if mode == "inprocess":
            arts, stages = g.run_in_process(args.model_dir, args.data, settings, args.ratios)
        result["mode"] = {
            "ray": "calibrate_fleet, --address local",
            "inprocess": "collect/merge/fit in one process (no Ray)",
        }[mode]
        result["gpu_8b_total_s"] = stages["total_s"]
        result["gpu_8b_stages"] = stages
        result["artifacts"] = [
            {
                "ratio": r,
                "honest_ratio": round(a.quality.get("honest_ratio", 0.0), 2),
                "measured_nmse": round(a.quality.get("measured_nmse", 0.0), 5),
                "ranks": [int(b.shape[1]) for b in a.bases],
            }
            for r, a in zip(args.ratios, arts)
        ]
    _write_gpu(out, result)


def _write_gpu(out: Path, result: dict) -> None:
    """``<out>.json`` and a Markdown summary ``<out>.md``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Fleet calibration on the GPU: the Llama-3.1-8B shape",
        "",
        f"`{result['command']}` on {result['device']}, {result['date']}; torch {result['torch']}.",
        "",
    ]
    st = result.get("gpu_8b_stages")
    if st:
        lines += [
            f"Mode: {result['mode']}. End to end {result['gpu_8b_total_s']} s (target 300 s).",
            "",
            "| stage | seconds |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in st.items() if isinstance(v, (int, float))]
        for r, d in st.get("ratios", {}).items():
            lines.append(
                f"| ratio {r}: DP / held-out measurement | {d['plan_s']} / {d['measure_s']} |"
            )
        lines += ["", "| ratio | honest ratio | relative error | ranks |", "|---:|---:|---:|---|"]
        lines += [
            f"| {a['ratio']:g} | {a['honest_ratio']} | {a['measured_nmse']} | {a['ranks']} |"
            for a in result["artifacts"]
        ]
    if "eigh_check" in result:
        lines += ["", "float32 against float64 eigh (one group):", ""]
        lines += [f"- {k}: {v}" for k, v in result["eigh_check"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
