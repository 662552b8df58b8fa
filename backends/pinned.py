"""Page-locked ("pinned") host copies of byte strings, for a CPU tier the GPU reads by DMA.

A CPU tier in pageable memory costs a host copy on every fetch for the GPU: the bytes go
to a pinned staging buffer first, because the device only copies asynchronously from
page-locked memory (CUDA C++ Best Practices Guide, "Pinned memory"). A tier that keeps
its blobs page-locked hands the device views it can copy from directly
(:meth:`HostStaging.upload <kvtc_store.codec.gpu.staging.HostStaging.upload>`).

Each blob is copied into a host array of exactly its size, page-locked in place with
``cudaHostRegister`` (PyTorch's pinned allocator would round each allocation up to a
power of two), and handed out as a read-only ``memoryview``. The array is unregistered
and freed when the last view of it is gone (evicted or deleted from the tier, and no
reader holding it), so the page-locked bytes are the tier's stored bytes plus those of
evicted blobs that readers still hold. Only the GPU decoder gains from it: with the CPU
codec a pinned tier is a copy and a registration per ``put`` for nothing.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from kvtc_store.errors import CapacityError, ConfigError

__all__ = ["check_pinning", "pinned_copies"]

logger = logging.getLogger(__name__)


def check_pinning() -> None:
    """Raise :class:`ConfigError` unless this process can page-lock host memory (a torch
    with CUDA and a visible device)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise ConfigError("pinned host memory needs torch with CUDA") from exc
    if not torch.cuda.is_available():
        raise ConfigError(
            "pinned host memory needs CUDA, which is not available here "
            f"(torch {torch.__version__}, cuda {torch.version.cuda}): use an unpinned "
            "memory tier (pinned: false, or KVTC_STORE_TIERS__<N>__PINNED=false on this host)"
        )


def _unregister(ptr: int) -> None:
    import torch

    rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if rc != 0:  # a finaliser must not raise; the memory is freed regardless
        logger.warning("cudaHostUnregister failed (cudaError %d)", rc)


def pinned_copies(values: list) -> list[memoryview]:
    """Copy each of ``values`` into a page-locked host array of its own.

    Args:
        values: bytes-like objects (``bytes``, ``memoryview``, ...); CUDA must be
            available (:func:`check_pinning`).

    Returns:
        One read-only ``memoryview`` per value (same bytes, same order); its array stays
        page-locked while the view (or a slice of it) is referenced.

    Raises:
        CapacityError: ``cudaHostRegister`` failed (the host cannot lock more memory);
            the copies made so far are released.
    """
    import torch

    cudart = torch.cuda.cudart()
    out = []
    for v in values:
        src = np.frombuffer(v, dtype=np.uint8)
        arr = np.empty(max(1, src.size), dtype=np.uint8)
        arr[: src.size] = src
        ptr = arr.ctypes.data
        rc = int(cudart.cudaHostRegister(ptr, arr.nbytes, 0))
        if rc != 0:
            raise CapacityError(
                f"page-locking {arr.nbytes} bytes of host memory failed (cudaError {rc})"
            )
        done = weakref.finalize(arr, _unregister, ptr)
        done.atexit = False  # at exit the process's memory goes anyway
        out.append(memoryview(arr).toreadonly()[: src.size])
    return out
