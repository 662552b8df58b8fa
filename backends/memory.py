"""CPU tier: encoded blobs in host memory, evicted under a byte cap (LRU or S3-FIFO).

Two eviction policies share one backend (its lock, byte accounting and counters):

- ``"lru"`` (default): least-recently-used; a ``get`` hit promotes the chunk.
- ``"s3fifo"``: S3-FIFO, from Yang et al., "FIFO queues are all you need for cache
  eviction", SOSP 2023. Scan-resistant: chunks read only once (a long prefill, a
  one-off scan) pass through a small FIFO queue and leave without displacing the
  chunks that are read again.

With ``pinned=True`` the blobs live in page-locked memory (:mod:`.pinned`), which a GPU
decoder copies to the device by DMA.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from kvtc_store.errors import CapacityError, ConfigError

from .base import Backend, TierUsage, check_capacity, validate_items, validate_keys

__all__ = ["EVICTION_POLICIES", "MemoryBackend"]

logger = logging.getLogger(__name__)

EvictionPolicy = Literal["lru", "s3fifo"]
EVICTION_POLICIES: tuple[str, ...] = ("lru", "s3fifo")
"""Names accepted by ``MemoryBackend(policy=...)``."""


class _Policy:
    """An eviction policy: it keeps the stored values (``_values``) and their order.

    The backend keeps the lock, the byte total and the counters; it calls
    ``get``, ``insert``, ``remove``, and ``evict`` until a new value fits.
    """

    _values: dict[str, bytes]

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        return key in self._values


class _LRU(_Policy):
    """Least-recently-used order: an ``OrderedDict``, LRU first, MRU last."""

    def __init__(self, capacity_bytes: int) -> None:
        self._values: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``; a hit becomes most-recently-used."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def insert(self, key: str, value: bytes) -> None:
        """Add a key that is not stored (the caller has made room)."""
        self._values[key] = value

    def evict(self) -> tuple[str, bytes]:
        """Remove and return the least-recently-used chunk (the policy is not empty)."""
        return self._values.popitem(last=False)

    def remove(self, key: str) -> bytes | None:
        """Remove a key (explicit delete); ``None`` if it is not stored."""
        return self._values.pop(key, None)


class _S3FIFO(_Policy):
    """S3-FIFO (Yang et al., SOSP 2023, "FIFO queues are all you need for cache eviction").

    Three FIFO queues, sized in bytes here rather than objects:

    - ``small`` (S): new chunks; its target is 10% of the capacity.
    - ``main`` (M): chunks read again while in S, and chunks re-admitted from G.
    - ``ghost`` (G): keys only (with their sizes) of chunks evicted from S unread;
      bounded by the bytes M may hold (capacity minus S's target).

    Each stored chunk has a read frequency, capped at 3, incremented on a hit (a
    hit moves nothing: "lazy promotion"). A new key goes to M if it is in G (it
    was evicted too early), else to S. Eviction takes from S while S holds at
    least its target (or M is empty), else from M:

    - from S's head: read since insertion (freq > 0) → moved to M's tail;
      otherwise evicted, its key remembered in G ("quick demotion");
    - from M's head: freq > 0 → freq decremented and reinserted at M's tail;
      otherwise evicted.
    """

    MAX_FREQ = 3
    SMALL_FRACTION = 0.1

    def __init__(self, capacity_bytes: int) -> None:
        self._values: dict[str, bytes] = {}
        self._freq: dict[str, int] = {}
        self.small: OrderedDict[str, None] = OrderedDict()
        self.main: OrderedDict[str, None] = OrderedDict()
        self.ghost: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._small_bytes = 0
        self._ghost_bytes = 0
        self._small_target = int(capacity_bytes * self.SMALL_FRACTION)
        self._ghost_cap = capacity_bytes - self._small_target

    def get(self, key: str) -> bytes | None:
        """The value, or ``None``; a hit bumps the chunk's frequency (capped at 3)."""
        value = self._values.get(key)
        if value is not None:
            self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)
        return value

    def insert(self, key: str, value: bytes) -> None:
        """Add a key that is not stored: to M if G remembers it, else to S."""
        self._values[key] = value
        self._freq[key] = 0
        size = self.ghost.pop(key, None)
        if size is not None:
            self._ghost_bytes -= size
            self.main[key] = None
        else:
            self.small[key] = None
            self._small_bytes += len(value)

    def evict(self) -> tuple[str, bytes]:
        """Remove and return one chunk (the policy is not empty)."""
        while True:
            if self.small and (self._small_bytes >= self._small_target or not self.main):
                key, _ = self.small.popitem(last=False)
                size = len(self._values[key])
                self._small_bytes -= size
                if self._freq[key] > 0:  # read again while in S: keep it, in M
                    self.main[key] = None
                    continue
                self._remember(key, size)
            else:
                key = next(iter(self.main))
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self.main.move_to_end(key)
                    continue
                del self.main[key]
            del self._freq[key]
            return key, self._values.pop(key)

    def remove(self, key: str) -> bytes | None:
        """Remove a key (explicit delete; not remembered in G); ``None`` if not stored."""
        value = self._values.pop(key, None)
        if value is not None:
            del self._freq[key]
            if key in self.small:
                del self.small[key]
                self._small_bytes -= len(value)
            else:
                del self.main[key]
        return value

    def _remember(self, key: str, size: int) -> None:
        """Add an evicted key to G, dropping G's oldest keys beyond its byte bound."""
        self.ghost[key] = size
        self._ghost_bytes += size
        while self._ghost_bytes > self._ghost_cap:
            _, old = self.ghost.popitem(last=False)
            self._ghost_bytes -= old


