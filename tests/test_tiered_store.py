"""The tiered store's data flow over real tiers: asynchronous write-down, back-pressure,
write-back, batched fetches, promotion, prefetch, tenants and faults.

A real (tiny) KVTC codec (tests/tiny_codec.py) keeps these fast; the S3 tier is moto's
server on loopback (tests/s3_server.py), made slow or stalled by a real TCP proxy in
front of it (:class:`~tests.s3_server.SlowProxy`), or dead (a closed port).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtc_store.backends import Backend, DiskBackend, MemoryBackend, S3Backend
from kvtc_store.backends import disk as disk_module
from kvtc_store.errors import CapacityError, ConfigError, StoreError
from kvtc_store.store import TieredStore
from tests.s3_server import SlowProxy, closed_port, raw_client
from tests.tiny_codec import (
    CHUNK,
    tiny_blobs,
    tiny_codec,
    tiny_info,
    tiny_namespace,
    tiny_sequence,
)


def s3_tier(endpoint: str, bucket: str, **kw) -> S3Backend:
    kw.setdefault("region_name", "us-east-1")
    return S3Backend(bucket, endpoint_url=endpoint, **kw)


def store_of(tiers: list[Backend], tenant: str = "t", **kw) -> TieredStore:
    return TieredStore(tiers, tiny_codec(), tiny_namespace(tenant), chunk_tokens=CHUNK, **kw)


def written_to_s3(endpoint: str, bucket: str, n_chunks: int, seed: int):
    """``(tokens, keys, values)`` of a sequence a replica (now closed) wrote to S3."""
    seq = tiny_sequence(n_chunks, seed=seed)
    with store_of([MemoryBackend(1 << 20), s3_tier(endpoint, bucket)]) as writer:
        writer.put(*seq)
    return seq


def s3_keys(endpoint: str, bucket: str) -> set[str]:
    """Chunk keys of the objects in the bucket, as the server lists them."""
    listed = raw_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"].rsplit("/", 1)[-1].removesuffix(".kvtc") for o in listed}


# --- write-down ----------------------------------------------------------------------------


def test_write_through_reaches_every_tier_after_flush(
    tmp_path: Path,
    s3_endpoint: str,
    bucket: str,
) -> None:
    tokens, keys, values = tiny_sequence(6)
    with store_of(
        [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20), s3_tier(s3_endpoint, bucket)]
    ) as store:
        assert store.put(tokens, keys, values).chunks_written == 6
        assert store.flush(timeout=30)
        ckeys = store.keys_for(tokens)
        for tier in store.tiers:
            assert tier.exists(ckeys) == [True] * 6, tier.name
        usage = store.usage()
        assert usage["disk"]["queue_depth"] == usage["s3"]["queue_depth"] == 0
        blobs = store.tiers[0].get(ckeys)
        assert store.tiers[1].get(ckeys) == blobs == store.tiers[2].get(ckeys)
    assert s3_keys(s3_endpoint, bucket) == set(ckeys)


def test_put_returns_while_s3_stalls_and_queued_chunks_are_served(
    s3_endpoint: str,
    bucket: str,
) -> None:
    """With S3 stalled, put returns once the top tier has the chunks; a chunk the top
    tier has already evicted is served from the write-down queue's copy, never missed."""
    tokens, keys, values = tiny_sequence(8, seed=2)
    with SlowProxy(s3_endpoint) as proxy:
        s3 = s3_tier(proxy.url, bucket, read_timeout=30)
        blob_size = max(map(len, tiny_blobs(tokens, keys, values)))
        store = store_of([MemoryBackend(3 * blob_size + 100), s3])  # holds 3 of 8
        proxy.hold()
        assert store.put(tokens, keys, values).chunks_written == 8
        assert s3_keys(s3_endpoint, bucket) == set()  # nothing reached the server
        assert store.queue_depths() == {"s3": 8}
        assert store.lookup(tokens) == 8 * CHUNK
        k, v = store.get(tokens)
        assert k.shape[2] == 8 * CHUNK
        assert store.stats.chunks_hit["write-queue"] >= 5
        assert not store.flush(timeout=0.3)
        proxy.release()
        assert store.flush(timeout=30)
        assert s3_keys(s3_endpoint, bucket) == set(store.keys_for(tokens))
        replica = store_of([MemoryBackend(1 << 20), s3_tier(s3_endpoint, bucket)])
        k2, v2 = replica.get(tokens)
        assert torch.equal(k, k2) and torch.equal(v, v2)
        assert replica.stats.chunks_hit == {"s3": 8}
        replica.close()
        store.close()


