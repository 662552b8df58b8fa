"""The operator's commands of ``kvtc-store``: ``stats``, ``admin`` and ``health``
(docs/operations.md). Registered by :func:`register` from :mod:`kvtc_store.cli`.

kvtc-store stats  --config store.yaml | --disk DIR [--capacity SIZE] [--tenant NAME] [--json]
kvtc-store admin  {evict|clear,verify,warm} --config store.yaml | --disk DIR [--tier NAME] ...
kvtc-store health --config store.yaml [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from .inventory import SHARED, Selection, TierView

NO_CAP = 1 << 62
"""The cap a ``--disk`` folder is opened with when none is given (nothing is evicted)."""


def _size(text: str) -> int:
    """``--capacity``: a byte count with the config's units (``1GiB``, ``500MB``, ``4096``)."""
    from .config import parse_byte_size

    try:
        n = parse_byte_size(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError("a capacity must be more than 0 bytes")
    return n


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def _duration(text: str) -> float:
    """``--older-than``: seconds, or a number with ``s``, ``m``, ``h``, ``d`` or ``w``."""
    m = _DURATION_RE.fullmatch(text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (a number and s, m, h, d or w, e.g. 7d)"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _size_text(n: int | None) -> str:
    """``n`` bytes in the binary units a config's capacities use (``1GiB``): ``"3.50 MiB"``;
    under 1 KiB, ``"512 B"``."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def _rows(rows: dict) -> str:
    return ", ".join(
        f"{k} {r['chunks']} chunks {_size_text(r['bytes'])}" for k, r in sorted(rows.items())
    )


def _views(args, writable: bool = False, failed: list | None = None):
    """The tiers an operator command works on: ``(views, skipped labels, config)``;
    ``failed`` as :func:`~kvtc_store.inventory.open_views` takes it."""
    if args.disk is not None:
        from pathlib import Path

        from .errors import ConfigError

        if not Path(args.disk).is_dir():
            raise ConfigError(f"no disk tier at {args.disk} (not a directory)")
        cap = getattr(args, "capacity", None)
        view = TierView.of_folder(args.disk, cap or NO_CAP, writable)
        view.capacity = cap
        return [view], [], None
    from .config import load_config
    from .errors import ConfigError
    from .inventory import open_views

    if getattr(args, "capacity", None) is not None:
        raise ConfigError(
            "--capacity goes with --disk; with --config each tier's cap is its "
            "tiers.N.capacity in the config"
        )
    cfg = load_config(args.config)
    views, skipped = open_views(cfg, getattr(args, "tier", None), writable, failed)
    return views, skipped, cfg


def _close(views) -> None:
    for v in views:
        v.close()


def cmd_stats(args) -> int:
    """Chunks and bytes of a store's disk and S3 tiers, per tenant and per artifact."""
    from .inventory import summarize, tenant_names

    def summary(view, cfg) -> dict:
        known = list(args.tenant or []) + ([cfg.tenant] if cfg is not None else [])
        return summarize(view, tenant_names(known))

    rows, skipped, cfg = _each_tier(args, False, summary)
    rc = 1 if any("error" in r for r in rows) else 0
    if cfg is not None:  # the config's order, top tier first
        kinds = {t.label: t.kind for t in cfg.tiers}
        note = "held by each serving process; nothing stored to read"
        rows += [{"tier": s, "kind": kinds[s], "note": note} for s in skipped]
        rows.sort(key=lambda r: list(kinds).index(r["tier"]))
    over = [r for r in rows if r.get("over_cap")]
    for r in over:
        print(
            f"kvtc-store: warning: tier {r['tier']} ({r['where']}) is over its cap: "
            f"{_size_text(r['used_bytes'])} of {_size_text(r['capacity_bytes'])} ({100 * r['use']:.0f}%); "
            "the next store that opens it evicts down to the cap",
            file=sys.stderr,
        )
    if args.json:
        out = {"config": args.config, "disk": args.disk, "tiers": rows}
        if cfg is not None:
            out.update(tenant=cfg.tenant, chunk_tokens=cfg.chunk_tokens)
        print(json.dumps(out))
        return rc
    if cfg is not None:
        print(
            f"store {args.config} ({cfg.chunk_tokens}-token chunks; its own tenant: "
            f"{cfg.tenant or SHARED}; counts cover every tenant in its tiers)"
        )
    for r in rows:
        head = f"  {r['tier']:<10} {r.get('kind', ''):<6} {r.get('where', '')}"
        if "error" in r:
            print(f"{head}: unreachable: {r['error']}")
            continue
        if "chunks" not in r:
            print(f"{head}: {r['note']}")
            continue
        cap = r["capacity_bytes"]
        of = f" of {_size_text(cap)} ({100 * r['use']:.1f}%)" if cap else ""
        absent = f" ({r['note']})" if "note" in r else ""
        print(f"{head}: {r['chunks']} chunks, {_size_text(r['used_bytes'])}{of}{absent}")
        if r["chunks"]:
            print(f"      by tenant: {_rows(r['by_tenant'])}")
            print(f"      by artifact: {_rows(r['by_artifact'])}")
    return rc


def prefix_keys(path: str, fingerprint: str, kv_layout: str, tenant: str, chunk_tokens: int):
    """The chunk keys of the prefixes in ``path`` (JSON lines: a list of token ids, or
    ``{"input_ids": [...]}``), in the namespace ``(fingerprint, kv_layout, tenant)``.

    Raises:
        CalibrationDataError: a line that is not such a list (the message names the line).
        ValueError: a token id outside ``[0, 2**32)``.
    """
    from .calibration_data import jsonl_token_ids
    from .keys import ChunkNamespace, chunk_keys

    ns = ChunkNamespace(fingerprint, kv_layout, tenant)
    return [k for ids in jsonl_token_ids(path) for k in chunk_keys(ids, ns, chunk_tokens)]


def _selection(args, cfg=None) -> Selection:
    keys = None
    if args.keys:
        from .backends.base import validate_keys

        with open(args.keys) as f:
            keys = frozenset(validate_keys([line.strip() for line in f if line.strip()]))
    if getattr(args, "prefixes", None):
        from .errors import ConfigError

        if cfg is None or not (args.model_fingerprint and args.kv_layout):
            raise ConfigError("--prefixes needs --config, --model-fingerprint and --kv-layout")
        try:
            more = prefix_keys(
                args.prefixes, args.model_fingerprint, args.kv_layout, cfg.tenant, cfg.chunk_tokens
            )
        except ValueError as exc:  # a token id out of range
            raise ConfigError(f"--prefixes {args.prefixes}: {exc}") from None
        keys = (keys or frozenset()) | frozenset(more)
    return Selection(
        tenants=tuple(args.tenant) if args.tenant is not None else None,
        artifacts=tuple(args.artifact) if args.artifact is not None else None,
        older_than_s=args.older_than,
        keys=keys,
    )


def cmd_admin(args) -> int:
    """``kvtc-store admin evict|verify|warm``."""
    from . import inventory

    if args.action in ("evict", "clear"):
        sel = _selection(args)
        if sel.empty() and not args.all:  # never "everything" by default
            from .errors import UsageError

            raise UsageError(
                "admin evict: name what to evict (--tenant, --artifact, --older-than, "
                "--keys) or give --all"
            )
        rows, _, _ = _each_tier(args, args.yes, lambda v, _: inventory.evict(v, sel, args.yes))
        verb = "removed" if args.yes else "would remove (dry run; --yes removes)"
        lines = [
            _unreachable(r)
            if "error" in r
            else f"{r['tier']} {r['where']}: {verb} {r['chunks']} chunks, {_size_text(r['bytes'])}"
            for r in rows
        ]
        _print(args, rows, lines)
        return 1 if any("error" in r for r in rows) else 0
    if args.action == "verify":
        rows, _, _ = _each_tier(args, args.remove, lambda v, _: inventory.verify(v, args.remove))
        lines = []
        for r in rows:
            if "error" in r:
                lines.append(_unreachable(r))
                continue
            gone = f", {r['removed']} removed" if args.remove else ""
            lines.append(
                f"{r['tier']} {r['where']}: {r['checked']} blobs read, {r['ok']} intact, "
                f"{len(r['bad'])} bad{gone}"
            )
            lines += [f"  {b['key']}: {b['error']}" for b in r["bad"]]
        _print(args, rows, lines)
        bad = any(r.get("bad") and not args.remove for r in rows)
        return 1 if bad or any("error" in r for r in rows) else 0
    # warm
    args.tier = [args.source, args.dest]
    views, _, cfg = _views(args, writable=not args.dry_run)
    try:
        by = {v.label: v for v in views}
        sel = _selection(args, cfg)
        row = inventory.warm(by[args.source], by[args.dest], sel, not args.dry_run)
    finally:
        _close(views)
    verb = "would copy (dry run)" if args.dry_run else "copied"
    n = row["chunks"] if args.dry_run else row["copied"]
    line = (
        f"{row['from']} -> {row['to']}: {verb} {n} chunks ({_size_text(row['bytes'])}), "
        f"{row['present']} there already, {row['bad']} bad left behind"
    )
    if row["missing"]:
        line += f", {len(row['missing'])} of the keys not in {row['from']}"
    _print(args, row, [line])
    return 0


def _each_tier(args, writable: bool, work):
    """``(rows, skipped labels, config)``: ``work(view, config)``'s row for each tier the
    command names; a tier that cannot be opened or fails midway (S3 down) gets ``{"tier",
    "kind", "error"}`` and the others go on."""
    from .errors import KVTCError

    failed: list = []
    views, skipped, cfg = _views(args, writable=writable, failed=failed)
    rows = [{"tier": t.label, "kind": t.kind, "error": str(e)} for t, e in failed]
    try:
        for v in views:
            try:
                rows.append(work(v, cfg))
            except KVTCError as exc:
                rows.append({"tier": v.label, "kind": v.kind, "where": v.where, "error": str(exc)})
    finally:
        _close(views)
    return rows, skipped, cfg


def _unreachable(r: dict) -> str:
    head = " ".join(x for x in (r["tier"], r.get("where")) if x)
    return f"{head}: unreachable: {r['error']}"


def _print(args, obj, lines: list[str]) -> None:
    print(json.dumps(obj) if args.json else "\n".join(lines))


def cmd_health(args) -> int:
    """``kvtc-store health``: 0 when every tier the store needs answers, else 1."""
    from .config import load_config
    from .health import config_health

    report = config_health(load_config(args.config))
    if args.json:
        print(json.dumps(report))
    else:
        print("healthy" if report["ok"] else "unhealthy")
        for r in report["tiers"]:
            state = "ok" if r["reachable"] else ("left out" if r.get("optional") else "DOWN")
            use = f", {100 * r['use']:.1f}% of its cap" if r["use"] is not None else ""
            print(f"  {r['tier']:<10} {r['kind']:<6} {state}: {r['detail']}{use}")
        c = report["codec"]
        print(f"  {'codec':<10} {c['kind']:<6} {'ok' if c['ok'] else 'DOWN'}: {c['detail']}")
    return 0 if report["ok"] else 1


def _where(p, disk: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="a store's YAML config: its disk and S3 tiers")
    if disk:
        g.add_argument("--disk", help="one disk tier's folder")
    p.add_argument("--json", action="store_true", help="print JSON")


def _selectors(p) -> None:
    p.add_argument(
        "--tenant",
        action="append",
        default=None,
        help="chunks of this tenant ('' for the shared namespace; repeatable)",
    )
    p.add_argument(
        "--artifact", action="append", default=None, help="chunks this codec artifact wrote"
    )
    p.add_argument(
        "--older-than",
        type=_duration,
        default=None,
        metavar="AGE",
        help="chunks last used (disk) or written (S3) longer ago than AGE (90s, 30m, 12h, 7d)",
    )
    p.add_argument("--keys", default=None, metavar="FILE", help="chunk keys, one a line")


def register(sub) -> None:
    """Add ``stats``, ``admin`` and ``health`` to the ``kvtc-store`` subcommands ``sub``."""
    s = sub.add_parser(
        "stats",
        help="chunks and bytes of a store's disk and S3 tiers, per tenant and per artifact",
    )
    _where(s)
    s.add_argument(
        "--capacity",
        type=_size,
        default=None,
        help="with --disk only: a cap to report against, in the config's units (e.g. 1GiB)",
    )
    s.add_argument(
        "--tenant",
        action="append",
        default=[],
        help="a tenant name to show instead of its key tag (repeatable; the config's own "
        "tenant is always named)",
    )
    s.set_defaults(fn=cmd_stats)

    a = sub.add_parser("admin", help="evict, verify or warm a store's disk and S3 tiers")
    acts = a.add_subparsers(dest="action", required=True)

    def action(name: str, help: str, **kw):
        p = acts.add_parser(name, help=help, **kw)
        _where(p)
        p.set_defaults(fn=cmd_admin)
        return p

    e = action(
        "evict",
        "remove chunks by tenant, artifact, age or key (a dry run unless --yes)",
        aliases=["clear"],
    )
    e.add_argument("--tier", action="append", default=None, help="only this tier (repeatable)")
    _selectors(e)
    e.add_argument("--all", action="store_true", help="every chunk (no selector)")
    e.add_argument("--yes", action="store_true", help="remove them (default: count only)")
    v = action("verify", "read every blob: checksums and key binding; report or remove bad ones")
    v.add_argument("--tier", action="append", default=None, help="only this tier (repeatable)")
    v.add_argument("--remove", action="store_true", help="delete the bad blobs")
    w = action("warm", "copy chunks from one tier into another (by key list or selectors)")
    w.add_argument("--from", dest="source", required=True, help="the tier to read")
    w.add_argument("--to", dest="dest", required=True, help="the tier to fill")
    _selectors(w)
    w.add_argument(
        "--prefixes",
        default=None,
        metavar="FILE",
        help='prompts to warm: JSON lines of token ids (a list, or {"input_ids": [...]}), '
        "keyed in the config's tenant; needs --model-fingerprint and --kv-layout",
    )
    w.add_argument(
        "--model-fingerprint", default=None, help="the served model's (kvtc-store inspect shows it)"
    )
    w.add_argument(
        "--kv-layout",
        default=None,
        help="the serving engine's KV layout, e.g. L30-H3-D64-bfloat16-tp0of1 "
        "(ModelInfo.kv_layout(dtype, tp_rank, tp_size))",
    )
    w.add_argument("--dry-run", action="store_true", help="count only")

    h = sub.add_parser("health", help="can the store's tiers be reached (exit 0) or not (1)")
    _where(h, disk=False)
    h.set_defaults(fn=cmd_health)
