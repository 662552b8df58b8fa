"""The serving path on the GPU (issue 21): the store's batched get into an engine's pages
against the old path, decode GB/s, host-to-device bytes and the copies avoided.

Llama-3.1-8B's KV shape (32 layers, 8 KV heads, head dim 128, bf16) with the synthetic
ratio-16 artifact of ``gpu_codec.py`` (random bases: only timing depends on them).
``--requests`` requests of ``--prefix`` tokens each (256-token chunks) sit in a tier;
vLLM's paged cache is one ``(blocks, H, 16, 2D)`` tensor per layer (K then V on the last
dim, FLASH_ATTN's layout), each request's blocks scattered at random.

Rows, all on one card in one call (``device`` names it):

- ``contiguous``: ``GpuCodec.decode_batch`` of every chunk from the pinned CPU tier into
  one ``(B, L, H, T, D)`` buffer (issue 6's benchmark path): the reference.
- ``paged``: the same batch decoded straight into the pages
  (``decode_batch(out=ChunkKV.paged(...))``); ``paged_vs_contiguous`` is its throughput
  over the reference's.
- ``old_path``: what the vLLM connector did before: per request ``decode_prefix`` (one
  tensor per chunk), ``torch.cat`` into ``(L, H, n, D)``, then the scatter into the
  blocks (two extra passes over the KV: ``copies_avoided_bytes``).
- ``store_pinned`` / ``store_gpu_tier``: ``TieredStore.get_batch(loads, pages)``, every
  request's chunks in one batch (what the vLLM connector does each step), from a pinned
  CPU tier and from a GPU tier; ``*_each``: ``TieredStore.get(out=pages)`` one request
  at a time. ``gpu_tier_h2d_blob_bytes`` counts the blob bytes the GPU tier's hits sent
  from the host (0: the blobs stay on the device), from the codec's own counters.

- ``contiguous_fp8``: the ``contiguous`` row with the fp8 tail projection
  (``GpuCodec(fp8_tail=True)``, :mod:`kvtc_store.codec.fp8_tail`): ``decode_gbps_fp8_pinned``,
  with its largest difference from the fp16 decode. The synthetic artifact's random
  bases have a flat spectrum and so no tail: the row imposes about the tail share of the
  real SmolLM2 ratio-16 artifact calibrated here with the defaults (1,088 of 2,112 rows,
  ``--fp8-tail-share 0.5``; timing only: these rows' symbols are not small).
- ``save_path``: the vLLM worker's saves of every request's prefix from the paged cache,
  one request a step, through :class:`~kvtc_store.connectors.vllm_save.PagedSaver` (what
  ``KVTCConnector.wait_for_save`` calls; ``save_kv_layer`` does nothing per layer), each
  step's forward stood in for by ``--forward-ms`` of GEMMs on the current stream: the
  seconds the hook takes on the calling thread (``hook_s``) and those the current stream
  spends past the forward waiting for the blocks' copy (``stall_s``, CUDA events: what the
  next step's kernels wait), summed as ``blocked_s``, against ``encode_s``, the codec's
  ``encode_sequence`` of the same chunks (what the save thread runs).
  ``save_blocking_share`` = blocked / encode (``save_blocking_share_host``: hook only;
  the stand-in forward outlasts the hook, so the two do not overlap). vLLM itself is not
  on the GPU image; its classes drive the connector in ``tests/test_vllm_connector.py``
  on the CPU. ``save_path_per_layer`` is the same with the hook's gather as one
  ``index_select`` per layer and kind (64 launches for 32 layers, each a GIL release and
  retake against the encoding thread) instead of one Triton launch per kind: before and
  after, same card.
- ``gpu_tier_decode_only``: the codec's ``decode_batch`` of the GPU tier's device blobs
  into the pages with no store around it; against ``paged`` (the same from the pinned
  tier's host blobs) it bounds what ``gpu_tier_vs_pinned`` can reach.
- ``sglang_batch_get``: SGLang's ``batch_get`` of ``--sglang-pages`` pages of 64 tokens
  (``page_first`` host layout) into pinned host pages, through the code
  ``KVTCHiCacheStorage.batch_get`` runs (:mod:`kvtc_store.connectors.sglang_host`:
  one batched decode into a device staging buffer, one pass into flat pages, one copy
  per page); the page-hash lookup it adds is not timed. ``sglang_batch_get_gbps``.

GB/s are of bf16 KV written (``2 * L * H * D * 2`` bytes a token). ``fp8_kl_change_pct_16``
and ``_24`` come from ``benchmarks/rate_distortion.py --fp8-tail`` (``--fp8-kl`` names its
``fp8_tail_kl.json``; null without it). Usage::

    python benchmarks/serving_path.py [--requests 16] [--prefix 8192] [--reps 3]
        [--sglang-pages 128] [--fp8-kl FILE] [--out benchmarks/results]

writes ``serving_path.json`` and ``serving_path.md`` there. ``--device cpu`` is a dry run
in Triton's interpreter (2 layers unless ``--layers``; measures nothing; in an
environment with Triton, such as ``.venv-vllm``; about 9 minutes on 2 cores):
``python benchmarks/serving_path.py --device cpu --requests 2 --prefix 512 --reps 1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

# --device before gpu_codec (and Triton) import: "cpu" runs Triton's interpreter
os.environ["KVTC_BENCH_DEVICE"] = (
    sys.argv[sys.argv.index("--device") + 1]
    if "--device" in sys.argv[:-1]
    else os.environ.get("KVTC_BENCH_DEVICE", "cuda")
)
if os.environ["KVTC_BENCH_DEVICE"] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_codec import (
    CHUNK,
    DEV,
    LLAMA,
    StageTimer,
    cuda_time,
    empty_cache,
    gaussian_kv,
    log,
    sync,
    synthetic_artifact,
)

from kvtc_store.backends import GPUBackend, MemoryBackend
from kvtc_store.codec import ChunkBatch, ChunkKV
from kvtc_store.codec.fp8_tail import tail_plan
from kvtc_store.codec.gpu import GpuCodec
from kvtc_store.connectors.sglang_host import HostPageLayout, copy_pages, fetch_pages
from kvtc_store.connectors.vllm_layout import PagedKVLayout
from kvtc_store.connectors.vllm_save import PagedSaver, RequestPlan
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import Load, TieredStore

BLOCK = 16  # vLLM's default block size
SGLANG_PAGE = 64  # tokens per SGLang host page


def paged_cache(layers: int, blocks: int, heads: int, dim: int):
    """vLLM-style per-layer caches ``(blocks, H, BLOCK, 2D)`` bf16 and their K, V views."""
    caches = [
        torch.empty(blocks, heads, BLOCK, 2 * dim, dtype=torch.bfloat16, device=DEV)
        for _ in range(layers)
    ]
    return caches, [c[..., :dim] for c in caches], [c[..., dim:] for c in caches]


def scatter_old(caches, block_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """The old connector's scatter (``PagedKVLayout.scatter``, FLASH_ATTN layout): a
    request's ``(L, H, n, D)`` into its blocks, one ``index_copy_`` per layer."""
    _, heads, _, dim = keys.shape
    n = block_ids.numel()
    for layer, cache in enumerate(caches):
        k = keys[layer].reshape(heads, n, BLOCK, dim).permute(1, 0, 2, 3)
        v = values[layer].reshape(heads, n, BLOCK, dim).permute(1, 0, 2, 3)
        cache.index_copy_(0, block_ids, torch.cat([k, v], dim=-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=8192, help="tokens per request")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layers", type=int, default=None, help="(default 32; --device cpu: 2)")
    ap.add_argument("--device", default=DEV, help="cuda, or cpu: a dry run (module doc)")
    ap.add_argument("--sglang-pages", type=int, default=128, help="pages of SGLang's batch_get")
    ap.add_argument("--fp8-tail-share", type=float, default=0.5,
                    help="rows in fp8 where the artifact has no tail (the synthetic one); "
                    "the real SmolLM2 ratio-16 artifact has 52%%")  # fmt: skip
    ap.add_argument(
        "--forward-ms",
        type=float,
        default=50.0,
        help="save_path: a stand-in forward per step on the GPU (0: none)",
    )
    ap.add_argument("--fp8-kl", type=Path, default=None,
                    help="fp8_tail_kl.json of rate_distortion.py --fp8-tail")  # fmt: skip
    ap.add_argument("--fold-kl", type=Path, default=None,
                    help="an earlier run's serving_path.json: only fill its KL keys from "
                    "--fp8-kl and write it to --out again (measures nothing)")  # fmt: skip
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.fold_kl:
        report = json.loads(args.fold_kl.read_text())
        add_kl(report, args.fp8_kl)
        write(report, args.out)
        return
    if args.layers is None:
        args.layers = 2 if DEV == "cpu" else LLAMA["layers"]
    shape = {**LLAMA, "layers": args.layers}
    layers, heads, dim = shape["layers"], shape["heads"], shape["dim"]
    per_req = args.prefix // CHUNK
    n_chunks = per_req * args.requests
    kv_bytes_per_token = 2 * layers * heads * dim * 2
    kv_bytes = n_chunks * CHUNK * kv_bytes_per_token
    gb = kv_bytes / 1e9
    log(f"{args.requests} requests x {args.prefix} tokens = {n_chunks} chunks, {gb:.1f} GB bf16")

    sample_k, sample_v = gaussian_kv(shape, 4096)
    art = synthetic_artifact(shape, None, sample_k, sample_v, "serving")
    codec = GpuCodec(art, DEV)
    keys, values = gaussian_kv(shape, args.prefix, seed=1)
    keys, values = keys.to(torch.bfloat16), values.to(torch.bfloat16)
    del sample_k, sample_v

    # one request's blobs (every request holds the same KV at other keys: timing only)
    batch_k = keys.unflatten(2, (per_req, CHUNK)).movedim(2, 0)
    batch_v = values.unflatten(2, (per_req, CHUNK)).movedim(2, 0)
    firsts = [i * CHUNK for i in range(per_req)]
    one = codec.encode_batch(ChunkBatch.of(batch_k, batch_v, firsts))
    blobs = one * args.requests
    blob_bytes = sum(len(b) for b in blobs)
    log(f"blobs: {blob_bytes / 1e6:.0f} MB ({kv_bytes / blob_bytes:.1f}x)")

    blocks = n_chunks * (CHUNK // BLOCK)
    g = torch.Generator().manual_seed(0)
    block_ids = torch.randperm(blocks, generator=g).reshape(n_chunks, CHUNK // BLOCK)
    caches, kpages, vpages = paged_cache(layers, blocks, heads, dim)
    pages = ChunkKV.paged(kpages, vpages, block_ids)

    cuda = torch.device(DEV).type == "cuda"  # KVTC_BENCH_DEVICE=cpu: a dry run
    pinned = MemoryBackend(1 << 42, pinned=cuda)
    names = [f"{i:064x}" for i in range(n_chunks)]
    pinned.put(list(zip(names, blobs)))
    views = pinned.get(names)
    rows: dict[str, dict] = {}

    def row(name: str, seconds: float, kv_gb: float | None = None, **extra) -> None:
        """A row: ``seconds`` for ``kv_gb`` GB of bf16 KV (default: the run's)."""
        size = gb if kv_gb is None else kv_gb
        rows[name] = {"seconds": seconds, "gbps": size / seconds, **extra}
        log(f"{name:16s} {seconds * 1e3:8.1f} ms  {size / seconds:7.1f} GB/s  {extra or ''}")

    # contiguous (the reference) and paged, from the pinned tier
    dense = torch.empty(n_chunks, layers, heads, CHUNK, dim, dtype=torch.bfloat16, device=DEV)
    out_dense = (dense, torch.empty_like(dense))
    row("contiguous", cuda_time(lambda: codec.decode_batch(views, out=out_dense), reps=args.reps))
    before = dict(codec.transfers)
    t_paged = cuda_time(lambda: codec.decode_batch(views, out=pages), reps=args.reps)
    calls = args.reps + 1
    h2d = (codec.transfers["h2d_blob_bytes"] - before["h2d_blob_bytes"]) // calls
    row("paged", t_paged, h2d_blob_bytes=h2d)
    # the pages hold what the contiguous decode holds (a sample of chunks)
    for c in (0, n_chunks // 2, n_chunks - 1):
        b = int(block_ids[c, 1])
        assert torch.equal(caches[-1][b, :, 5, :dim], dense[c, -1, :, BLOCK + 5])
        assert torch.equal(caches[-1][b, :, 5, dim:], out_dense[1][c, -1, :, BLOCK + 5])
    # the fp8 tail projection, the contiguous row's decode again (after the check above)
    widths = [b.shape[1] for b in art.bases]
    tails = tail_plan(art, [0, *itertools.accumulate(widths)])
    source = "the artifact's rANS tables"
    if all(t == w for t, w in zip(tails, widths)):  # a flat synthetic spectrum: no tail
        tails = [w - int(args.fp8_tail_share * w) // 16 * 16 for w in widths]
        source = f"imposed: {args.fp8_tail_share:.0%} of each group's rows (--fp8-tail-share)"
    fp8 = GpuCodec(art, DEV, fp8_tail=True, tail_rows=tails)
    first_k = out_dense[0][0].clone()
    t_fp8 = cuda_time(lambda: fp8.decode_batch(views, out=out_dense), reps=args.reps)
    diff = float((out_dense[0][0].float() - first_k.float()).abs().max())
    # one synchronised pass by stage each (the roofline of the fp8 tail: it speeds only
    # the projection)
    stages = {}
    for name, c in (("fp16", codec), ("fp8", fp8)):
        timer = StageTimer()
        c.decode_batch(views, out=out_dense, timer=timer)
        stages[name] = {k: round(v * 1e3, 3) for k, v in timer.times.items()}
    row("contiguous_fp8", t_fp8, tail_rows=sum(w - t for w, t in zip(widths, tails)),
        rows=fp8.n_rows, tail_source=source, max_abs_diff_vs_fp16=diff,
        kv_abs_max=float(first_k.float().abs().max()), stages_ms=stages)  # fmt: skip
    fp8 = first_k = None  # back to the allocator
    out_dense = dense = None  # back to the allocator
    empty_cache()

    # the old path: per request, decode_prefix, cat, scatter
    def old_path() -> None:
        for r in range(args.requests):
            part = views[r * per_req : (r + 1) * per_req]
            chunks, error = codec.decode_prefix(part)
            assert error is None
            k = torch.cat([c.keys for c in chunks], dim=2)
            v = torch.cat([c.values for c in chunks], dim=2)
            scatter_old(caches, block_ids[r * per_req : (r + 1) * per_req].reshape(-1).to(DEV),
                        k, v)  # fmt: skip

    row("old_path", cuda_time(old_path, reps=args.reps), extra_copies=2,
        copies_avoided_bytes=2 * kv_bytes)  # fmt: skip

    # the store's get into the pages: pinned CPU tier, GPU tier
    ns = ChunkNamespace(art.model_fingerprint, "bench", tenant="t")
    tokens = [torch.randint(0, 100_000, (args.prefix,), generator=g) for _ in range(args.requests)]
    for name, tier in (("store_pinned", MemoryBackend(1 << 42, pinned=cuda)),
                       ("store_gpu_tier", GPUBackend(1 << 40, device=DEV))):  # fmt: skip
        with TieredStore([tier], codec, ns, chunk_tokens=CHUNK, write_mode="write-through") as st:
            for r in range(args.requests):
                st.put(tokens[r], keys, values)

            def get_each(st=st) -> None:  # one request at a time
                for r in range(args.requests):
                    dest = pages.select(range(r * per_req, (r + 1) * per_req))
                    assert st.get(tokens[r], out=dest) == args.prefix

            def get_batch(st=st) -> None:  # the step's loads in one batch (the connector)
                loads = [Load(tokens[r], at=r * per_req) for r in range(args.requests)]
                assert st.get_batch(loads, pages) == [args.prefix] * args.requests

            for suffix, fn in (("", get_batch), ("_each", get_each)):
                before = dict(codec.transfers)
                t = cuda_time(fn, reps=args.reps)
                moved = {k: (codec.transfers[k] - before[k]) // calls for k in before}
                row(name + suffix, t, **moved)
            if name == "store_gpu_tier":  # the ceiling: the codec alone on the tier's blobs
                held = tier.get_device([k for t in tokens for k in st.keys_for(t)])
                before = dict(codec.transfers)
                t = cuda_time(lambda held=held: codec.decode_batch(held, out=pages), reps=args.reps)
                moved = {k: (codec.transfers[k] - before[k]) // calls for k in before}
                row("gpu_tier_decode_only", t, **moved)
                del held
        del tier
        empty_cache()

    # the hook's gather as one index_select per layer and kind (before), then fused
    save_path(args, rows, row, codec, art, caches, block_ids, keys, values, g, fused=False)
    save_path(args, rows, row, codec, art, caches, block_ids, keys, values, g)
    sglang_batch_get(args, row, codec, art, keys, values, g)

    sync()
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"{DEV} (dry run)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "shape": shape,
        "requests": args.requests,
        "prefix_tokens": args.prefix,
        "chunks": n_chunks,
        "kv_bytes": kv_bytes,
        "blob_bytes": blob_bytes,
        "rows": rows,
        "paged_vs_contiguous": rows["paged"]["gbps"] / rows["contiguous"]["gbps"],
        "paged_vs_old_path": rows["paged"]["gbps"] / rows["old_path"]["gbps"],
        "gpu_tier_vs_pinned": rows["store_gpu_tier"]["gbps"] / rows["store_pinned"]["gbps"],
        "gpu_tier_h2d_blob_bytes": rows["store_gpu_tier"]["h2d_blob_bytes"],
        "gpu_tier_h2d_bytes": rows["store_gpu_tier"]["h2d_bytes"],
        "pinned_h2d_blob_bytes": rows["store_pinned"]["h2d_blob_bytes"],
        "copies_avoided_bytes": 2 * kv_bytes,
        "gpu_tier_decode_only_vs_pinned": rows["gpu_tier_decode_only"]["gbps"]
        / rows["paged"]["gbps"],
        "save_blocking_share": rows["save_path"]["blocking_share"],
        "save_blocking_share_per_layer_gather": rows["save_path_per_layer"]["blocking_share"],
        "save_blocking_share_host": rows["save_path"]["blocking_share_host"],
        "sglang_batch_get_gbps": rows["sglang_batch_get"]["gbps"],
        "decode_gbps_pinned": rows["contiguous"]["gbps"],
        "decode_gbps_fp8_pinned": rows["contiguous_fp8"]["gbps"],
    }
    add_kl(report, args.fp8_kl)
    write(report, args.out)
    log(f"wrote {args.out}/serving_path.{{json,md}} in {time.perf_counter() - t_start:.0f} s")


def add_kl(report: dict, path: Path | None) -> None:
    """Fill ``fp8_kl_change_pct_16``/``_24`` from ``rate_distortion.py --fp8-tail``'s
    ``fp8_tail_kl.json`` (null without one)."""
    fp8_kl = json.loads(path.read_text()) if path else {}
    for r in (16, 24):
        report[f"fp8_kl_change_pct_{r}"] = fp8_kl.get(f"fp8_kl_change_pct_{r}")
    report["fp8_kl_source"] = (
        None
        if path is None
        else {"file": str(path), **{k: fp8_kl.get(k) for k in ("device", "date", "command")}}
    )


def write(report: dict, out: Path) -> None:
    """``serving_path.json`` and ``serving_path.md`` in ``out``."""
    rows = report["rows"]
    gb = report["kv_bytes"] / 1e9
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_path.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# The serving path on the GPU (issue 21)",
        "",
        (
            f"`{report['command']}` on {report['device']}, {report['date']}. Llama-3.1-8B KV "
            f"shape ({report['shape']['layers']} layers), {report['requests']} requests x "
            f"{report['prefix_tokens']} tokens ({report['chunks']} chunks, {gb:.1f} GB bf16), "
            "synthetic ratio-16 artifact; GB/s of bf16 KV written."
        ),
        "",
        "| path | ms | GB/s | host-to-device blob bytes |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        h2d = r.get("h2d_blob_bytes", "")
        lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['gbps']:.1f} | {h2d} |")
    sv, sg, f8 = rows["save_path"], rows["sglang_batch_get"], rows["contiguous_fp8"]
    kl = [report[f"fp8_kl_change_pct_{r}"] for r in (16, 24)]
    lines += [
        "",
        f"- paged / contiguous: {report['paged_vs_contiguous']:.2f}",
        (
            f"- paged / old path: {report['paged_vs_old_path']:.2f} (the old path's cat and "
            f"scatter copied {2 * gb:.1f} GB more)"
        ),
        (
            f"- GPU tier / pinned tier (store.get into pages): "
            f"{report['gpu_tier_vs_pinned']:.2f}; the GPU tier's hits sent "
            f"{report['gpu_tier_h2d_blob_bytes']} blob bytes from the host "
            f"({report['gpu_tier_h2d_bytes']} bytes in all, the offset tables); the "
            f"codec alone on the tier's device blobs (no store) against the pinned tier's "
            f"paged decode: {_ratio(report.get('gpu_tier_decode_only_vs_pinned'))}, the "
            "most the GPU tier can gain with this decoder"
        ),
        (
            f"- saves (save_path: {report['requests']} requests, one a step): the forward "
            f"blocked {sv['blocked_s'] * 1e3:.1f} ms (hook on the calling thread "
            f"{sv['hook_s'] * 1e3:.1f} ms; one hook with the save thread idle "
            f"{_ms(sv.get('hook_idle_s'))}; stream behind the copy "
            f"{sv['stall_s'] * 1e3:.1f} "
            f"ms, stand-in forward {sv['forward_ms']:g} ms a step) against "
            f"{sv['encode_s'] * 1e3:.1f} ms of encoding the same chunks: "
            f"save_blocking_share {sv['blocking_share']:.3f} (host only "
            f"{sv['blocking_share_host']:.3f}); every save done "
            f"{sv['done_s'] * 1e3:.0f} ms after the first hook; with the gather as one "
            f"index_select per layer and kind instead of one Triton launch per kind: "
            f"{_ratio(report.get('save_blocking_share_per_layer_gather'), 3)}"
        ),
        (
            f"- SGLang batch_get of {sg['pages']} pages into pinned host pages: "
            f"{sg['gbps']:.1f} GB/s ({sg['note']})"
        ),
        (
            f"- fp8 tail projection: {f8['gbps']:.1f} GB/s against "
            f"{rows['contiguous']['gbps']:.1f} in fp16 ({f8['tail_rows']} of {f8['rows']} "
            f"rows in fp8, {f8['tail_source']}; largest difference "
            f"{f8['max_abs_diff_vs_fp16']:.3g} on KV of magnitude up to {f8['kv_abs_max']:.3g}); "
            f"KL change at 16 / 24: {kl[0]} / {kl[1]} % (rate_distortion.py --fp8-tail)"
        ),
        *_fp8_roofline(f8, rows["contiguous"]["gbps"]),
        "",
    ]
    if report.get("fp8_kl_source"):
        src = report["fp8_kl_source"]
        lines += [f"KL change from `{src['command']}` on {src['device']}, {src['date']}.", ""]
    (out / "serving_path.md").write_text("\n".join(lines))


def _fp8_roofline(f8: dict, fp16_gbps: float) -> list[str]:
    """The report's lines on what the fp8 tail can reach: stage times of one pass each,
    and the decode rate were the projection free (an older JSON has no stages: none)."""
    st = f8.get("stages_ms")
    if not st:
        return []
    t16, t8 = sum(st["fp16"].values()), sum(st["fp8"].values())
    rest = t16 - st["fp16"].get("projection", 0.0)
    return [
        (
            f"- decode stages, one synchronised pass each (ms): fp16 {st['fp16']}; fp8 tail "
            f"{st['fp8']}. Sums {t16:.1f} / {t8:.1f} ms; without the projection the other "
            f"stages take {rest:.1f} ms, so even a free projection caps this decoder at "
            f"{fp16_gbps * t16 / rest:.0f} GB/s from the pinned tier"
        )
    ]


def _ratio(x: float | None, digits: int = 2) -> str:
    """A ratio for the report; "not measured" for a key an older JSON lacks."""
    return "not measured" if x is None else f"{x:.{digits}f}"


def _ms(seconds: float | None) -> str:
    """Milliseconds for the report; "not measured" for a key an older JSON lacks."""
    return "not measured" if seconds is None else f"{seconds * 1e3:.1f} ms"


def save_path(args, rows, row, codec, art, caches, block_ids, keys, values, g, fused=None) -> None:
    """The ``save_path`` row (module doc): one request's save a step from the paged cache,
    then the encode of the same chunks alone. ``fused=False``: the ``save_path_per_layer``
    row, the hook's gather as one ``index_select`` per layer and kind (the layout's
    ``fused_gather``)."""
    blocks, heads, _, two_d = caches[0].shape
    layout = PagedKVLayout.from_views(
        {f"model.layers.{i}.self_attn.attn": c for i, c in enumerate(caches)},
        "FLASH_ATTN", block_size=BLOCK, num_blocks=blocks, num_kv_heads=heads,
        head_size=two_d // 2, head_size_v=two_d // 2, dtype=caches[0].dtype,
    )  # fmt: skip
    layout.fused_gather = fused
    per_req = args.prefix // CHUNK
    cuda = torch.device(DEV).type == "cuda"
    ns = ChunkNamespace(art.model_fingerprint, "bench-save", tenant="t")
    tokens = [torch.randint(0, 100_000, (args.prefix,), generator=g) for _ in range(args.requests)]
    plans = [
        RequestPlan(f"r{r}", tokens[r].tolist(),
                    block_ids[r * per_req : (r + 1) * per_req].reshape(-1).tolist(),
                    save_end=args.prefix)
        for r in range(args.requests)
    ]  # fmt: skip
    with TieredStore([MemoryBackend(1 << 42, pinned=cuda)], codec, ns, chunk_tokens=CHUNK) as st:
        saver = PagedSaver(st, layout, BLOCK)
        forward = stand_in_forward(args.forward_ms) if cuda else None
        hook = stall = 0.0
        sync()
        t_first = time.perf_counter()
        for plan in plans:  # one request's prefill a step
            if forward is not None:
                forward()  # the step's forward, queued on the current stream
                fwd_done = torch.cuda.Event(enable_timing=True)
                fwd_done.record()
            t0 = time.perf_counter()
            saver.save([plan])  # wait_for_save's work (save_kv_layer: nothing per layer)
            hook += time.perf_counter() - t0
            if forward is not None:
                past_copy = torch.cuda.Event(enable_timing=True)
                past_copy.record()  # the next step's kernels start here
                past_copy.synchronize()
                stall += fwd_done.elapsed_time(past_copy) / 1e3
        assert saver.wait(600)
        sync()
        done = time.perf_counter() - t_first
        # the hook once more with the save thread idle: its own work, against the loop's
        # hook, which shares the GIL with the encoding thread
        t0 = time.perf_counter()
        saver.save([plans[0]])
        hook_idle = time.perf_counter() - t0
        assert saver.wait(600)
        saver.close()
        assert all(st.lookup(t) == args.prefix for t in tokens), "a save did not land"
        # what was stored is request 0's blocks (the synthetic codec re-encodes its own
        # decode closely; another chunk's KV would be as far as the KV itself)
        got_k, _ = st.get(tokens[0])
        want_k, _ = layout.gather(plans[0].block_ids)
        err = float((got_k.float() - want_k.float()).norm() / want_k.float().norm())
        assert err < 0.5, err
    encode = cuda_time(
        lambda: [codec.encode_sequence(keys, values, chunk_tokens=CHUNK) for _ in plans],
        reps=args.reps,
    )
    blocked = hook + stall
    row("save_path" if fused is None else "save_path_per_layer", done, hook_s=hook, hook_idle_s=hook_idle, stall_s=stall, blocked_s=blocked,
        encode_s=encode, done_s=done, blocking_share=blocked / encode, blocking_share_host=hook / encode,
        forward_ms=args.forward_ms if cuda else 0, stored_rel_err=err)  # fmt: skip
    empty_cache()


def stand_in_forward(ms: float):
    """A stand-in for a step's forward on the current stream: bf16 GEMMs taking about
    ``ms`` milliseconds (None for 0)."""
    if ms <= 0:
        return None
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=DEV)
    one = cuda_time(lambda: a @ a, reps=3)
    n = max(1, round(ms / 1e3 / one))

    def forward() -> None:
        for _ in range(n):
            a @ a

    return forward


def sglang_batch_get(args, row, codec, art, keys, values, g) -> None:
    """The ``sglang_batch_get`` row (module doc): ``--sglang-pages`` pages of a prefix in a
    pinned CPU tier, fetched, decoded and copied into pinned host pages."""
    layers, heads, _, dim = keys.shape
    n_chunks = min(args.sglang_pages * SGLANG_PAGE // CHUNK, args.prefix // CHUNK)
    n_tok = n_chunks * CHUNK
    pages = n_tok // SGLANG_PAGE
    cuda = torch.device(DEV).type == "cuda"
    layout = HostPageLayout("page_first", layers, SGLANG_PAGE, heads, dim, torch.bfloat16)
    ns = ChunkNamespace(art.model_fingerprint, "bench-sglang", tenant="t")
    tokens = torch.randint(0, 100_000, (n_tok,), generator=g)
    pool = torch.empty(pages, 2 * layers * SGLANG_PAGE * heads * dim, dtype=torch.bfloat16,
                       pin_memory=cuda)  # fmt: skip
    targets = list(pool)  # SGLang's host pool hands pages over as views like these
    with TieredStore([MemoryBackend(1 << 40, pinned=cuda)], codec, ns, chunk_tokens=CHUNK) as st:
        st.put(tokens, keys[:, :, :n_tok], values[:, :, :n_tok])

        def batch_get() -> None:
            flat = fetch_pages(st, layout, tokens, 0)
            assert flat is not None and flat.shape[0] == pages
            copy_pages(list(flat), targets)

        t = cuda_time(batch_get, reps=args.reps)
        k, v = st.get(tokens)
        for j in (0, pages - 1):
            s = j * SGLANG_PAGE
            page = torch.stack([k, v])[:, :, :, s : s + SGLANG_PAGE].permute(0, 1, 3, 2, 4)
            assert torch.equal(pool[j], layout.to_flat(page).cpu())
    try:
        import sglang  # noqa: F401

        where = "sglang importable here"
    except ImportError:
        where = "sglang is not installed on this image"
    note = (f"batch_get's path through connectors/sglang_host.py ({where}); page_first "
            f"layout, {SGLANG_PAGE}-token pages")  # fmt: skip
    kv = n_tok * 2 * layers * heads * dim * 2
    row("sglang_batch_get", t, kv_gb=kv / 1e9, pages=pages, kv_bytes=kv, note=note)


if __name__ == "__main__":
    main()