def test_a_full_queue_blocks_put_until_the_tier_drains(
    s3_endpoint: str,
    bucket: str,
) -> None:
    """Back-pressure: a queue of 2 chunks in front of a stalled S3 holds a put of 5."""
    tokens, keys, values = tiny_sequence(5, seed=3)
    with SlowProxy(s3_endpoint) as proxy:
        store = store_of(
            [MemoryBackend(1 << 20), s3_tier(proxy.url, bucket, read_timeout=30)],
            write_queue_chunks=2,
        )
        proxy.hold()
        done = threading.Event()

        def put() -> None:
            store.put(tokens, keys, values)
            done.set()

        th = threading.Thread(target=put)
        th.start()
        assert not done.wait(1.0), "put returned although the queue was full"
        assert store.queue_depths() == {"s3": 4}  # 2 taken by the stalled writer, 2 queued
        proxy.release()
        assert done.wait(30)
        th.join()
        assert store.flush(timeout=30)
        assert s3_keys(s3_endpoint, bucket) == set(store.keys_for(tokens))
        store.close()


def test_write_back_writes_a_chunk_down_when_it_is_evicted(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(6, seed=4)
    blob_size = max(map(len, tiny_blobs(tokens, keys, values)))
    disk = DiskBackend(tmp_path, 1 << 20)
    with store_of([MemoryBackend(2 * blob_size + 50), disk], write_mode="write-back") as store:
        store.put(tokens[: 2 * CHUNK], keys, values)
        assert store.flush(timeout=30)
        assert disk.usage().n_items == 0  # both chunks still fit in memory
        store.put(tokens, keys, values)  # 4 more: chunks 0-3 are evicted, in order
        assert store.flush(timeout=30)
        ckeys = store.keys_for(tokens)
        assert disk.exists(ckeys) == [True] * 4 + [False] * 2
        assert store.tiers[0].exists(ckeys) == [False] * 4 + [True] * 2
        assert store.get(tokens)[0].shape[2] == 6 * CHUNK  # from two tiers
    # close() does not write resident chunks down (write-back): a later replica misses them
    replica = store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)])
    assert replica.lookup(tokens) >= 4 * CHUNK
    replica.close()


