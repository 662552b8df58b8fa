"""``kvtc-store fleet ...``: the Ray jobs' command line (registered by
:mod:`kvtc_store.cli`; Ray is imported only when a job runs).

::

    kvtc-store fleet calibrate --model PATH|HUB-ID|GGUF --address auto|local|ray://... \\
        --workers N --ratio 16 [--corpus C | --data PATH ...] [--out DIR] \\
        [--publish REGISTRY [--profile P [--force]]] [--report FILE]
    kvtc-store fleet reencode --from ID --to ID|current --tiers store.yaml [--workers N]
    kvtc-store fleet gc --tiers store.yaml ... [--ttl disk=7d s3=30d] [--apply]
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvtc_store import cli_args as base
from kvtc_store.texts import CORPORA


def add_parser(sub) -> None:
    """Add ``fleet`` and its jobs to the ``kvtc-store`` subparsers ``sub``."""
    f = sub.add_parser("fleet", help="fleet jobs on Ray: calibrate, reencode, gc (docs/fleet.md)")
    jobs = f.add_subparsers(dest="job", required=True)
    c = jobs.add_parser(
        "calibrate",
        help="calibrate codec artifacts on Ray workers, gate and publish them",
        description="Collect calibration statistics on N Ray workers (one model each), "
        "merge and fit on the driver; the artifacts equal single-process calibration's "
        "on the same windows.",
    )
    c.add_argument("--model", default=None, help="as `kvtc-store calibrate --model`")
    c.add_argument(
        "--address",
        default="local",
        help="Ray cluster: local (started here, stopped after), auto, host:port or "
        "ray://host:10001 (default local)",
    )
    c.add_argument("--workers", type=base._at_least(1), default=1, help="actors (default 1)")
    c.add_argument("--ratio", "--ratios", dest="ratio", type=base._ratio, nargs="+", default=[16.0])
    c.add_argument("--corpus", choices=sorted(CORPORA), default=None, help="built-in corpus")
    base._data_option(c, "; also .parquet files with an input_ids column (Ray Data)")
    c.add_argument("--windows", type=base._at_least(1), default=48)
    c.add_argument("--window-tokens", type=base._at_least(64), default=2048)
    c.add_argument("--layers-per-group", type=int, default=None)
    c.add_argument("--max-artifact-share", type=base._cap_setting, default=None)
    c.add_argument(
        "--shard-windows", type=base._at_least(1), default=4, help="windows per shard (4)"
    )
    c.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor (default 1 where the cluster has GPUs; 0.5 shares one GPU "
        "between two actors)",
    )
    c.add_argument(
        "--model-dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="the workers' weights dtype (default float32; bfloat16 for large models)",
    )
    c.add_argument(
        "--fit-device", default=None, help="where the driver fits PCA (default cuda if present)"
    )
    c.add_argument(
        "--object-store-gb",
        type=float,
        default=None,
        help="object store of a local cluster, GB (default 0.2; a shard of the "
        "Llama-3.1-8B shape carries 17)",
    )
    c.add_argument("--out", default=None, metavar="DIR", help="write DIR/cr<ratio>")
    c.add_argument("--report", default=None, metavar="FILE", help="write the job report (JSON)")
    c.add_argument("--publish", default=None, metavar="REGISTRY", help="publish the artifacts")
    c.add_argument(
        "--profile",
        default=None,
        help="with --publish: gate against the profile's current artifact, then promote "
        "(one --ratio)",
    )
    c.add_argument("--force", action="store_true", help="publish even if the gate refuses")
    c.add_argument(
        "--gate-data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out files for the gate (as --data; never calibrated on); the "
        "calibration's held-out window is always used",
    )
    c.add_argument("--gate-windows", type=base._at_least(1), default=4, help="(default 4)")
    c.add_argument(
        "--gate-threshold",
        type=float,
        default=0.10,
        help="KL increase allowed at the same honest ratio (default 0.10: +10%%)",
    )
    c.add_argument("--reason", default="fleet calibration", help="recorded with the move")
    base._registry_options(c, required=False)
    c.set_defaults(fn=cmd_fleet_calibrate)
    r = jobs.add_parser(
        "reencode",
        help="re-encode a store's disk and S3 chunks from one artifact to another, in place",
        description="Decode each chunk of artifact --from, encode it with --to, check it, "
        "and replace it atomically under the same key (Ray Data over the tiers' keys). "
        "Idempotent: rerun after a crash to finish.",
    )
    r.add_argument("--from", dest="from_id", required=True, metavar="ID", help="old artifact")
    r.add_argument(
        "--to", dest="to_id", default="current", metavar="ID", help="new artifact or current"
    )
    r.add_argument("--tiers", required=True, metavar="STORE.YAML", help="the store's config")
    r.add_argument("--tier", nargs="+", default=None, help="only these tier labels")
    r.add_argument("--address", default="local", help="Ray cluster (as fleet calibrate)")
    r.add_argument("--workers", type=base._at_least(1), default=1, help="actors (default 1)")
    r.add_argument("--batch-size", type=base._at_least(1), default=64, help="keys per batch")
    r.add_argument("--report", default=None, metavar="FILE", help="write the report (JSON)")
    r.set_defaults(fn=cmd_fleet_reencode)
    g = jobs.add_parser(
        "gc",
        help="drop chunks past a TTL or of unreachable artifacts, and unused artifacts",
        description="Garbage collection over stores sharing a registry (docs/fleet.md). "
        "A dry run by default: --apply deletes.",
    )
    g.add_argument(
        "--tiers", nargs="+", required=True, metavar="STORE.YAML", help="every store's config"
    )
    g.add_argument(
        "--ttl",
        nargs="+",
        default=[],
        metavar="LABEL=AGE",
        help="per tier: drop chunks older than AGE (90s, 15m, 12h, 7d) since last access "
        "(disk) or write (S3)",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="apply", action="store_false", help="(default)")
    mode.add_argument("--apply", dest="apply", action="store_true", help="delete")
    g.add_argument("--address", default="local", help="Ray cluster (as fleet calibrate)")
    g.add_argument("--workers", type=base._at_least(1), default=1, help="actors (default 1)")
    g.add_argument("--report", default=None, metavar="FILE", help="write the report (JSON)")
    g.set_defaults(fn=cmd_fleet_gc, apply=False)


def cmd_fleet_gc(args) -> int:
    """Run :func:`kvtc_store.ray_jobs.gc.gc_fleet`; exit 1 when a deletion failed."""
    from kvtc_store.gc import parse_duration

    from .gc import gc_fleet

    ttl = {}
    for item in args.ttl:
        label, _, age = item.partition("=")
        try:
            ttl[label] = parse_duration(age)
        except ValueError:
            raise SystemExit(f"kvtc-store fleet gc: --ttl {item!r}: want LABEL=AGE (e.g. disk=7d)")
    plan = gc_fleet(
        args.tiers, ttl=ttl, apply=args.apply, address=args.address, workers=args.workers
    )
    if args.report:
        Path(args.report).write_text(plan.to_json())
    print(plan.to_markdown())
    return 1 if plan.errors else 0


def cmd_fleet_reencode(args) -> int:
    """Run :func:`kvtc_store.ray_jobs.reencode.reencode_fleet`; exit 1 when a chunk
    failed (it keeps its old bytes: rerun, or see the report's errors)."""
    from .reencode import reencode_fleet

    report = reencode_fleet(
        args.tiers,
        args.from_id,
        args.to_id,
        tiers=args.tier,
        address=args.address,
        workers=args.workers,
        batch_size=args.batch_size,
    )
    if args.report:
        Path(args.report).write_text(report.to_json())
    print(report.to_markdown())
    for e in report.errors:
        print(f"  {e['tier']} {e['key']}: {e['error']}", file=sys.stderr)
    return 1 if any(t["error"] for t in report.tiers.values()) else 0


def cmd_fleet_calibrate(args) -> int:
    """Run :func:`kvtc_store.ray_jobs.calibrate.calibrate_fleet` for the arguments."""
    from kvtc_store.calibration_data import data_files
    from kvtc_store.errors import GateRefusedError
    from kvtc_store.model import resolve_model

    from .calibrate import PublishPlan, calibrate_fleet

    base._check_publish_args(args, "kvtc-store fleet calibrate")
    parquet = [p for p in args.data if p.endswith(".parquet") or p.startswith("s3://")]
    if args.data and len(parquet) < len(args.data):
        data_files([p for p in args.data if p not in parquet])
    resolve_model(args.model)
    settings = base._calibration_settings(args)
    publish = None
    if args.publish:
        publish = PublishPlan(
            base._registry(args, create=True),
            profile=args.profile,
            force=args.force,
            gate_data=args.gate_data,
            gate_windows=args.gate_windows,
            threshold=args.gate_threshold,
            reason=args.reason,
        )
    try:
        arts, report = calibrate_fleet(
            args.model,
            args.ratio,
            settings,
            address=args.address,
            workers=args.workers,
            data=args.data or None,
            shard_windows=args.shard_windows,
            progress=_shard_bar(),
            publish=publish,
            gpus_per_worker=args.gpus_per_worker,
            model_dtype=args.model_dtype,
            fit_device=args.fit_device,
            object_store_bytes=int(args.object_store_gb * 1e9) if args.object_store_gb else None,
        )
    except GateRefusedError as exc:
        print(exc.report.to_markdown())
        if args.report and getattr(exc, "job_report", None) is not None:
            Path(args.report).write_text(exc.job_report.to_json())
        raise
    for r, a, row in zip(args.ratio, arts, report.artifacts):
        if args.out:
            row["path"] = str(a.save(Path(args.out) / f"cr{r:g}"))
        if "id" in row:
            print(f"ratio {r:g}: published {row['id']} to {publish.registry.url}")
    if report.gate:
        print(f"gate ({args.profile}): {report.gate['verdict']}: {report.gate['reason']}")
        print(f"profile {args.profile} -> {report.artifacts[0]['id']}")
    if args.report:
        Path(args.report).write_text(report.to_json())
    print(report.to_markdown())
    return 0


def _shard_bar():
    """A tqdm ``progress(done, total)`` over shards."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="fleet calibration", unit="shard", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress
