"""The backend protocol: one storage tier, bytes in and bytes out, batched.

A backend knows two things only: string keys (lowercase hex, the chunk keys of
:mod:`kvtc_store.keys`) and opaque byte strings (encoded blobs). It never sees
tensors, codecs or token ids; the tiered store (``kvtc_store.store``) sequences
tiers and promotes chunks between them.

Contract shared by every backend (DESIGN.md, "The tiered store"):

- Every call is batched: it takes a sequence of keys (or ``(key, value)`` pairs)
  and answers in the same order.
- Blobs are immutable and content-addressed: ``put`` of a key that is already
  stored is a no-op (the stored bytes are kept, nothing is rewritten).
- A key that is not stored is a miss (``False`` / ``None``), never an error.
  ``delete`` of a missing key is a no-op.
- Each tier has a byte capacity and evicts chunks to stay under it (LRU; the CPU
  tier also offers scan-resistant S3-FIFO). An item larger than the whole capacity raises
  :class:`~kvtc_store.errors.CapacityError`.
- A malformed key raises :class:`ValueError` before anything is read or written;
  a single string passed where a sequence of keys is expected raises
  :class:`TypeError` (it would otherwise be read as one key per character).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtc_store.errors import ConfigError

__all__ = [
    "Backend",
    "EvictionListener",
    "TierUsage",
    "check_capacity",
    "validate_items",
    "validate_key",
    "validate_keys",
]

_KEY_RE = re.compile(r"[0-9a-f]{2,128}")

EvictionListener = Callable[[list[tuple[str, bytes]]], None]
"""Called with the ``(key, value)`` pairs a tier evicted to make room (see
:meth:`Backend.set_eviction_listener`)."""


@dataclass(frozen=True)
class TierUsage:
    """A snapshot of one tier's occupancy and its counters since it was opened.

    Attributes:
        used_bytes: Bytes of stored values (payload only; file-system or dict
            overhead is not counted).
        capacity_bytes: The tier's byte cap; ``used_bytes`` never exceeds it.
            ``None``: unbounded (an object store with no cap set).
        n_items: Number of stored chunks.
        hits: Keys asked for by ``get`` that were found.
        misses: Keys asked for by ``get`` that were not found.
        evictions: Chunks removed to make room (explicit ``delete`` not counted).
        bytes_written: Bytes of values newly stored by ``put`` (no-op re-puts of
            an existing key not counted).
        bytes_read: Bytes of values returned by ``get``.
        errors: Requests that failed (endpoint unreachable, timeout, refused);
            always 0 on tiers that cannot fail that way.
    """

    used_bytes: int
    capacity_bytes: int | None
    n_items: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    errors: int = 0


def validate_key(key: object) -> str:
    """Check one chunk key and return it.

    A key is a ``str`` of 2 to 128 lowercase hexadecimal characters (a SHA-256
    hex digest is 64). Lowercase only, so that two spellings of one key can never
    name two files on a case-insensitive file system or two S3 objects.

    Raises:
        ValueError: ``key`` is not such a string.
    """
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid chunk key {key!r}: expected 2-128 lowercase hex characters")
    return key


def validate_keys(keys: Sequence[str]) -> list[str]:
    """Check a batch of chunk keys and return them as a list.

    Raises:
        TypeError: ``keys`` is a single string or bytes, not a sequence of keys.
        ValueError: any key is invalid (see :func:`validate_key`).
    """
    if isinstance(keys, (str, bytes, bytearray)):
        raise TypeError("keys must be a sequence of str keys, not a single string")
    return [validate_key(k) for k in keys]


def validate_items(items: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Check a batch of ``(key, value)`` pairs; return them with values as ``bytes``.

    Values may be any bytes-like object (``bytes``, ``bytearray``,
    ``memoryview``); they are copied to immutable ``bytes``.

    Raises:
        ValueError: a key is invalid (see :func:`validate_key`).
        TypeError: an item is not a pair, or a value is not bytes-like.
    """
    out: list[tuple[str, bytes]] = []
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"put expects (key, bytes) pairs, got {type(item).__name__}")
        key, value = item
        validate_key(key)
        if isinstance(value, bytes):
            out.append((key, value))
        elif isinstance(value, (bytearray, memoryview)):
            out.append((key, bytes(value)))
        else:
            raise TypeError(f"value for key {key} must be bytes-like, got {type(value).__name__}")
    return out


