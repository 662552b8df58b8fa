"""Reliability: a store is never wrong, never stuck, never silent (issue 20).

Each test reproduces one defect of the fault review with real parts: the tiny real KVTC
codec (tests/tiny_codec.py), real disk folders, moto's S3 server on loopback and a real
silent TCP endpoint. A mock appears only for a fault that cannot be caused here, and says
so.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kvtc_store.backends import Backend, DiskBackend, MemoryBackend, S3Backend
from kvtc_store.backends import disk as disk_module
from kvtc_store.cli import main
from kvtc_store.codec import KVTCCodec
from kvtc_store.codec.blob import ChunkBinding, unpack_blob_header
from kvtc_store.config import build_tiers, load_config
from kvtc_store.errors import BlobMisfiledError, BucketNotFoundError, ConfigError
from kvtc_store.guard import BreakerSettings, CircuitBreaker
from kvtc_store.keys import chunk_keys
from kvtc_store.store import TieredStore
from tests.s3_server import SilentServer, SlowProxy, open_fds, raw_client, sockets_to
from tests.tiny_codec import CHUNK, tiny_artifact, tiny_codec, tiny_namespace, tiny_sequence

pytestmark = pytest.mark.usefixtures("one_thread")


def store_of(tiers: list[Backend], codec: KVTCCodec | None = None, **kw) -> TieredStore:
    codec = codec if codec is not None else tiny_codec()
    return TieredStore(tiers, codec, tiny_namespace(), chunk_tokens=CHUNK, **kw)


def chunk_file(root: Path, key: str) -> Path:
    return next(root.rglob(f"{key}.kvtc"))


# --- 1. a blob is bound to its chunk --------------------------------------------------------


def test_a_blob_copied_under_another_key_is_a_counted_miss_and_removed(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(4, seed=1)
    other, okeys, ovalues = tiny_sequence(4, seed=2)
    with store_of([DiskBackend(tmp_path, 1 << 20)]) as writer:
        writer.put(tokens, keys, values)
        writer.put(other, okeys, ovalues)
        ck, ok = writer.keys_for(tokens), writer.keys_for(other)
    # chunk 1 of another prompt (same position, same length: only the key digest differs)
    shutil.copyfile(chunk_file(tmp_path, ok[1]), chunk_file(tmp_path, ck[1]))
    # chunk 0 copied over chunk 3 (another position)
    shutil.copyfile(chunk_file(tmp_path, ck[0]), chunk_file(tmp_path, ck[3]))
    with store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)]) as reader:
        k, _ = reader.get(tokens)
        assert k.shape[2] == CHUNK  # ends before the misfiled chunk 1, never serves it
        assert reader.stats.misfiled_dropped == 1
        assert not list(tmp_path.rglob(f"{ck[1]}.kvtc"))  # removed
        assert reader.lookup(tokens) == CHUNK
        assert reader.get(tokens, start=3 * CHUNK) is None  # chunk 3 holds position 0
        assert reader.stats.misfiled_dropped == 2
        assert "kvtc_store_misfiled_chunks_total 2.0" in reader.metrics.text()


def test_decode_checks_position_and_length_and_old_blobs_without_digest() -> None:
    codec = tiny_codec()
    _, keys, values = tiny_sequence(2, seed=3)
    bound = codec.encode_sequence(keys, values, 0, CHUNK, chunk_keys=["a" * 64, "b" * 64])
    old = codec.encode_sequence(keys, values, 0, CHUNK)  # written before key_digest existed
    assert unpack_blob_header(bound[0])[0].key_digest
    assert unpack_blob_header(old[0])[0].key_digest == ""
    want = [ChunkBinding("a" * 64, 0, CHUNK), ChunkBinding("b" * 64, CHUNK, CHUNK)]
    chunks, error = codec.decode_prefix(bound, expect=want)
    assert len(chunks) == 2 and error is None
    chunks, error = codec.decode_prefix(bound[::-1], expect=want)
    assert chunks == [] and isinstance(error, BlobMisfiledError)
    # an old blob is accepted under any key at its own position and length only
    chunks, error = codec.decode_prefix(old, expect=[ChunkBinding("c" * 64, 0, CHUNK)] * 2)
    assert len(chunks) == 1 and isinstance(error, BlobMisfiledError)
    chunks, error = codec.decode_prefix(old[:1], expect=[ChunkBinding("c" * 64, 0, 2 * CHUNK)])
    assert chunks == [] and isinstance(error, BlobMisfiledError)


# --- 2. an undecodable chunk blocks nothing -------------------------------------------------


def other_codec() -> KVTCCodec:
    """A codec of the same model with another artifact (a codec change)."""
    art = tiny_artifact()
    other = dataclasses.replace(art, artifact_id="", version=2, target_ratio=4.0)
    other.bases = [torch.eye(16)[:, :8] for _ in other.groups]
    other.artifact_id = other._content_id()
    assert other.artifact_id != art.artifact_id
    return KVTCCodec(other)


def test_a_chunk_no_codec_here_decodes_stops_counting_and_a_put_replaces_it(
    tmp_path: Path,
) -> None:
    tokens, keys, values = tiny_sequence(3, seed=4)
    with store_of([DiskBackend(tmp_path, 1 << 20)], codec=other_codec()) as old:
        old.put(tokens, keys, values)
    with store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)]) as new:
        assert new.lookup(tokens) == 3 * CHUNK  # the blobs are there
        assert new.get(tokens) is None  # but this codec cannot read them
        assert new.stats.undecodable_dropped == 3
        assert "kvtc_store_undecodable_chunks_total 3.0" in new.metrics.text()
        assert new.lookup(tokens) == 0  # they no longer count as present
        assert new.put(tokens, keys, values).chunks_written == 3  # and a put replaces them
        assert new.flush(timeout=30)
        k, _ = new.get(tokens)
        assert k.shape[2] == 3 * CHUNK
    with store_of([DiskBackend(tmp_path, 1 << 20)]) as again:
        assert again.get(tokens)[0].shape[2] == 3 * CHUNK  # replaced on disk too


# --- 3. deadlines and circuit breakers ------------------------------------------------------


def test_a_silent_s3_never_stalls_lookup_get_flush_or_close(
    tmp_path: Path, aws_credentials: None
) -> None:
    """S3 accepts connections and never answers. Reads answer from memory and disk within
    the deadline (plus 10%); once the breaker opens, S3 is skipped at no cost, then probed
    again after the back-off; flush and close with a timeout return on time."""
    tokens, keys, values = tiny_sequence(3, seed=5)
    deadline = 0.5
    with SilentServer() as silent:
        s3 = S3Backend("kvtc-silent", endpoint_url=silent.url, region_name="us-east-1")
        s3.deadline_s = deadline
        breaker = BreakerSettings(failures=2, backoff_s=1.0, max_backoff_s=4.0)
        store = store_of(
            [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20), s3], breaker=breaker
        )
        store.put(tokens, keys, values)
        unknown, *_ = tiny_sequence(2, seed=6)

        def timed(fn, *args):
            t0 = time.monotonic()
            out = fn(*args)
            return out, time.monotonic() - t0

        n, dt = timed(store.lookup, unknown)  # memory and disk miss, S3 is asked
        assert n == 0 and dt < deadline * 1.1 + 0.2
        got, dt = timed(store.get, unknown)
        assert got is None and dt < deadline * 1.1 + 0.2
        assert store._stack.breaker_states()["s3"] == "open"  # two timeouts
        got, dt = timed(store.get, unknown)  # skipped: no wait at all
        assert got is None and dt < 0.1
        assert store._stack.failures()[("s3", "skipped")] >= 1
        k, _ = store.get(tokens)  # the local tiers serve
        assert k.shape[2] == 3 * CHUNK
        time.sleep(1.1)  # past the back-off: half-open, one probe goes out
        asked = silent.connections
        assert store._stack.breaker_states()["s3"] == "half-open"
        _, dt = timed(store.lookup, unknown)
        assert dt < deadline * 1.1 + 0.2
        assert silent.connections > asked
        assert store._stack.breaker_states()["s3"] == "open"  # back-off now 2 s
        t0 = time.monotonic()
        flushed = store.flush(timeout=1.0)
        assert time.monotonic() - t0 < 1.1 + 0.2
        assert not flushed
        t0 = time.monotonic()
        store.close(timeout=1.0)
        assert time.monotonic() - t0 < 1.1 + 0.5


def test_breaker_closes_after_a_good_probe() -> None:
    clock = [0.0]
    b = CircuitBreaker(
        BreakerSettings(failures=2, backoff_s=1.0, max_backoff_s=3.0), lambda: clock[0]
    )
    assert b.allow()
    b.failed()
    assert b.state == "closed"
    b.failed()
    assert b.state == "open" and not b.allow()
    clock[0] = 1.0
    assert b.allow() and not b.allow()  # one probe at a time
    b.failed()  # the probe failed: open for 2 s
    clock[0] = 2.5
    assert not b.allow()
    clock[0] = 3.0
    assert b.allow()
    b.succeeded()
    assert b.state == "closed" and b.allow()
    with pytest.raises(ConfigError):
        BreakerSettings(failures=0)


# --- 4. a missing bucket is named, never a silent miss ---------------------------------------


def test_a_misspelt_bucket_is_a_named_error_at_open_and_counted_on_calls(
    s3_endpoint: str, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "store.yaml"
    tier = {"kind": "s3", "bucket": bucket + "-typo", "endpoint_url": s3_endpoint}
    cfg.write_text(yaml.safe_dump({"tiers": [tier], "codec": {"artifact": "unused"}}))
    with pytest.raises(BucketNotFoundError, match=f"tiers.0.bucket: .*{bucket}-typo"):
        build_tiers(load_config(cfg))
    tier["check_bucket"] = False  # opened without the check: every call is a counted error
    cfg.write_text(yaml.safe_dump({"tiers": [tier], "codec": {"artifact": "unused"}}))
    (s3,) = build_tiers(load_config(cfg))
    tokens, *_ = tiny_sequence(2, seed=7)
    with store_of([MemoryBackend(1 << 20), s3]) as store:
        assert store.get(tokens) is None
        assert store._stack.failures()[("s3", "get")] == 1
        assert s3.usage().errors >= 1
        assert any(f"{bucket}-typo" in r.getMessage() for r in caplog.records)
    good = S3Backend(bucket, endpoint_url=s3_endpoint, region_name="us-east-1")
    assert good.check_bucket()
    good.close()


# --- 5. the disk cap holds across processes, in allocated bytes ------------------------------

_WRITER = """
import hashlib, os, random, sys
from kvtc_store.backends import DiskBackend
root, cap, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tier = DiskBackend(root, cap)
rng = random.Random(seed)
for b in range(50):
    tier.put([
        (hashlib.sha256(f"{seed}-{b}-{i}".encode()).hexdigest(), os.urandom(rng.randint(1000, 9000)))
        for i in range(4)
    ])
