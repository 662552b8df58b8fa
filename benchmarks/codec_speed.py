"""Throughput of the reference (torch) codec path, per chunk, on CPU or CUDA.

Not the GPU codec of the fused-kernel work: this times ``KVTCCodec.encode`` and
``decode_prefix`` as they are, to show where the reference path stands.

Usage: ``python benchmarks/codec_speed.py ARTIFACT_DIR CHUNK.safetensors [--device cuda]
[--chunks 16]`` (the chunk file holds ``keys``/``values`` ``(L, H, T, D)``; positions
from 256). Prints GB/s of bf16 KV processed, end to end including DEFLATE on the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load_file

from kvtc_store.codec import CodecArtifact, KVTCCodec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunks", type=int, default=16)
    args = p.parse_args()
    codec = KVTCCodec(CodecArtifact.load(args.artifact), device=args.device)
    t = load_file(args.chunk)
    k, v = t["keys"].float().to(args.device), t["values"].float().to(args.device)
    bf16 = k.numel() * 2 * 2 * args.chunks
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    blobs = [codec.encode(k, v, 256) for _ in range(2)]  # warm-up
    codec.decode_prefix(blobs)
    sync()
    t0 = time.perf_counter()
    blobs = [codec.encode(k, v, 256 * (i + 1)) for i in range(args.chunks)]
    sync()
    t1 = time.perf_counter()
    chunks, err = codec.decode_prefix(blobs)
    sync()
    t2 = time.perf_counter()
    assert err is None and len(chunks) == args.chunks
    ratio = bf16 / sum(len(b) for b in blobs)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device != 'cpu' else 'cpu'}),"
        f" {args.chunks} chunks of {k.shape}, honest ratio {ratio:.2f}: "
        f"encode {bf16 / (t1 - t0) / 1e9:.3f} GB/s, decode {bf16 / (t2 - t1) / 1e9:.3f} GB/s"
    )


if __name__ == "__main__":
    main()
