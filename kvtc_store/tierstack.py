"""The tier stack: byte blobs over ordered tiers, written down and promoted between them.

DESIGN.md, "The tiered store". The stack knows keys and bytes only; the tiered store
(:mod:`kvtc_store.store`) turns tokens into keys and tensors into blobs on top of it.

- **put**: the top tier is written synchronously (its failure is the caller's error);
  the tiers below get the chunks through :class:`~kvtc_store.writedown.WriteDown`'s
  bounded queues, either at once (``write-through``, the default) or when the tier
  above evicts them (``write-back``: a tier's evictions are queued for the tier below).
- **get**: one batched ``get`` per tier, top first, each asking only for the chunks no
  tier above had; a chunk still queued for a lower tier is served from the queue's copy
  (so a chunk being written down is never a miss). A hit below the top is *promoted*:
  written into the top tier at once and, under write-through, queued (best effort,
  never blocking) for the tiers between.
- **faults**: a tier that raises on a read counts as a miss for that call, is logged and
  counted (:meth:`TierStack.failures`); a failed write-down is counted likewise. Nothing
  is ever served but the bytes a tier returned for the key asked.
- **deadlines and breakers** (:mod:`kvtc_store.guard`): every call to a tier goes through
  its :class:`~kvtc_store.guard.TierGuard`: a tier with a deadline (``Backend.deadline_s``:
  disk and S3 by default) is waited for at most that long, and a tier that keeps failing
  is skipped for a back-off, then probed again. A silent tier is then a miss within its
  deadline, and a skipped one costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from .backends import Backend
from .errors import ConfigError, KVTCError, StoreError
from .guard import BreakerSettings, TierGuard, TierUnavailableError
from .writedown import FlushResult, WriteDown

log = logging.getLogger(__name__)

__all__ = ["QUEUED", "WRITE_MODES", "Fetched", "TierStack", "WriteMode"]

WriteMode = Literal["write-through", "write-back"]
WRITE_MODES: tuple[str, ...] = ("write-through", "write-back")
QUEUED = "write-queue"
"""Source name of a chunk served from the write-down queue's copy."""


@dataclass
class Fetched:
    """What :meth:`TierStack.get` found.

    Attributes:
        blobs: the bytes of each key asked, or None (missing everywhere, or its tiers
            failed).
        sources: for each key, the name of the tier that served it, :data:`QUEUED`, or
            None for a miss.
    """

    blobs: list[bytes | None]
    sources: list[str | None]


