"""Disk tier: one file per chunk, written atomically, LRU-evicted under a byte cap.

Layout under ``root``::

    root/
      3f/                                  two-character fan-out: key[:2]
        3fa9...c1.kvtc                     one complete chunk (name = key + ".kvtc")
        .tmp-3fa9...c1-<host>-<pid>-<rand>.part   a write in progress

Write path: the value goes to a temp file in the chunk's own directory, is
fsynced, then ``os.replace``-d onto its final name and the directory is
fsynced. A rename is atomic, so a reader sees either no chunk or the whole
chunk; a crash leaves at most a temp file, which the chunk scan never matches
(dot prefix, ``.part`` suffix) and the next open removes once it is stale.

Recency is the file's mtime: it is stamped on write and on every ``get``
(``os.utime``), so LRU order survives a restart and is shared by every process
that opens the directory.

The cap counts *allocated* bytes (``st_blocks * 512``: what the file system gives a
file, whole blocks), not file lengths, and holds across every process sharing the
folder: ``root/.kvtc-lock`` holds the folder's allocated bytes (8 bytes,
little-endian), read and written only under an exclusive ``fcntl.flock`` of that file.
A put reserves its batch there before writing; when the folder would go over the cap,
the process holding the lock lists the folder (which also corrects the count) and
evicts the least recently used chunks, whoever wrote them, to 95% of the cap. Chunks a
process writes at the moment another one lists the folder are not seen by that listing,
so the folder may go over the cap by at most those batches, until the next put.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtc_store.errors import CapacityError, ConfigError, StoreError

from .base import Backend, TierUsage, check_capacity, validate_items, validate_key, validate_keys

__all__ = ["DiskBackend"]

logger = logging.getLogger(__name__)

CHUNK_SUFFIX = ".kvtc"
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"

_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_CHUNK_RE = re.compile(r"([0-9a-f]{2,128})\.kvtc")
_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]{2,128}-([0-9a-f]{12})-([0-9]+)-[0-9a-f]+\.part")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
LEDGER_NAME = ".kvtc-lock"
"""The file whose flock guards a folder's shared accounting and which holds it."""
LOW_WATER = 0.95
"""A shared eviction frees the folder down to this share of the cap (fewer listings)."""


