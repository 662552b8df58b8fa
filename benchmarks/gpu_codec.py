"""Throughput, memory and TTFT of the codec on CUDA (:class:`kvtc_store.codec.gpu.GpuCodec`).

Writes ``benchmarks/results/gpu_codec.md`` (command, device, date, raw numbers) and its
JSON twin ``gpu_codec.json``. Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/gpu_codec.py [--smollm2-artifact DIR] [--ttft]

Dry run without a GPU (Triton's interpreter, tiny shapes; checks the code paths, measures
nothing): ``KVTC_BENCH_DEVICE=cpu TRITON_INTERPRET=1 python benchmarks/gpu_codec.py
--tiny --ttft --batches 1,2 --reps 1 --ttft-reps 1 --out /tmp/dry``.

Shapes: SmolLM2-135M (30 layers, 3 KV heads, head dim 64) with its real calibrated
``rans`` artifact when given, and the Llama-3.1-8B KV shape (32 layers, 8 KV heads, head
dim 128) with a *synthetic* codec: random orthonormal bases (QR of a Gaussian matrix, a
quarter of each group's features kept, as PCA keeps at ratio 16), one quantisation step
for every component chosen by bisection so the rANS size meets ratio 16, and rANS tables
(shift, class) calibrated on KV projected onto those bases. The KV is a random-weight
Llama-3.1-8B-architecture model's cache of random-token prompts with ``--ttft`` (that
model is loaded anyway), else Gaussian KV with a decaying spectrum. Timing does not
depend on the bases' values; it depends on the number of coded symbols and their
entropy, which match a ratio-16 codec.

Per configuration (grouping x batch of 256-token chunks): end-to-end encode (device KV ->
blobs in host memory) and decode (blobs in host memory -> device KV) in GB/s of bf16 KV,
each stage's time from a separate synchronised run, the projection's FLOPs per token
against the bf16/fp16 GEMM rate measured here (its roofline), and the peak GPU memory the
codec adds per batch. Ceilings measured in the same run: device-to-device copy and GEMM,
and nvCOMP alone on the same bytes (:func:`nvcomp_runs`: RAW Deflate over the blob
payloads of the largest Llama-3.1-8B-shape batch, all-layer groups, cut into the 64 KiB
pieces of coder ``deflate64k``, and, for comparison, as one stream a payload (the older
``deflate`` layout); ANS over whole payloads), beside the codec end to end with coder
``deflate``, which writes ``deflate64k`` (nvCOMP both ways: ``decode_gbps_deflate``).

``--ttft``: time to first token of prompts whose first 8k and 32k tokens are reused,
against their full prefill: from the CPU tier (``MemoryBackend``) and the disk tier
(``DiskBackend``, page cache dropped before each read) as KVTC blobs, and uncompressed
bf16 as the anchors (pinned host memory; one file per chunk on the same disk); see
:func:`ttft`. The model's output from reused bf16 KV is checked against the prefill's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from kvtc_store.backends import DiskBackend, MemoryBackend
from kvtc_store.codec import CodecArtifact, PlanRange, RopeParams
from kvtc_store.codec.blob import unpack_blob
from kvtc_store.codec.entropy import (
    PIECE_SIZE,
    deflate_stored,
    pack_pieces,
    piece_raw_sizes,
    read_piece_table,
    stored_size,
)
from kvtc_store.codec.features import default_groups
from kvtc_store.codec.gpu.codec_gpu import GpuCodec
from kvtc_store.codec.gpu.nvcomp_coder import NvcompCoder
from kvtc_store.codec.gpu.staging import HostStaging
from kvtc_store.codec.rans import ESC, N_SYM, PREC, STATE_BITS, K, assign_classes, laplace_tables

sys.path.insert(0, str(Path(__file__).parent))
from suffix_forward import SuffixForward  # a sibling script, not a package

RESULTS = Path(__file__).parent / "results"
CHUNK = 256
LLAMA = {"layers": 32, "heads": 8, "dim": 128, "theta": 500000.0}
SMOL = {"layers": 30, "heads": 3, "dim": 64, "theta": 100000.0}


DEV = os.environ.get("KVTC_BENCH_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1: dry run
CUDA = DEV == "cuda"


def log(*a):
    print(*a, flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def mem_allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def mem_peak_reset() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def mem_peak() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def empty_cache() -> None:
    if CUDA:
        torch.cuda.empty_cache()


# -- ceilings -------------------------------------------------------------------------------


def cuda_time(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def ceilings() -> dict:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), reps=10)
    out = {"copy_gbps_read_plus_write": 2 * (2 << 30) / t / 1e9}
    n = 8192
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device=DEV, dtype=dt)
        b = torch.randn(n, n, device=DEV, dtype=dt)
        t = cuda_time(lambda a=a, b=b: a @ b, reps=10, warmup=3)
        out[f"gemm_tflops_{name}"] = 2 * n**3 / t / 1e12
    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    out["h2d_pinned_gbps"] = (
        (1 << 30) / cuda_time(lambda: dev.copy_(pinned, non_blocking=True)) / 1e9
    )
    out["d2h_pinned_gbps"] = (
        (1 << 30) / cuda_time(lambda: pinned.copy_(dev, non_blocking=True)) / 1e9
    )
    return out


# -- synthetic codec ----------------------------------------------------------------------


def gaussian_kv(shape: dict, tokens: int, seed: int = 0):
    """``(L, H, T, D)`` K (rotated by nothing: only timing depends on it) and V with a
    decaying spectrum over 64 latent directions plus noise."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    p = shape["layers"] * shape["heads"] * shape["dim"]
    out = []
    for _ in range(2):
        z = torch.randn(tokens, 64, device=DEV, generator=g) * torch.logspace(1, -1, 64, device=DEV)
        w = torch.randn(64, p, device=DEV, generator=g) / 8
        x = z @ w + 0.1 * torch.randn(tokens, p, device=DEV, generator=g)
        x = x.reshape(tokens, shape["layers"], shape["heads"], shape["dim"]).permute(1, 2, 0, 3)
        out.append(x.to(torch.bfloat16).contiguous())
    return out