def test_write_down_failure_is_counted_never_raised(aws_credentials) -> None:
    tokens, keys, values = tiny_sequence(4, seed=5)
    dead = S3Backend("kvtc-dead", endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    with store_of([MemoryBackend(1 << 20), dead]) as store:
        assert store.put(tokens, keys, values).chunks_written == 4
        flushed = store.flush(timeout=30)  # finished, and says what failed (issue 20)
        assert flushed.complete and not flushed
        assert flushed.failed_chunks == {"s3": 4}
        assert sorted(flushed.failed_keys["s3"]) == sorted(store.keys_for(tokens))
        assert store.flush(timeout=30)  # reported once
        assert store.stats.lower_tier_put_errors == 1  # one failed batch of 4
        assert store.stats.writedown_failed_chunks == 4
        assert store._stack.write_down.failed(1) == 4
        k, _ = store.get(tokens)  # the CPU tier keeps serving
        assert k.shape[2] == 4 * CHUNK and store.stats.chunks_hit == {"memory": 4}
        other, *_ = tiny_sequence(2, seed=6)
        assert store.lookup(other) == 0 and store.get(other) is None  # S3 down: a miss
        failures = store._stack.failures()
        assert failures[("s3", "write-down")] == 1
        assert failures[("s3", "exists")] == 1 and failures[("s3", "get")] == 1
        assert dead.usage().errors >= 4 + 2 + 2


def test_a_slow_s3_is_a_miss_while_the_upper_tiers_serve(
    s3_endpoint: str,
    bucket: str,
) -> None:
    old, _, _ = written_to_s3(s3_endpoint, bucket, 3, seed=7)  # for a new replica: S3 only
    tokens, keys, values = tiny_sequence(3, seed=8)
    with SlowProxy(s3_endpoint, delay=1.5) as proxy:
        slow = s3_tier(proxy.url, bucket, read_timeout=0.3, max_attempts=1)
        with store_of([MemoryBackend(1 << 20), slow]) as store:
            store.put(tokens, keys, values)
            assert store.get(old) is None  # S3 timed out: a miss, not an error
            assert store.get(tokens)[0].shape[2] == 3 * CHUNK  # memory serves
            assert store.stats.chunks_hit == {"memory": 3}
            assert slow.usage().errors >= 1
            flushed = store.flush(timeout=30)  # the write-down times out too: counted
            assert flushed.complete and flushed.failed_chunks == {"s3": 3}
            assert store.stats.lower_tier_put_errors >= 1


def test_corrupt_s3_object_is_caught_removed_and_missed(
    s3_endpoint: str,
    bucket: str,
) -> None:
    tokens, _, _ = written_to_s3(s3_endpoint, bucket, 4, seed=9)
    s3 = s3_tier(s3_endpoint, bucket)
    third = store_of([s3]).keys_for(tokens)[2]
    obj = s3.object_key(third)
    client = raw_client(s3_endpoint)
    data = bytearray(client.get_object(Bucket=bucket, Key=obj)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    with store_of([MemoryBackend(1 << 20), s3_tier(s3_endpoint, bucket)]) as reader:
        k, _ = reader.get(tokens)
        assert k.shape[2] == 2 * CHUNK  # the prefix ends before the damaged chunk
        assert reader.stats.corrupt_dropped == 1
        assert third not in s3_keys(s3_endpoint, bucket)
        assert reader.lookup(tokens) == 2 * CHUNK


def test_a_bad_copy_is_removed_where_it_was_and_a_good_copy_below_then_serves(
    tmp_path: Path,
    s3_endpoint: str,
    bucket: str,
) -> None:
    tokens, keys, values = tiny_sequence(4, seed=16)
    tiers = [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20), s3_tier(s3_endpoint, bucket)]
    with store_of(tiers) as writer:
        writer.put(tokens, keys, values)
        ref_k, _ = writer.get(tokens)
        second = writer.keys_for(tokens)[1]
    path = next(tmp_path.rglob(f"{second}.kvtc"))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    tiers = [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20), s3_tier(s3_endpoint, bucket)]
    with store_of(tiers) as reader:
        assert reader.get(tokens)[0].shape[2] == CHUNK  # the bad disk copy ends the prefix
        assert reader.stats.corrupt_dropped == 1
        assert not path.exists() and second in s3_keys(s3_endpoint, bucket)
        assert not reader.tiers[0].exists([second])[0]  # nor kept where it was promoted
        k, _ = reader.get(tokens)  # now from S3's good copy
        assert torch.equal(k, ref_k)


# --- fetching --------------------------------------------------------------------------------


