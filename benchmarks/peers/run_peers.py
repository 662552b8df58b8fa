"""External peers on the rate-distortion windows: LMCache's CacheGen serde, kvpress evictions.

Main-environment driver (``make bench-peers``; needs ``make peers-env``). It tokenises the
windows once (``benchmarks/quality.py``'s ``windows(tok, 32)``: 1,536 context + 256
continuation tokens, half Python's reference docs, half Shakespeare's tragedies) and hands
token ids to the peer environments in a safetensors file, then:

1. CacheGen (``cachegen_serde.py`` in ``.venv-lmcache``, a long-lived worker): here, the
   exact context KV of each window (float32 model); there, a round trip of its bf16 copy
   through LMCache's CacheGen serde in 256-token chunks; here again, the continuation from
   the decoded KV, scored against the exact KV (``kvtc_store.evaluate.compare_logits``).
2. kvpress (``kvpress_presses.py`` in ``.venv-kvpress``): each press at memory ratios 2, 4
   and 8, with its own exact reference in that environment, scored there the same way.

The two run one after the other, never at once. With ``--limit N`` only N windows run,
taken alternately from the two texts (windows 0, 16, 1, 17, ... of the 32), the same ones
for every peer. Writes ``benchmarks/results/peers.json`` (every per-window record) and
``peers.md``, and merges one row per (method, ratio) into ``quality.json`` (``merge.py``).

Usage: ``python benchmarks/peers/run_peers.py [--limit N (default 8; 0: all 32)]
[--presses snapkv knorm ...] [--ratios 2 4 8] [--threads 1] [--no-cachegen] [--no-kvpress]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: quality.windows

from kvpress_presses import DEFAULT_PRESSES
from merge import merge_rows
from protocol import (
    CTX,
    GREEDY,
    continue_and_greedy,
    load_kv,
    save_kv,
    save_windows,
    score_record,
)

try:  # the rate-distortion harness: the two-text windows of its suite before issue 17
    from rd.data import suite_v1_windows as windows
except ImportError:
    from quality import windows

from kvtc_store.evaluate import ContinuationScores, compare_logits
from kvtc_store.model import cache_from_kv, kv_from_cache, lm_forward, load_model

RESULTS = ROOT / "benchmarks" / "results"
LMCACHE_PY = ROOT / ".venv-lmcache" / "bin" / "python"
KVPRESS_PY = ROOT / ".venv-kvpress" / "bin" / "python"
N_WINDOWS = 32
# 2 windows took 504 s on 2 shared cores (load 5-14), 4 presses about 206 s a window:
# 8 windows fit the ~30-minute budget (see benchmarks/results/peers.md).
DEFAULT_LIMIT = 8


def interleaved(n_total: int, limit: int | None) -> list[int]:
    """Window indices alternating between the two texts' halves of ``windows(tok, n_total)``."""
    first = n_total // 2 + n_total % 2
    a, b = list(range(first)), list(range(first, n_total))
    order = [i for pair in zip(a, b) for i in pair] + a[len(b) :]
    return order if limit is None else order[:limit]


def model_dir(model, work: Path) -> Path:
    """A local folder holding the loaded model (the converted cache folder, else a copy)."""
    path = Path(getattr(model.config, "_name_or_path", "") or "")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    model.save_pretrained(work / "model")
    return work / "model"


