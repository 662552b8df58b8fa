"""Argument types and option groups shared by the command lines (``kvtc-store``'s own
commands in :mod:`kvtc_store.cli` and ``kvtc-store fleet`` in :mod:`kvtc_store.ray_jobs.cli`):
target ratios, bounded integers, the artifact-share cap, ``--data``, the registry's
location and S3 settings, and the calibration settings they name."""

from __future__ import annotations

import argparse


def _check_publish_args(args, prog: str) -> None:
    """The calibration commands' argument rules that need no model (``SystemExit`` or
    :class:`~kvtc_store.errors.CalibrationDataError`)."""
    from .errors import CalibrationDataError

    if args.profile and not args.publish:
        raise SystemExit(f"{prog}: --profile needs --publish REGISTRY")
    if args.profile and len(args.ratio) != 1:
        raise SystemExit(f"{prog}: --profile promotes one artifact: give one --ratio")
    if args.data and args.corpus:
        raise CalibrationDataError("--data and --corpus exclude each other")


def _calibration_settings(args):
    """The :class:`~kvtc_store.calibration.CalibrationSettings` that a calibration
    command's ``--windows``, ``--window-tokens``, ``--layers-per-group``, ``--corpus`` and
    ``--max-artifact-share`` name (the library's defaults for what is not given)."""
    from .calibration import CalibrationSettings

    return CalibrationSettings(
        windows=args.windows,
        window_tokens=args.window_tokens,
        layers_per_group=args.layers_per_group,
        **({"corpus": args.corpus} if args.corpus else {}),
        **(args.max_artifact_share or {}),
    )


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


def _registry(args, create: bool = False):
    """The registry named by ``--publish`` or ``--registry`` (:func:`~kvtc_store.registry.open_registry`)."""
    from .registry import open_registry

    url = getattr(args, "publish", None) or args.registry
    return open_registry(
        url,
        endpoint_url=args.endpoint_url,
        region=args.region,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_attempts=args.max_attempts,
        create=create,
    )


def _registry_options(p, required: bool = True) -> None:
    """The registry's location and S3 settings (as the S3 tier's)."""
    if required:
        p.add_argument("--registry", required=True, help="a folder, or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--region", default=None, help="S3 region")
    p.add_argument("--connect-timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--max-attempts", type=int, default=3, help="per request (default 3)")


DATA_HELP = (
    "calibration data instead of the built-in corpus: .txt/.md text, .jsonl "
    '({"input_ids": [...]} or a list of ids per line), .npy integer arrays, or '
    "folders of them (repeatable)"
)


def _data_option(p, extra: str = "") -> None:
    """``--data PATH ...`` (repeatable) of the calibration commands."""
    p.add_argument(
        "--data", action="extend", nargs="+", default=[], metavar="PATH", help=DATA_HELP + extra
    )