def check_capacity(capacity_bytes: object) -> int:
    """Return ``capacity_bytes`` as an int after checking it is a non-negative integer.

    Raises:
        ConfigError: the value is not an ``int`` (bools refused) or is negative.
    """
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise ConfigError(f"capacity_bytes must be an int, got {capacity_bytes!r}")
    if capacity_bytes < 0:
        raise ConfigError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
    return capacity_bytes


class Backend(abc.ABC):
    """One storage tier: a batched, byte-capped key → bytes map with LRU eviction.

    Subclasses set :attr:`name` and implement the five methods below. All
    methods are safe to call from several threads at once.

    Attributes:
        name: Short tier name used in logs and metrics (``"memory"``, ``"disk"``).
        remote: Whether the tier is reached over the network.
    """

    name: str = "backend"
    remote: bool = False
    """True for a tier reached over the network (S3): the store never waits on it
    where a local answer will do (the check for chunks already stored, in ``put``)."""
    deadline_s: float | None = None
    """Most seconds the tier stack waits for one call to this tier
    (:mod:`kvtc_store.guard`); None: called directly (in-process memory tiers, which
    never wait on I/O). Set per instance from the config's ``deadline``."""
    _eviction_listener: EvictionListener | None = None

    @abc.abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Say which keys are stored, in order. Side-effect free: no promotion,
        no counters.

        Raises:
            ValueError: a key is malformed.
            TypeError: ``keys`` is a single string, not a sequence.
        """

    @abc.abstractmethod
    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the stored bytes of each key, or ``None`` for a miss, in order.

        Bytes-like: a pinned memory tier returns read-only ``memoryview`` objects
        (:class:`~kvtc_store.backends.MemoryBackend`); ``bytes(value)`` gives ``bytes``.

        A hit marks the chunk most-recently-used. A chunk that vanished or
        cannot be read (for example removed by another process) is a miss,
        never an error and never wrong data.

        Raises:
            ValueError: a key is malformed.
        """

    @abc.abstractmethod
    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store each ``(key, value)`` pair, evicting LRU chunks to stay under capacity.

        The whole batch is validated first: a malformed key, a non-bytes value or
        a value larger than the capacity (bytes) stores nothing. A key already
        stored is left as it is (blobs are immutable). Within one batch, later
        items may evict earlier ones when the batch exceeds the capacity.

        Raises:
            ValueError: a key is malformed.
            TypeError: a value is not bytes-like.
            CapacityError: a value is larger than the tier's capacity, or the
                medium is full.
            StoreError: the tier failed to write for another reason.
        """

    @abc.abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Remove the given keys; missing keys are ignored.

        Raises:
            ValueError: a key is malformed.
        """

    @abc.abstractmethod
    def usage(self) -> TierUsage:
        """Return a snapshot of occupancy (bytes, items) and counters."""

    def snapshot(self) -> TierUsage:
        """A cheap :meth:`usage`: the counters, and the occupancy as last known.

        Meant for frequent readers (metrics scrapes). Local tiers know their
        occupancy exactly and return :meth:`usage`; a remote tier whose occupancy
        costs requests (S3 lists its prefix) returns the last one it measured.
        """
        return self.usage()

    def set_eviction_listener(self, listener: EvictionListener | None) -> None:
        """Have ``listener`` called with every batch of chunks this tier evicts.

        The store uses it for write-back: a chunk leaving a tier is written to the
        tier below. The listener is called after the tier's lock is released, in
        the thread whose ``put`` caused the eviction, with the evicted
        ``(key, value)`` pairs; explicit ``delete`` does not call it. Tiers that
        never evict (default) ignore it. ``None`` removes the listener.
        """
        self._eviction_listener = listener

    def close(self, wait: bool = True) -> None:
        """Release resources held by the tier (files, connections). Default: nothing.

        ``wait=False`` (a store's garbage-collection finalizer): do not join threads; stop
        them without waiting. A finalizer can run inside ``threading``'s own bookkeeping
        (a thread starting up), where joining a thread deadlocks (seen in CI: a disk
        tier's I/O pool joined from there).

        Stored data stays where the tier keeps it; a closed in-memory tier
        simply stops being used.
        """
