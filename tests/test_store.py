"""The tiered store on real SmolLM2 KV: prefix lookup, put/get, tiers, faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from kvtc_store.backends import DiskBackend, MemoryBackend, S3Backend
from kvtc_store.codec import KVTCCodec
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import TieredStore
from tests.s3_server import closed_port

pytestmark = pytest.mark.model


def _store(artifact, disk_dir, tenant="t", cpu_bytes=64 << 20):
    ns = ChunkNamespace(artifact.model_fingerprint, "L30-H3-D64", tenant)
    return TieredStore(
        [MemoryBackend(cpu_bytes), DiskBackend(disk_dir, 1 << 30)], KVTCCodec(artifact), ns
    )


def test_put_lookup_get_round_trip(artifact8, doc_kv, tmp_path):
    ids, keys, values = doc_kv
    store = _store(artifact8, tmp_path)
    assert store.lookup(ids) == 0
    assert store.get(ids) is None
    res = store.put(ids, keys, values)
    assert res.chunks_written == len(ids) // 256 == 4
    assert store.lookup(ids) == 1024
    # a longer sequence with the same prefix hits the same chunks; a changed token misses
    longer = torch.cat([ids, ids[:300]])
    assert store.lookup(longer) == 1024
    changed = ids.clone()
    changed[600] += 1
    assert store.lookup(changed) == 512
    k, v = store.get(ids)
    assert k.shape == (30, 3, 1024, 64) and v.shape == k.shape
    rel = ((k - keys[:, :, :1024]).norm() / keys[:, :, :1024].norm()).item()
    assert rel < 0.2
    # the last 128 stored tokens and the sinks are stored exactly (bf16)
    tail = keys[:, :, 896:1024].to(torch.bfloat16).float()
    assert torch.equal(k[:, :, 896:1024], tail)
    assert torch.equal(v[:, :, :4], values[:, :, :4].to(torch.bfloat16).float())
    # a second put is a no-op
    assert store.put(ids, keys, values).chunks_written == 0


def test_get_promotes_from_disk_into_cpu(artifact8, doc_kv, tmp_path):
    ids, keys, values = doc_kv
    with _store(artifact8, tmp_path) as first:  # close() flushes the write-down queues
        first.put(ids, keys, values)
    fresh = _store(artifact8, tmp_path)  # a new replica: empty CPU tier, same disk
    assert fresh.tiers[0].usage().n_items == 0
    assert fresh.lookup(ids) == 1024
    assert fresh.get(ids) is not None
    assert fresh.stats.chunks_hit == {"disk": 4}
    assert fresh.tiers[0].usage().n_items == 4
    fresh.get(ids)
    assert fresh.stats.chunks_hit == {"disk": 4, "memory": 4}


def test_tenants_do_not_share_chunks(artifact8, doc_kv, tmp_path):
    ids, keys, values = doc_kv
    with _store(artifact8, tmp_path, tenant="alice") as alice:
        alice.put(ids, keys, values)
    assert _store(artifact8, tmp_path, tenant="bob").lookup(ids) == 0
    assert _store(artifact8, tmp_path, tenant="alice").lookup(ids) == 1024


def test_corrupt_chunk_on_disk_is_dropped_and_missed(artifact8, doc_kv, tmp_path):
    ids, keys, values = doc_kv
    store = _store(artifact8, tmp_path)
    store.put(ids, keys, values)
    assert store.flush(timeout=60)
    third = store.keys_for(ids)[2]
    path = next(tmp_path.rglob(f"{third}*"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = _store(artifact8, tmp_path)
    k, _ = fresh.get(ids)
    assert k.shape[2] == 512  # the prefix ends before the damaged chunk
    assert fresh.stats.corrupt_dropped == 1
    assert not path.exists()
    assert fresh.lookup(ids) == 512


def test_blob_of_another_codec_is_a_miss_dropped_and_replaced(artifact8, doc_kv, tmp_path):
    import dataclasses

    ids, keys, values = doc_kv
    with _store(artifact8, tmp_path) as first:
        first.put(ids, keys, values)
    other = dataclasses.replace(artifact8, artifact_id="", version=2, target_ratio=9.0)
    other.plan = other.plan[:-1]
    if other.quantizer == "rans":  # its tables cover the components the plan codes
        n = other.coded_components()
        other.rans_shift, other.rans_cls = other.rans_shift[:n], other.rans_cls[:n]
    other.artifact_id = other._content_id()
    store = _store(other, tmp_path)
    assert store.lookup(ids) == 1024
    assert store.get(ids) is None
    # no codec here reads them: deleted, so they no longer block the prefix (issue 20)
    assert store.stats.undecodable_dropped == 4
    assert store.lookup(ids) == 0
    assert store.put(ids, keys, values).chunks_written == 4
    assert store.flush(timeout=60)
    assert len(list(tmp_path.rglob("*.kvtc"))) == 4
    assert store.get(ids)[0].shape[2] == 1024


def test_disk_chunks_found_by_a_new_process(artifact8, doc_kv, tmp_path):
    ids, keys, values = doc_kv
    store = _store(artifact8, tmp_path / "disk")
    store.put(ids, keys, values)
    assert store.flush(timeout=60)
    art_dir = artifact8.save(tmp_path / "codec")
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from kvtc_store.backends import DiskBackend, MemoryBackend
        from kvtc_store.codec import CodecArtifact, KVTCCodec
        from kvtc_store.keys import ChunkNamespace
        from kvtc_store.store import TieredStore
        art = CodecArtifact.load({str(art_dir)!r})
        ns = ChunkNamespace(art.model_fingerprint, "L30-H3-D64", "t")
        store = TieredStore([MemoryBackend(1 << 26), DiskBackend({str(tmp_path / "disk")!r}, 1 << 30)],
                            KVTCCodec(art), ns)
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        k, v = store.get(ids)
        print(store.lookup(ids), k.shape[2], float(k.float().abs().sum()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lookup, n, ksum = out.stdout.split()
    k, _ = store.get(ids)
    assert int(lookup) == int(n) == 1024
    assert abs(float(ksum) - float(k.float().abs().sum())) < 1e-3 * float(ksum)


def test_s3_lower_tier_shared_and_dead_s3_degrades_to_misses(
    artifact8,
    doc_kv,
    s3_endpoint,
):
    """Two replicas share chunks through a real (loopback moto) S3 tier; with S3 dead,
    the CPU tier keeps serving and S3 failures are misses, not errors."""
    ids, keys, values = doc_kv
    ns = ChunkNamespace(artifact8.model_fingerprint, "L30-H3-D64", "s3")
    codec = KVTCCodec(artifact8)
    bucket = f"kvtc-{uuid.uuid4().hex[:12]}"

    def s3(**kw):
        return S3Backend(bucket, endpoint_url=s3_endpoint, create_bucket=True, **kw)

    a = TieredStore([MemoryBackend(64 << 20), s3()], codec, ns)
    assert a.put(ids, keys, values).chunks_written == 4
    assert a.flush(timeout=60)
    b = TieredStore([MemoryBackend(64 << 20), s3()], codec, ns)
    assert b.lookup(ids) == 1024
    kb, _ = b.get(ids)
    ka, _ = a.get(ids)
    assert torch.equal(ka, kb) and b.stats.chunks_hit == {"s3": 4}

    dead = S3Backend(bucket, endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    c = TieredStore([MemoryBackend(64 << 20), dead], codec, ns)
    assert c.lookup(ids) == 0 and c.get(ids) is None
    assert c.put(ids, keys, values).chunks_written == 4  # the CPU tier takes it
    flushed = c.flush(timeout=60)  # the write-down to S3 fails: counted, never raised,
    assert flushed.complete and flushed.failed_chunks == {"s3": 4}  # and reported
    assert c.stats.lower_tier_put_errors == 1
    assert c.lookup(ids) == 1024 and c.get(ids) is not None
    assert dead.usage().errors > 0
