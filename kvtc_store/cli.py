"""kvtc-store: a tiered KV-cache store with KVTC compression.

kvtc-store demo [--ratio 16] [--doc-tokens 4000] [--windows 24]
kvtc-store calibrate --ratio 8 16 [--windows 24] [--layers-per-group N]
kvtc-store inspect BLOB_FILE
kvtc-store stats --config store.yaml [--json] | --disk DIR
"""

from __future__ import annotations

import argparse
import logging
import sys


def _progress_bar():
    """A tqdm-backed ``progress(done, total, stage)`` callback."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int, stage: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="calibration", unit="step", file=sys.stderr)
        bar.set_postfix_str(stage)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _quiet_transformers() -> None:
    """Hide transformers' per-tensor loading bars and advisories: the CLI shows its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_demo(args) -> int:
    from .calibration import CalibrationSettings
    from .demo import check_demo_args, format_report, run_demo

    check_demo_args(args.ratio, args.doc_tokens, args.windows)  # before touching anything
    _quiet_transformers()

    report = run_demo(
        target_ratio=args.ratio,
        doc_tokens=args.doc_tokens,
        settings=CalibrationSettings(windows=args.windows),
        progress=_progress_bar(),
        log=lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True),
    )
    print(format_report(report))
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import CalibrationSettings, artifact_dir, load_or_calibrate
    from .model import load_model

    _quiet_transformers()
    model, tok, info = load_model()
    settings = CalibrationSettings(
        windows=args.windows,
        layers_per_group=args.layers_per_group,
        **({"corpus": args.corpus} if args.corpus else {}),
        **(args.max_artifact_share or {}),
    )
    arts = load_or_calibrate(model, tok, info, args.ratio, settings, _progress_bar())
    for r, a in zip(args.ratio, arts):
        q = a.quality
        print(
            f"ratio {r:g}: {artifact_dir(info, settings, r)}  measured honest ratio "
            f"{q.get('honest_ratio', 0):.2f}, relative error {q.get('measured_nmse', 0):.4f}"
        )
    return 0


def _cap_setting(text: str) -> dict:
    """``--max-artifact-share`` as a calibration setting: a share in (0, 1], or ``none``
    for no cap (not given: the library's default)."""
    if text.lower() == "none":
        return {"max_artifact_share": None}
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in (0, 1] or 'none'")
    return {"max_artifact_share": share}


def cmd_inspect(args) -> int:
    from dataclasses import asdict

    from .codec.blob import unpack_blob

    try:
        with open(args.blob, "rb") as f:
            data = f.read()
    except OSError as exc:
        print(f"kvtc-store: cannot read {args.blob}: {exc.strerror}", file=sys.stderr)
        return 2
    header, _ = unpack_blob(data)
    for k, v in asdict(header).items():
        print(f"{k}: {v}")
    return 0


def _tier_usage(tier) -> dict:
    """Chunks and bytes of one configured tier, read from where it keeps them.

    Memory and GPU tiers live inside a serving process: there is nothing to read. A
    report never changes a store: the disk tier is opened read-only (nothing evicted or
    cleaned) and the S3 tier without its open-time cleanup of stale uploads.
    """
    from .backends import DiskBackend

    out: dict = {"tier": tier.label, "kind": tier.kind, "capacity_bytes": tier.capacity}
    if tier.kind in ("memory", "gpu"):
        out["note"] = "held by each serving process; nothing stored to read"
        return out
    if tier.kind == "disk":
        out["where"] = str(tier.path)
        if not tier.path.is_dir():
            out["note"] = "absent (no such directory)"
            return out
        disk = DiskBackend(tier.path, tier.capacity, read_only=True)
        u = disk.usage()
        disk.close()
    else:
        from .config import build_tier

        backend = build_tier(tier.model_copy(update={"abort_uploads_after": None}))
        out["where"] = f"s3://{tier.bucket}/{backend.prefix}"
        try:
            u = backend.list_chunks()
        finally:
            backend.close()
        out.update(chunks=len(u), used_bytes=sum(u.values()))
        return out
    out.update(chunks=u.n_items, used_bytes=u.used_bytes)
    return out


