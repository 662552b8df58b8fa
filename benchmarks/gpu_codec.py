"""Throughput, memory and TTFT of the codec on CUDA (:class:`kvtc_store.codec.gpu.GpuCodec`).

Writes ``benchmarks/results/gpu_codec.md`` (command, device, date, raw numbers) and its
JSON twin ``gpu_codec.json``. Run on the GPU machine from the repository root:

    PYTHONPATH=. python3 benchmarks/gpu_codec.py [--smollm2-artifact DIR] [--ttft]

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
codec adds per batch. Ceilings measured in the same run: device-to-device copy and GEMM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from kvtc_store.codec import CodecArtifact, PlanRange, RopeParams
from kvtc_store.codec.features import default_groups
from kvtc_store.codec.gpu.codec_gpu import GpuCodec
from kvtc_store.codec.rans import ESC, N_SYM, PREC, STATE_BITS, K, assign_classes, laplace_tables

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


def run_config(
    codec: GpuCodec, keys, values, batch: int, gemm_tflops: float, reps: int, first=None
):
    """Encode and decode ``batch`` chunks built from ``keys/values`` ``(L, H, T, D)``
    (chunk ``i`` at position ``first`` if given, the data's own, else ``4096 + 256 i``)."""
    pool = keys.shape[2] // CHUNK
    idx = [i % pool for i in range(batch)]
    k = torch.stack([keys[:, :, i * CHUNK : (i + 1) * CHUNK] for i in idx])
    v = torch.stack([values[:, :, i * CHUNK : (i + 1) * CHUNK] for i in idx])
    firsts = [first if first is not None else 4096 + i * CHUNK for i in range(batch)]
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


# -- TTFT ---------------------------------------------------------------------------------


def load_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=LLAMA["theta"],
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def forward(model, ids, cache=None):
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits, out.past_key_values


def model_kv(model, tokens: int, seed: int):
    """``(L, H, T, D)`` bf16 K and V of a random-token prompt."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(0, 128256, (1, tokens), device=DEV, generator=g)
    with torch.no_grad():
        _, cache = forward(model, ids)
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return k, v


def ttft(model, codec: GpuCodec, prefix: int, suffix: int = 16, reps: int = 3) -> dict:
    """TTFT of a ``prefix + suffix`` prompt: full prefill, against reuse of the prefix's
    KV from pinned CPU memory as blobs (copy + GPU decode into the cache layout + prefill
    of the suffix), and as uncompressed bf16 (copy + prefill of the suffix)."""
    from transformers import DynamicCache

    layers, heads, dim = codec.artifact.kv_shape
    g = torch.Generator(device=DEV).manual_seed(prefix)
    ids = torch.randint(0, 128256, (1, prefix + suffix), device=DEV, generator=g)
    with torch.no_grad():
        t_prefill = cuda_time(lambda: forward(model, ids), reps=reps)
        _, cache = forward(model, ids[:, :prefix])
        k = torch.stack([layer.keys[0] for layer in cache.layers])  # (L, H, T, D)
        v = torch.stack([layer.values[0] for layer in cache.layers])
        del cache
        n = prefix // CHUNK
        kc = k.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4)
        vc = v.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4)
        blobs = []
        for s in range(0, n, 32):
            blobs += codec.encode_batch(
                kc[s : s + 32], vc[s : s + 32], [i * CHUNK for i in range(s, min(n, s + 32))]
            )
        ratio = 2 * k.numel() * 2 / sum(len(b) for b in blobs)
        host_k = k.cpu().pin_memory()
        host_v = v.cpu().pin_memory()
        del k, v, kc, vc

        def cache_of(kk, vv):
            return DynamicCache(ddp_cache_data=[(kk[i][None], vv[i][None]) for i in range(layers)])

        def reuse_compressed():
            kk = torch.empty(layers, heads, prefix, dim, dtype=torch.bfloat16, device=DEV)
            vv = torch.empty_like(kk)
            view = (  # the cache's own layout, written in place by the decoder
                kk.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4),
                vv.view(layers, heads, n, CHUNK, dim).permute(2, 0, 1, 3, 4),
            )
            dec = codec.decode_batch(blobs, out=view)
            assert dec.count == n
            return forward(model, ids[:, prefix:], cache_of(kk, vv))

        def reuse_plain():
            kk = host_k.to("cuda", non_blocking=True)
            vv = host_v.to("cuda", non_blocking=True)
            return forward(model, ids[:, prefix:], cache_of(kk, vv))

        t_comp = cuda_time(reuse_compressed, reps=reps)
        t_plain = cuda_time(reuse_plain, reps=reps)
        t_suffix = cuda_time(lambda: forward(model, ids[:, prefix:], cache_of(
            host_k.to("cuda"), host_v.to("cuda"))), reps=1)  # fmt: skip
    return {
        "prefix": prefix,
        "prefill_ms": 1e3 * t_prefill,
        "reuse_cpu_compressed_ms": 1e3 * t_comp,
        "reuse_cpu_bf16_ms": 1e3 * t_plain,
        "speedup_cpu_compressed": t_prefill / t_comp,
        "honest_ratio": ratio,
        "note_suffix_with_copy_ms": 1e3 * t_suffix,
    }


# -- report -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2-artifact", type=Path, default=None)
    ap.add_argument("--smollm2-chunk", type=Path, default=None)
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--groupings", default="all,4,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ttft", action="store_true")
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
            model = load_llama()
            sample = [model_kv(model, 4096, seed=s) for s in range(2)]
            lk = torch.cat([s[0] for s in sample], dim=2)
            lv = torch.cat([s[1] for s in sample], dim=2)
            kv_source = "random-weight Llama-3.1-8B-architecture model, random-token prompts"
        except Exception:  # noqa: BLE001 - report and go on with the throughput part
            traceback.print_exc()
            model = None
    if model is None:
        lk, lv = gaussian_kv(LLAMA, 1024 if args.tiny else 8192)
    ttft_codec = None
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
        if grouping == "all":
            ttft_codec = codec
        del codec
    info["seconds"] = round(time.time() - t0, 1)
    write(args.out, info, ceil, configs, [], kv_source)
    ttfts = []
    if model is not None and ttft_codec is not None:
        del lk, lv
        empty_cache()
        try:
            for prefix in (8192, 32768):
                r = ttft(model, ttft_codec, prefix)
                log(json.dumps(r))
                ttfts.append(r)
        except Exception:  # noqa: BLE001 - keep what was measured
            traceback.print_exc()
        info["seconds"] = round(time.time() - t0, 1)
        write(args.out, info, ceil, configs, ttfts, kv_source)


def write(out: Path, info, ceil, configs, ttfts, kv_source) -> None:
    out.mkdir(parents=True, exist_ok=True)
    big = [c for c in configs if c["batch"] == max(c2["batch"] for c2 in configs)]
    default = [c for c in big if c["shape"] == "Llama-3.1-8B" and c["grouping"] == "all"]
    summary = {
        **info,
        "ceilings": ceil,
        "kv_source_llama": kv_source,
        "honest_ratio": default[0]["honest_ratio"] if default else None,
        "encode_gbps_ans": default[0]["encode_gbps"] if default else None,
        "decode_gbps_ans": default[0]["decode_gbps"] if default else None,
        "decode_gbps_deflate": None,
        "entropy_coder": "rANS (Triton), not nvCOMP ANS: the codec's own stream format",
        "ttft_speedup_cpu_8k": next((t["speedup_cpu_compressed"] for t in ttfts if t["prefix"] == 8192), None),
        "ttft_speedup_cpu_32k": next((t["speedup_cpu_compressed"] for t in ttfts if t["prefix"] == 32768), None),
        "ttft_speedup_disk_32k": None,
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
        "## Throughput (GB/s of bf16 KV), 256-token chunks",
        "",
        "End to end: encode from device KV to blobs in host memory; decode from blobs in",
        "host memory to device KV in the caller's layout. Stages in ms from separate",
        "synchronised runs.",
        "",
        (
            "| shape | grouping | batch | ratio | encode GB/s | decode GB/s | NMSE | FLOP/token "
            "| GEMM roofline GB/s | proj. share enc/dec | peak extra MiB enc/dec |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        lines.append(
            f"| {c['shape']} | {c['grouping']} | {c['batch']} | {c['honest_ratio']:.2f} | "
            f"{c['encode_gbps']:.1f} | {c['decode_gbps']:.1f} | {c['nmse']:.4f} | "
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
        lines += [
            "",
            "## TTFT, random-weight Llama-3.1-8B architecture, bf16, prefix + 16 new tokens",
            "",
            (
                "| prefix | prefill ms | reuse from pinned CPU, KVTC ms | reuse, bf16 copy ms "
                "| speedup | ratio |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for t in ttfts:
            lines.append(
                f"| {t['prefix']} | {t['prefill_ms']:.1f} | {t['reuse_cpu_compressed_ms']:.1f} "
                f"| {t['reuse_cpu_bf16_ms']:.1f} | {t['speedup_cpu_compressed']:.1f}x | "
                f"{t['honest_ratio']:.2f} |"
            )
    lines += ["", "Raw JSON: `gpu_codec.json`.", ""]
    (out / "gpu_codec.md").write_text("\n".join(lines))
    log("\n".join(lines))


if __name__ == "__main__":
    main()
