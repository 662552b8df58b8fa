"""Page-locked ("pinned") host copies of byte strings, for a CPU tier the GPU reads by DMA.

A CPU tier in pageable memory costs a host copy on every fetch for the GPU: the bytes go
to a pinned staging buffer first, because the device only copies asynchronously from
page-locked memory (CUDA C++ Best Practices Guide, "Pinned memory"). A tier that keeps
its blobs page-locked hands the device views it can copy from directly.

Each ``put`` batch is copied into one host array, page-locked in place with
``cudaHostRegister`` (exact size: PyTorch's pinned allocator rounds each allocation up to
a power of two), and stored as read-only ``memoryview`` slices, one per blob. The array
is unregistered and freed when its last slice is gone (evicted, deleted, and no reader
holding it).
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from kvtc_store.errors import ConfigError

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
            f"(torch {torch.__version__}, cuda {torch.version.cuda}); set pinned: false"
        )


def _unregister(ptr: int) -> None:
    import torch

    rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if rc != 0:  # a finaliser must not raise; the memory is freed regardless
        logger.warning("cudaHostUnregister failed (cudaError %d)", rc)


def pinned_copies(values: list) -> list[memoryview]:
    """Copy ``values`` (bytes-like) into one page-locked host array.

    Returns:
        One read-only ``memoryview`` per value (same bytes, same order), slices of the
        array; it stays page-locked while any of them is referenced.

    Raises:
        RuntimeError: ``cudaHostRegister`` failed (the array is not kept).
    """
    import torch

    sizes = [memoryview(v).nbytes for v in values]
    arr = np.empty(max(1, sum(sizes)), dtype=np.uint8)
    offsets, at = [], 0
    for v, n in zip(values, sizes):
        arr[at : at + n] = np.frombuffer(v, dtype=np.uint8, count=n)
        offsets.append(at)
        at += n
    ptr = arr.ctypes.data
    rc = int(torch.cuda.cudart().cudaHostRegister(ptr, arr.nbytes, 0))
    if rc != 0:
        raise RuntimeError(f"cudaHostRegister of {arr.nbytes} bytes failed (cudaError {rc})")
    done = weakref.finalize(arr, _unregister, ptr)
    done.atexit = False  # at exit the process's memory goes anyway
    view = memoryview(arr).toreadonly()
    return [view[o : o + n] for o, n in zip(offsets, sizes)]