class Counting(Backend):
    """A real tier with its calls counted (no behaviour changed)."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []

    def exists(self, keys):
        self.calls.append(("exists", len(keys)))
        return self.inner.exists(keys)

    def get(self, keys):
        self.calls.append(("get", len(keys)))
        return self.inner.get(keys)

    def put(self, items):
        self.calls.append(("put", len(items)))
        return self.inner.put(items)

    def delete(self, keys):
        return self.inner.delete(keys)

    def usage(self):
        return self.inner.usage()

    def close(self):
        self.inner.close()


def test_a_128_chunk_prefix_is_one_concurrent_batch_per_tier(
    tmp_path: Path,
    s3_endpoint: str,
    bucket: str,
) -> None:
    """128 chunks, half on disk and half in S3 only: one get per tier, and the S3
    tier's GetObject requests run concurrently (its thread pool), not one by one."""
    tokens, keys, values = tiny_sequence(128, seed=10)
    with store_of(
        [MemoryBackend(1 << 30), DiskBackend(tmp_path / "d", 1 << 30), s3_tier(s3_endpoint, bucket)]
    ) as writer:
        writer.put(tokens, keys, values)
        ckeys = writer.keys_for(tokens)
    DiskBackend(tmp_path / "d", 1 << 30).delete(ckeys[64:])
    s3 = s3_tier(s3_endpoint, bucket)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def before(**_: object) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])

    def after(**_: object) -> None:
        with lock:
            in_flight[0] -= 1

    s3._client.meta.events.register("before-call.s3.GetObject", before)
    s3._client.meta.events.register("after-call.s3.GetObject", after)
    tiers = [
        Counting(MemoryBackend(1 << 30)),
        Counting(DiskBackend(tmp_path / "d", 1 << 30)),
        Counting(s3),
    ]
    with store_of(tiers) as reader:
        assert reader.lookup(tokens) == 128 * CHUNK
        assert [t.calls for t in tiers] == [[("exists", 128)], [("exists", 128)], [("exists", 64)]]
        for t in tiers:
            t.calls.clear()
        k, _ = reader.get(tokens)
        assert k.shape[2] == 128 * CHUNK
        gets = [[c for c in t.calls if c[0] == "get"] for t in tiers]
        assert gets == [[("get", 128)], [("get", 128)], [("get", 64)]]
        assert reader.stats.chunks_hit == {"disk": 64, "s3": 64}
        assert peak[0] > 1
        assert reader.flush(timeout=30)  # S3 hits were queued for the disk tier too
        assert tiers[1].inner.exists(ckeys) == [True] * 128
        assert tiers[0].inner.exists(ckeys) == [True] * 128  # promoted


def test_an_engine_holding_a_prefix_puts_and_gets_only_the_chunks_after_it() -> None:
    """``start``: an engine (SGLang) holds the KV of the first chunks itself, so it
    stores and asks for the chunks from there on, with the prefix's tokens for the keys."""
    tokens, keys, values = tiny_sequence(6, seed=11)
    s = 2 * CHUNK
    with store_of([MemoryBackend(1 << 20)]) as whole, store_of([MemoryBackend(1 << 20)]) as tail:
        whole.put(tokens, keys, values)
        res = tail.put(tokens, keys[:, :, s:], values[:, :, s:], start=s)
        assert (res.chunks_written, res.chunks_present) == (4, 0)
        assert tail.tiers[0].exists(tail.keys_for(tokens)) == [False] * 2 + [True] * 4
        assert tail.lookup(tokens) == 0  # the prefix is not there
        assert tail.lookup(tokens, start=s) == 6 * CHUNK
        assert tail.lookup(tokens, start=s + 3) == 6 * CHUNK  # rounded down to a chunk
        assert tail.get(tokens) is None
        k, v = tail.get(tokens, start=s)
        wk, wv = whole.get(tokens)
        torch.testing.assert_close(k, wk[:, :, s:])
        torch.testing.assert_close(v, wv[:, :, s:])
        k2, _ = tail.get(tokens, n_tokens=4 * CHUNK, start=s)
        assert k2.shape[2] == 2 * CHUNK
        again = tail.put(tokens, keys[:, :, s:], values[:, :, s:], start=s)
        assert (again.chunks_written, again.chunks_present) == (0, 4)
        with pytest.raises(ValueError, match="multiple"):
            tail.put(tokens, keys, values, start=3)
        with pytest.raises(ValueError, match="KV holds"):
            tail.put(tokens, keys[:, :, s + CHUNK :], values[:, :, s + CHUNK :], start=s)


def test_prefetch_runs_ahead_and_get_uses_what_it_fetched(
    s3_endpoint: str,
    bucket: str,
) -> None:
    tokens, keys, values = written_to_s3(s3_endpoint, bucket, 12, seed=11)
    with store_of([MemoryBackend(1 << 20)]) as ref:
        ref.put(tokens, keys, values)
        ref_k, ref_v = ref.get(tokens)
    s3 = s3_tier(s3_endpoint, bucket)
    with store_of([MemoryBackend(1 << 20), s3]) as reader:
        future = reader.prefetch(tokens)
        assert future.result(timeout=30) == 12 * CHUNK
        fetched = s3.usage().hits
        assert fetched == 12
        k, v = reader.get(tokens)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
        assert s3.usage().hits == fetched  # the get asked S3 for nothing
        assert reader.stats.chunks_hit == {"prefetch": 12}
        assert reader.prefetch(tokens).result(timeout=30) == 12 * CHUNK  # now resident
        assert s3.usage().hits == fetched


