"""The LMCache serde ``kvtc`` on real SmolLM2 chunks: positions read from the keys,
ratio and error, against coding every chunk at position 0.

LMCache's serde API hands a chunk without its position (connectors/lmcache_serde.py), so
the serializer reads it from the keys (kvtc_store/codec/position.py). This runs the serde's
own ``KVTCSerializer`` / ``KVTCDeserializer`` on LMCache ``TensorMemoryObj`` chunks in
``KV_2LTD`` layout ``(2, L, T, H * D)`` bfloat16, cut from one forward pass of SmolLM2 over
Python's own documentation (``pydoc_data.topics``), once with the serde's default
candidates (multiples of 256 below 131072) and once with position 0 only (what a serde
that ignored positions would do).

Usage (inside ``.venv-lmcache``, ``make .venv-lmcache/.kvtc-store``)::

    .venv-lmcache/bin/python benchmarks/lmcache_serde.py [--tokens 2048] [--artifact DIR]

Writes ``benchmarks/results/lmcache_serde.{json,md}``. ``--artifact``: a codec artifact
for SmolLM2 (default: the newest cached ``rans-b0.1-cr16``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import pydoc_data.topics
import time
from pathlib import Path

import torch
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

from kvtc_store.codec import CodecArtifact, KVTCCodec
from kvtc_store.connectors.lmcache_serde import KVTCDeserializer, KVTCSerializer
from kvtc_store.model import cache_home, load_model

CHUNK = 256
OUT = Path(__file__).parent / "results"


def memory_obj(t: torch.Tensor, fmt: MemoryFormat) -> TensorMemoryObj:
    """An LMCache memory object over ``t`` (no allocator), as the storage manager hands one."""
    meta = MemoryObjMetadata(t.shape, t.dtype, -1, t.numel() * t.element_size(), -1, fmt=fmt)
    return TensorMemoryObj(t, meta, None)


def serde_round_trip(ser: KVTCSerializer, des: KVTCDeserializer, kv: torch.Tensor) -> dict:
    """One chunk through the serde: blob bytes, coded position, relative errors, seconds."""
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey

    key = ObjectKey(b"\0" * 32, "bench", 0)
    size = ser.estimate_serialized_size(MemoryLayoutDesc([kv.shape], [kv.dtype]))
    buf = memory_obj(torch.zeros(size, dtype=torch.uint8), MemoryFormat.BINARY_BUFFER)
    t0 = time.perf_counter()
    n = ser.serialize(memory_obj(kv, MemoryFormat.KV_2LTD), buf, key)
    t1 = time.perf_counter()
    out = memory_obj(torch.empty_like(kv), MemoryFormat.KV_2LTD)
    des.deserialize(buf, out, key)
    t2 = time.perf_counter()
    blob = bytes(buf.raw_tensor[:n].numpy())
    err = [
        ((out.tensor[i].float() - kv[i].float()).norm() / kv[i].float().norm()).item()
        for i in (0, 1)
    ]
    return {
        "blob_bytes": n,
        "ratio": kv.numel() * 2 / n,
        "coded_at": ser.codec.read_header(blob).first_position,
        "key_rel_err": err[0],
        "value_rel_err": err[1],
        "serialize_s": t1 - t0,
        "deserialize_s": t2 - t1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--artifact", type=Path)
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.time()
    cached = glob.glob(str(cache_home() / "codecs" / "SmolLM2*" / "*" / "rans-b0.1-cr16"))
    artifact = args.artifact or Path(max(cached, key=os.path.getmtime))
    model_dir = max(glob.glob(str(cache_home() / "models" / "SmolLM2-135M-Instruct-*")))
    model, tok, _ = load_model(model_dir)
    text = "".join(list(pydoc_data.topics.topics.values())[50:])
    ids = tok(text[: 40 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    layers, heads, tokens, dim = k.shape
    kv = torch.stack([k, v]).transpose(2, 3).reshape(2, layers, tokens, heads * dim)
    codec = KVTCCodec(CodecArtifact.load(artifact))
    serdes = {
        "keys_position": KVTCSerializer(codec, torch.arange(0, 131072, CHUNK)),
        "position_0": KVTCSerializer(codec),
    }
    des = KVTCDeserializer(codec)
    rows = []
    for start in range(0, tokens - CHUNK + 1, CHUNK):
        chunk = kv[:, :, start : start + CHUNK].to(torch.bfloat16).contiguous()
        row = {"position": start}
        for name, ser in serdes.items():
            row[name] = serde_round_trip(ser, des, chunk)
        rows.append(row)
        print(json.dumps(row))
    found = sum(r["keys_position"]["coded_at"] == r["position"] for r in rows)
    meta = {
        "command": "python benchmarks/lmcache_serde.py "
        + (f"--tokens {args.tokens}" + (f" --artifact {args.artifact}" if args.artifact else "")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_s": round(time.time() - started, 1),
        "artifact": f"{artifact.name} ({codec.artifact.artifact_id})",
        "positions_found": f"{found}/{len(rows)}",
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "lmcache_serde.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# LMCache serde `kvtc`: positions read from the keys vs coding at 0",
        "",
        *[f"- {k}: {v}" for k, v in meta.items()],
        (
            "- chunks: SmolLM2-135M-Instruct KV over `pydoc_data.topics`, 256 tokens, "
            "KV_2LTD bfloat16 (5.9 MB each); ratio = bf16 bytes / blob bytes; errors: "
            "relative L2 over the chunk; seconds on this shared CPU, one chunk at a time "
            "(not a throughput benchmark)"
        ),
        "",
        (
            "| position | coded at | ratio | K err | V err | coded at 0: ratio | K err "
            "| V err | serialize s | deserialize s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, z = r["keys_position"], r["position_0"]
        lines.append(
            f"| {r['position']} | {a['coded_at']} | {a['ratio']:.2f} | {a['key_rel_err']:.3f} "
            f"| {a['value_rel_err']:.3f} | {z['ratio']:.2f} | {z['key_rel_err']:.3f} "
            f"| {z['value_rel_err']:.3f} | {a['serialize_s']:.2f} | {a['deserialize_s']:.2f} |"
        )
    (OUT / "lmcache_serde.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
