"""The host side of the batched GPU decoder, alone: parse, checksum, staging upload.

:meth:`GpuCodec.decode_batch <kvtc_store.codec.gpu.GpuCodec.decode_batch>` spends its
host time on Python ``bytes`` blobs before any kernel runs. This times that work for
Llama-3.1-8B-shaped blobs (32 layers, 8 KV heads, head dim 128, 256 tokens; a stream of
2.11 MB, a ratio-16 chunk) without a GPU, so it runs on any host (``--device cpu``: the
"upload" is then a host copy) and on the GPU machine (``--device cuda``):

- before: the earlier decoder's host path, still in the library's pieces: per blob
  ``unpack_blob`` (header checks and the payload's xxh64) and the codec's section checks,
  then :func:`~kvtc_store.codec.gpu.rans_triton.upload_streams` (one thread copies each
  stream into a fresh (pinned on CUDA) buffer, one host-to-device copy);
- after: ``GpuCodec._parse_all`` (headers only), ``GpuCodec._upload`` (host threads
  fill the codec's kept staging buffer, sent in slices), and the payload checksums on the
  host threads (``verify``), which the decoder overlaps with the device work.

The stream bytes are random (no kernel runs), the headers real. Writes
``benchmarks/results/decode_host_<device>.md``. Usage:

    PYTHONPATH=. python benchmarks/decode_host.py [--device cpu] [--batches 1,16,128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
STREAM = 2_110_000  # bytes: 33.5 MB of bf16 KV per chunk at ratio 15.9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ["KVTC_BENCH_DEVICE"] = args.device  # read by gpu_codec at import
    from gpu_codec import LLAMA, gaussian_kv, synthetic_artifact

    from kvtc_store.codec.blob import pack_blob, payload_intact, unpack_blob
    from kvtc_store.codec.gpu.codec_gpu import GpuCodec
    from kvtc_store.codec.gpu.rans_triton import upload_streams
    from kvtc_store.codec.gpu.staging import host_pool, host_workers

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    k, v = gaussian_kv(LLAMA, 512)
    art = synthetic_artifact(LLAMA, 1, k, v, "Llama-3.1-8B shape (synthetic codec)")
    codec = GpuCodec(art, device=args.device)
    rng = np.random.default_rng(0)

    def blob(i: int) -> bytes:
        stream = rng.integers(0, 256, STREAM, dtype=np.uint8).tobytes()
        header = codec._ref.blob_header(256, torch.bfloat16, 4096 + 256 * i, 0, "none",
                                        {"stream": STREAM, "exact": 0})  # fmt: skip
        return pack_blob(header, stream)

    def timed(fn, reps: int) -> float:
        fn()  # warm-up: buffers grown, pool started
        out = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    def measure(blobs: list[bytes]) -> dict:
        batch = len(blobs)

        def before_parse():
            streams = []
            for b in blobs:
                header, payload = unpack_blob(b)
                p = codec._parse(header, payload)
                streams.append(p.raw[: p.stream_len])
            return streams

        streams = before_parse()
        parsed, error = codec._parse_all(blobs)
        assert error is None and len(parsed) == batch
        r = {"batch": batch, "blob_mb": sum(len(b) for b in blobs) / 1e6}
        r["before_parse_ms"] = 1e3 * timed(before_parse, args.reps)
        r["before_upload_ms"] = 1e3 * timed(lambda: upload_streams(streams, args.device), args.reps)
        r["before_ms"] = r["before_parse_ms"] + r["before_upload_ms"]
        r["before_us_per_blob"] = 1e3 * r["before_parse_ms"] / batch
        r["parse_ms"] = 1e3 * timed(lambda: codec._parse_all(blobs), args.reps)
        r["upload_ms"] = 1e3 * timed(lambda: codec._upload(parsed, batch), args.reps)
        r["verify_ms"] = 1e3 * timed(
            lambda: all(host_pool().map(lambda p: payload_intact(p.header, p.payload), parsed)),
            args.reps,
        )
        r["parse_us_per_blob"] = 1e3 * r["parse_ms"] / batch
        r["after_critical_ms"] = r["parse_ms"] + r["upload_ms"]
        r["after_all_ms"] = r["after_critical_ms"] + r["verify_ms"]
        print(r, flush=True)
        return r

    batches = [int(b) for b in args.batches.split(",")]
    pool = [blob(i) for i in range(max(batches))]
    rows = [measure(pool[:batch]) for batch in batches]
    write(args, rows, host_workers())


def write(args, rows, workers: int) -> None:
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    lines = [
        "# Host side of the batched GPU decoder (`benchmarks/decode_host.py`)",
        "",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        (
            f"- device: {args.device} ({name}); host: {os.cpu_count()} cores, "
            f"{workers} pool threads; torch {torch.__version__}"
        ),
        f"- date: {datetime.date.today().isoformat()}",
        "- blobs: Llama-3.1-8B shape, 256 tokens, 2.11 MB rANS stream each (random bytes),",
        "  coder `none`; median of the repetitions",
        "",
        (
            "| blobs | MB | before: parse ms (µs/blob) | before: upload ms | after: parse ms "
            "(µs/blob) | after: upload ms | after: verify ms | before, total ms "
            "| after, before the kernels ms |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['blob_mb']:.0f} | {r['before_parse_ms']:.1f} "
            f"({r['before_us_per_blob']:.0f}) | {r['before_upload_ms']:.1f} | "
            f"{r['parse_ms']:.2f} ({r['parse_us_per_blob']:.1f}) | {r['upload_ms']:.1f} | "
            f"{r['verify_ms']:.1f} | {r['before_ms']:.1f} | {r['after_critical_ms']:.1f} |"
        )
    lines += [
        "",
        "`before`: per blob `unpack_blob` (its xxh64 included) and section checks, then",
        "`upload_streams` (fresh buffer, one copying thread). `after, before the kernels`:",
        "`parse + upload`, what the decoder does before it queues device work; `verify`",
        "(the payload checksums on the host threads) runs while the device decodes.",
        "With `--device cpu` the `after` upload also copies into a freshly allocated CPU",
        "tensor standing in for device memory (on CUDA: the caching allocator's, no page",
        "faults), and `before`'s upload skips that copy (`.to('cpu')` is a no-op): its",
        "upload columns compare nothing on CPU; the parse columns do.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_host_{args.device}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