def test_lookup_and_get_during_a_prefetch_wait_for_it_instead_of_fetching_twice(
    s3_endpoint: str,
    bucket: str,
) -> None:
    tokens, _, _ = written_to_s3(s3_endpoint, bucket, 6, seed=12)
    with SlowProxy(s3_endpoint) as proxy:
        s3 = s3_tier(proxy.url, bucket, read_timeout=30)
        with store_of([MemoryBackend(1 << 20), s3]) as reader:
            proxy.hold()
            future = reader.prefetch(tokens)
            threading.Timer(0.5, proxy.release).start()
            assert reader.lookup(tokens) == 6 * CHUNK  # waits for the prefetch
            assert future.done()
            k, _ = reader.get(tokens)
            assert k.shape[2] == 6 * CHUNK and reader.stats.chunks_hit == {"prefetch": 6}
            assert s3.usage().hits == 6  # each chunk fetched once


def test_a_prefetch_stalled_on_a_tier_does_not_hold_back_the_next_one(
    s3_endpoint: str,
    bucket: str,
) -> None:
    """Prefetches run on ``prefetch_threads`` threads: one waiting on a stalled S3 does
    not queue a second one behind it (the reliability soak's 3.4 s prefetch on CI was
    such a wait behind another prefetch, with one prefetch thread)."""
    slow_tokens, _, _ = written_to_s3(s3_endpoint, bucket, 4, seed=14)
    tokens, keys, values = tiny_sequence(3, seed=15)
    with SlowProxy(s3_endpoint) as proxy:
        s3 = s3_tier(proxy.url, bucket, read_timeout=30)
        with store_of([MemoryBackend(1 << 20), s3]) as reader:
            reader.put(tokens, keys, values)
            reader.flush(timeout=30)
            proxy.hold()
            try:
                stalled = reader.prefetch(slow_tokens)
                assert reader.prefetch(tokens).result(timeout=10) == 3 * CHUNK
                assert not stalled.done()  # still waiting on S3: not ahead of the queue
            finally:
                proxy.release()
            assert stalled.result(timeout=30) == 4 * CHUNK
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="prefetch_threads"):
            store_of([MemoryBackend(1 << 20)], prefetch_threads=bad)


# --- tenants, capacity -----------------------------------------------------------------------

TENANT_CONFIG = """
chunk_tokens: 16
tiers:
  - {kind: memory, capacity: 1MiB}
  - {kind: disk, path: disk, capacity: 1MiB}
codec: {artifact: art}
"""


def test_tenants_from_config_never_hit_each_others_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tiny_codec import tiny_artifact

    tiny_artifact().save(tmp_path / "art")
    path = tmp_path / "store.yaml"
    path.write_text(TENANT_CONFIG)
    tokens, keys, values = tiny_sequence(4, seed=13)

    def store(tenant: str) -> TieredStore:
        monkeypatch.setenv("KVTC_STORE_TENANT", tenant)
        return TieredStore.from_config(path, tiny_info())

    with store("alice") as alice:
        assert alice.namespace.tenant == "alice"
        alice.put(tokens, keys, values)
        alice_keys = alice.keys_for(tokens)
    with store("bob") as bob:
        assert not set(bob.keys_for(tokens)) & set(alice_keys)
        assert bob.lookup(tokens) == 0 and bob.get(tokens) is None
        assert bob.put(tokens, keys, values).chunks_written == 4  # bob's own copy
    with store("alice") as again:
        assert again.lookup(tokens) == 4 * CHUNK
        assert again.get(tokens) is not None and again.stats.chunks_hit == {"disk": 4}
    assert len(list((tmp_path / "disk").rglob("*.kvtc"))) == 8