class _Ledger:
    """The shared accounting of a disk-tier folder: ``root/.kvtc-lock`` holds, as JSON,
    ``total`` (allocated bytes of the chunk files plus the writes in flight) and
    ``inflight`` (bytes reserved by each writer, ``"<host tag>-<pid>"``, whose files are
    not visible yet), read and written only under ``flock(LOCK_EX)`` of that file. One
    per backend instance (flock locks belong to an open file, so two instances in one
    process exclude each other too)."""

    def __init__(self, root: Path) -> None:
        self._fd = os.open(root / LEDGER_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read(self) -> dict | None:
        """The recorded state, None when never written or unreadable (then the caller
        lists the folder). Caller holds the lock."""
        raw = os.pread(self._fd, 1 << 20, 0)
        try:
            state = json.loads(raw)
            total, inflight = int(state["total"]), dict(state["inflight"])
        except (ValueError, KeyError, TypeError):
            return None
        return {"total": total, "inflight": {str(k): int(v) for k, v in inflight.items()}}

    def write(self, state: dict) -> None:
        data = json.dumps(state, separators=(",", ":")).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _host_tag() -> str:
    """Name this host and PID namespace in 12 hex characters.

    Temp files carry it with the writer's pid, so a later open can tell a temp
    file left by a dead local process (stale) from one of a live writer on
    another host or container sharing the directory (not ours to judge).
    """
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = 0
    ident = f"{socket.gethostname()}/{pid_ns}".encode()
    return hashlib.sha256(ident).hexdigest()[:12]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 probe)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _writer_alive(writer: str, host: str) -> bool:
    """Whether a writer ``"<host tag>-<pid>"`` of the shared count may still be writing:
    one of this host whose process is gone is not; one of another host is assumed alive
    (not ours to judge)."""
    tag, _, pid = writer.rpartition("-")
    return tag != host or not pid.isdigit() or _pid_alive(int(pid))


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskBackend(Backend):
    """Local-disk tier: one ``<key>.kvtc`` file per chunk under ``root/<key[:2]>/``.

    Guarantees:

    - Atomic writes: temp file, ``os.fsync``, ``os.replace``, fsync of the
      directory. A crash never leaves a partial chunk visible.
    - Byte cap (bytes of chunk files): least-recently-used chunks (oldest mtime)
      are evicted before a new chunk is written, and on open when the directory
      holds more than ``capacity_bytes`` (for example after reopening with a
      smaller cap).
    - Persistence: the index is rebuilt by scanning ``root`` on open, so chunks
      written by one process are found by the next. A key missing from this
      instance's index is still looked up on disk, so chunks written by another
      live process sharing the directory are found too (and then counted).
    - A full disk (``ENOSPC``/``EDQUOT``) during a write raises
      :class:`~kvtc_store.errors.CapacityError` after the temp file is removed;
      chunks already stored are untouched.

    - The cap counts allocated bytes (whole file-system blocks) and holds across
      every process sharing ``root`` (a shared count under a file lock; see the
      module docstring): at most the batches being written when another process
      lists the folder go over it, until the next put.
    - A full file system (``ENOSPC``) on a write evicts the least recently used
      chunks (twice the failed bytes) and retries the failed chunks once before
      :class:`~kvtc_store.errors.CapacityError`.

    Thread-safe. One lock guards the index and the counters; file I/O runs outside
    it, so reads are not held up by writes. A batch's files are written (and read)
    in parallel by ``io_threads`` threads: each write's fsync then overlaps the
    others' (file systems commit concurrent fsyncs together), which a one-by-one
    write cannot do. Space for a batch is reserved (evicting LRU chunks) before its
    files are written, so the cap holds while writes are in flight.

    Args:
        root: Directory of the tier; created (with parents) if missing.
        capacity_bytes: Byte cap of the stored chunk files.
        stale_temp_seconds: A temp file older than this (seconds) is stale and
            removed on open, whoever wrote it. A temp file whose writer ran on
            this host (same PID namespace) and is dead is removed at once.
        io_threads: Files of one batch written or read at once (≥ 1).
        read_only: Open for reading only (reports: ``kvtc-store stats``): nothing is
            evicted, written, deleted or removed, not even on open; ``put`` and
            ``delete`` raise :class:`~kvtc_store.errors.StoreError`.
        block_bytes: The allocation unit sizes are counted in; default None: the file
            system's (what it allocates: ``st_blocks * 512`` of each file). ``1``
            counts file lengths instead (tests that reason about exact byte counts).

    Raises:
        ConfigError: ``capacity_bytes`` is not a non-negative int, or ``root``
            cannot be created as a directory.
    """

    name = "disk"
    deadline_s = 5.0

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        stale_temp_seconds: float = 3600.0,
        io_threads: int = 8,
        read_only: bool = False,
        block_bytes: int | None = None,
    ) -> None:
        self.capacity_bytes = check_capacity(capacity_bytes)
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise ConfigError(f"io_threads must be an int >= 1, got {io_threads!r}")
        self.io_threads = io_threads
        self.root = Path(root)
        self.stale_temp_seconds = float(stale_temp_seconds)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"disk tier root {self.root} cannot be created: {e}") from e
        if not self.root.is_dir():
            raise ConfigError(f"disk tier root {self.root} is not a directory")
        self.read_only = read_only
        if block_bytes is not None and (isinstance(block_bytes, bool) or block_bytes < 1):
            raise ConfigError(f"block_bytes must be an int >= 1, got {block_bytes!r}")
        self._logical = block_bytes == 1
        self._unit = block_bytes or os.statvfs(self.root).f_frsize or 4096
        self._ledger = None if read_only else _Ledger(self.root)
        self._host = _host_tag()
        self._me = f"{self._host}-{os.getpid()}"  # this writer, in the shared count
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when reserved space frees
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, LRU first
        self._used = 0
        self._reserved = 0  # bytes of files being written outside the lock
        self._pool: ThreadPoolExecutor | None = None
        self._last_stamp_ns = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._bytes_written = 0
        self._bytes_read = 0
        with self._lock:
            self._scan()
            if not read_only:
                self._shared_reserve(0, None)  # corrects the shared count, evicts if over

    # --- public API ------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Say which keys have a chunk file now; no promotion, no counters.

        Asks the file system (one ``stat`` per key), so chunks written or
        evicted by another process sharing ``root`` are seen as they are.

        Raises:
            ValueError: a key is malformed.
            TypeError: ``keys`` is a single string, not a sequence.
        """
        keys = validate_keys(keys)
        return [self._path(k).is_file() for k in keys]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read each key's chunk, or ``None`` on a miss; hits get a fresh mtime (MRU).

        A file that vanished (another process evicted it) or cannot be read is
        a miss and is dropped from the index.

        Raises:
            ValueError: a key is malformed.
        """
        keys = validate_keys(keys)
        values = self._each(self._read_file, keys)  # file I/O, outside the lock
        touch: list[tuple[Path, int]] = []
        with self._lock:
            for k, value in zip(keys, values):
                if value is None:
                    self._misses += 1
                    continue
                self._hits += 1
                self._bytes_read += len(value)
                touch.append((self._path(k), self._stamp()))
                if k in self._index:
                    self._index.move_to_end(k)
                elif (size := self._file_size(self._path(k))) is not None:  # still there
                    self._adopt(k, size)
        for path, stamp in touch if not self.read_only else []:
            self._touch(path, stamp)
        return values

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write new chunks atomically, evicting LRU chunks first to stay under the cap.

        A key already on disk is a no-op (blobs are immutable). The batch is
        validated before anything is written; if a write fails, chunks written
        earlier in the batch stay stored.

        Raises:
            ValueError: a key is malformed.
            TypeError: a value is not bytes-like.
            CapacityError: a value is larger than ``capacity_bytes`` (nothing
                stored), or the file system is full (the failing chunk is not
                stored, its temp file is removed).
            StoreError: another OS error while writing (temp file removed).
        """
        items = validate_items(items)
        self._writable()
        for key, value in items:
            if self._alloc(len(value)) > self.capacity_bytes:
                raise CapacityError(
                    f"{self.name} tier: chunk {key} is {len(value)} B, "
                    f"larger than the tier's capacity of {self.capacity_bytes} B"
                )
        evicted: list[tuple[str, bytes]] = []
        try:
            with self._lock:
                plan: dict[str, tuple[Path, bytes, int]] = {}
                for key, value in items:
                    path = self._path(key)
                    size = self._file_size(path)
                    if size is not None:  # stored already (maybe by another process)
                        if key not in self._index:
                            self._adopt(key, size, evicted)
                        continue
                    if key not in plan:
                        self._forget(key)  # indexed but removed by another process
                        plan[key] = (path, value, 0)
                total = sum(self._alloc(len(v)) for _, v, _ in plan.values())
                if total > self.capacity_bytes:  # the batch evicts itself: one by one
                    for key, (path, value, _) in plan.items():
                        need = self._alloc(len(value))
                        self._make_room(need, evicted)
                        self._shared_reserve(need, evicted)
                        try:
                            self._write(path, value, self._stamp())
                        except BaseException:
                            self._shared_settle(-need, need)
                            raise
                        self._shared_settle(self._commit(key, path) - need, need)
                    return
                self._make_room(total, evicted)
                self._shared_reserve(total, evicted)
                self._reserved += total
                plan = {k: (p, v, self._stamp()) for k, (p, v, _) in plan.items()}
            failures = self._each(self._write_or_error, list(plan.values()))
            full = [j for j, e in zip(plan.values(), failures) if isinstance(e, CapacityError)]
            if full:  # ENOSPC: make room on the file system, then try those once more
                with self._lock:
                    self._evict_for_full_disk(2 * sum(len(v) for _, v, _ in full), evicted)
                again = iter(self._each(self._write_or_error, full))
                failures = [next(again) if isinstance(e, CapacityError) else e for e in failures]
            with self._lock:
                self._reserved -= total
                settle = -total
                for key, (path, _, _), error in zip(plan, plan.values(), failures):
                    if error is None:
                        settle += self._commit(key, path)
                self._shared_settle(settle, total)
                self._room.notify_all()
            error = next((e for e in failures if e is not None), None)
            if error is not None:
                raise error
        finally:
            listener = self._eviction_listener
            if evicted and listener is not None:
                listener(evicted)

    def replace(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Overwrite stored chunks with new bytes under the same keys (re-encode jobs:
        keys name tokens, not codecs). Each file is replaced atomically (temp file,
        fsync, ``os.replace``): a reader sees the old bytes or the new, never a mix. A
        key not stored is left alone. The shared count is corrected by the size change;
        a larger file is not made room for (the next put evicts as usual).

        Returns:
            For each item, whether it replaced a stored chunk.

        Raises:
            ValueError, TypeError: as :meth:`put`.
            CapacityError, StoreError: a write failed (that chunk keeps its old bytes).
        """
        items = validate_items(items)
        self._writable()
        done = []
        for key, value in items:
            path = self._path(key)
            old = self._file_size(path)
            if old is None:
                done.append(False)
                continue
            self._write(path, value, self._stamp())
            with self._lock:
                self._forget(key)
                self._shared_settle(self._commit(key, path) - old)
            done.append(True)
        return done

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the keys' files; missing keys are ignored.

        Raises:
            ValueError: a key is malformed.
            StoreError: a file exists but cannot be removed.
        """
        keys = validate_keys(keys)
        self._writable()
        with self._lock:
            freed = 0
            try:
                for k in keys:
                    self._forget(k)
                    try:
                        freed += self._remove(self._path(k))
                    except OSError as e:
                        raise StoreError(f"{self.name} tier: cannot delete chunk {k}: {e}") from e
            finally:
                self._shared_settle(-freed)

    def close(self, wait: bool = True) -> None:
        """Stop the I/O threads (the chunk files stay); ``wait=False``: without joining
        them (see :meth:`Backend.close`; no I/O is pending, as every call waits for its
        own)."""
        with self._lock:
            pool, self._pool = self._pool, None
            ledger, self._ledger = self._ledger, None
        if pool is not None:
            pool.shutdown(wait=wait)
        if ledger is not None:
            ledger.close()

    def usage(self) -> TierUsage:
        """Return occupancy (allocated bytes of the chunk files known to this instance)
        and counters."""
        with self._lock:
            return TierUsage(
                used_bytes=self._used,
                capacity_bytes=self.capacity_bytes,
                n_items=len(self._index),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes_written=self._bytes_written,
                bytes_read=self._bytes_read,
            )

    def inventory(self) -> list[tuple[str, int, float]]:
        """Every chunk file under ``root``, whichever process wrote it: ``(key, allocated
        bytes, last use)``, the last use in seconds since the epoch (the file's mtime,
        which reads and writes stamp for LRU order). A scan of the folder; nothing is
        touched, so a read-only instance serves operators' reports."""
        return [(key, size, ns / 1e9) for ns, key, size in self._list_chunks()]

    def read_head(self, key: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` bytes of chunk ``key``'s file (a blob's header without its
        payload), or None when there is none. Not counted as a hit; recency untouched.

        Raises:
            ValueError: a malformed key.
        """
        validate_key(key)
        try:
            with open(self._path(key), "rb") as f:
                return f.read(nbytes)
        except OSError:
            return None

    # --- internals (caller holds the lock) -------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{CHUNK_SUFFIX}"

    def _file_size(self, path: Path) -> int | None:
        """Allocated bytes of a chunk file (its length with ``block_bytes=1``), None if
        there is none."""
        try:
            st = path.stat()
        except OSError:
            return None
        return self._allocated(st) if stat.S_ISREG(st.st_mode) else None

    def _allocated(self, st: os.stat_result) -> int:
        return st.st_size if self._logical else st.st_blocks * 512

    def _alloc(self, nbytes: int) -> int:
        """Bytes a file of ``nbytes`` takes: whole allocation units (an estimate before
        it is written; :meth:`_commit` counts what it took)."""
        return -(-nbytes // self._unit) * self._unit

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.name} tier at {self.root} is open read-only")

    def _remove(self, path: Path) -> int:
        """Unlink a chunk file; the allocated bytes freed (0 if it was gone)."""
        try:
            size = self._file_size(path) or 0
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    # --- the folder's shared count (caller holds the thread lock) ---------------------

    def _shared_reserve(self, need: int, evicted: list | None) -> None:
        """Reserve ``need`` bytes in the folder's shared count for a write; first, if the
        folder would pass the cap, list it (correcting the count) and evict its least
        recently used chunks, whoever wrote them, to :data:`LOW_WATER` of the cap."""
        if self._ledger is None:
            return
        self._ledger.lock()
        try:
            state = self._ledger.read()
            if state is None or state["total"] + need > self.capacity_bytes:
                low = int(self.capacity_bytes * LOW_WATER)
                state = self._evict_folder(
                    max(0, min(low, self.capacity_bytes - need)), state, evicted
                )
            state["total"] += need
            state["inflight"][self._me] = state["inflight"].get(self._me, 0) + need
            self._ledger.write(state)
        finally:
            self._ledger.unlock()

    def _shared_settle(self, delta: int, release: int = 0) -> None:
        """Add ``delta`` bytes to the folder's shared count (a reservation corrected to
        what the files took, or bytes freed) and end ``release`` bytes of this
        instance's reservation (its files are visible now, or failed)."""
        if self._ledger is None or not (delta or release):
            return
        self._ledger.lock()
        try:
            state = self._ledger.read() or {"total": 0, "inflight": {}}
            state["total"] = max(0, state["total"] + delta)
            left = state["inflight"].pop(self._me, 0) - release
            if left > 0:
                state["inflight"][self._me] = left
            self._ledger.write(state)
        finally:
            self._ledger.unlock()

    def _evict_for_full_disk(self, nbytes: int, evicted: list | None) -> None:
        """The file system is full: evict the folder's LRU chunks worth ``nbytes``."""
        if self._ledger is None:
            return
        self._ledger.lock()
        try:
            state = self._ledger.read()
            total = state["total"] if state is not None else 0
            self._ledger.write(self._evict_folder(max(0, total - nbytes), state, evicted))
        finally:
            self._ledger.unlock()
        logger.warning("%s tier: file system full; evicted to free %d B", self.name, nbytes)

    def _evict_folder(self, target: int, state: dict | None, evicted: list | None) -> dict:
        """List the folder and remove its LRU chunk files until its allocated bytes plus
        the writes in flight (of live writers: a dead local writer's reservation is
        dropped) are at most ``target``; the corrected state. Caller holds the thread
        lock and the ledger's lock."""
        inflight = {
            w: n
            for w, n in (state["inflight"] if state is not None else {}).items()
            if n > 0 and _writer_alive(w, self._host)
        }
        found = sorted(self._list_chunks())
        total = sum(size for _, _, size in found) + sum(inflight.values())
        keep = evicted is not None and self._eviction_listener is not None
        for _, key, _ in found:
            if total <= target:
                break
            path = self._path(key)
            data = None
            if keep:
                try:
                    data = path.read_bytes()
                except OSError:
                    data = None
            freed = self._remove(path)
            total -= freed
            self._forget(key)
            if freed:
                self._evictions += 1
                if data is not None:
                    evicted.append((key, data))
        return {"total": total, "inflight": inflight}

    def _list_chunks(self, temps: list | None = None) -> list[tuple[int, str, int]]:
        """``(mtime_ns, key, allocated bytes)`` of every chunk file under ``root``;
        temp files' entries go to ``temps`` when given."""
        found = []
        with os.scandir(self.root) as top:
            fanouts = [
                e.path
                for e in top
                if _FANOUT_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
        for fanout in fanouts:
            prefix = os.path.basename(fanout)
            try:
                entries = list(os.scandir(fanout))
            except FileNotFoundError:
                continue
            for entry in entries:
                if temps is not None and entry.name.startswith(TEMP_PREFIX):
                    temps.append(entry)
                    continue
                m = _CHUNK_RE.fullmatch(entry.name)
                if m is None or m.group(1)[:2] != prefix:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime_ns, m.group(1), self._allocated(st)))
        return found

    def _stamp(self) -> int:
        """A strictly increasing mtime in ns, so LRU order is exact within a process."""
        self._last_stamp_ns = max(time.time_ns(), self._last_stamp_ns + 1)
        return self._last_stamp_ns

    def _touch(self, path: Path, stamp: int) -> None:
        try:
            os.utime(path, ns=(stamp, stamp))
        except OSError as e:  # read-only, foreign or just evicted: recency is best effort
            logger.debug("%s tier: cannot touch %s: %s", self.name, path, e)

    def _each(self, fn, args: list) -> list:
        """``[fn(a) for a in args]``, on the I/O threads when there is more than one."""
        if len(args) <= 1 or self.io_threads == 1:
            return [fn(a) for a in args]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="kvtc-disk")
            pool = self._pool
        return list(pool.map(fn, args))

    def _commit(self, key: str, path: Path) -> int:
        """Index a chunk file just written (caller holds the lock); the bytes it took."""
        if key in self._index:  # written meanwhile by a concurrent put of the same key
            return 0  # one file, counted by that put
        size = self._file_size(path) or 0
        self._index[key] = size
        self._used += size
        self._bytes_written += size
        return size

    def _forget(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    def _adopt(self, key: str, size: int, evicted: list | None = None) -> None:
        """Count a chunk found on disk but not in the index, as most-recently-used."""
        if size > self.capacity_bytes:
            return  # another instance's bigger cap; serve it, never count it
        self._make_room(size, evicted)
        self._index[key] = size
        self._used += size

    def _read_file(self, key: str) -> bytes | None:
        """A chunk file's bytes; None if it is missing or unreadable (no lock held)."""
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            with self._lock:
                self._forget(key)
            return None
        except OSError as e:
            logger.warning(
                "%s tier: cannot read chunk %s, treated as a miss: %s", self.name, key, e
            )
            return None

    def _write_or_error(self, job: tuple[Path, bytes, int]) -> Exception | None:
        """:meth:`_write`, returning its error instead of raising it (for the I/O pool)."""
        try:
            self._write(*job)
        except Exception as e:  # noqa: BLE001 - handed back to put, which raises it
            return e
        return None

    def _write(self, path: Path, value: bytes, stamp: int) -> None:
        """Write ``value`` to ``path`` atomically, mtime ``stamp`` (ns); on failure remove
        the temp file. Needs no lock."""
        directory = path.parent
        key = path.name[: -len(CHUNK_SUFFIX)]
        tmp = directory / (
            f"{TEMP_PREFIX}{key}-{self._host}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        )
        try:
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                self._fsync_dir_best_effort(self.root)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(value)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.utime(fd, ns=(stamp, stamp))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as e:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as cleanup:
                logger.error("%s tier: cannot remove temp file %s: %s", self.name, tmp, cleanup)
            if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
                raise CapacityError(
                    f"{self.name} tier: file system full writing {path.name} ({len(value)} B): {e}"
                ) from e
            if isinstance(e, OSError):
                raise StoreError(f"{self.name} tier: cannot write {path.name}: {e}") from e
            raise
        self._fsync_dir_best_effort(directory)

    def _fsync_dir_best_effort(self, directory: Path) -> None:
        """fsync a directory after a create or rename inside it; a failure is logged.

        The entry is already whole and visible; only its durability across a
        power loss is in doubt, which is no reason to fail the put.
        """
        try:
            _fsync_dir(directory)
        except OSError as e:
            logger.warning("%s tier: fsync of directory %s failed: %s", self.name, directory, e)

    def _make_room(self, nbytes: int, evicted: list | None = None) -> None:
        """Evict LRU chunks until ``nbytes`` more fit under the cap beside the chunks
        stored and those being written; wait for those writes if that is not enough.
        Caller holds the lock (the wait releases it)."""
        while self._used + self._reserved + nbytes > self.capacity_bytes:
            if self._index:
                self._evict_until_fits(nbytes, evicted)
            elif self._reserved:
                self._room.wait()
            else:
                return

    def _evict_until_fits(self, nbytes: int, evicted: list | None = None) -> None:
        """Remove LRU chunk files until ``nbytes`` more fit under the cap (beside the
        bytes being written).

        With an eviction listener set and an ``evicted`` list given, each file is read
        before it is removed and ``(key, bytes)`` is appended (for write-back).
        """
        keep = evicted is not None and self._eviction_listener is not None
        freed = 0
        while self._index and self._used + self._reserved + nbytes > self.capacity_bytes:
            key, size = self._index.popitem(last=False)
            self._used -= size
            self._evictions += 1
            if keep:
                try:
                    evicted.append((key, self._path(key).read_bytes()))
                except OSError as e:  # gone already: nothing to hand down
                    logger.debug("%s tier: evicted %s unread: %s", self.name, key, e)
            try:
                freed += self._remove(self._path(key))
            except OSError as e:
                logger.warning("%s tier: cannot evict chunk %s: %s", self.name, key, e)
            logger.debug("%s tier: evicted %s (%d B)", self.name, key, size)
        self._shared_settle(-freed)

    def _scan(self) -> None:
        """Rebuild the index from ``root`` in mtime order; remove stale temp files
        (unless read-only)."""
        temps: list[os.DirEntry[str]] = []
        found = self._list_chunks(temps)
        now_ns = time.time_ns()
        for entry in temps if not self.read_only else []:
            try:
                self._maybe_remove_temp(entry, now_ns)
            except FileNotFoundError:  # removed while we scanned
                continue
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        logger.info(
            "%s tier at %s: %d chunks, %d B (cap %d B)",
            self.name,
            self.root,
            len(self._index),
            self._used,
            self.capacity_bytes,
        )

    def _maybe_remove_temp(self, entry: os.DirEntry[str], now_ns: int) -> None:
        """Remove a temp file left by a dead local writer, or older than the stale age."""
        m = _TEMP_RE.fullmatch(entry.name)
        dead_local = (
            m is not None
            and m.group(1) == self._host
            and int(m.group(2)) != os.getpid()
            and not _pid_alive(int(m.group(2)))
        )
        age_s = (now_ns - entry.stat(follow_symlinks=False).st_mtime_ns) / 1e9
        if dead_local or age_s > self.stale_temp_seconds:
            try:
                os.unlink(entry.path)
                logger.info("%s tier: removed stale temp file %s", self.name, entry.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("%s tier: cannot remove temp file %s: %s", self.name, entry.path, e)
