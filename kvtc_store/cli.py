"""kvtc-store: a tiered KV-cache store with KVTC compression.

kvtc-store demo [--ratio 16] [--doc-tokens 4000] [--windows 8]
kvtc-store calibrate --ratio 8 16 [--windows 8] [--layers-per-group N]
kvtc-store inspect BLOB_FILE
kvtc-store stats --disk DIR
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
    from .demo import format_report, run_demo

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
    settings = CalibrationSettings(windows=args.windows, layers_per_group=args.layers_per_group)
    arts = load_or_calibrate(model, tok, info, args.ratio, settings, _progress_bar())
    for r, a in zip(args.ratio, arts):
        q = a.quality
        print(
            f"ratio {r:g}: {artifact_dir(info, settings, r)}  measured honest ratio "
            f"{q.get('honest_ratio', 0):.2f}, relative error {q.get('measured_nmse', 0):.4f}"
        )
    return 0


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


def cmd_stats(args) -> int:
    from pathlib import Path

    from .backends import DiskBackend

    if not Path(args.disk).is_dir():
        print(f"kvtc-store: no disk tier at {args.disk} (not a directory)", file=sys.stderr)
        return 2
    u = DiskBackend(args.disk, capacity_bytes=args.capacity).usage()
    print(f"disk tier {args.disk}: {u.n_items} chunks, {u.used_bytes / 1e6:.2f} MB")
    return 0


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
    d.add_argument("--doc-tokens", type=int, default=4000, help="document length in tokens")
    d.add_argument(
        "--windows", type=int, default=8, help="calibration windows of 2,048 tokens (default 8)"
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
        "--windows", type=int, default=8, help="calibration windows of 2,048 tokens (default 8)"
    )
    c.add_argument(
        "--layers-per-group",
        type=int,
        default=None,
        help="PCA feature group shape (default: all layers of K, and of V, together)",
    )
    c.set_defaults(fn=cmd_calibrate)
    i = sub.add_parser("inspect", help="print a blob's header")
    i.add_argument("blob")
    i.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("stats", help="chunks and bytes of a disk tier")
    s.add_argument("--disk", required=True)
    s.add_argument(
        "--capacity",
        type=int,
        default=1 << 40,
        help="byte cap to open the tier with (default 1 TiB: evicts nothing)",
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