def cmd_stats(args) -> int:
    import json
    from pathlib import Path

    from .errors import KVTCError

    if args.config is None:
        from .backends import DiskBackend

        if not Path(args.disk).is_dir():
            print(f"kvtc-store: no disk tier at {args.disk} (not a directory)", file=sys.stderr)
            return 2
        disk = DiskBackend(args.disk, capacity_bytes=args.capacity, read_only=True)
        u = disk.usage()
        disk.close()
        print(f"disk tier {args.disk}: {u.n_items} chunks, {u.used_bytes / 1e6:.2f} MB allocated")
        return 0
    from .config import load_config

    cfg = load_config(args.config)
    rows, rc = [], 0
    for tier in cfg.tiers:
        try:
            rows.append(_tier_usage(tier))
        except KVTCError as exc:
            rows.append({"tier": tier.label, "kind": tier.kind, "error": str(exc)})
            rc = 1
    if args.json:
        print(json.dumps({"config": str(args.config), "tenant": cfg.tenant, "tiers": rows}))
        return rc
    print(f"store {args.config} (tenant {cfg.tenant!r}, {cfg.chunk_tokens}-token chunks)")
    for r in rows:
        head = f"  {r['tier']:<10} {r['kind']:<6} {r.get('where', '')}"
        if "error" in r:
            print(f"{head}: unreachable: {r['error']}")
        elif "note" in r:
            print(f"{head}: {r['note']}")
        else:
            cap = r["capacity_bytes"]
            of = f" of {cap / 1e6:.2f} MB ({100 * r['used_bytes'] / cap:.1f}%)" if cap else ""
            print(f"{head}: {r['chunks']} chunks, {r['used_bytes'] / 1e6:.2f} MB{of}")
    return rc


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvtc-store`` console script."""
    from .errors import KVTCError

    p = argparse.ArgumentParser(
        prog="kvtc-store",
        description=__doc__.split("\n")[0],
        epilog="Caches (converted model, codecs, demo store) live in $KVTC_STORE_HOME, "
        "default ~/.cache/kvtc-store.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="long-document reuse on SmolLM2 with CPU and disk tiers")
    d.add_argument("--ratio", type=float, default=16.0, help="codec target ratio (default 16)")
    d.add_argument(
        "--doc-tokens", type=int, default=4000, help="document length in tokens (default 4000)"
    )
    d.add_argument(
        "--windows", type=int, default=24, help="calibration windows of 2,048 tokens (default 24)"
    )
    d.set_defaults(fn=cmd_demo)
    c = sub.add_parser("calibrate", help="calibrate (and cache) codec artifacts for SmolLM2")
    c.add_argument(
        "--ratio",
        type=float,
        nargs="+",
        default=[16.0],
        help="target ratios against 16-bit KV (default 16)",
    )
    c.add_argument(
        "--windows", type=int, default=24, help="calibration windows of 2,048 tokens (default 24)"
    )
    c.add_argument(
        "--layers-per-group",
        type=int,
        default=None,
        help="PCA feature group shape (default: all layers of K, and of V, together)",
    )
    c.add_argument(
        "--corpus",
        choices=["shakespeare", "shakespeare+numpy"],
        default=None,
        help="calibration text (default shakespeare+numpy)",
    )
    c.add_argument(
        "--max-artifact-share",
        type=_cap_setting,
        default=None,
        help="cap on the artifact's stored parameters as a share of the model's, applied "
        "from target ratio 16 up (default 0.15; 'none': no cap)",
    )
    c.set_defaults(fn=cmd_calibrate)
    i = sub.add_parser("inspect", help="print a blob's header")
    i.add_argument("blob")
    i.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("stats", help="chunks and bytes of a store's disk and S3 tiers")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="a store's YAML config: every tier it names")
    where.add_argument("--disk", help="one disk tier's folder")
    s.add_argument("--json", action="store_true", help="with --config: print JSON")
    s.add_argument(
        "--capacity",
        type=int,
        default=1 << 40,
        help="byte cap to report against (the tier is opened read-only: nothing is evicted)",
    )
    s.set_defaults(fn=cmd_stats)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.fn(args)
    except KVTCError as exc:
        print(f"kvtc-store: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
