"""CPU tier: encoded blobs in host memory, LRU-evicted under a byte cap."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvtc_store.errors import CapacityError

from .base import Backend, TierUsage, check_capacity, validate_items, validate_keys

__all__ = ["MemoryBackend"]

logger = logging.getLogger(__name__)


class MemoryBackend(Backend):
    """Host-memory tier: an ``OrderedDict`` in LRU order, capped in bytes.

    The sum of stored value lengths (bytes) never exceeds ``capacity_bytes``,
    not even during a ``put``: least-recently-used chunks are evicted before a
    new one is inserted. ``get`` promotes hits to most-recently-used; ``exists``
    does not. One lock guards every operation, so the tier is thread-safe.

    Values are kept as ordinary (pageable) ``bytes``; pinned staging for
    host-to-device copies is the store's concern.

    Args:
        capacity_bytes: Byte cap of the stored values.

    Raises:
        ConfigError: ``capacity_bytes`` is not a non-negative int.
    """

    name = "memory"

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = check_capacity(capacity_bytes)
        self._data: OrderedDict[str, bytes] = OrderedDict()  # LRU first, MRU last
        self._used = 0
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._bytes_written = 0
        self._bytes_read = 0

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Say which keys are stored (no promotion). Raises ValueError on a bad key."""
        keys = validate_keys(keys)
        with self._lock:
            return [k in self._data for k in keys]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return each key's bytes or ``None``; hits become most-recently-used.

        Raises:
            ValueError: a key is malformed.
        """
        keys = validate_keys(keys)
        out: list[bytes | None] = []
        with self._lock:
            for k in keys:
                value = self._data.get(k)
                if value is None:
                    self._misses += 1
                else:
                    self._data.move_to_end(k)
                    self._hits += 1
                    self._bytes_read += len(value)
                out.append(value)
        return out

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store new chunks, evicting LRU ones first so the cap is never exceeded.

        Re-putting a stored key is a no-op (no rewrite, no promotion).

        Raises:
            ValueError: a key is malformed.
            TypeError: a value is not bytes-like.
            CapacityError: a value is larger than ``capacity_bytes``; nothing
                from the batch is stored.
        """
        items = validate_items(items)
        for key, value in items:
            if len(value) > self.capacity_bytes:
                raise CapacityError(
                    f"{self.name} tier: chunk {key} is {len(value)} B, "
                    f"larger than the tier's capacity of {self.capacity_bytes} B"
                )
        with self._lock:
            for key, value in items:
                if key in self._data:
                    continue
                self._evict_until_fits(len(value))
                self._data[key] = value
                self._used += len(value)
                self._bytes_written += len(value)

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the keys; missing ones are ignored. Raises ValueError on a bad key."""
        keys = validate_keys(keys)
        with self._lock:
            for k in keys:
                value = self._data.pop(k, None)
                if value is not None:
                    self._used -= len(value)

    def usage(self) -> TierUsage:
        """Return occupancy and counters."""
        with self._lock:
            return TierUsage(
                used_bytes=self._used,
                capacity_bytes=self.capacity_bytes,
                n_items=len(self._data),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes_written=self._bytes_written,
                bytes_read=self._bytes_read,
            )

    def _evict_until_fits(self, nbytes: int) -> None:
        """Pop LRU chunks until ``nbytes`` more fit under the cap. Caller holds the lock."""
        while self._data and self._used + nbytes > self.capacity_bytes:
            key, value = self._data.popitem(last=False)
            self._used -= len(value)
            self._evictions += 1
            logger.debug("%s tier: evicted %s (%d B)", self.name, key, len(value))