tier.close()
"""


def allocated_bytes(root: Path) -> int:
    """What the chunk files under ``root`` take on the file system (st_blocks * 512)."""
    total = 0
    for p in root.rglob("*.kvtc"):
        try:
            total += p.stat().st_blocks * 512
        except FileNotFoundError:  # evicted meanwhile
            pass
    return total


def test_two_processes_sharing_a_folder_hold_its_cap_in_allocated_bytes(tmp_path: Path) -> None:
    cap = 200_000
    batch_max = 4 * 12_288  # 4 chunks of at most 9000 B: 3 blocks of 4 KiB each
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(cap), str(seed)])
        for seed in (1, 2)
    ]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, allocated_bytes(tmp_path))
        time.sleep(0.005)
    assert [p.returncode for p in procs] == [0, 0]
    final = allocated_bytes(tmp_path)
    assert final <= cap  # never left over it
    assert peak <= cap + batch_max  # at most one batch over, while it is written
    assert len(list(tmp_path.rglob("*.kvtc"))) > 10  # and it holds chunks of both
    # a third process opening the folder sees the shared count within one block per file
    tier = DiskBackend(tmp_path, cap)
    assert tier.usage().used_bytes == final
    tier.close()


# --- 6. a full file system makes room -------------------------------------------------------


def settle(check, seconds: float = 5.0) -> bool:
    """Poll ``check()`` until it is true or ``seconds`` pass (threads finishing)."""
    end = time.monotonic() + seconds
    while not check() and time.monotonic() < end:
        time.sleep(0.05)
    return check()


def test_the_soak_proxy_closes_each_connection_it_forwarded(s3_endpoint: str) -> None:
    """The descriptor leak of the 10-minute soak (issue 20): moto answers each request on
    a connection of its own (HTTP/1.0), and the fault proxy shut each finished
    connection's two sockets but closed them only at its own close: 160 connections a
    second left 20,000 descriptors open in 2 minutes. Each must close when it ends."""
    with SlowProxy(s3_endpoint) as proxy:
        client = raw_client(proxy.url)
        client.list_buckets()
        before = open_fds()
        for _ in range(150):
            client.list_buckets()
        assert settle(lambda: open_fds() <= before + 10), (before, open_fds())
        client.close()


def test_silent_s3_deadline_expiries_leave_no_connection_or_thread_behind(
    aws_credentials: None, s3_endpoint: str
) -> None:
    """Calls to a silent S3 that the guard gives up on at their deadline finish in the
    background (the client's read timeout): after 25 of them no connection to the
    endpoint is left open, and no thread but those of the fixed pools."""
    import threading

    tokens, *_ = tiny_sequence(1, seed=8)
    with SlowProxy(s3_endpoint) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        s3 = S3Backend(
            "kvtc-leak",
            endpoint_url=proxy.url,
            region_name="us-east-1",
            create_bucket=True,
            read_timeout=0.5,
            connect_timeout=0.5,
            max_attempts=1,
        )
        s3.deadline_s = 0.2
        store = store_of([MemoryBackend(1 << 20), s3], breaker=BreakerSettings(failures=10**6))
        assert store.get(tokens) is None  # a plain miss: connection pool warm

        def ours() -> int:  # the store's threads (the proxy's and moto's are the fault's)
            return sum(t.name.startswith("kvtc") for t in threading.enumerate())

        threads = ours()
        proxy.hold()
        for _ in range(25):
            assert store.get(tokens) is None  # the deadline passes: a counted failure
        assert store._stack.guards[1].timeouts >= 25
        assert settle(lambda: sockets_to(port) <= 2), sockets_to(port)  # read timeouts
        # bounded by the fixed pools (the guard's 8 workers, the tier's own), however
        # many calls expired
        assert ours() <= threads + 8 + s3.max_concurrency
        proxy.release()
        store.close(timeout=2.0)
        assert settle(lambda: sockets_to(port) == 0), sockets_to(port)


def test_evictions_and_full_disk_retries_leave_no_descriptor_open(small_fs: Path) -> None:
    """Hundreds of LRU evictions (folder listings) and ENOSPC retries: the tier holds
    its ledger's one descriptor, nothing more."""
    tier = DiskBackend(small_fs, 10 << 20)
    keys = [hashlib.sha256(f"leak-{i}".encode()).hexdigest() for i in range(120)]
    tier.put([(keys[0], b"x" * 20_000)])
    before = open_fds()
    for key in keys[1:]:  # 20 KB each into 256 KiB: evicts on every few puts
        tier.put([(key, key.encode() * 312)])
        tier.get([key])
    assert tier.usage().evictions > 50
    assert open_fds() <= before + 2, (before, open_fds())
    tier.close()
    small = DiskBackend(small_fs / "capped", 60_000)
    before = open_fds()
    for key in keys:
        small.put([(key, key.encode() * 100)])
    assert small.usage().evictions > 50 and open_fds() <= before + 2
    small.close()


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real 256 KiB tmpfs where this process may mount one (root); elsewhere a mock
    of that fault (it cannot be caused without root): ``os.write`` of the disk tier
    raises ENOSPC once the folder's files would pass 256 KiB."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not mounted:
        real_write = disk_module.os.write

        def write(fd: int, data) -> int:
            used = sum(p.stat().st_size for p in mnt.rglob("*") if p.is_file())
            if used + len(data) > 256 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(disk_module.os, "write", write)
    yield mnt
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_file_system_evicts_and_retries_before_failing(small_fs: Path) -> None:
    tier = DiskBackend(small_fs, 10 << 20)  # a cap far above what the file system holds
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(40)]
    for key in keys:  # 40 x 20 KB = 800 KB into 256 KiB: each put must make room
        tier.put([(key, key.encode() * 312)])
    assert tier.get(keys[-3:]) == [k.encode() * 312 for k in keys[-3:]]
    assert tier.get(keys[:1]) == [None]  # the oldest made room
    assert tier.usage().evictions > 0
    tier.close()


