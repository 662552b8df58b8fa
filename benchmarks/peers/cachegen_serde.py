"""CacheGen, through LMCache's own serde: round-trip context KV in 256-token chunks.

CacheGen (Liu et al., "CacheGen: KV Cache Compression and Streaming for Fast Large
Language Model Serving", SIGCOMM 2024, arXiv 2310.07240) quantises each token's K and V
per layer with a max-abs scale into a fixed number of bins (LMCache: keys 32 bins in
layers 0-9, 16 after; values 32 bins in layers 0-1, 16 after; no quality setting) and
arithmetic-codes the symbols with a per-(layer, channel) CDF. This runs the real
``lmcache==0.5.6`` ``CacheGenSerializer`` / ``CacheGenDeserializer`` (CPU kernels, numba),
in ``.venv-lmcache`` (``make peers-env``), on chunks in LMCache's ``KV_2LTD`` layout
``(2, L, T, H * D)`` bfloat16.

Serialised size is the serde's byte buffer as LMCache stores it; it is also DEFLATE-compressed
(zlib level 9, raw) to report the ratio after DEFLATE (the per-chunk CDF tables compress).

Usage (from the main environment, see ``run_peers.py``)::

    .venv-lmcache/bin/python benchmarks/peers/cachegen_serde.py --model DIR --serve
        # then one JSON line per request on stdin: {"in": kv.safetensors, "out": dec.safetensors}
    .venv-lmcache/bin/python benchmarks/peers/cachegen_serde.py --model DIR --once IN OUT

``IN`` holds ``keys``/``values`` ``(L, H, T, D)`` bfloat16, ``T`` a multiple of the chunk
size; ``OUT`` gets the decoded ``keys``/``values`` (same shape, bfloat16) and int64
``chunk_bytes`` / ``chunk_deflate_bytes`` ``(T / 256,)``. ``DIR`` is a local model folder
holding ``config.json`` (CacheGen reads the layer count from it; ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from protocol import load_kv, save_kv

CHUNK = 256


class CacheGenRoundTrip:
    """LMCache's CacheGen serializer and deserializer for one model.

    Args:
        model_dir: local folder with the model's ``config.json``.
        kv_shape: ``(L, H, D)`` of the model's KV.
        chunk: tokens per chunk (LMCache's ``chunk_size``, default 256).
    """

    def __init__(self, model_dir: str, kv_shape: tuple[int, int, int], chunk: int = CHUNK):
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.naive_serde import CreateSerde

        layers, heads, dim = kv_shape
        config = LMCacheEngineConfig.from_defaults(chunk_size=chunk)
        meta = LMCacheMetadata(
            model_name=str(model_dir),
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(layers, 2, chunk, heads, dim),
            chunk_size=chunk,
        )
        self.serializer, self.deserializer = CreateSerde("cachegen", meta, config)
        self.chunk = chunk

    def chunk_roundtrip(self, keys: torch.Tensor, values: torch.Tensor):
        """One chunk through the serde.

        Args:
            keys, values: ``(L, H, T, D)`` with ``T <= chunk``, any float dtype (cast to
                bfloat16, as an LMCache deployment of a bf16 model holds them).

        Returns:
            ``(keys, values, blob)``: decoded ``(L, H, T, D)`` bfloat16 and the serialised bytes.
        """
        from lmcache.v1.memory_management import (
            BytesBufferMemoryObj,
            MemoryFormat,
            MemoryObjMetadata,
            TensorMemoryObj,
        )

        layers, heads, tokens, dim = keys.shape
        kv = torch.stack([keys, values]).to(torch.bfloat16)  # (2, L, H, T, D)
        kv = kv.permute(0, 1, 3, 2, 4).reshape(2, layers, tokens, heads * dim).contiguous()
        obj = TensorMemoryObj(
            raw_data=kv,
            metadata=MemoryObjMetadata(
                shape=kv.shape,
                dtype=kv.dtype,
                address=-1,
                phy_size=kv.numel() * kv.element_size(),
                ref_count=-1,
                fmt=MemoryFormat.KV_2LTD,
            ),
            parent_allocator=None,
        )
        blob = bytes(self.serializer.serialize(obj).byte_array)
        out = self.deserializer.deserialize(BytesBufferMemoryObj(blob)).tensor
        out = out.reshape(2, layers, tokens, heads, dim).permute(0, 1, 3, 2, 4)
        return out[0].contiguous(), out[1].contiguous(), blob

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole context, chunk by chunk: decoded KV and per-chunk byte counts."""
        ks, vs, nbytes, ndeflate = [], [], [], []
        for start in range(0, keys.shape[2], self.chunk):
            sl = slice(start, start + self.chunk)
            k, v, blob = self.chunk_roundtrip(keys[:, :, sl], values[:, :, sl])
            ks.append(k)
            vs.append(v)
            nbytes.append(len(blob))
            deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
            ndeflate.append(len(deflater.compress(blob) + deflater.flush()))
        return {
            "keys": torch.cat(ks, dim=2),
            "values": torch.cat(vs, dim=2),
            "chunk_bytes": torch.tensor(nbytes, dtype=torch.int64),
            "chunk_deflate_bytes": torch.tensor(ndeflate, dtype=torch.int64),
        }


def _one(rt: CacheGenRoundTrip, src: Path, dst: Path) -> dict:
    t0 = time.perf_counter()
    kv = load_kv(src)
    out = rt.roundtrip(kv["keys"], kv["values"])
    keys, values = out.pop("keys"), out.pop("values")
    save_kv(dst, keys, values, **out)
    return {
        "out": str(dst),
        "seconds": round(time.perf_counter() - t0, 3),
        "bytes": int(out["chunk_bytes"].sum()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model folder holding config.json")
    p.add_argument("--once", nargs=2, type=Path, metavar=("IN", "OUT"))
    p.add_argument("--serve", action="store_true", help="requests as JSON lines on stdin")
    args = p.parse_args(argv)
    # LMCache logs to stdout; keep stdout for the replies only.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    heads = cfg["num_key_value_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rt = CacheGenRoundTrip(args.model, (cfg["num_hidden_layers"], heads, dim))
    if args.once:
        replies.write(json.dumps(_one(rt, *args.once)) + "\n")
        return 0
    for line in sys.stdin:
        if line.strip():
            req = json.loads(line)
            replies.write(json.dumps(_one(rt, Path(req["in"]), Path(req["out"]))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
