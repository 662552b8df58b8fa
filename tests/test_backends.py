"""Tests of the storage tiers: the memory (CPU) tier and the disk tier.

All CPU, all small. Cross-process behaviour is checked with real child
processes (``sys.executable``); crashes with a real ``SIGKILL``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.backends import Backend, DiskBackend, GPUBackend, MemoryBackend, TierUsage
from kvtc_store.backends import disk as disk_module
from kvtc_store.errors import CapacityError, ConfigError


def key_of(value: bytes) -> str:
    """Content address of a value, as the store would use it."""
    return hashlib.sha256(value).hexdigest()


def k(i: int) -> str:
    """A deterministic valid key for small integer ids."""
    return hashlib.sha256(str(i).encode()).hexdigest()


def run_child(code: str, *args: str, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh Python process; return its stdout (fails on non-zero exit)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def chunk_files(root: Path) -> list[Path]:
    """Every visible chunk file under a disk tier's root."""
    return sorted(root.glob("??/*.kvtc"))


def temp_files(root: Path) -> list[Path]:
    """Every temp (in-progress) file under a disk tier's root."""
    return sorted(root.glob("??/.tmp-*"))


@pytest.fixture(params=["memory", "gpu-code-on-cpu", "disk"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each tier with a 1,000-byte capacity. The GPU tier's code runs here on host
    tensors (``device="cpu"``); tests/test_gpu_backend.py runs it on CUDA."""
    if request.param == "memory":
        return MemoryBackend(1000)
    if request.param == "gpu-code-on-cpu":
        return GPUBackend(1000, device="cpu")
    return DiskBackend(tmp_path / "tier", 1000, block_bytes=1)


# --- the protocol, on both tiers ---------------------------------------------------------


def test_put_get_exists_delete(backend: Backend) -> None:
    backend.put([(k(1), b"one"), (k(2), bytearray(b"two")), (k(3), memoryview(b"three"))])
    assert backend.exists([k(1), k(4), k(3)]) == [True, False, True]
    got = backend.get([k(3), k(4), k(2), k(1)])
    assert got == [b"three", None, b"two", b"one"]
    assert all(v is None or type(v) is bytes for v in got)
    backend.delete([k(2), k(4)])  # a missing key is ignored
    assert backend.exists([k(1), k(2), k(3)]) == [True, False, True]
    u = backend.usage()
    assert isinstance(u, TierUsage)
    assert (u.used_bytes, u.n_items, u.capacity_bytes) == (3 + 5, 2, 1000)
    assert (u.hits, u.misses, u.bytes_written, u.bytes_read) == (3, 1, 11, 11)
    assert backend.get([]) == [] and backend.exists([]) == []


def test_lru_eviction_and_get_promotes(backend: Backend) -> None:
    v = b"x" * 300
    backend.put([(k(1), v), (k(2), v), (k(3), v)])  # 900 of 1000 bytes
    assert backend.get([k(1)]) == [v]  # 1 becomes most recent: order 2, 3, 1
    backend.put([(k(4), v)])  # needs 200 bytes: evicts 2 only
    assert backend.exists([k(1), k(2), k(3), k(4)]) == [True, False, True, True]
    backend.put([(k(5), b"y" * 600)])  # evicts 3 then 1
    assert backend.exists([k(1), k(3), k(4), k(5)]) == [False, False, True, True]
    u = backend.usage()
    assert u.evictions == 3 and u.used_bytes == 900 <= u.capacity_bytes


def test_exists_does_not_promote(backend: Backend) -> None:
    v = b"x" * 400
    backend.put([(k(1), v), (k(2), v)])
    assert backend.exists([k(1)]) == [True]
    backend.put([(k(3), v)])  # 1 is still least recent
    assert backend.exists([k(1), k(2), k(3)]) == [False, True, True]


def test_item_larger_than_capacity_raises_and_stores_nothing(backend: Backend) -> None:
    backend.put([(k(1), b"keep")])
    with pytest.raises(CapacityError):
        backend.put([(k(2), b"small"), (k(3), b"z" * 1001)])
    assert backend.exists([k(1), k(2), k(3)]) == [True, False, False]
    assert backend.usage().used_bytes == 4
    backend.put([(k(4), b"z" * 1000)])  # exactly the capacity fits, evicting the rest
    assert backend.exists([k(1), k(4)]) == [False, True]


def test_put_of_existing_key_is_noop(backend: Backend) -> None:
    backend.put([(k(1), b"first")])
    backend.put([(k(1), b"second, ignored")])
    assert backend.get([k(1)]) == [b"first"]
    u = backend.usage()
    assert (u.bytes_written, u.used_bytes, u.n_items) == (5, 5, 1)


@pytest.mark.parametrize("bad", ["", "a", "ABCD", "xyz0", "ab cd", "a" * 129, b"abcd", 1234, None])
def test_malformed_keys_raise_value_error(backend: Backend, bad: object) -> None:
    for call in (backend.exists, backend.get, backend.delete):
        with pytest.raises(ValueError):
            call([bad])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        backend.put([(bad, b"v")])  # type: ignore[list-item]
    assert backend.usage().n_items == 0


def test_single_string_or_non_bytes_value_is_a_type_error(backend: Backend) -> None:
    with pytest.raises(TypeError):
        backend.get(k(1))
    with pytest.raises(TypeError):
        backend.put([(k(1), "text")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        backend.put([k(1)])  # type: ignore[list-item]


@pytest.mark.parametrize("cap", [-1, 1.5, "10", True, None])
def test_bad_capacity_is_config_error(tmp_path: Path, cap: object) -> None:
    with pytest.raises(ConfigError):
        MemoryBackend(cap)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DiskBackend(tmp_path, cap, block_bytes=1)  # type: ignore[arg-type]


# --- memory tier --------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 15), st.integers(0, 120)),
        st.tuples(st.just("get"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 15), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(cap=st.integers(0, 300), ops=_ops)
def test_memory_matches_reference_lru_and_never_exceeds_cap(
    cap: int, ops: list[tuple[str, int, int]]
) -> None:
    """Random puts/gets/deletes against a 10-line reference LRU; cap checked after every op."""
    tier = MemoryBackend(cap)
    model: OrderedDict[str, bytes] = OrderedDict()
    for op, i, size in ops:
        key = k(i)
        if op == "put":
            value = bytes([i]) * size
            if size > cap:
                with pytest.raises(CapacityError):
                    tier.put([(key, value)])
            else:
                tier.put([(key, value)])
                if key not in model:
                    while model and sum(map(len, model.values())) + size > cap:
                        model.popitem(last=False)
                    model[key] = value
        elif op == "get":
            assert tier.get([key]) == [model.get(key)]
            if key in model:
                model.move_to_end(key)
        else:
            tier.delete([key])
            model.pop(key, None)
        u = tier.usage()
        assert u.used_bytes <= cap
        assert u.used_bytes == sum(map(len, model.values()))
        assert tier.exists([k(j) for j in range(16)]) == [k(j) in model for j in range(16)]


def test_memory_thread_safe_under_concurrent_puts() -> None:
    tier = MemoryBackend(10_000)
    seen_over_cap: list[int] = []

    def worker(seed: int) -> None:
        for j in range(300):
            tier.put([(k(seed * 1000 + j), b"v" * (37 * (j % 11)))])
            tier.get([k(seed * 1000 + j // 2)])
            used = tier.usage().used_bytes
            if used > 10_000:
                seen_over_cap.append(used)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not seen_over_cap
    u = tier.usage()
    assert u.used_bytes <= 10_000
    assert u.hits + u.misses == 4 * 300


# --- disk tier ------------------------------------------------------------------------------

_WRITE_CHILD = """
import sys
from kvtc_store.backends import DiskBackend
root, cap = sys.argv[1], int(sys.argv[2])
tier = DiskBackend(root, cap, block_bytes=1)
for i, arg in enumerate(sys.argv[3:]):
    op, key, *rest = arg.split(":")
    if op == "put":
        tier.put([(key, bytes.fromhex(rest[0]))])
    elif op == "get":
        print(tier.get([key])[0].hex())
"""

_READ_CHILD = """
import json, sys
from kvtc_store.backends import DiskBackend
tier = DiskBackend(sys.argv[1], int(sys.argv[2]), block_bytes=1)
keys = sys.argv[3:]
got = tier.get(keys)
print(json.dumps([None if v is None else v.hex() for v in got]))
"""


def read_in_child(root: Path, cap: int, keys: list[str]) -> list[bytes | None]:
    import json

    out = json.loads(run_child(_READ_CHILD, str(root), str(cap), *keys))
    return [None if v is None else bytes.fromhex(v) for v in out]


def test_disk_layout_and_no_leftover_temp_files(tmp_path: Path) -> None:
    tier = DiskBackend(tmp_path, 10_000, block_bytes=1)
    tier.put([(k(1), b"abc")])
    path = tmp_path / k(1)[:2] / f"{k(1)}.kvtc"
    assert path.read_bytes() == b"abc"
    assert chunk_files(tmp_path) == [path]
    assert temp_files(tmp_path) == []


def test_disk_data_written_by_one_process_is_read_by_another(tmp_path: Path) -> None:
    values = {key_of(v): v for v in (b"alpha", b"beta" * 100, os.urandom(5000))}
    run_child(
        _WRITE_CHILD,
        str(tmp_path),
        "100000",
        *(f"put:{key}:{v.hex()}" for key, v in values.items()),
    )
    keys = [*values, k(99)]
    assert read_in_child(tmp_path, 100_000, keys) == [*values.values(), None]
    later = DiskBackend(tmp_path, 100_000, block_bytes=1)  # and a later instance in this process
    assert later.get(keys) == [*values.values(), None]
    assert later.usage().used_bytes == sum(map(len, values.values()))


def test_disk_lru_order_survives_restart_in_new_process(tmp_path: Path) -> None:
    v = "ab" * 300  # 300 bytes
    # Process A: write 1, 2, 3, then read 1 (1 becomes most recent).
    run_child(
        _WRITE_CHILD,
        str(tmp_path),
        "1000",
        f"put:{k(1)}:{v}",
        f"put:{k(2)}:{v}",
        f"put:{k(3)}:{v}",
        f"get:{k(1)}",
    )
    # Process B: write 4, which must evict 2 (the oldest), not 1.
    run_child(_WRITE_CHILD, str(tmp_path), "1000", f"put:{k(4)}:{v}")
    got = read_in_child(tmp_path, 1000, [k(1), k(2), k(3), k(4)])
    assert [g is not None for g in got] == [True, False, True, True]


def test_disk_cap_enforced_on_reopen_with_smaller_cap(tmp_path: Path) -> None:
    tier = DiskBackend(tmp_path, 10_000, block_bytes=1)
    for i in range(6):
        tier.put([(k(i), bytes([i]) * 100)])
    tier.get([k(0)])  # 0 is now the most recent
    small = DiskBackend(tmp_path, 250, block_bytes=1)
    assert small.exists([k(i) for i in range(6)]) == [True, False, False, False, False, True]
    u = small.usage()
    assert u.used_bytes == 200 and u.evictions == 4
    assert sum(p.stat().st_size for p in chunk_files(tmp_path)) == 200


def test_disk_cap_never_exceeded_over_random_puts(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    tier = DiskBackend(tmp_path, 4096, block_bytes=1)
    for i in range(60):
        tier.put([(k(i), b"r" * rng.randint(0, 1500))])
        if rng.random() < 0.3:
            tier.get([k(rng.randrange(i + 1))])
        on_disk = sum(p.stat().st_size for p in chunk_files(tmp_path))
        assert on_disk == tier.usage().used_bytes <= 4096


def test_disk_reput_existing_key_writes_nothing(tmp_path: Path) -> None:
    tier = DiskBackend(tmp_path, 10_000, block_bytes=1)
    tier.put([(k(1), b"first")])
    path = chunk_files(tmp_path)[0]
    before = (path.stat().st_mtime_ns, path.stat().st_ino)
    tier.put([(k(1), b"other bytes")])
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert path.read_bytes() == b"first"
    assert tier.usage().bytes_written == 5


def test_disk_two_live_instances_share_a_directory(tmp_path: Path) -> None:
    a = DiskBackend(tmp_path, 10_000, block_bytes=1)
    b = DiskBackend(tmp_path, 10_000, block_bytes=1)
    a.put([(k(1), b"from a")])
    assert b.exists([k(1)]) == [True]
    assert b.get([k(1)]) == [b"from a"]
    assert b.usage().n_items == 1  # counted once found
    a.delete([k(1)])
    assert b.get([k(1)]) == [None]  # vanished file: a miss, never an error
    assert b.usage().n_items == 0


def test_disk_stale_temp_files_ignored_and_removed_on_reopen(tmp_path: Path) -> None:
    tier = DiskBackend(tmp_path, 10_000, block_bytes=1)
    tier.put([(k(1), b"real")])
    fan = tmp_path / k(2)[:2]
    fan.mkdir(exist_ok=True)
    host = disk_module._host_tag()
    # A dead writer on this host: a pid that cannot exist (above pid_max).
    dead = fan / f".tmp-{k(2)}-{host}-{2**22 + 1}-00000000.part"
    dead.write_bytes(b"half a chu")
    # A writer on another host, long ago: stale by age.
    old = fan / f".tmp-{k(3)}-{'f' * 12}-123-11111111.part"
    old.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    # A writer on another host, just now: maybe still writing; ignored, kept.
    live = fan / f".tmp-{k(4)}-{'f' * 12}-123-22222222.part"
    live.write_bytes(b"y" * 10)

    reopened = DiskBackend(tmp_path, 10_000, stale_temp_seconds=3600, block_bytes=1)
    assert not dead.exists() and not old.exists() and live.exists()
    assert reopened.exists([k(1), k(2), k(3), k(4)]) == [True, False, False, False]
    assert reopened.get([k(2), k(4)]) == [None, None]
    u = reopened.usage()
    assert (u.n_items, u.used_bytes) == (1, 4)


_CRASH_MID_WRITE_CHILD = """
import os, sys, time
from kvtc_store.backends import DiskBackend
tier = DiskBackend(sys.argv[1], 1 << 30, block_bytes=1)
tier.put([(sys.argv[2], b"complete chunk")])
real_write = os.write
def half_then_hang(fd, data):
    n = real_write(fd, bytes(data[: len(data) // 2]))
    os.fsync(fd)
    print("HALF", flush=True)
    time.sleep(120)
    return n
os.write = half_then_hang
tier.put([(sys.argv[3], b"z" * 1_000_000)])
"""


def test_disk_kill_mid_write_leaves_no_visible_partial_chunk(tmp_path: Path) -> None:
    """SIGKILL a writer while half of a chunk is in its temp file."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASH_MID_WRITE_CHILD, str(tmp_path), k(1), k(2)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "HALF"
        partial = temp_files(tmp_path)
        assert len(partial) == 1 and partial[0].stat().st_size == 500_000
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    tier = DiskBackend(tmp_path, 1 << 30, block_bytes=1)
    assert tier.exists([k(1), k(2)]) == [True, False]
    assert tier.get([k(1), k(2)]) == [b"complete chunk", None]
    assert temp_files(tmp_path) == []  # the dead writer's temp file is gone
    assert [p.name for p in chunk_files(tmp_path)] == [f"{k(1)}.kvtc"]


_WRITE_LOOP_CHILD = """
import hashlib, os, sys
from kvtc_store.backends import DiskBackend
tier = DiskBackend(sys.argv[1], 1 << 30, block_bytes=1)
for i in range(400):
    value = os.urandom(200_000 + 1_000 * i)
    tier.put([(hashlib.sha256(value).hexdigest(), value)])
    if i == 0:
        print("STARTED", flush=True)
"""


def test_disk_kill_during_write_loop_every_visible_chunk_is_whole(tmp_path: Path) -> None:
    """SIGKILL a writer at an arbitrary moment of a write loop; check every visible chunk."""
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITE_LOOP_CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "STARTED"
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

    tier = DiskBackend(tmp_path, 1 << 30, block_bytes=1)
    files = chunk_files(tmp_path)
    assert files, "the child wrote at least one chunk before being killed"
    keys = [p.name.removesuffix(".kvtc") for p in files]
    for key, value in zip(keys, tier.get(keys)):
        assert value is not None and key_of(value) == key
    assert tier.usage().n_items == len(files)
    assert temp_files(tmp_path) == []


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fault", ["write", "fsync"])
def test_disk_full_evicts_retries_once_then_raises_capacity_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """ENOSPC while writing a chunk that stays full: the LRU chunks are evicted to make
    room, the write is tried once more, then CapacityError; temp files removed, what is
    left intact. (tests/test_reliability.py fills a real tmpfs; this mock covers ENOSPC
    reported at fsync, as delayed allocation on XFS, ext4 and NFS does.)

    ``os.write`` writes part of the chunk for real and then fails with ENOSPC (the disk
    filled mid-write), or ``os.fsync`` fails with ENOSPC.
    """
    tier = DiskBackend(tmp_path, 1 << 20, block_bytes=1)
    old = {k(i): bytes([i]) * 1000 for i in range(20)}
    tier.put(list(old.items()))
    real_write = os.write
    attempts = []

    def write_then_full(fd: int, data: bytes) -> int:
        attempts.append(fd)
        real_write(fd, bytes(memoryview(data)[:100]))
        raise _enospc()

    def fsync_full(fd: int) -> None:
        attempts.append(fd)
        raise _enospc()

    with monkeypatch.context() as m:
        if fault == "write":
            m.setattr(disk_module.os, "write", write_then_full)
        else:
            m.setattr(disk_module.os, "fsync", fsync_full)
        with pytest.raises(CapacityError) as info:
            tier.put([(k(99), b"n" * 5000)])
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    # tried, evicted, tried once more (fsync: also the new fan-out folder's, once)
    assert len(attempts) == (2 if fault == "write" else 3)

    assert temp_files(tmp_path) == []
    left = tier.get(list(old))
    assert left[:10] == [None] * 10  # 2 x 5000 B evicted, least recently used first
    assert left[10:] == list(old.values())[10:]
    new = k(99)
    assert tier.exists([new]) == [False]
    tier.put([(new, b"n" * 5000)])  # space is back: the same put now succeeds
    assert tier.get([new]) == [b"n" * 5000]


def test_disk_root_that_is_a_file_is_config_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(ConfigError):
        DiskBackend(f, 100, block_bytes=1)


def test_disk_put_rewrites_a_chunk_removed_by_another_process(tmp_path: Path) -> None:
    a = DiskBackend(tmp_path, 10_000, block_bytes=1)
    b = DiskBackend(tmp_path, 10_000, block_bytes=1)
    a.put([(k(1), b"v1")])
    b.delete([k(1)])
    a.put([(k(1), b"v1")])  # a's index still listed it; the file is written again
    assert b.get([k(1)]) == [b"v1"]
    assert a.usage().used_bytes == 2


# --- eviction listener (write-back) ----------------------------------------------------------


def test_eviction_listener_gets_each_evicted_chunk_once(backend: Backend) -> None:
    seen: list[tuple[str, bytes]] = []
    backend.set_eviction_listener(seen.extend)
    values = {k(i): bytes([i]) * 300 for i in range(6)}
    for key, value in values.items():
        backend.put([(key, value)])  # 3 fit: each later put evicts the oldest
    assert seen == [(k(i), values[k(i)]) for i in range(3)]
    assert all(type(v) is bytes for _, v in seen)
    backend.delete([k(4)])  # an explicit delete is not an eviction
    backend.set_eviction_listener(None)
    backend.put([(k(7), b"x" * 1000)])  # evicts 3 and 5, nobody told
    assert len(seen) == 3 and backend.usage().evictions == 5


def test_disk_cap_never_exceeded_under_concurrent_batches(tmp_path: Path) -> None:
    """8 threads put batches (written in parallel, outside the index lock) and read;
    the chunk files on disk, summed with the index lock held, never pass the cap, and
    at the end they are exactly what the index counts."""
    cap = 40_000
    tier = DiskBackend(tmp_path, cap, io_threads=4, block_bytes=1)
    over: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with tier._lock:
                used = sum(p.stat().st_size for p in chunk_files(tmp_path))
            if used > cap:
                over.append(used)
            time.sleep(0.002)  # let the writers take the lock (it is not fair)

    def worker(seed: int) -> None:
        for j in range(12):
            batch = [(k(seed * 1000 + j * 10 + i), bytes([i]) * (500 + 400 * i)) for i in range(5)]
            tier.put(batch)
            got = tier.get([key for key, _ in batch])
            assert all(g is None or g == v for g, (_, v) in zip(got, batch))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not over
    u = tier.usage()
    assert sum(p.stat().st_size for p in chunk_files(tmp_path)) == u.used_bytes <= cap
    assert u.n_items == len(chunk_files(tmp_path)) and u.evictions > 0
    assert temp_files(tmp_path) == []
    tier.close()