# --- 8. multipart uploads a crashed writer left are aborted ----------------------------------


def test_stale_multipart_uploads_under_the_prefix_are_aborted_at_open(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = raw_client(s3_endpoint)
    ours = client.create_multipart_upload(Bucket=bucket, Key="kvtc/ab/ab00.kvtc")
    client.upload_part(
        Bucket=bucket, Key="kvtc/ab/ab00.kvtc", UploadId=ours["UploadId"], PartNumber=1, Body=b"x"
    )
    client.create_multipart_upload(Bucket=bucket, Key="other/ab00.kvtc")  # not this tier's
    # moto's server reports every upload as begun on 2010-11-10, so both are "stale"
    cfg = tmp_path / "store.yaml"
    tier = {"kind": "s3", "bucket": bucket, "endpoint_url": s3_endpoint}
    cfg.write_text(yaml.safe_dump({"tiers": [{**tier, "abort_uploads_after": None}]}))
    (s3,) = build_tiers(load_config(cfg))  # cleanup off: both kept
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert sorted(u["Key"] for u in left) == ["kvtc/ab/ab00.kvtc", "other/ab00.kvtc"]
    s3.close()
    cfg.write_text(yaml.safe_dump({"tiers": [tier]}))  # default: older than a day
    (s3,) = build_tiers(load_config(cfg))
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/ab00.kvtc"]  # only this tier's prefix
    assert s3.abort_stale_uploads(0) == 0
    s3.close()


# --- 10. reports change nothing; the demo checks its arguments first -------------------------


def test_stats_never_changes_a_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(15)]
    tier = DiskBackend(tmp_path / "disk", 1 << 20)
    tier.put([(k, os.urandom(5000)) for k in keys])
    tier.close()
    before = sorted(p.name for p in (tmp_path / "disk").rglob("*.kvtc"))
    assert len(before) == 15
    assert main(["stats", "--disk", str(tmp_path / "disk"), "--capacity", "1000"]) == 0
    assert "15 chunks" in capsys.readouterr().out
    cfg = tmp_path / "store.yaml"
    disk = {"kind": "disk", "path": str(tmp_path / "disk"), "capacity": 1000}
    cfg.write_text(yaml.safe_dump({"tiers": [disk]}))
    assert main(["stats", "--config", str(cfg), "--json"]) == 0
    assert '"chunks": 15' in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "disk").rglob("*.kvtc")) == before