class TierStack:
    """Ordered byte tiers with asynchronous write-down and promotion on hit.

    Args:
        tiers: backends from the top (fastest) to the bottom; at least one, names
            unique.
        write_mode: ``"write-through"`` (every put is queued for every lower tier) or
            ``"write-back"`` (a chunk goes down one tier when the tier above evicts it;
            chunks still resident at exit are not written down, as in any write-back
            cache).
        queue_chunks: capacity of each lower tier's queue, in chunks; a put blocks
            while a queue it needs is full (back-pressure).
        batch_chunks: most chunks one write-down ``put`` carries.
        breaker: circuit-breaker settings of every tier (default
            :class:`~kvtc_store.guard.BreakerSettings`); each tier's deadline is its
            ``deadline_s`` attribute.

    Raises:
        ConfigError: no tiers, duplicate tier names, an unknown write mode, or a queue
            or batch size below 1.
    """

    def __init__(
        self,
        tiers: Sequence[Backend],
        write_mode: WriteMode = "write-through",
        queue_chunks: int = 256,
        batch_chunks: int = 32,
        breaker: BreakerSettings | None = None,
    ) -> None:
        if not tiers:
            raise ConfigError("a tier stack needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}")
        if write_mode not in WRITE_MODES:
            raise ConfigError(
                f"write_mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}"
            )
        if isinstance(queue_chunks, bool) or not isinstance(queue_chunks, int) or queue_chunks < 1:
            raise ConfigError(f"write_queue_chunks must be an int >= 1, got {queue_chunks!r}")
        if isinstance(batch_chunks, bool) or not isinstance(batch_chunks, int) or batch_chunks < 1:
            raise ConfigError(f"write_batch_chunks must be an int >= 1, got {batch_chunks!r}")
        self.tiers = list(tiers)
        self.write_mode = write_mode
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], int] = {}
        self.guards = [TierGuard(t.name, getattr(t, "deadline_s", None), breaker) for t in tiers]
        self.write_down = WriteDown(
            self.tiers,
            queue_chunks=queue_chunks,
            batch_chunks=batch_chunks,
            skip_present=write_mode == "write-back",
            on_failure=lambda t, n, exc: self._count_failure(self.tiers[t], "write-down"),
            call=self.call,
        )
        if write_mode == "write-back":
            for t, tier in enumerate(self.tiers[:-1]):
                tier.set_eviction_listener(partial(self._evicted, t))

    # --- writes --------------------------------------------------------------------------

    def put(self, items: list[tuple[str, bytes]]) -> None:
        """Write ``items`` to the top tier now and queue them for the tiers below.

        Under write-through, blocks while a lower tier's queue is full. The lower tiers'
        failures are never raised here.

        Raises:
            StoreError: the top tier failed (CapacityError: a chunk larger than it, or
                its medium is full); or the stack is closed.
        """
        if not items:
            return
        self.call(0, "put", self.tiers[0].put, items)
        if self.write_mode == "write-through":
            self.write_down.submit_all(items)

    def delete(self, keys: list[str], through: str | None = None) -> None:
        """Remove ``keys`` from every tier, or from the top one down to the tier named
        ``through`` (:data:`QUEUED`: the top tier only); a tier's failure is logged and
        counted. A bad copy found in one tier is removed from it and from the tiers it
        was promoted into, while the copies below (maybe good) stay."""
        names = [t.name for t in self.tiers]
        last = len(self.tiers) if through not in names else names.index(through) + 1
        if through == QUEUED:
            last = 1
        for t, tier in enumerate(self.tiers[:last]):
            try:
                self.call(t, "delete", tier.delete, keys)
            except KVTCError as exc:
                log.warning("tier %s failed on delete: %s", tier.name, exc)
                self._count_failure(tier, "delete")

    def _evicted(self, t: int, items: list[tuple[str, bytes]]) -> None:
        """Write-back: what tier ``t`` evicted goes down to tier ``t + 1``."""
        self.write_down.submit(t + 1, items)

    # --- reads ---------------------------------------------------------------------------

    def exists(self, keys: list[str], local_only: bool = False) -> list[bool]:
        """Which keys some tier (or a write-down queue) holds: one ``exists`` per tier.

        Side-effect free; a failed tier counts as holding nothing. ``local_only``: ask
        no remote tier (``Backend.remote``), so the answer never waits on the network.
        """
        found, _, _ = self._ask("exists", keys, local_only)
        return [f is not None for f in found]

    def get(self, keys: list[str], device_blobs: bool = False) -> Fetched:
        """Each key's bytes from the highest tier holding it; promote hits from below.

        One batched ``get`` per tier (only for keys no tier above had), so a prefix of
        128 chunks costs at most one call per tier, not 128. ``device_blobs``: a top tier
        that has ``get_device`` (the GPU tier) hands its hits out in device memory
        (:class:`~kvtc_store.backends.DeviceBlob`), for a decoder on that device.
        """
        blobs, found_in, sources = self._ask("get", keys, device_blobs=device_blobs)
        self._promote(keys, blobs, found_in)
        return Fetched(blobs, sources)

    def _ask(
        self, op: str, keys: list[str], local_only: bool = False, device_blobs: bool = False
    ) -> tuple[list, list[int], list[str | None]]:
        """Ask the tiers top down, each once and only for the keys none above had.

        Between the top tier and the next, the write-down queues' copies answer too.
        Returns, per key: the answer (``True`` or the bytes; None: nowhere), the index
        of the tier that gave it (the queue counts as the top tier's; -1: nowhere), and
        the name of its source.
        """
        found: list = [None] * len(keys)
        where = [-1] * len(keys)
        sources: list[str | None] = [None] * len(keys)
        for t, tier in enumerate(self.tiers):
            if t == 1:
                for i, blob in enumerate(self.write_down.pending(keys)):
                    if found[i] is None and blob is not None:
                        found[i] = blob if op == "get" else True
                        where[i], sources[i] = 0, QUEUED
            missing = [i for i, f in enumerate(found) if f is None]
            if not missing:
                break
            if local_only and tier.remote:
                continue
            try:
                name = "get_device" if device_blobs and t == 0 and op == "get" else op
                fn = getattr(tier, name, None) or getattr(tier, op)
                answers = self.call(t, op, fn, [keys[i] for i in missing])
            except TierUnavailableError:  # its breaker is open: skipped, a miss
                self._count_failure(tier, "skipped")
                continue
            except KVTCError as exc:  # a failed tier is a miss, never an error
                log.warning("tier %s failed on %s: %s", tier.name, op, exc)
                self._count_failure(tier, op)
                continue
            for i, answer in zip(missing, answers):
                if answer is not None and answer is not False:
                    found[i], where[i], sources[i] = answer, t, tier.name
        return found, where, sources

    def _promote(self, keys: list[str], blobs: list[bytes | None], found_in: list[int]) -> None:
        """Hits from tier ``t >= 1`` into the top tier (now) and, under write-through,
        into tiers ``1..t-1`` (queued, dropped if their queue is full)."""
        for t in range(1, len(self.tiers)):
            items = [(keys[i], blobs[i]) for i in range(len(keys)) if found_in[i] == t]
            if not items:
                continue
            try:
                self.call(0, "promote", self.tiers[0].put, items)
            except StoreError as exc:
                log.warning("promotion into %s failed: %s", self.tiers[0].name, exc)
                self._count_failure(self.tiers[0], "promote")
            if self.write_mode == "write-through":
                for u in range(1, t):
                    self.write_down.submit(u, items, block=False)

    def call(self, t: int, op: str, fn, *args):
        """``fn(*args)``, a call to tier ``t``, under its deadline and breaker
        (:meth:`TierGuard.call`; raises its named errors)."""
        return self.guards[t].call(op, fn, *args)

    # --- state -----------------------------------------------------------------------------

    def breaker_states(self) -> dict[str, str]:
        """Each tier's circuit-breaker state (``closed``, ``open``, ``half-open``)."""
        return {tier.name: g.breaker.state for tier, g in zip(self.tiers, self.guards)}

    def health(self) -> dict:
        """The health of this live store's tiers (``/healthz``; docs/operations.md).

        Per tier: ``reachable`` (False while its breaker is open: calls to it are skipped),
        ``circuit`` (``closed``, ``open``, ``half-open``), ``queue_depth`` (chunks waiting to
        be written to it; None for the top tier, which is written in the caller's thread),
        ``used_bytes``, ``capacity_bytes`` and ``use`` (their ratio, None without a cap).
        Occupancy is the tier's last known one: nothing here waits on I/O (an S3 tier's
        figure is from its last listing).
        """
        states = self.breaker_states()
        depths = self.queue_depths()
        rows = []
        for tier in self.tiers:
            u = tier.snapshot()
            cap = u.capacity_bytes
            rows.append(
                {
                    "tier": tier.name,
                    "reachable": states[tier.name] != "open",
                    "circuit": states[tier.name],
                    "queue_depth": depths.get(tier.name),
                    "used_bytes": u.used_bytes,
                    "capacity_bytes": cap,
                    "use": u.used_bytes / cap if cap else None,
                }
            )
        return {"ok": all(r["reachable"] for r in rows), "tiers": rows}

    def _count_failure(self, tier: Backend, op: str) -> None:
        with self._lock:
            self._failures[tier.name, op] = self._failures.get((tier.name, op), 0) + 1

    def failures(self) -> dict[tuple[str, str], int]:
        """Failed calls so far by ``(tier name, operation)``; operations: ``get``,
        ``exists``, ``delete``, ``promote``, ``write-down`` (one per failed batch) and
        ``skipped`` (a read not sent: the tier's breaker was open)."""
        with self._lock:
            return dict(self._failures)

    def queue_depths(self) -> dict[str, int]:
        """Chunks queued or in flight for each lower tier, by tier name."""
        return {tier.name: self.write_down.depth(t) for t, tier in enumerate(self.tiers) if t}

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until the lower tiers have every chunk queued so far; what failed since
        the previous flush (:meth:`WriteDown.flush`)."""
        return self.write_down.flush(timeout)

    def close(self, timeout: float | None = None, wait: bool = True) -> FlushResult:
        """Flush, stop the writers and close every tier. Returns the flush's
        :class:`FlushResult`; past ``timeout`` no tier is waited for. ``wait=False``: join no thread (a garbage-collection
        finalizer, see :meth:`~kvtc_store.backends.Backend.close`). The stack must not be
        used afterwards."""
        flushed = self.write_down.close(timeout, wait=wait)
        # chunks still queued past the timeout: a tier stuck on them must not hold the
        # close either (its requests end on the client's own timeouts, in the background)
        for tier, guard in zip(self.tiers, self.guards):
            tier.set_eviction_listener(None)
            join = wait and flushed.complete and not guard.busy
            guard.close(wait=join)
            try:
                # plain close() when waiting: a backend written before `wait` still closes
                tier.close() if join else tier.close(wait=False)
            except Exception as exc:  # noqa: BLE001 - close the others regardless
                log.warning("closing tier %s failed: %s", tier.name, exc)
        return flushed
