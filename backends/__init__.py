"""Storage tiers of kvtc-store (import name ``kvtc_store.backends``).

A backend stores opaque bytes (encoded KV blobs) under string keys (hex chunk
keys) with a byte capacity and LRU eviction; it knows nothing of tensors,
codecs or tokens. The protocol is :class:`Backend`; its occupancy and counters
come back as :class:`TierUsage`.

Tiers here:

- :class:`MemoryBackend`: host memory (the CPU tier).
- :class:`DiskBackend`: one file per chunk, atomic writes (the disk tier).
"""

from .base import Backend, TierUsage
from .disk import DiskBackend
from .memory import MemoryBackend

__all__ = ["Backend", "DiskBackend", "MemoryBackend", "TierUsage"]
