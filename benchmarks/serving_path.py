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

GB/s are of bf16 KV written (``2 * L * H * D * 2`` bytes a token). Usage::

    python benchmarks/serving_path.py [--requests 16] [--prefix 8192] [--reps 3]
        [--out benchmarks/results]

writes ``serving_path.json`` and ``serving_path.md`` there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_codec import (
    CHUNK,
    DEV,
    LLAMA,
    cuda_time,
    empty_cache,
    gaussian_kv,
    log,
    sync,
    synthetic_artifact,
)

from kvtc_store.backends import GPUBackend, MemoryBackend
from kvtc_store.codec import ChunkBatch, ChunkKV
from kvtc_store.codec.gpu import GpuCodec
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import Load, TieredStore

BLOCK = 16  # vLLM's default block size


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
    ap.add_argument("--layers", type=int, default=LLAMA["layers"], help="(a dry run: fewer)")
    args = ap.parse_args()
    t_start = time.perf_counter()
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

    def row(name: str, seconds: float, **extra) -> None:
        rows[name] = {"seconds": seconds, "gbps": gb / seconds, **extra}
        log(f"{name:16s} {seconds * 1e3:8.1f} ms  {gb / seconds:7.1f} GB/s  {extra or ''}")

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
        del tier
        empty_cache()

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
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_path.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# The serving path on the GPU (issue 21)",
        "",
        (
            f"`{report['command']}` on {report['device']}, {report['date']}. Llama-3.1-8B KV "
            f"shape ({layers} layers), {args.requests} requests x {args.prefix} tokens ({n_chunks} chunks, "
            f"{gb:.1f} GB bf16), synthetic ratio-16 artifact; GB/s of bf16 KV written."
        ),
        "",
        "| path | ms | GB/s | host-to-device blob bytes |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        h2d = r.get("h2d_blob_bytes", "")
        lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['gbps']:.1f} | {h2d} |")
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
            f"({report['gpu_tier_h2d_bytes']} bytes in all, the offset tables)"
        ),
        "",
    ]
    (args.out / "serving_path.md").write_text("\n".join(lines))
    log(f"wrote {args.out}/serving_path.{{json,md}} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