def test_demo_refuses_bad_arguments_before_touching_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path))
    kept = tmp_path / "demo-store" / "ab" / "kept.kvtc"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a chunk of an earlier demo")
    for argv in (["--doc-tokens", "100"], ["--doc-tokens", "100000"], ["--ratio", "0.5"]):
        assert main(["demo", *argv]) == 2
        assert "ConfigError" in capsys.readouterr().err
    assert kept.read_bytes() == b"a chunk of an earlier demo"


# --- 9. per-request salts (engine cache salts, LoRA adapters) --------------------------------


def test_requests_of_different_salts_never_share_a_chunk(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(3, seed=9)
    with store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)]) as store:
        plain = store.keys_for(tokens)
        assert plain == chunk_keys(tokens, tiny_namespace(), CHUNK)  # unsalted: keys as before
        a, b = store.keys_for(tokens, "tenant-a"), store.keys_for(tokens, "tenant-b")
        assert len({*plain, *a, *b}) == 9
        assert store.put(tokens, keys, values, salt="tenant-a").chunks_written == 3
        assert store.lookup(tokens, salt="tenant-a") == 3 * CHUNK
        assert store.lookup(tokens) == 0 and store.lookup(tokens, salt="tenant-b") == 0
        assert store.get(tokens, salt="tenant-b") is None and store.get(tokens) is None
        k, _ = store.get(tokens, salt="tenant-a")
        assert k.shape[2] == 3 * CHUNK
        assert store.prefetch(tokens, salt="tenant-a").result(timeout=10) == 3 * CHUNK