def test_disk_cap_holds_under_concurrent_puts(tmp_path: Path) -> None:
    """8 threads put through one store whose disk tier holds a fraction of it all; the
    bytes of chunk files, measured with the tier's lock held, never pass the cap."""
    cap = 6000
    disk = DiskBackend(tmp_path, cap)
    over: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with disk._lock:  # a consistent view of the directory
                used = sum(p.stat().st_size for p in tmp_path.glob("??/*.kvtc"))
            if used > cap:
                over.append(used)
            time.sleep(0.002)  # let the writers take the lock (it is not fair)

    with store_of([MemoryBackend(1 << 20), disk], write_queue_chunks=8) as store:
        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [
            threading.Thread(target=store.put, args=tiny_sequence(6, seed=100 + i))
            for i in range(8)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert store.flush(timeout=30)
        stop.set()
        watcher.join()
    assert not over
    assert disk.usage().used_bytes <= cap and disk.usage().evictions > 0


def _enospc(*_: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_an_error_on_put_at_the_top_and_counted_below(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real full file system cannot be made here without root: this mock of
    ``os.fsync`` raising ENOSPC stands for it (as in test_backends.py)."""
    tokens, keys, values = tiny_sequence(2, seed=14)
    monkeypatch.setattr(disk_module.os, "fsync", _enospc)
    with store_of([DiskBackend(tmp_path / "top", 1 << 20)]) as top:
        with pytest.raises(CapacityError, match="file system full"):
            top.put(tokens, keys, values)
        assert top.lookup(tokens) == 0
    with store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path / "low", 1 << 20)]) as store:
        assert store.put(tokens, keys, values).chunks_written == 2
        assert store.flush(timeout=30).failed_chunks == {"disk": 2}
        assert store.stats.lower_tier_put_errors == 1
        assert store.get(tokens)[0].shape[2] == 2 * CHUNK
    assert not list((tmp_path / "low").rglob("*.kvtc"))


def test_closed_store_refuses_puts_and_bad_settings_are_config_errors(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(1)
    store = store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)])
    assert store.close() and store.close()
    with pytest.raises(StoreError):
        store.put(tokens, keys, values)
    with pytest.raises(StoreError):
        store.prefetch(tokens)
    for kw in ({"write_mode": "write-around"}, {"write_queue_chunks": 0}):
        with pytest.raises(ConfigError):
            store_of([MemoryBackend(1 << 20)], **kw)
    with pytest.raises(ConfigError, match="unique"):
        store_of([MemoryBackend(1 << 20), MemoryBackend(1 << 20)])


def test_a_dropped_store_still_writes_its_queue_down(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(5, seed=15)
    store = store_of([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)])
    store.put(tokens, keys, values)
    del store  # the finalizer flushes, then closes
    deadline = time.monotonic() + 10
    while len(list(tmp_path.rglob("*.kvtc"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.rglob("*.kvtc"))) == 5


FINALIZER_IN_THREADING = """
import sys, threading
from kvtc_store.backends import DiskBackend, MemoryBackend
from kvtc_store.store import TieredStore
from tests.tiny_codec import CHUNK, tiny_codec, tiny_namespace, tiny_sequence

disk = DiskBackend(sys.argv[1], 1 << 30, io_threads=4)
disk.put([("aa", b"1"), ("bb", b"2")])  # two files at once: the I/O pool starts here,
# in the main thread, so its threads are not daemons (join takes threading's lock)
store = TieredStore([MemoryBackend(1 << 24), disk], tiny_codec(), tiny_namespace("t"),
                    chunk_tokens=CHUNK)
tokens, keys, values = tiny_sequence(4)
store.put(tokens, keys, values)
assert store.flush(timeout=30)
# A store collected without close() runs its finalizer wherever collection happens,
# e.g. inside threading's bookkeeping while a thread starts, with this lock held:
with threading._shutdown_locks_lock:
    store._finalizer()
print("released")
"""


@pytest.mark.skipif(
    not hasattr(threading, "_shutdown_locks_lock"), reason="CPython's threading internals"
)
def test_store_finalizer_joins_no_thread(tmp_path: Path) -> None:
    """Regression (a CI run hung in tests/test_store.py): a store dropped without close()
    is released by its finalizer, which garbage collection may run inside threading's
    bookkeeping; joining a thread there (the disk tier's I/O pool, the writers)
    deadlocks. The finalizer flushes and closes without joining. Run in a subprocess so
    a regression fails on the timeout instead of hanging the suite."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", FINALIZER_IN_THREADING, str(tmp_path / "disk")],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "released"
