"""Storage tiers of kvtc-store (import name ``kvtc_store.backends``).

A backend stores opaque bytes (encoded KV blobs) under string keys (hex chunk
keys) with a byte capacity and LRU eviction; it knows nothing of tensors,
codecs or tokens. The protocol is :class:`Backend`; its occupancy and counters
come back as :class:`TierUsage`.

Tiers here:

- :class:`GPUBackend`: device memory (the GPU tier), the memory tier's policies
  over ``uint8`` CUDA tensors; imported on first use (it needs torch). Its
  ``get_device`` hands hits out as :class:`DeviceBlob` (the device bytes), for a
  decoder on that device.
- :class:`MemoryBackend`: host memory (the CPU tier); LRU, or scan-resistant
  S3-FIFO with ``policy="s3fifo"`` (Yang et al., SOSP 2023).
- :class:`DiskBackend`: one file per chunk, atomic writes (the disk tier).
- :class:`S3Backend`: one object per chunk in any S3-compatible store, shared
  by replicas (the S3 tier). It needs boto3 (``pip install 'kvtc-store[s3]'``)
  and is imported on first use, so this package imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, EvictionListener, TierUsage
from .disk import DiskBackend
from .memory import EVICTION_POLICIES, MemoryBackend

if TYPE_CHECKING:
    from .gpu import DeviceBlob, GPUBackend
    from .s3 import S3Backend

__all__ = [
    "EVICTION_POLICIES",
    "Backend",
    "DeviceBlob",
    "DiskBackend",
    "EvictionListener",
    "GPUBackend",
    "MemoryBackend",
    "S3Backend",
    "TierUsage",
]


def __getattr__(name: str) -> Any:
    """Import :class:`GPUBackend` (torch) and :class:`S3Backend` (boto3) on first use."""
    if name in ("GPUBackend", "DeviceBlob"):
        from . import gpu

        return getattr(gpu, name)
    if name == "S3Backend":
        try:
            from .s3 import S3Backend
        except ImportError as e:
            raise ImportError(
                f"S3Backend needs boto3 ({e}); install it with: pip install 'kvtc-store[s3]'"
            ) from e
        return S3Backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