_POLICIES: dict[str, type[_LRU | _S3FIFO]] = {"lru": _LRU, "s3fifo": _S3FIFO}


class MemoryBackend(Backend):
    """Host-memory tier, capped in bytes, with LRU or S3-FIFO eviction.

    The sum of stored value lengths (bytes) never exceeds ``capacity_bytes``,
    not even during a ``put``: chunks are evicted (by the policy) before a new
    one is inserted. Under ``"lru"``, ``get`` promotes hits to most-recently-used;
    under ``"s3fifo"`` (Yang et al., SOSP 2023; see :class:`_S3FIFO`) a hit
    bumps a frequency counter instead. ``exists`` changes nothing under either.
    One lock guards the index and the counters, so the tier is thread-safe.

    Values are kept as ordinary (pageable) ``bytes``, by reference (``bytes`` are
    immutable, so neither ``put`` nor ``get`` copies them); with ``pinned=True``, in
    page-locked host memory (:mod:`~kvtc_store.backends.pinned`: each blob copied
    into an array of its own, registered with CUDA at ``put``), and
    ``get`` returns read-only ``memoryview`` objects over it, which a GPU decoder
    copies to the device by DMA without a staging copy (:meth:`GpuCodec.decode_batch
    <kvtc_store.codec.gpu.GpuCodec.decode_batch>`). Subclasses keep values
    elsewhere (:class:`~kvtc_store.backends.GPUBackend`: device memory) by
    overriding :meth:`_to_stored` and :meth:`_from_stored`; the policies, the byte
    accounting and the counters are shared.

    Args:
        capacity_bytes: Byte cap of the stored values.
        policy: ``"lru"`` (default) or ``"s3fifo"`` (scan-resistant).
        pinned: keep the values in page-locked memory (needs CUDA).

    Raises:
        ConfigError: ``capacity_bytes`` is not a non-negative int, ``policy``
            is not one of :data:`EVICTION_POLICIES`, or ``pinned`` without CUDA.
    """

    name = "memory"

    def __init__(
        self, capacity_bytes: int, policy: EvictionPolicy = "lru", pinned: bool = False
    ) -> None:
        self.capacity_bytes = check_capacity(capacity_bytes)
        if policy not in _POLICIES:
            raise ConfigError(
                f"policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}"
            )
        self.policy = policy
        self.pinned = bool(pinned)
        if self.pinned:
            from .pinned import check_pinning

            check_pinning()
        self._policy = _POLICIES[policy](self.capacity_bytes)
        self._used = 0
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._bytes_written = 0
        self._bytes_read = 0

    # --- where values live (overridden by device tiers) ---------------------------------

    def _to_stored(self, values: list[bytes]) -> list[Any]:
        """Host bytes -> the stored form; ``len()`` of a stored value is its bytes."""
        if self.pinned:
            from .pinned import pinned_copies

            return pinned_copies(values)
        return values

    def _from_stored(self, stored: list[Any]) -> list[bytes]:
        """The stored form -> host bytes, in order."""
        return stored

    # --- the protocol ----------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Say which keys are stored (no promotion). Raises ValueError on a bad key."""
        keys = validate_keys(keys)
        with self._lock:
            return [k in self._policy for k in keys]

    def get(self, keys: Sequence[str]) -> list[bytes | memoryview | None]:
        """Return each key's bytes or ``None``; hits are promoted per the policy.

        A pinned tier returns read-only ``memoryview`` objects over its page-locked
        copies (bytes-like: ``bytes(v)`` makes a ``bytes``; ``v + b""`` does not work).

        Raises:
            ValueError: a key is malformed.
        """
        return self._get(keys, self._from_stored)

    def _get(self, keys: Sequence[str], convert) -> list:
        """Each key's stored value through ``convert`` (one call for all hits), or None;
        hits promoted and counted."""
        keys = validate_keys(keys)
        found: list[Any] = []
        with self._lock:
            for k in keys:
                value = self._policy.get(k)
                if value is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._bytes_read += len(value)
                found.append(value)
        hits = [v for v in found if v is not None]
        loaded = iter(convert(hits) if hits else [])
        return [None if v is None else next(loaded) for v in found]

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store new chunks, evicting (per the policy) first so the cap is never exceeded.

        Re-putting a stored key is a no-op (no rewrite, no promotion). Evicted
        chunks go to the eviction listener, if one is set.

        Raises:
            ValueError: a key is malformed.
            TypeError: a value is not bytes-like.
            CapacityError: a value is larger than ``capacity_bytes``, or (pinned)
                the host could not page-lock the copies; nothing from the batch is
                stored.
        """
        items = validate_items(items)
        for key, value in items:
            if len(value) > self.capacity_bytes:
                raise CapacityError(
                    f"{self.name} tier: chunk {key} is {len(value)} B, "
                    f"larger than the tier's capacity of {self.capacity_bytes} B"
                )
        with self._lock:
            fresh: dict[str, bytes] = {}  # the first value of each key not stored yet
            for key, value in items:
                if key not in self._policy and key not in fresh:
                    fresh[key] = value
        new = list(fresh.items())
        if not new:
            return
        stored = self._to_stored([v for _, v in new])  # e.g. a host-to-device copy, unlocked
        evicted: list[tuple[str, Any]] = []
        with self._lock:
            for (key, _), value in zip(new, stored):
                if key in self._policy:  # stored meanwhile by another thread
                    continue
                evicted += self._evict_until_fits(len(value))
                self._policy.insert(key, value)
                self._used += len(value)
                self._bytes_written += len(value)
        listener = self._eviction_listener
        if evicted and listener is not None:
            listener(list(zip([k for k, _ in evicted], self._from_stored([v for _, v in evicted]))))

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the keys; missing ones are ignored. Raises ValueError on a bad key."""
        keys = validate_keys(keys)
        with self._lock:
            for k in keys:
                value = self._policy.remove(k)
                if value is not None:
                    self._used -= len(value)

    def usage(self) -> TierUsage:
        """Return occupancy and counters."""
        with self._lock:
            return TierUsage(
                used_bytes=self._used,
                capacity_bytes=self.capacity_bytes,
                n_items=len(self._policy),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes_written=self._bytes_written,
                bytes_read=self._bytes_read,
            )

    def _evict_until_fits(self, nbytes: int) -> list[tuple[str, Any]]:
        """Evict chunks until ``nbytes`` more fit under the cap; return them.

        Caller holds the lock.
        """
        evicted = []
        while self._policy and self._used + nbytes > self.capacity_bytes:
            key, value = self._policy.evict()
            self._used -= len(value)
            self._evictions += 1
            evicted.append((key, value))
            logger.debug("%s tier: evicted %s (%d B)", self.name, key, len(value))
        return evicted
