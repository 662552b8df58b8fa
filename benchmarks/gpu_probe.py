"""Where the GPU decode and the TTFT's suffix forward spend their time (issue 6 probe).

Two questions, on the GPU machine, before writing kernels for them:

1. The projection GEMM of decode at the Llama-3.1-8B shape, all-layer groups (``basis
   (p, r) @ coeffs (r, N)``, p = 32,768 features, r = 8,192 components, N = 32,768
   tokens = 128 chunks): bf16/fp16 ``torch.mm`` against ``torch._scaled_mm`` (fp8 e4m3,
   row-wise scales, bf16 out) and ``torch._int_mm`` (int8, int32 out), in TFLOP/s.
2. The 16-token suffix forward of Hugging Face Llama (random-weight 8B architecture) on a
   reused 8k / 32k cache: wall time, GPU-busy time and the top kernels (torch.profiler);
   and the same forward through ``suffix_forward.SuffixForward`` (the TTFT benchmark's
   path).

    PYTHONPATH=. python3 benchmarks/gpu_probe.py [--skip-gemm] [--skip-suffix] --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_codec import cache_of, cuda_time, forward, load_llama, model_kv_of

DEV = "cuda"


def gemm_probe(p: int = 32768, r: int = 8192, n: int = 32768) -> dict:
    out: dict = {"shape": [p, r, n]}
    flop = 2 * p * r * n
    g = torch.Generator(device=DEV).manual_seed(0)
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(p, r, device=DEV, dtype=dt, generator=g)
        b = torch.randn(r, n, device=DEV, dtype=dt, generator=g)
        o = torch.empty(p, n, device=DEV, dtype=dt)
        t = cuda_time(lambda a=a, b=b, o=o: torch.mm(a, b, out=o), reps=5, warmup=2)
        out[f"{name}_tflops"] = flop / t / 1e12
        del a, b, o
    try:
        fa = torch.randn(p, r, device=DEV, generator=g).to(torch.float8_e4m3fn)
        fb = torch.randint(-16, 17, (n, r), device=DEV, generator=g).float()
        fb = fb.to(torch.float8_e4m3fn).t()  # column-major (r, n)
        sa = torch.rand(p, 1, device=DEV) + 0.5
        sb = torch.ones(1, n, device=DEV)
        t = cuda_time(
            lambda fa=fa, fb=fb: torch._scaled_mm(fa, fb, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
            reps=5, warmup=2,
        )  # fmt: skip
        out["fp8_rowwise_tflops"] = flop / t / 1e12
        st = torch.ones((), device=DEV)
        t = cuda_time(
            lambda fa=fa, fb=fb: torch._scaled_mm(fa, fb, scale_a=st, scale_b=st, out_dtype=torch.bfloat16),
            reps=5, warmup=2,
        )  # fmt: skip
        out["fp8_tensorwise_tflops"] = flop / t / 1e12
        del fa, fb
    except Exception as exc:  # noqa: BLE001 - a probe: record what failed
        out["fp8_error"] = repr(exc)[:300]
    for layout in ("b_colmajor", "b_rowmajor"):
        try:
            a = torch.randint(-127, 128, (p, r), device=DEV, dtype=torch.int8, generator=g)
            if layout == "b_colmajor":
                b = torch.randint(-127, 128, (n, r), device=DEV, dtype=torch.int8).t()
            else:
                b = torch.randint(-127, 128, (r, n), device=DEV, dtype=torch.int8)
            t = cuda_time(lambda a=a, b=b: torch._int_mm(a, b), reps=5, warmup=2)
            out[f"int8_{layout}_tops"] = flop / t / 1e12
            del a, b
        except Exception as exc:  # noqa: BLE001
            out[f"int8_{layout}_error"] = repr(exc)[:300]
    torch.cuda.empty_cache()
    return out


def profile_suffix(model, ids, k, v) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn = lambda: forward(model, ids, cache_of(k, v))
    wall = cuda_time(fn, reps=5, warmup=2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    return {
        "wall_ms": 1e3 * wall,
        "gpu_busy_ms": gpu_us / 1e3,
        "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 3), e.count) for e in top],
    }


def graphed_suffix(model, ids, k, v, prefix: int) -> dict:
    """The same suffix through :class:`suffix_forward.SuffixForward` (the TTFT
    benchmark's path: preallocated cache buffers, split-KV attention, a CUDA graph),
    timed, and its logits against Hugging Face's path."""
    from suffix_forward import SuffixForward

    runner = SuffixForward(model, ids, prefix)
    for dst, src in zip(runner.prefix_kv(), (k, v)):
        dst.copy_(src)
    t = cuda_time(runner.logits, reps=10, warmup=2)
    ref = forward(model, ids, cache_of(k, v)).float()
    diff = float((runner.logits().float() - ref).abs().max())
    return {"graph_ms": 1e3 * t, "max_abs_diff_vs_dynamic": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-suffix", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    res: dict = {"command": " ".join(["python3", *sys.argv]),
                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "device": torch.cuda.get_device_name()}  # fmt: skip
    t0 = time.time()
    if not args.skip_gemm:
        res["gemm"] = gemm_probe()
        print(json.dumps(res["gemm"]), flush=True)
    if not args.skip_suffix:
        model = load_llama()
        res["suffix"] = {}
        for prefix in (8192, 32768):
            g = torch.Generator(device=DEV).manual_seed(prefix)
            ids = torch.randint(0, model.config.vocab_size, (1, prefix + 16), device=DEV,
                                generator=g)  # fmt: skip
            with torch.no_grad():
                k, v = model_kv_of(model, ids[:, :prefix])
                row = profile_suffix(model, ids[:, prefix:], k, v)
                try:
                    row.update(graphed_suffix(model, ids[:, prefix:], k, v, prefix))
                except Exception:  # noqa: BLE001 - a probe: record what failed
                    row["graph_error"] = traceback.format_exc()[-1500:]
            res["suffix"][prefix] = row
            print(prefix, json.dumps(row, indent=1), flush=True)
            del k, v
            torch.cuda.empty_cache()
    res["seconds"] = time.time() - t0
    (args.out / "gpu_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
