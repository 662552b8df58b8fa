"""Asynchronous write-down: bounded per-tier queues, one writer thread per lower tier.

DESIGN.md, "The tiered store": a put writes the top tier synchronously and the tiers
below asynchronously, through bounded queues with back-pressure. This module is that
machinery, over byte-only tiers (it never sees tensors or tokens):

- one :class:`_ChunkQueue` per lower tier, bounded in chunks: a submit blocks while the
  queue is full (back-pressure on the putting thread), or, non-blocking, gives up;
- one daemon writer thread per lower tier: it takes up to ``batch_chunks`` chunks at a
  time and writes them with one batched ``put``;
- a *pending* map of every queued chunk's bytes, so a chunk still on its way down is
  never a miss (the tiered store serves it from there if the top tier dropped it);
- :meth:`WriteDown.flush` waits until every queue is empty and no write is in flight.

A failed write is logged and counted (per tier), never raised into the putting thread:
the chunk stays wherever it already is, and the tier that failed simply misses it. It
never leaves wrong data: a tier stores whole blobs or nothing (atomic rename on disk,
atomic PutObject on S3).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .backends import Backend
from .errors import KVTCError, StoreError

log = logging.getLogger(__name__)

__all__ = ["FlushResult", "WriteDown"]

FAILED_KEYS_KEPT = 1000
"""Most failed keys per tier a :class:`FlushResult` lists (all are counted)."""


@dataclass
class FlushResult:
    """What a flush saw: whether it finished, and the write-downs that failed since the
    previous flush.

    Truthy only when everything queued was written: it finished in time and nothing
    failed (``assert store.flush()`` checks both).

    Attributes:
        complete: every queue drained before the timeout.
        failed_chunks: tier name -> chunks whose write-down failed since the previous
            flush (each chunk counted once per failed attempt).
        failed_keys: tier name -> the first :data:`FAILED_KEYS_KEPT` of those keys.
    """

    complete: bool
    failed_chunks: dict[str, int] = field(default_factory=dict)
    failed_keys: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.complete and not self.failed_chunks


Items = list[tuple[str, bytes]]
FailureHook = Callable[[int, int, BaseException], None]
"""``hook(tier_index, n_chunks, error)`` after a failed write-down batch."""


class _ChunkQueue:
    """A FIFO of ``(key, bytes)`` bounded in chunks, with in-flight accounting.

    ``depth`` counts queued chunks plus chunks taken by the writer and not yet done, so
    a depth of 0 means the tier has everything submitted to it.
    """

    def __init__(self, max_chunks: int) -> None:
        self.max_chunks = max_chunks
        self._items: deque[tuple[str, bytes]] = deque()
        self._in_flight = 0
        self._closed = False
        self._cv = threading.Condition()

    @property
    def depth(self) -> int:
        with self._cv:
            return len(self._items) + self._in_flight

    def put(self, items: Items, block: bool) -> int:
        """Append ``items`` in order; return how many were queued.

        Blocking: waits for room as often as needed (a batch larger than the queue goes
        in piece by piece as the writer drains it). Non-blocking: queues what fits now.

        Raises:
            StoreError: the queue is closed.
        """
        done = 0
        with self._cv:
            while done < len(items):
                if self._closed:
                    raise StoreError("write-down queue is closed")
                room = self.max_chunks - len(self._items)
                if room <= 0:
                    if not block:
                        break
                    self._cv.wait()
                    continue
                take = items[done : done + room]
                self._items.extend(take)
                done += len(take)
                self._cv.notify_all()
        return done

    def take(self, max_batch: int) -> Items | None:
        """Up to ``max_batch`` chunks (waits for one); ``None`` once closed and drained."""
        with self._cv:
            while not self._items and not self._closed:
                self._cv.wait()
            if not self._items:
                return None
            n = min(max_batch, len(self._items))
            batch = [self._items.popleft() for _ in range(n)]
            self._in_flight += n
            self._cv.notify_all()
            return batch

    def done(self, n: int) -> None:
        """The writer finished (wrote or failed) ``n`` chunks it took."""
        with self._cv:
            self._in_flight -= n
            self._cv.notify_all()

    def wait_empty(self, deadline: float | None) -> bool:
        """Wait until nothing is queued or in flight; False if ``deadline`` passed first."""
        with self._cv:
            while self._items or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cv.wait(remaining)
            return True

    def close(self) -> None:
        """Refuse new chunks; the writer drains what is queued, then stops."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class WriteDown:
    """Queues and writer threads that carry chunks down to the lower tiers.

    Args:
        tiers: all tiers, top first; tier 0 gets no queue (the caller writes it).
        queue_chunks: capacity of each lower tier's queue, in chunks (≥ 1).
        batch_chunks: most chunks one writer ``put`` call carries.
        skip_present: ask the tier which chunks it has first and write only the others
            (write-back: an evicted chunk is often stored below already).
        on_failure: called after a failed batch, in the writer thread.
        call: ``call(t, op, fn, *args)`` runs ``fn(*args)``, a call to tier ``t`` (the
            tier stack passes its deadline and breaker guard); default: ``fn(*args)``.

    Raises:
        ValueError: ``queue_chunks`` or ``batch_chunks`` below 1.
    """

    def __init__(
        self,
        tiers: Sequence[Backend],
        queue_chunks: int = 256,
        batch_chunks: int = 32,
        skip_present: bool = False,
        on_failure: FailureHook | None = None,
        call: Callable[..., object] | None = None,
    ) -> None:
        if queue_chunks < 1 or batch_chunks < 1:
            raise ValueError(
                f"queue_chunks and batch_chunks must be >= 1, got {queue_chunks}, {batch_chunks}"
            )
        self.tiers = list(tiers)
        self.batch_chunks = batch_chunks
        self.skip_present = skip_present
        self._on_failure = on_failure
        self._call = call if call is not None else (lambda t, op, fn, *args: fn(*args))
        self._queues = {t: _ChunkQueue(queue_chunks) for t in range(1, len(self.tiers))}
        self._pending: dict[str, list] = {}  # key -> [bytes, submissions not yet done]
        self._lock = threading.Lock()
        self._failed = [0] * len(self.tiers)  # chunks whose write failed, per tier
        self._written = [0] * len(self.tiers)  # chunks handed to the tier successfully
        self._failed_since: dict[int, list] = {}  # tier -> [chunks, keys] since last flush
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._work, args=(t,), name=f"kvtc-writedown-{tier.name}", daemon=True
            )
            for t, tier in enumerate(self.tiers)
            if t > 0
        ]
        for th in self._threads:
            th.start()

    # --- submitting ----------------------------------------------------------------------

    def submit(self, t: int, items: Items, block: bool = True) -> int:
        """Queue ``items`` for tier ``t``; return how many were queued.

        Blocking (default) waits while the queue is full: back-pressure. Non-blocking
        queues what fits and drops the rest (best-effort promotion copies).

        Raises:
            StoreError: the write-down is closed.
        """
        if not items:
            return 0
        self._hold(items)
        try:
            n = self._queues[t].put(items, block)
        except BaseException:
            self._release(items)
            raise
        if n < len(items):
            self._release(items[n:])
        return n

    def submit_all(self, items: Items) -> None:
        """Queue ``items`` for every lower tier (write-through), blocking while full."""
        for t in self._queues:
            self.submit(t, items)

    # --- reading the pending chunks ----------------------------------------------------

    def pending(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes of each key still queued (or being written) for some tier, else None."""
        with self._lock:
            return [self._pending[k][0] if k in self._pending else None for k in keys]

    # --- state ---------------------------------------------------------------------------

    def depth(self, t: int) -> int:
        """Chunks queued or in flight for tier ``t``."""
        return self._queues[t].depth

    def failed(self, t: int) -> int:
        """Chunks whose write to tier ``t`` failed, since the start."""
        with self._lock:
            return self._failed[t]

    def written(self, t: int) -> int:
        """Chunks written to tier ``t`` by the writer (a tier's no-op re-puts included)."""
        with self._lock:
            return self._written[t]

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every lower tier has every chunk submitted so far.

        Repeats until all queues are empty at once (a write may queue more: write-back
        of a chunk that the write evicted from the tier below).

        Returns:
            :class:`FlushResult`: ``complete`` False when ``timeout`` seconds passed
            first; the chunks whose write failed since the previous flush (reported
            once). Truthy only when complete and nothing failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        complete = self._drain(deadline)
        with self._lock:
            since, self._failed_since = self._failed_since, {}
        names = [t.name for t in self.tiers]
        return FlushResult(
            complete,
            {names[t]: n for t, (n, _) in since.items()},
            {names[t]: keys for t, (_, keys) in since.items()},
        )

    def _drain(self, deadline: float | None) -> bool:
        """Wait until all queues are empty at once; False if ``deadline`` passed first."""
        while True:
            for q in self._queues.values():
                if not q.wait_empty(deadline):
                    return False
            if all(q.depth == 0 for q in self._queues.values()):
                return True

    def close(self, timeout: float | None = None, wait: bool = True) -> FlushResult:
        """Flush (up to ``timeout``), then stop the writers; later submits raise.
        ``wait=False``: do not join the writer threads (they exit once their queues are
        empty; see :meth:`~kvtc_store.backends.Backend.close` for why a finalizer
        must not join).

        Returns:
            The last :class:`FlushResult`: whether everything queued was written before
            the writers stopped, and what failed. Chunks still queued when the timeout
            passes are written by the writers before they exit, if the process lives
            that long.
        """
        flushed = self.flush(timeout)
        with self._lock:
            self._closed = True
        for q in self._queues.values():
            q.close()
        if flushed.complete and wait:
            for th in self._threads:
                th.join()
        return flushed

    # --- internals -----------------------------------------------------------------------

    def _hold(self, items: Items) -> None:
        with self._lock:
            if self._closed:
                raise StoreError("write-down is closed")
            for key, value in items:
                entry = self._pending.get(key)
                if entry is None:
                    self._pending[key] = [value, 1]
                else:
                    entry[1] += 1

    def _release(self, items: Items) -> None:
        with self._lock:
            for key, _ in items:
                entry = self._pending.get(key)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._pending[key]

    def _work(self, t: int) -> None:
        """Writer of tier ``t``: batches from its queue, one ``put`` each, until closed."""
        tier, q = self.tiers[t], self._queues[t]
        while True:
            batch = q.take(self.batch_chunks)
            if batch is None:
                return
            try:
                todo = list(dict(batch).items())  # one write per key
                if self.skip_present:
                    try:
                        there = self._call(t, "exists", tier.exists, [k for k, _ in todo])
                        todo = [kv for kv, present in zip(todo, there) if not present]
                    except KVTCError:
                        pass  # cannot tell: write them all (a re-put is a no-op)
                if todo:
                    self._call(t, "write-down", tier.put, todo)
                with self._lock:
                    self._written[t] += len(batch)
            except Exception as exc:  # a writer must outlive any failure
                with self._lock:
                    self._failed[t] += len(batch)
                    since = self._failed_since.setdefault(t, [0, []])
                    since[0] += len(batch)
                    room = FAILED_KEYS_KEPT - len(since[1])
                    since[1].extend(k for k, _ in batch[: max(room, 0)])
                if isinstance(exc, KVTCError):
                    log.warning(
                        "write-down to %s failed (%d chunks): %s", tier.name, len(batch), exc
                    )
                else:
                    log.error(
                        "write-down to %s failed (%d chunks)", tier.name, len(batch), exc_info=exc
                    )
                if self._on_failure is not None:
                    try:
                        self._on_failure(t, len(batch), exc)
                    except Exception:  # a hook's bug must not stop writes
                        log.exception("write-down failure hook raised")
            finally:
                self._release(batch)
                q.done(len(batch))