def run_cachegen(model, ids: torch.Tensor, names: list[str], mdir: Path, work: Path) -> list:
    """CacheGen records, one per window; also each window's exact greedy tokens."""
    worker = subprocess.Popen(
        [str(LMCACHE_PY), str(HERE / "cachegen_serde.py"), "--model", str(mdir), "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    records = []
    try:
        for wi in range(ids.shape[0]):
            ctx, cont = ids[wi, :CTX], ids[wi, CTX:]
            t0 = time.perf_counter()
            with torch.no_grad():
                _, cache = lm_forward(model, ctx[None], last_only=True)
            keys, values = kv_from_cache(cache)
            ref, ref_greedy, _ = continue_and_greedy(model, cache_from_kv(keys, values), cont)
            save_kv(work / "kv.safetensors", keys.to(torch.bfloat16), values.to(torch.bfloat16))
            t_exact = time.perf_counter() - t0
            worker.stdin.write(
                json.dumps(
                    {"in": str(work / "kv.safetensors"), "out": str(work / "dec.safetensors")}
                )
                + "\n"
            )
            worker.stdin.flush()
            reply = worker.stdout.readline()
            if not reply:
                raise RuntimeError("the CacheGen worker exited; see its stderr above")
            reply = json.loads(reply)
            dec = load_kv(work / "dec.safetensors")
            t1 = time.perf_counter()
            kd, vd = dec["keys"].float(), dec["values"].float()
            got, _, matched = continue_and_greedy(model, cache_from_kv(kd, vd), cont, ref_greedy)
            s = compare_logits(ref, got, cont)
            raw = keys.numel() * 2 * 2  # K and V in bf16
            records.append(
                {
                    "window": wi,
                    "text": names[wi],
                    "method": "cachegen",
                    "target_ratio": None,
                    "bf16_bytes": raw,
                    "serde_bytes": int(dec["chunk_bytes"].sum()),
                    "deflate_bytes": int(dec["chunk_deflate_bytes"].sum()),
                    "chunk_bytes": dec["chunk_bytes"].tolist(),
                    "max_abs_error": float(
                        torch.maximum((kd - keys).abs().amax(), (vd - values).abs().amax())
                    ),
                    **score_record(s, matched),
                    "exact_greedy": ref_greedy.tolist(),
                    "seconds_exact": round(t_exact, 3),
                    "seconds_serde": reply["seconds"],
                    "seconds_score": round(time.perf_counter() - t1, 3),
                }
            )
            print(f"cachegen window {wi + 1}/{ids.shape[0]} done", file=sys.stderr, flush=True)
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    return records


def run_kvpress(ids_file: Path, mdir: Path, work: Path, presses, ratios, threads: int) -> list:
    """kvpress records (the exact reference rows included), one per window x method x ratio."""
    out = work / "kvpress.jsonl"
    cmd = [str(KVPRESS_PY), str(HERE / "kvpress_presses.py"), "--model", str(mdir)]
    cmd += ["--windows", str(ids_file), "--out", str(out), "--presses", *presses]
    cmd += ["--ratios", *map(str, ratios), "--threads", str(threads)]
    subprocess.run(cmd, check=True, cwd=HERE)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _pool(recs: list[dict]) -> ContinuationScores:
    s = ContinuationScores()
    for r in recs:
        s.add(
            ContinuationScores(
                **{k: r[k] for k in ("positions", "kl_sum", "agree")},
                nll_ref_sum=r["nll_ref_sum"],
                nll_got_sum=r["nll_got_sum"],
            )
        )
    return s


def _scores(recs: list[dict]) -> dict:
    s = _pool(recs)
    return {
        "ppl_change_pct": round(s.ppl_change_pct, 3),
        "kl": round(s.kl, 5),
        "top1_agreement": round(s.top1_agreement, 4),
        "greedy_agreement": round(sum(r["greedy_matched"] == GREEDY for r in recs) / len(recs), 4),
        "greedy_prefix_mean": round(sum(r["greedy_matched"] for r in recs) / len(recs), 2),
    }


def rows_from(records: list[dict], device: str) -> list[dict]:
    """One row per (method, target ratio), in the shared results schema."""
    groups = defaultdict(list)
    for r in records:
        if r["method"] != "exact":
            groups[(r["method"], r["target_ratio"])].append(r)
    rows = []
    for (method, target), recs in groups.items():
        if method == "cachegen":
            raw = sum(r["bf16_bytes"] for r in recs)
            ratio = {
                "honest_ratio": round(raw / sum(r["deflate_bytes"] for r in recs), 3),
                "honest_ratio_serde": round(raw / sum(r["serde_bytes"] for r in recs), 3),
            }
        else:
            kept = sum(r["kept_tokens_per_layer"] for r in recs)
            ratio = {"honest_ratio": round(CTX * len(recs) / kept, 3)}
        per_text = defaultdict(list)
        for r in recs:
            per_text[r["text"]].append(r)
        rows.append(
            {
                "method": method,
                "target_ratio": target,
                "kind": "baseline",
                **ratio,
                **_scores(recs),
                "retrieval_delta_pts": None,
                "device": device,
                "n_windows": len(recs),
                "per_text": {t: _scores(rs) for t, rs in per_text.items()},
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"windows to run (of {N_WINDOWS}; 0: all)",
    )
    p.add_argument("--presses", nargs="+", default=DEFAULT_PRESSES)
    p.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    p.add_argument("--no-cachegen", action="store_true")
    p.add_argument("--no-kvpress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-merge", action="store_true", help="do not touch quality.json")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here and in the kvpress worker (1: two contending threads on a "
        "shared 2-core host ran single-token steps 4x slower)",
    )
    p.add_argument("--note", default=None, help="a sentence on the run kept in the report")
    p.add_argument(
        "--render",
        action="store_true",
        help="no run: rebuild rows, peers.md and the quality.json merge from peers.json's records",
    )
    args = p.parse_args(argv)
    if args.render:
        doc = json.loads((args.out / "peers.json").read_text())
        meta = doc.get("runs", {}).get(doc.get("run")) or {
            k: v for k, v in doc.items() if k not in ("rows", "records")
        }
        if args.note:
            meta["note"] = args.note
        write_outputs(args.out, meta, doc["records"], not args.no_merge)
        return 0
    torch.set_num_threads(args.threads)

    t_start = time.time()
    model, tok, info = load_model()
    wins = windows(tok, N_WINDOWS)
    order = interleaved(N_WINDOWS, args.limit or None)
    ids = torch.stack([wins[i][1] for i in order])
    names = [wins[i][0] for i in order]
    device = "cpu"
    timing = {}
    with tempfile.TemporaryDirectory(prefix="kvtc-peers-") as tmp:
        work = Path(tmp)
        ids_file = work / "windows.safetensors"
        save_windows(ids_file, ids, names)
        mdir = model_dir(model, work)
        records = []
        if not args.no_cachegen:
            t0 = time.time()
            records += run_cachegen(model, ids, names, mdir, work)
            timing["cachegen_s"] = round(time.time() - t0, 1)
        if not args.no_kvpress:
            t0 = time.time()
            records += run_kvpress(ids_file, mdir, work, args.presses, args.ratios, args.threads)
            timing["kvpress_s"] = round(time.time() - t0, 1)
    for r in records:  # window index within the 32 of windows(tok, 32)
        r["window"] = order[r["window"]]
    cmd = "python benchmarks/peers/run_peers.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "command": cmd.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU, "
        f"torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": info.name,
        "device": device,
        "windows": order,
        "seconds": round(time.time() - t_start, 1),
        **timing,
        **({"note": args.note} if args.note else {}),
    }
    print(write_outputs(args.out, meta, records, not args.no_merge))
    return 0


def write_outputs(out: Path, meta: dict, records: list[dict], merge: bool) -> str:
    """Rows from ``records``; ``peers.json`` (a results document of one run, which
    ``merge_rows`` or ``benchmarks/rd/rows.py``'s ``merge_docs`` can merge, plus every
    record), ``peers.md``, and the rows merged into ``quality.json``. Returns the report."""
    rows = rows_from(records, meta.get("device", "cpu"))
    run_id = "peers-" + meta["date"][:19].replace(":", "")
    doc = {
        "rows": [{**r, "run": run_id} for r in rows],
        "runs": {run_id: meta},
        "run": run_id,
        "records": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(doc, indent=1) + "\n")
    if merge:
        merge_rows(out / "quality.json", rows, run_id, meta)
    report = render(meta, rows, records)
    (out / "peers.md").write_text(report)
    return report


def render(meta: dict, rows: list[dict], records: list[dict]) -> str:
    """The markdown report: settings, one table of rows, per-window costs, cross-checks."""
    lines = [
        "# External peers on SmolLM2-135M-Instruct (rate-distortion windows)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; run time {meta['seconds']} s",
        (
            f"- windows: {len(meta['windows'])} of `windows(tok, {N_WINDOWS})` "
            f"(indices {meta['windows']})"
        ),
        "",
        (
            "| method | target | honest ratio | ppl change | mean KL | top-1 | greedy (64) "
            "| greedy prefix | windows |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}"
        ratio = f"{r['honest_ratio']:.2f}"
        if "honest_ratio_serde" in r:
            ratio += f" ({r['honest_ratio_serde']:.2f} before DEFLATE)"
        lines.append(
            f"| {r['method']} | {target} | {ratio} | {r['ppl_change_pct']:+.2f}% | "
            f"{r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['greedy_agreement']:.2f} | "
            f"{r['greedy_prefix_mean']:.1f} | {r['n_windows']} |"
        )
    lines += ["", "Per-window cost (seconds, mean):", ""]
    cg = [r for r in records if r["method"] == "cachegen"]
    if cg:
        for k in ("seconds_exact", "seconds_serde", "seconds_score"):
            lines.append(f"- cachegen {k[8:]}: {sum(r[k] for r in cg) / len(cg):.1f}")
    by = defaultdict(list)
    for r in records:
        if r["method"] != "cachegen":
            by[r["method"]].append(r["seconds"])
    for m, s in by.items():
        lines.append(f"- {m} (per ratio and window): {sum(s) / len(s):.1f}")
    lines += [f"- totals: {json.dumps({k: v for k, v in meta.items() if k.endswith('_s')})}"]
    if meta.get("note"):
        lines += ["", meta["note"]]
    exact = {r["window"]: r["greedy"] for r in records if r["method"] == "exact"}
    if cg and exact:
        same = sum(exact.get(r["window"]) == r["exact_greedy"] for r in cg)
        nll = {
            r["window"]: r["nll_ref_sum"] / r["positions"]
            for r in records
            if "kvpress" in r["method"]
        }
        gap = max(abs(nll[r["window"]] - r["nll_ref_sum"] / r["positions"]) for r in cg)
        lines += [
            "",
            (
                "Cross-check: the exact-KV continuation's mean NLL differs between the two "
                f"environments by at most {gap:.2e} nats per token over these windows."
            ),
            "",
            (
                "Cross-check: the exact-KV greedy runs of the two environments (transformers "
                f"5.24 here, kvpress's pinned one there) agree on {same} of {len(cg)} windows."
            ),
        ]
    return "\n".join(lines + ["", METHOD_NOTES]) + "\n"


METHOD_NOTES = """## How the peers were run

- Windows: `benchmarks/quality.py`'s `windows(tok, 32)` (1,536 context + 256 continuation
  tokens), tokenised once in the main environment; token ids reach the peer environments
  in a safetensors file. With `--limit N` the first N of the order 0, 16, 1, 17, ... run
  (alternating Python docs and Shakespeare), the same windows for every peer.
- Scores: `kvtc_store.evaluate.compare_logits` (mean KL of next-token distributions, exact
  KV as the reference; top-1 agreement; perplexity change of the 256 continuation tokens).
  Greedy: from the context's KV, the first continuation token is fed at position 1,536 and
  64 tokens are decoded greedily; "greedy (64)" is the share of windows whose 64 tokens all
  equal the exact run's, "greedy prefix" the mean length of the common prefix.
- CacheGen (arXiv 2310.07240): `lmcache==0.5.6`'s own `CacheGenSerializer` /
  `CacheGenDeserializer` on the CPU, 256-token chunks in LMCache's `KV_2LTD` layout, bf16.
  It has no quality setting: for a 30-layer model LMCache uses 32 bins for keys of layers
  0-9 and values of layers 0-1, 16 bins elsewhere. Honest ratio = bf16 bytes / serialised
  bytes after raw DEFLATE (zlib level 9); before DEFLATE in brackets. DEFLATE gains this
  much because each chunk's blob carries its int16 CDF tables (60 x 192 channels x 33
  entries = 760 KB, about 45% of the 1.70 MB serialised chunk), which compress well; the
  arithmetic-coded symbols do not.
- kvpress 0.5.5 presses (SnapKV arXiv 2404.14469, Knorm arXiv 2406.11430, Expected
  Attention arXiv 2510.00636, StreamingLLM arXiv 2309.17453), default settings, on the same
  model loaded from the converted folder. Memory ratio m maps to kvpress's
  `compression_ratio = 1 - 1/m`; kvpress keeps `int(1536 * (1 - compression_ratio))` tokens
  per layer and head (768, 384, 192 for m = 2, 4, 8); the honest ratio is read back from the
  cache after the press (context tokens x layers / kept tokens). The continuation and the
  greedy run use the true positions (1,536 on), as kvpress's pipeline does.
- One prefill per window serves every press: each press's own `forward_hook` is replayed on
  the recorded hook arguments of the reference prefill (`kvpress_presses.replay`);
  `tests/test_peers.py` checks the resulting caches equal those of prefills run under
  `with press(model):`, tensor for tensor.
"""


if __name__ == "__main__":
    sys.exit(main())