def synthetic_artifact(shape: dict, layers_per_group: int | None, sample_k, sample_v, name):
    """A ratio-16 ``rans`` artifact for timing (module docstring): random orthonormal
    bases of a quarter of each group's features, one step for all components (bisection
    on the rANS size of the sample), tables calibrated on the sample's symbols."""
    layers, heads, dim = shape["layers"], shape["heads"], shape["dim"]
    groups = default_groups(layers, layers_per_group)
    per_layer = heads * dim
    g = torch.Generator(device=DEV).manual_seed(1)
    means, bases, coeffs = [], [], []
    feats = {
        "k": sample_k.permute(2, 0, 1, 3).reshape(sample_k.shape[2], -1).float(),
        "v": sample_v.permute(2, 0, 1, 3).reshape(sample_v.shape[2], -1).float(),
    }
    for grp in groups:
        x = feats[grp.kind][:, grp.layer_start * per_layer : grp.layer_end * per_layer]
        p = x.shape[1]
        q, _ = torch.linalg.qr(torch.randn(p, p // 4, device=DEV, generator=g))
        q = q.half().float()  # bases are stored in float16
        mean = x.mean(0)
        means.append(mean.cpu())
        bases.append(q.cpu())
        coeffs.append((x - mean) @ q)
    c = torch.cat(coeffs, dim=1)[:512]  # (N, n) sample coefficients, on the GPU
    features = 2 * layers * per_layer
    budget = 16 * features / 16.0 - STATE_BITS * 4 - 12
    tables = laplace_tables()
    log2f = torch.from_numpy(np.log2(tables.reshape(-1))).to(DEV, torch.float32)

    def bits_at(step):  # rans.symbol_bits, on the GPU
        qs = torch.round(c / step).clamp(-32767, 32767).to(torch.int64)
        shift, cls = assign_classes(qs.abs().float().mean(0).cpu().numpy())
        sh = torch.from_numpy(shift).to(DEV)
        table = torch.from_numpy((shift > 0) * tables.shape[1] + cls).to(DEV)
        h = qs >> sh
        esc = (h < -K) | (h > K)
        idx = torch.where(esc, ESC, h + K) + table * N_SYM
        bits = PREC - log2f[idx] + sh + 16.0 * esc
        return float(bits.sum()) / c.shape[0], shift, cls

    lo, hi = 1e-3 * float(c.std()), 100 * float(c.std())
    for _ in range(25):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if bits_at(mid)[0] < budget else (mid, hi)
    step = hi
    bits, shift, cls = bits_at(step)
    plan = []
    for gi, b in enumerate(bases):
        plan.append(PlanRange(gi, 0, b.shape[1], 0, float(step)))
    art = CodecArtifact(
        model_fingerprint="0" * 64,
        model_name=name,
        kv_shape=(layers, heads, dim),
        rope=RopeParams(head_dim=dim, theta=shape["theta"]),
        groups=groups,
        means=means,
        bases=bases,
        plan=plan,
        target_ratio=16.0,
        n_sink=4,
        window=128,
        quantizer="rans",
        rans_freq=torch.from_numpy(tables).to(torch.int32),
        rans_shift=torch.from_numpy(shift).to(torch.int32),
        rans_cls=torch.from_numpy(cls).to(torch.int32),
        rans_interleave=4,
        quality={"estimated_bits_per_token": float(bits), "synthetic": True},
    )
    return art


# -- one configuration --------------------------------------------------------------------


class StageTimer:
    """``timer(stage)`` context manager: synchronised wall time per stage."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        sync()
        t = time.perf_counter()
        yield
        sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t


def projection_flops_per_token(art: CodecArtifact) -> int:
    return int(sum(2 * b.shape[0] * b.shape[1] for b in art.bases))


def make_batch(keys, values, batch: int, first=None):
    """``(B, L, H, T, D)`` K and V of ``batch`` chunks cut from ``(L, H, T, D)`` (cycling
    over them) and each chunk's first position (``first``, else ``4096 + 256 i``)."""
    pool = keys.shape[2] // CHUNK
    idx = [i % pool for i in range(batch)]
    k = torch.stack([keys[:, :, i * CHUNK : (i + 1) * CHUNK] for i in idx])
    v = torch.stack([values[:, :, i * CHUNK : (i + 1) * CHUNK] for i in idx])
    firsts = [first if first is not None else 4096 + i * CHUNK for i in range(batch)]
    return k, v, firsts


def decode_from_pinned_tier(codec: GpuCodec, blobs: list[bytes], out, reps: int) -> float:
    """Median seconds of ``codec.decode_batch`` on ``blobs`` read from a pinned CPU tier
    (``MemoryBackend(pinned=True)``: ``get`` returns page-locked views, copied by DMA),
    into ``out``; the tier goes with the call."""
    tier = MemoryBackend(1 << 42, pinned=True)
    names = [chunk_key("pinned", i) for i in range(len(blobs))]
    tier.put(list(zip(names, blobs)))
    views = tier.get(names)
    return cuda_time(lambda: codec.decode_batch(views, out=out), reps=reps)


def nvcomp_runs(art: CodecArtifact, keys, values, batch: int, reps: int) -> dict:
    """nvCOMP on ``batch`` chunks cut from ``keys/values``.

    Alone on the same bytes: the blobs' payloads as the codec writes them with coder
    ``none`` (each chunk's rANS stream and its exact bf16 tokens: the bytes a blob coder
    is given), already on the device, compressed and decompressed with nvCOMP, one call
    per batch: RAW Deflate over the 64 KiB pieces that ``deflate64k`` cuts each payload
    into (``nvcomp_deflate_*``: every piece of the batch a stream of one call, spans of
    one buffer as :class:`GpuCodec` hands them over) and over one stream a payload (the
    older ``deflate`` layout: ``nvcomp_deflate_stream_*``), and ANS over whole payloads
    (nvCOMP's own 64 KiB chunks): GB/s of those payload bytes (both ways) and the ratio.
    End to end: the codec with coder ``deflate`` (writes ``deflate64k``; nvCOMP both
    ways), in GB/s of bf16 KV as the other configurations. A note instead where nvCOMP
    is missing."""
    try:
        coders = {name: NvcompCoder(name, DEV) for name in ("deflate", "ans")}
    except Exception as exc:  # noqa: BLE001 - NvcompUnavailableError, or a broken install
        return {"nvcomp_note": f"nvCOMP not measured: {exc}"}
    k, v, firsts = make_batch(keys, values, batch)
    kv_bytes = 2 * k.numel() * 2
    payloads = [bytes(unpack_blob(b)[1]) for b in GpuCodec(art, DEV).encode_batch(k, v, firsts)]
    sizes = [len(p) for p in payloads]
    raws = [piece_raw_sizes(n) for n in sizes]
    out = {
        "nvcomp_version": coders["deflate"].version,
        "nvcomp_batch": batch,
        "nvcomp_input": "blob payloads with coder none (rANS stream and exact bf16 tokens)",
        "nvcomp_input_bytes": sum(sizes),
        "nvcomp_deflate_layout": (
            f"deflate64k: each payload cut into {PIECE_SIZE}-byte pieces, "
            f"{sum(map(len, raws))} streams in one call (spans of one device buffer)"
        ),
        "nvcomp_deflate_stream_layout": f"older deflate: one stream a payload, {batch} streams",
    }
    deflate = coders["deflate"]
    src, starts = deflate.to_device_packed(payloads)
    offs = np.concatenate([s + PIECE_SIZE * np.arange(len(r)) for s, r in zip(starts, raws)])
    lens = np.concatenate(raws)
    comp, comp_at, comp_len = deflate.compress_spans(src, offs, lens)
    dst = torch.empty_like(src)
    out["nvcomp_deflate_ratio"] = sum(sizes) / sum(comp_len)
    t_c = cuda_time(lambda a=src: deflate.compress_spans(a, offs, lens), reps=reps)
    t_d = cuda_time(
        lambda c=comp, d=dst: deflate.decompress_spans(c, comp_at, comp_len, d, offs, lens),
        reps=reps,
    )
    assert all(torch.equal(dst[s : s + n], src[s : s + n]) for s, n in zip(starts, sizes))
    out["nvcomp_deflate_compress_gbps"] = sum(sizes) / t_c / 1e9
    out["nvcomp_deflate_decompress_gbps"] = sum(sizes) / t_d / 1e9
    out["nvcomp_deflate_pieces_shorter_than_stored"] = float(
        np.mean([c < stored_size(n) for c, n in zip(comp_len, lens.tolist())])
    )
    # the same pieces as stored blocks (what zlib and ISA-L write for bytes they cannot
    # shrink, and GpuCodec where nvCOMP's piece is not shorter), inflated by nvCOMP
    stored = [
        pack_pieces([deflate_stored(p[s : s + PIECE_SIZE]) for s in range(0, len(p), PIECE_SIZE)])
        for p in payloads
    ]
    st_dev, st_at = deflate.to_device_packed(stored)
    tables = [read_piece_table(c, n) for c, n in zip(stored, sizes)]  # (starts, lengths)
    st_off = np.concatenate([a + starts for a, (starts, _) in zip(st_at, tables)])
    st_len = np.concatenate([lengths for _, lengths in tables])
    dst.zero_()
    t_s = cuda_time(
        lambda c=st_dev, d=dst: deflate.decompress_spans(c, st_off, st_len, d, offs, lens),
        reps=reps,
    )
    assert all(torch.equal(dst[s : s + n], src[s : s + n]) for s, n in zip(starts, sizes))
    out["nvcomp_deflate_stored_decompress_gbps"] = sum(sizes) / t_s / 1e9
    del src, dst, comp, st_dev
    for name, coder in coders.items():
        dev = coder.to_device(payloads)
        comp = coder.compress(dev)
        key = "deflate_stream" if name == "deflate" else name
        out[f"nvcomp_{key}_ratio"] = sum(sizes) / sum(c.numel() for c in comp)
        t_c = cuda_time(lambda c=coder, d=dev: c.compress(d), reps=reps)
        t_d = cuda_time(lambda c=coder, x=comp: c.decompress(x, sizes), reps=reps)
        out[f"nvcomp_{key}_compress_gbps"] = sum(sizes) / t_c / 1e9
        out[f"nvcomp_{key}_decompress_gbps"] = sum(sizes) / t_d / 1e9
        del dev, comp
    codec = GpuCodec(art, DEV, coder="deflate", nvcomp=True)
    blobs = codec.encode_batch(k, v, firsts)
    out["deflate_coder"] = unpack_blob(blobs[0])[0].coder  # what "deflate" writes
    first = []  # each piece's first byte: BTYPE 00 (bits 1-2) is a stored block
    for b in blobs:
        header, payload = unpack_blob(b)
        at, _ = read_piece_table(payload, sum(header.sections.values()))
        first.extend(payload[a] for a in at.tolist())
    out["deflate_pieces_stored"] = float(np.mean([(f >> 1) & 3 == 0 for f in first]))
    dest = (torch.empty_like(k), torch.empty_like(v))
    dec = codec.decode_batch(blobs, out=dest)
    assert dec.count == batch and dec.error is None, dec.error
    out["deflate_honest_ratio"] = kv_bytes / sum(len(b) for b in blobs)
    t_e = cuda_time(lambda: codec.encode_batch(k, v, firsts), reps=reps)
    # three at least: two runs' median is their mean, and one slow run halved this figure
    t_d = cuda_time(lambda: codec.decode_batch(blobs, out=dest), reps=max(3, reps))
    out["encode_gbps_deflate"] = kv_bytes / t_e / 1e9
    out["decode_gbps_deflate"] = kv_bytes / t_d / 1e9
    # the same blobs read from a pinned CPU tier, as decode_gbps_pinned for coder none
    t_p = decode_from_pinned_tier(codec, blobs, dest, max(3, reps))
    out["decode_gbps_deflate_pinned"] = kv_bytes / t_p / 1e9
    tm = StageTimer()
    codec.decode_batch(blobs, out=dest, timer=tm)
    out["decode_deflate_stages_ms"] = {s: round(1e3 * t, 3) for s, t in tm.times.items()}
    return out


def run_config(
    codec: GpuCodec, keys, values, batch: int, gemm_tflops: float, reps: int, first=None
):
    """Encode and decode ``batch`` chunks built from ``keys/values`` ``(L, H, T, D)``
    (chunk ``i`` at position ``first`` if given, the data's own, else ``4096 + 256 i``)."""
    k, v, firsts = make_batch(keys, values, batch, first)
    kv_bytes = 2 * k.numel() * 2  # bf16 K and V
    res = {"batch": batch, "kv_bytes": kv_bytes}

    sync()
    base = mem_allocated()
    mem_peak_reset()
    blobs = codec.encode_batch(k, v, firsts)
    sync()
    res["peak_extra_mib_encode"] = (mem_peak() - base) / 2**20
    res["honest_ratio"] = kv_bytes / sum(len(b) for b in blobs)
    out = (torch.empty_like(k), torch.empty_like(v))
    sync()
    base = mem_allocated()
    mem_peak_reset()
    dec = codec.decode_batch(blobs, out=out)
    sync()
    assert dec.count == batch and dec.error is None
    res["peak_extra_mib_decode"] = (mem_peak() - base) / 2**20
    err = ((out[0].float() - k.float()) ** 2).sum() + ((out[1].float() - v.float()) ** 2).sum()
    res["nmse"] = float(err / ((k.float() ** 2).sum() + (v.float() ** 2).sum()))

    t_enc = cuda_time(lambda: codec.encode_batch(k, v, firsts), reps=reps)
    t_dec = cuda_time(lambda: codec.decode_batch(blobs, out=out), reps=reps)
    res["encode_gbps"] = kv_bytes / t_enc / 1e9
    res["decode_gbps"] = kv_bytes / t_dec / 1e9
    if CUDA:  # the same blobs read from a pinned CPU tier: the payloads go by DMA
        res["decode_gbps_pinned"] = (
            kv_bytes / decode_from_pinned_tier(codec, blobs, out, reps) / 1e9
        )
    res["encode_ms"] = 1e3 * t_enc
    res["decode_ms"] = 1e3 * t_dec
    for kind, fn in (
        ("encode", lambda tm: codec.encode_batch(k, v, firsts, timer=tm)),
        ("decode", lambda tm: codec.decode_batch(blobs, out=out, timer=tm)),
    ):
        runs = []
        for _ in range(reps):
            tm = StageTimer()
            fn(tm)
            runs.append(tm.times)
        res[f"{kind}_stages_ms"] = {
            s: round(1e3 * statistics.median(r[s] for r in runs), 3) for s in runs[0]
        }
    tokens = batch * CHUNK
    flops = projection_flops_per_token(codec.artifact)
    bytes_tok = kv_bytes / tokens
    roof = gemm_tflops * 1e12 / flops * bytes_tok / 1e9  # GB/s the GEMMs alone allow
    res["flops_per_token"] = flops
    res["gemm_roofline_gbps"] = roof
    for kind in ("encode", "decode"):
        proj = res[f"{kind}_stages_ms"]["projection"] / 1e3
        res[f"{kind}_projection_gbps"] = kv_bytes / proj / 1e9
        res[f"{kind}_projection_share_of_roofline"] = kv_bytes / proj / 1e9 / roof
    return res


# -- TTFT: the model ------------------------------------------------------------------


def load_llama(tiny: bool = False):
    """A random-weight Llama-3.1-8B-architecture model in bf16 on :data:`DEV` (``tiny``:
    the same architecture at :data:`LLAMA`'s dry-run shape)."""
    from transformers import LlamaConfig

    dims = {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    }
    if tiny:
        heads = 2 * LLAMA["heads"]
        dims = {
            "vocab_size": 1000,
            "hidden_size": heads * LLAMA["dim"],
            "intermediate_size": 4 * heads * LLAMA["dim"],
            "num_hidden_layers": LLAMA["layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": LLAMA["heads"],
        }
    rope = {"rope_type": "default", "rope_theta": LLAMA["theta"]}  # transformers 5 spelling
    cfg = LlamaConfig(**dims, max_position_embeddings=131072, rope_parameters=rope)
    from fleet_gpu import random_llama  # benchmarks/: the script's own folder

    return random_llama(cfg, DEV)


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` in newer transformers (which still
    take ``past_key_values`` with a deprecation warning), ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, ids, cache=None):
    """Logits of the last position of ``ids`` ``(1, n)``; ``cache`` (a DynamicCache,
    new if None) is extended in place."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    kwargs = {_cache_kwarg(model): cache}
    return model(ids, use_cache=True, logits_to_keep=1, **kwargs).logits


def cache_of(keys, values):
    """A DynamicCache holding ``(L, H, T, D)`` keys and values (one layer each)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(keys.shape[0]):
        cache.update(keys[i][None], values[i][None], i)
    return cache


def cache_kv(cache):
    """``(L, H, T, D)`` keys and values of a batch-1 DynamicCache."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:  # transformers 4.x
        pairs = list(zip(cache.key_cache, cache.value_cache))
    return torch.stack([k[0] for k, _ in pairs]), torch.stack([v[0] for _, v in pairs])


def model_kv(model, tokens: int, seed: int):
    """``(L, H, T, D)`` bf16 K and V of a random-token prompt."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=DEV, generator=g)
    return model_kv_of(model, ids)


def model_kv_of(model, ids):
    """``(L, H, T, D)`` K and V of a prefill of ``ids`` ``(1, T)``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        forward(model, ids, cache)
    return cache_kv(cache)


# -- TTFT: the tiers --------------------------------------------------------------------


def fs_info(path: Path) -> dict:
    """The file system holding ``path``: mount point, type, source, free bytes."""
    path = Path(path).resolve()
    best = ("/", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            src, mnt, fstype = line.split()[:3]
            under = str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt
            if under and len(mnt) >= len(best[0]):
                best = (mnt, fstype, src)
    except OSError:
        pass
    st = os.statvfs(path)
    return {"path": str(path), "mount": best[0], "fstype": best[1], "source": best[2],
            "free_gb": round(st.f_bavail * st.f_frsize / 1e9, 1)}  # fmt: skip


def pick_disk_dir(wanted: Path | None, need_bytes: int) -> Path:
    """``wanted``, else the first of home, the temp folders and the working directory
    on a file system not held in memory (tmpfs, ramfs) with twice ``need_bytes`` free;
    the temp folder if none is."""
    if wanted is not None:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    cands = [Path.home(), Path("/var/tmp"), Path(tempfile.gettempdir()), Path.cwd()]
    for c in cands:
        try:
            info = fs_info(c)
        except OSError:
            continue
        if info["fstype"] not in ("tmpfs", "ramfs") and info["free_gb"] * 1e9 > 2 * need_bytes:
            return c
    return Path(tempfile.gettempdir())


def drop_page_cache(paths: list[Path]) -> str | None:
    """fsync then ``posix_fadvise(DONTNEED)`` each file, so the next read comes from the
    disk; the first error's text, or None."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError) as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore`` of a private
    mapping), or None where that cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        total = resident = 0
        for p in paths:
            size = os.path.getsize(p)
            if not size:
                continue
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                buf = (ctypes.c_char * size).from_buffer(mm)
                pages = -(-size // mmap.PAGESIZE)
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)),
                                  ctypes.c_size_t(size), vec)  # fmt: skip
                del buf
            finally:
                mm.close()
            if rc != 0:
                return None
            resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
            total += pages
        return resident / max(total, 1)
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def raw_read_gbps(paths: list[Path], threads: int = 8) -> float:
    """The disk's cold read rate for these files: page cache dropped, each file read
    into a reused buffer, ``threads`` at a time (the disk tier's own parallelism)."""
    from concurrent.futures import ThreadPoolExecutor

    drop_page_cache(paths)
    size = max(os.path.getsize(p) for p in paths)
    local = threading.local()

    def read(p):
        if not hasattr(local, "buf"):
            local.buf = bytearray(size)
        with open(p, "rb", buffering=0) as f:
            view = memoryview(local.buf)[: os.path.getsize(p)]
            while view:
                n = f.readinto(view)
                if not n:
                    break
                view = view[n:]

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, paths))
    return sum(os.path.getsize(p) for p in paths) / (time.perf_counter() - t) / 1e9


def chunk_key(tag: str, i: int) -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def disk_paths(disk, keys: list[str]) -> list[Path]:
    """Files of ``keys`` in a DiskBackend (its documented layout: root/key[:2]/key.kvtc)."""
    paths = [Path(disk.root) / k[:2] / f"{k}.kvtc" for k in keys]
    assert all(p.is_file() for p in paths), "DiskBackend layout changed"
    return paths


def cold_time(fn, paths: list[Path], reps: int) -> tuple[float, dict]:
    """Median seconds of ``fn()`` with the files' page cache dropped before each run
    (outside the timing); a warm-up run first. Also what the drops did."""
    out, errors, resident = [], set(), []
    for r in range(reps + 1):
        err = drop_page_cache(paths)
        if err:
            errors.add(err)
        resident.append(resident_fraction(paths))
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if r:
            out.append(time.perf_counter() - t)
    known = [x for x in resident if x is not None]
    return statistics.median(out), {
        "drop_errors": sorted(errors),
        "resident_after_drop_max": max(known) if known else None,
    }


# -- TTFT ---------------------------------------------------------------------------------


def ttft(
    model,
    codecs: dict,
    prefix: int,
    root: Path,
    reps: int,
    suffix: int = 16,
    suffix_forward: str = "graph",
) -> dict:
    """TTFT of a ``prefix + suffix`` prompt: full prefill against reuse of the prefix's
    KV, each timed from the tier's ``get`` to the last position's logits (synchronised):

    - CPU tier, compressed: blobs in a :class:`MemoryBackend` in page-locked memory
      (``pinned=True`` on CUDA; also timed from pageable ``bytes``) → ``decode_batch``
      into the cache layout → prefill of the suffix;
    - CPU tier, bf16 (the anchor): the prefix's KV in pinned host memory in the cache
      layout → one host-to-device copy each of K and V → prefill of the suffix;
    - disk tier, compressed: the blobs as files of a :class:`DiskBackend`, page cache
      dropped first (per file: fsync, ``posix_fadvise(DONTNEED)``) → ``get`` → decode
      → prefill of the suffix;
    - disk tier, bf16: one file per 256-token chunk (K then V, bf16) in another
      DiskBackend on the same disk, dropped the same way → ``get`` → the codec's
      staging upload (:class:`HostStaging`) → the cache layout → prefill of the suffix.

    ``codecs``: grouping name → GpuCodec; the compressed rows are per codec.

    The cache layout every path writes into is that of
    :class:`suffix_forward.SuffixForward` (preallocated buffers of the prefix and the
    suffix); the suffix's prefill on it is ``suffix_forward``: ``graph`` (that class: a
    replayed CUDA graph, one FlashAttention-2 call a layer, as a serving engine runs it;
    its first version, attention split by hand, timed beside it) or ``hf``
    (Hugging Face's own path: a ``DynamicCache`` built from the buffers, then
    ``forward``). Both are timed alone and their logits compared in the row.
    """
    layers, heads, dim = next(iter(codecs.values())).artifact.kv_shape
    n = prefix // CHUNK
    g = torch.Generator(device=DEV).manual_seed(prefix)
    ids = torch.randint(0, model.config.vocab_size, (1, prefix + suffix), device=DEV, generator=g)
    row: dict = {"prefix": prefix, "suffix": suffix, "chunks": n}
    with torch.no_grad():
        t = cuda_time(lambda: forward(model, ids), reps=reps)
        row["prefill_ms"] = 1e3 * t
        log(f"ttft {prefix}: prefill {1e3 * t:.1f} ms")
        k, v = model_kv_of(model, ids[:, :prefix])
        row["kv_bf16_bytes"] = 2 * k.numel() * 2
        row["suffix_only_ms"] = 1e3 * cuda_time(
            lambda: forward(model, ids[:, prefix:], cache_of(k, v)), reps=reps
        )
        runner = SuffixForward(model, ids[:, prefix:], prefix, graph=CUDA)
        for dst, src in zip(runner.prefix_kv(), (k, v)):
            dst.copy_(src)
        row["suffix_forward"] = suffix_forward
        row["suffix_graph_ms"] = 1e3 * cuda_time(runner.logits, reps=max(reps, 5))
        hf_logits = forward(model, ids[:, prefix:], cache_of(k, v)).float()
        row["check_graph_vs_hf_logit_max_abs_diff"] = float(
            (runner.logits().float() - hf_logits).abs().max()
        )
        if CUDA:  # the first version's attention (split-KV by hand), timed to compare
            split = SuffixForward(model, ids[:, prefix:], prefix, graph=True, attention="split")
            for dst, src in zip(split.prefix_kv(), (k, v)):
                dst.copy_(src)
            row["suffix_graph_split_ms"] = 1e3 * cuda_time(split.logits, reps=max(reps, 5))
            row["check_split_vs_flash_logit_max_abs_diff"] = float(
                (split.logits().float() - runner.logits().float()).abs().max()
            )
            del split

        def layout():  # the cache's own buffers, and as chunks: (n, L, H, 256, D) views
            return (*runner.prefix_kv(), runner.chunk_views(CHUNK))

        def suffix_logits(kk, vv):
            own = runner.prefix_kv()
            if kk.data_ptr() != own[0].data_ptr() or vv.data_ptr() != own[1].data_ptr():
                raise ValueError("the prefix's KV must be in the runner's buffers")
            if suffix_forward == "hf":
                return forward(model, ids[:, prefix:], cache_of(kk, vv))
            return runner.logits()

        # -- CPU tier, bf16 in pinned memory (the anchor)
        host_k, host_v = k.cpu(), v.cpu()
        if CUDA:
            host_k, host_v = host_k.pin_memory(), host_v.pin_memory()

        def reuse_pinned_bf16():
            kk, vv = runner.prefix_kv()
            kk.copy_(host_k, non_blocking=True)
            vv.copy_(host_v, non_blocking=True)
            return suffix_logits(kk, vv)

        row["reuse_cpu_bf16_ms"] = 1e3 * cuda_time(reuse_pinned_bf16, reps=reps)
        # plumbing check: reused bf16 KV gives the full prefill's next-token logits
        ref = forward(model, ids).float()
        anchor = reuse_pinned_bf16().float()
        row["check_bf16_reuse_logit_max_abs_diff"] = float((anchor - ref).abs().max())
        row["check_logit_scale"] = float(ref.abs().max())
        host_k = host_v = None  # 2 x 2.1 GB of pinned memory at 32k, freed

        # -- disk tier, bf16: one file per chunk, through the same DiskBackend
        cap = 1 << 42
        disk_bf16 = DiskBackend(root / f"bf16-{prefix}", cap)
        keys_bf16 = [chunk_key(f"bf16/{prefix}", i) for i in range(n)]
        for s in range(0, n, 16):  # 16 chunks (0.5 GB) of host bytes at a time
            items = []
            for i in range(s, min(n, s + 16)):
                sl = slice(i * CHUNK, (i + 1) * CHUNK)
                kv = torch.stack([k[:, :, sl], v[:, :, sl]]).contiguous().cpu()
                items.append((keys_bf16[i], kv.view(torch.int16).numpy().tobytes()))
            disk_bf16.put(items)
            del items
        paths_bf16 = disk_paths(disk_bf16, keys_bf16)
        row["disk_raw_read_gbps"] = raw_read_gbps(paths_bf16)
        staging = HostStaging(DEV)
        chunk_bytes = 2 * layers * heads * CHUNK * dim * 2

        def bf16_to_device(vals):
            buf = staging.upload([(i * chunk_bytes, b) for i, b in enumerate(vals)],
                                 n * chunk_bytes)  # fmt: skip
            kv = buf.view(torch.bfloat16).view(n, 2, layers, heads, CHUNK, dim)
            for dst, src in zip(runner.chunk_views(CHUNK), (kv[:, 0], kv[:, 1])):
                dst.copy_(src)
            return runner.prefix_kv()

        def reuse_disk_bf16(phases=None):
            return reuse_phases(lambda: disk_bf16.get(keys_bf16), bf16_to_device,
                                suffix_logits, phases)  # fmt: skip

        row["check_disk_bf16_logits_equal_pinned"] = bool(
            torch.equal(reuse_disk_bf16().float(), anchor)
        )
        # a slow disk: one cold read of the bf16 KV per measurement, not reps + 1
        slow = row["kv_bf16_bytes"] / (row["disk_raw_read_gbps"] * 1e9) > 3.0
        row["disk_bf16_reps"] = 1 if slow else reps
        t, drops = cold_time(reuse_disk_bf16, paths_bf16, row["disk_bf16_reps"])
        row["reuse_disk_bf16_ms"] = 1e3 * t
        row["disk_bf16_phases_ms"] = phased(reuse_disk_bf16, paths_bf16)
        row["page_cache_drop"] = {"bf16": drops}
        staging.release()
        disk_bf16 = None
        shutil.rmtree(root / f"bf16-{prefix}", ignore_errors=True)
        log(f"ttft {prefix}: anchors done {json.dumps(row)}")

        # -- compressed, per codec: the CPU tier and the disk tier
        row["compressed"] = {}
        for name, codec in codecs.items():
            try:
                row["compressed"][name] = ttft_compressed(
                    codec, name, (k, v), prefix, root, reps, layout, suffix_logits,
                    row["page_cache_drop"],
                )  # fmt: skip
            except Exception:  # noqa: BLE001 - keep the other groupings' rows
                traceback.print_exc()
            empty_cache()
    return row


def reuse_phases(fetch, to_device, finish, phases: dict | None = None):
    """``finish(*to_device(fetch()))``: the tier's get, the KV on the device in the
    cache layout, the suffix's logits. With ``phases`` (a dict), synchronise after each
    and record their ms there."""
    t0 = time.perf_counter()
    got = fetch()
    t1 = time.perf_counter()
    kk, vv = to_device(got)
    del got
    if phases is not None:
        sync()
    t2 = time.perf_counter()
    logits = finish(kk, vv)
    if phases is not None:
        sync()
        phases.update(fetch_ms=1e3 * (t1 - t0), to_device_ms=1e3 * (t2 - t1),
                      suffix_ms=1e3 * (time.perf_counter() - t2))  # fmt: skip
    return logits


def phased(fn, paths: list[Path]) -> dict:
    """One more cold run of ``fn(phases)`` with a synchronisation between phases: where
    the time goes (fetch from the tier, to the device in the cache layout, suffix)."""
    drop_page_cache(paths)
    phases: dict = {}
    sync()
    fn(phases)
    return {k: round(v, 2) for k, v in phases.items()}


def ttft_compressed(codec, name, kv, prefix, root, reps, layout, suffix_logits,
                    drops) -> dict:  # fmt: skip
    """The compressed rows of :func:`ttft` for one codec (``kv``: the prefix's ``(L, H,
    T, D)`` K and V on the device)."""
    k, v = kv
    layers, heads, _, dim = k.shape
    n = prefix // CHUNK
    kc = k.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4)
    vc = v.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4)
    blobs = []
    for s in range(0, n, 32):
        e = min(n, s + 32)
        blobs += codec.encode_batch(kc[s:e], vc[s:e], [i * CHUNK for i in range(s, e)])
    keys = [chunk_key(f"kvtc-{name}/{prefix}", i) for i in range(n)]
    out = {"honest_ratio": 2 * kc.numel() * 2 / sum(len(b) for b in blobs),
           "blob_bytes": sum(len(b) for b in blobs)}  # fmt: skip
    cpu = MemoryBackend(1 << 42, pinned=CUDA)  # the CPU tier in page-locked memory
    cpu.put(list(zip(keys, blobs)))
    pageable = MemoryBackend(1 << 42)
    pageable.put(list(zip(keys, blobs)))
    disk = DiskBackend(root / f"kvtc-{name}-{prefix}", 1 << 42)
    disk.put(list(zip(keys, blobs)))
    del blobs
    paths = disk_paths(disk, keys)

    def decode(got):
        kk, vv, view = layout()
        dec = codec.decode_batch(got, out=view)
        assert dec.count == n and dec.error is None, dec.error
        return kk, vv

    def reuse(tier, phases=None):
        return reuse_phases(lambda: tier.get(keys), decode, suffix_logits, phases)

    kk, vv, view = layout()
    codec.decode_batch(cpu.get(keys), out=view)
    err = ref = 0.0
    for a, b in ((kk, k), (vv, v)):
        for i in range(layers):  # a layer at a time: float32 copies of 32k tokens are big
            err += float(((a[i].float() - b[i].float()) ** 2).sum())
            ref += float((b[i].float() ** 2).sum())
    out["kv_nmse"] = err / ref
    del kk, vv, view
    out["reuse_cpu_compressed_ms"] = 1e3 * cuda_time(lambda: reuse(cpu), reps=reps)
    out["cpu_phases_ms"] = phased(lambda ph: reuse(cpu, ph), [])
    out["reuse_cpu_pageable_ms"] = 1e3 * cuda_time(lambda: reuse(pageable), reps=reps)
    pageable = None
    t, drops[f"kvtc-{name}"] = cold_time(lambda: reuse(disk), paths, reps)
    out["reuse_disk_compressed_ms"] = 1e3 * t
    out["disk_phases_ms"] = phased(lambda ph: reuse(disk, ph), paths)
    disk = None
    shutil.rmtree(root / f"kvtc-{name}-{prefix}", ignore_errors=True)
    log(f"ttft {prefix} {name}: {json.dumps(out)}")
    return out


def ttft_speedups(row: dict, default: str = "all") -> None:
    """Add the speedups to each compressed row of a :func:`ttft` row, and the default
    codec's times and speedups to the row itself."""
    for c in row.get("compressed", {}).values():
        c["speedup_cpu"] = row["prefill_ms"] / c["reuse_cpu_compressed_ms"]
        c["speedup_disk"] = row["prefill_ms"] / c["reuse_disk_compressed_ms"]
        c["cpu_vs_bf16"] = row["reuse_cpu_bf16_ms"] / c["reuse_cpu_compressed_ms"]
        c["disk_vs_bf16"] = row["reuse_disk_bf16_ms"] / c["reuse_disk_compressed_ms"]
    c = row.get("compressed", {}).get(default)
    if c is not None:
        row["default_codec"] = default
        for key in ("reuse_cpu_compressed_ms", "reuse_disk_compressed_ms", "speedup_cpu",
                    "speedup_disk", "cpu_vs_bf16", "disk_vs_bf16"):  # fmt: skip
            row[key] = c[key]


# -- report -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2-artifact", type=Path, default=None)
    ap.add_argument("--smollm2-chunk", type=Path, default=None)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--groupings", default="all,4,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--ttft-prefixes", default=None, help="default 8192,32768 (tiny: 512,1024)")
    ap.add_argument("--ttft-groupings", default="all,4", help="codecs whose TTFT is measured")
    ap.add_argument("--ttft-reps", type=int, default=3)
    ap.add_argument(
        "--suffix-forward", choices=("graph", "hf"), default="graph",
        help="the suffix's prefill in the TTFT: a CUDA graph with one FlashAttention call a "
        "layer over preallocated cache buffers (suffix_forward.py, as serving engines run it) or "
        "Hugging Face's DynamicCache + forward",
    )  # fmt: skip
    ap.add_argument(
        "--disk-dir",
        type=Path,
        default=None,
        help="where the disk tier writes (default: the first of the working "
        "directory, home, /var/tmp, the temp folder not held in memory)",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of the script)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        LLAMA.update(layers=4, heads=2, dim=16)
    t0 = time.time()
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "cpu (Triton interpreter: a dry run, not a measurement)"
    info = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        pass
    log(info)
    ceil = ceilings() if CUDA else {"gemm_tflops_fp16": 1.0}
    log("ceilings", ceil)
    rate = ceil["gemm_tflops_fp16"]
    configs = []

    if args.smollm2_artifact:
        from safetensors.torch import load_file

        art = CodecArtifact.load(args.smollm2_artifact)
        t = load_file(str(args.smollm2_chunk)) if args.smollm2_chunk else None
        sk, sv = (t["keys"].to(DEV), t["values"].to(DEV)) if t else gaussian_kv(SMOL, 256)
        codec = GpuCodec(art, device=DEV)
        for b in batches:
            r = run_config(codec, sk, sv, b, rate, args.reps, first=256 if t else None)
            r.update(shape="SmolLM2-135M", grouping="all", artifact=art.artifact_id + " (real)")
            log(json.dumps(r))
            configs.append(r)
    model, kv_source = None, "Gaussian KV with a decaying spectrum (no model loaded)"
    if args.ttft:
        try:
            model = load_llama(tiny=args.tiny)
            sample = [model_kv(model, 4096, seed=s) for s in range(2)]
            lk = torch.cat([s[0] for s in sample], dim=2)
            lv = torch.cat([s[1] for s in sample], dim=2)
            kv_source = "random-weight Llama-3.1-8B-architecture model, random-token prompts"
            del sample
        except Exception:  # noqa: BLE001 - report and go on with the throughput part
            traceback.print_exc()
            model = None
    if model is None:
        lk, lv = gaussian_kv(LLAMA, 1024 if args.tiny else 8192)
    ttft_codecs = {}
    nvc: dict = {}
    wanted = args.ttft_groupings.split(",")
    for grouping in args.groupings.split(","):
        lpg = None if grouping == "all" else int(grouping)
        art = synthetic_artifact(LLAMA, lpg, lk[:, :, :2048], lv[:, :, :2048],
                                 "Llama-3.1-8B shape (synthetic codec)")  # fmt: skip
        codec = GpuCodec(art, device=DEV)
        for b in batches:
            r = run_config(codec, lk, lv, b, rate, args.reps)
            r.update(shape="Llama-3.1-8B", grouping=grouping, artifact="synthetic")
            log(json.dumps(r))
            configs.append(r)
            empty_cache()
        if grouping == "all":  # nvCOMP alone on this codec's payloads, and coder deflate
            try:
                nvc = nvcomp_runs(art, lk, lv, max(batches), args.reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                nvc = {"nvcomp_note": f"nvCOMP run failed: {type(exc).__name__}: {exc}"}
            log(json.dumps(nvc))
            empty_cache()
        if grouping in wanted:
            ttft_codecs[grouping] = codec
        del codec
    info["seconds"] = round(time.time() - t0, 1)
    log(f"[{info['seconds']} s] throughput done")
    write(args.out, info, ceil, configs, [], kv_source, nvc)
    if model is None or not ttft_codecs:
        return
    del lk, lv
    empty_cache()
    prefixes = [int(x) for x in (args.ttft_prefixes or ("512,1024" if args.tiny else "8192,32768")).split(",")]  # fmt: skip
    layers, heads, dim = LLAMA["layers"], LLAMA["heads"], LLAMA["dim"]
    need = 2 * layers * heads * dim * 2 * max(prefixes) * (1 + 0.2 * len(ttft_codecs))
    root = Path(tempfile.mkdtemp(prefix="kvtc-ttft-", dir=pick_disk_dir(args.disk_dir, need)))
    info["disk"] = fs_info(root)
    log("disk tier at", info["disk"])
    ttfts = []
    try:
        for prefix in prefixes:
            log(f"[{time.time() - t0:.0f} s] TTFT at a {prefix}-token prefix")
            try:
                r = ttft(model, ttft_codecs, prefix, root, args.ttft_reps,
                         suffix_forward=args.suffix_forward)  # fmt: skip
                ttft_speedups(r)
                log(json.dumps(r))
                ttfts.append(r)
            except Exception:  # noqa: BLE001 - keep what was measured
                traceback.print_exc()
            empty_cache()
            info["seconds"] = round(time.time() - t0, 1)
            write(args.out, info, ceil, configs, ttfts, kv_source, nvc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fmt_value(v) -> str:
    """Two decimals for figures, four significant digits for shares below one."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}"


def write(out: Path, info, ceil, configs, ttfts, kv_source, nvc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    big = [c for c in configs if c["batch"] == max(c2["batch"] for c2 in configs)]
    default = [c for c in big if c["shape"] == "Llama-3.1-8B" and c["grouping"] == "all"]
    nvcomp_ceil = {k: v for k, v in nvc.items() if k.startswith("nvcomp_") and isinstance(v, float)}
    if "decode_gbps_deflate" in nvc:
        deflate_note = (
            f"the codec with coder 'deflate', written as {nvc.get('deflate_coder')!r} (RAW "
            f"Deflate over each blob's payload in independent {PIECE_SIZE}-byte pieces, "
            f"every piece of the batch one stream of one nvCOMP call, on the device both "
            f"ways; nvCOMP {nvc['nvcomp_version']}), Llama-3.1-8B "
            f"shape, all-layer groups, {nvc['nvcomp_batch']} chunks, GB/s of bf16 KV as "
            f"decode_gbps_ans; honest ratio {nvc['deflate_honest_ratio']:.2f}"
        )
    else:
        deflate_note = nvc.get("nvcomp_note", "not measured (no Llama-3.1-8B 'all' config)")
    summary = {
        **info,
        "ceilings": {**ceil, **nvcomp_ceil},
        "kv_source_llama": kv_source,
        "honest_ratio": default[0]["honest_ratio"] if default else None,
        "encode_gbps_ans": default[0]["encode_gbps"] if default else None,
        "decode_gbps_ans": default[0]["decode_gbps"] if default else None,
        "decode_gbps_ans_pinned": default[0].get("decode_gbps_pinned") if default else None,
        "decode_gbps_deflate": nvc.get("decode_gbps_deflate"),
        "decode_gbps_deflate_note": deflate_note,
        "decode_gbps_deflate_pinned": nvc.get("decode_gbps_deflate_pinned"),
        "encode_gbps_deflate": nvc.get("encode_gbps_deflate"),
        "entropy_coder": "rANS (Triton), not nvCOMP ANS: the codec's own stream format",
        "nvcomp": nvc,
        **ttft_keys(ttfts),
        "configs": configs,
        "ttft": ttfts,
    }  # fmt: skip
    (out / "gpu_codec.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# The codec on the GPU: throughput, memory, TTFT (`benchmarks/gpu_codec.py`)",
        "",
        f"- command: `{info['command']}`",
        f"- device: {info['device']}; torch {info['torch']}, triton {info.get('triton')}",
        f"- date: {info['date']}; run took {info['seconds']} s",
        f"- Llama-3.1-8B shape: synthetic codec (see the script's docstring); KV: {kv_source}",
        "",
        "## Ceilings measured in this run",
        "",
        *(f"- {k}: {v:.1f}" for k, v in ceil.items()),
        "",
        "nvCOMP alone on the same bytes (the blob payloads with coder `none`: each chunk's",
        "rANS stream and exact bf16 tokens, on the device; one nvCOMP call per batch; GB/s",
        "of those payload bytes): `nvcomp_deflate_*` over the 64 KiB pieces of `deflate64k`",
        "(every piece a stream), `nvcomp_deflate_stream_*` over one stream a payload (the",
        "older `deflate` layout), `nvcomp_ans_*` over whole payloads;",
        "`nvcomp_deflate_stored_decompress_gbps`: the same pieces written as stored blocks",
        "(as zlib and ISA-L write bytes they cannot shrink), inflated by nvCOMP; and the",
        "codec with coder `deflate`, written as `deflate64k` (nvCOMP both ways; a piece",
        "nvCOMP does not shrink is stored, `deflate_pieces_stored` the share; GB/s of bf16",
        "KV; `decode_gbps_deflate_pinned` from a pinned CPU tier):",
        "",
        *(f"- {k}: {fmt_value(v)}" for k, v in nvc.items()),
        "",
        "## Throughput (GB/s of bf16 KV), 256-token chunks",
        "",
        "End to end: encode from device KV to blobs in host memory; decode from blobs in",
        "host memory to device KV in the caller's layout. Stages in ms from separate",
        "synchronised runs. `decode pinned`: the same blobs read from a pinned CPU tier",
        "(`MemoryBackend(pinned=True)`), whose payloads the decoder copies by DMA.",
        "",
        (
            "| shape | grouping | batch | ratio | encode GB/s | decode GB/s | decode pinned "
            "| NMSE | FLOP/token | GEMM roofline GB/s | proj. share enc/dec "
            "| peak extra MiB enc/dec |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        lines.append(
            f"| {c['shape']} | {c['grouping']} | {c['batch']} | {c['honest_ratio']:.2f} | "
            f"{c['encode_gbps']:.1f} | {c['decode_gbps']:.1f} | "
            f"{c.get('decode_gbps_pinned', float('nan')):.1f} | {c['nmse']:.4f} | "
            f"{c['flops_per_token'] / 1e6:.0f} M | {c['gemm_roofline_gbps']:.0f} | "
            f"{c['encode_projection_share_of_roofline']:.0%} / "
            f"{c['decode_projection_share_of_roofline']:.0%} | "
            f"{c['peak_extra_mib_encode']:.0f} / {c['peak_extra_mib_decode']:.0f} |"
        )
    lines += ["", "Stages (ms):", ""]
    for c in configs:
        lines.append(
            f"- {c['shape']} {c['grouping']} x{c['batch']}: encode {c['encode_stages_ms']}; "
            f"decode {c['decode_stages_ms']}"
        )
    if ttfts:
        lines += ttft_lines(ttfts, info)
    lines += ["", "Raw JSON: `gpu_codec.json`.", ""]
    (out / "gpu_codec.md").write_text("\n".join(lines))
    log("\n".join(lines))


def _get(ttfts, prefix: int, grouping: str, key: str):
    row = next((t for t in ttfts if t["prefix"] == prefix), None)
    return row.get("compressed", {}).get(grouping, {}).get(key) if row else None


def ttft_keys(ttfts: list[dict]) -> dict:
    """The issue's JSON keys, for the default codec (all-layer groups)."""
    return {
        "ttft_grouping": "all",
        "ttft_speedup_cpu_8k": _get(ttfts, 8192, "all", "speedup_cpu"),
        "ttft_speedup_cpu_32k": _get(ttfts, 32768, "all", "speedup_cpu"),
        "ttft_speedup_disk_32k": _get(ttfts, 32768, "all", "speedup_disk"),
        "ttft_cpu_vs_bf16_32k": _get(ttfts, 32768, "all", "cpu_vs_bf16"),
        "ttft_disk_vs_bf16_32k": _get(ttfts, 32768, "all", "disk_vs_bf16"),
    }


def ttft_lines(ttfts: list[dict], info: dict) -> list[str]:
    disk = info.get("disk", {})
    lines = [
        "",
        "## TTFT, random-weight Llama-3.1-8B architecture, bf16, prefix + 16 new tokens",
        "",
        "Each time runs from the tier's `get` to the last position's logits, synchronised,",
        "median of the repetitions: prefill = the whole prompt; CPU tier = blobs in a pinned",
        "`MemoryBackend` (page-locked; `get` returns views the decoder copies by DMA), then",
        "`decode_batch` into the cache layout, then the suffix (the same from pageable",
        "`bytes` under 'Where the time goes');",
        "CPU bf16 (anchor) = the prefix's KV in pinned host memory, copied to the device;",
        "disk = a `DiskBackend` per variant (compressed: the blobs; bf16: one file of K and V",
        "per 256-token chunk), page cache dropped before each run (fsync,",
        "`posix_fadvise(DONTNEED)` per file), `get`, then to the device (decode, or the",
        "staging upload and a device copy into the layout), then the suffix.",
        "Every path writes the prefix's KV into the same preallocated cache buffers; the",
        "suffix's prefill on them is "
        + (
            "replayed from a CUDA graph, one FlashAttention-2 call a layer with the causal "
            "mask aligned bottom-right (`suffix_forward.py`: GQA without `repeat_kv`, no "
            "`torch.cat` of the cache), as serving engines run it."
            if ttfts and ttfts[0].get("suffix_forward") == "graph"
            else "Hugging Face's own path (a `DynamicCache` built from them, then `forward`)."
        ),
        f"Disk: `{disk.get('path')}` on {disk.get('source')} ({disk.get('fstype')}).",
        "",
        (
            "| prefix | codec | ratio | prefill ms | CPU kvtc ms | CPU bf16 ms | disk kvtc ms "
            "| disk bf16 ms | speedup CPU | speedup disk | CPU kvtc vs bf16 | disk kvtc vs bf16 |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ttfts:
        for name, c in t.get("compressed", {}).items():
            lines.append(
                f"| {t['prefix']} | {name} | {c['honest_ratio']:.2f} | {t['prefill_ms']:.1f} | "
                f"{c['reuse_cpu_compressed_ms']:.1f} | {t['reuse_cpu_bf16_ms']:.1f} | "
                f"{c['reuse_disk_compressed_ms']:.1f} | {t['reuse_disk_bf16_ms']:.1f} | "
                f"{c['speedup_cpu']:.1f}x | {c['speedup_disk']:.1f}x | "
                f"{c['cpu_vs_bf16']:.2f}x | {c['disk_vs_bf16']:.2f}x |"
            )
    lines += ["", "Where the time goes (one more run, synchronised between phases, ms):", ""]
    for t in ttfts:
        lines.append(
            f"- {t['prefix']}: suffix alone on a cache already on the device: Hugging Face's "
            f"path {t['suffix_only_ms']:.1f}, CUDA graph {t.get('suffix_graph_ms', float('nan')):.1f} "
            f"(logits max abs diff between them "
            f"{t.get('check_graph_vs_hf_logit_max_abs_diff', float('nan')):.3g}; the graph "
            f"with the first version's hand-made split-KV attention "
            f"{t.get('suffix_graph_split_ms', float('nan')):.1f}, logits within "
            f"{t.get('check_split_vs_flash_logit_max_abs_diff', float('nan')):.3g}); disk bf16 {t['disk_bf16_phases_ms']} (cold read of "
            f"the bf16 files into a reused buffer, 8 threads: {t['disk_raw_read_gbps']:.2f} "
            f"GB/s); page cache drops {t['page_cache_drop']}; checks: logits from reused "
            f"bf16 KV against the prefill's, max abs diff "
            f"{t['check_bf16_reuse_logit_max_abs_diff']:.3g} (logit scale "
            f"{t['check_logit_scale']:.3g}), disk bf16 logits equal the pinned anchor's: "
            f"{t['check_disk_bf16_logits_equal_pinned']}; disk bf16 runs "
            f"{t['disk_bf16_reps']}"
        )
        for name, c in t.get("compressed", {}).items():
            lines.append(
                f"  - {name}: CPU tier {c['cpu_phases_ms']} (from pageable bytes: "
                f"{c.get('reuse_cpu_pageable_ms', float('nan')):.1f} ms end to end); disk tier "
                f"{c['disk_phases_ms']}; "
                f"decoded KV NMSE {c['kv_nmse']:.3f} (random bases: a timing codec)"
            )
    return lines


if __name__ == "__main__":
    main()
