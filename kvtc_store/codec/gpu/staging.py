"""Host-to-device upload of many byte ranges through one reused pinned buffer, and the
device-to-host download of one buffer into another.

The batched decoder's host side (:meth:`GpuCodec.decode_batch
<kvtc_store.codec.gpu.GpuCodec.decode_batch>`) must move a few hundred MB of blob
payloads from ordinary (pageable) host memory onto the device per call. Two costs
dominate a naive copy: allocating pinned memory per call (``cudaHostAlloc`` maps and locks
every page) and one thread copying at a few GB/s. :class:`HostStaging` keeps one
grow-only pinned buffer, fills it with several threads (numpy's copy releases the GIL),
and sends it to the device in a few slices, each as soon as its part is filled, so the
host-to-device copy overlaps the filling of the next slice.

Parts that already sit in page-locked memory (a pinned CPU tier,
:mod:`kvtc_store.backends.pinned`) skip the buffer: the device copies them by DMA.

The same code runs on a CPU "device" (dry runs of the CUDA path): the buffer is then not
pinned and the device copy is an ordinary copy.

Source: CUDA C++ Best Practices Guide, "Pinned memory" and "Asynchronous and overlapping
transfers with computation".
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

PIECE = 1 << 20  # bytes one task copies at a time (a blob of 2 MB is 2-3 pieces)
SLICE_MIN = 32 << 20  # uploads above this go in slices overlapping the fill
SLICES = 4
POOL_MIN = 1 << 20  # below this the calling thread copies alone (no pool round trip)
_GROW = 1.25  # new capacity: at least this times the old

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def host_workers() -> int:
    """Threads of the shared host pool: the cores but one (the caller launches kernels
    meanwhile), at most 16, at least 1."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def host_pool() -> ThreadPoolExecutor:
    """The process-wide pool for host-side codec work (copies, checksums); created on
    first use with :func:`host_workers` threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(host_workers(), thread_name_prefix="kvtc-host")
        return _pool


def _grown(buf: torch.Tensor, nbytes: int, pinned: bool) -> torch.Tensor:
    """``buf`` if it holds ``nbytes``, else a new uint8 host buffer (pinned if asked) of at
    least ``nbytes`` and ``_GROW`` times ``buf``'s size, in whole 2 MiB (fewer regrowths)."""
    if nbytes <= buf.numel():
        return buf
    size = max(nbytes, int(buf.numel() * _GROW))
    size = -(-size // (2 << 20)) * (2 << 20)
    return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)


def _page_locked(buf) -> torch.Tensor | None:
    """A uint8 CPU tensor over ``buf``'s bytes if they are in page-locked memory (the
    device can copy them asynchronously), else None."""
    mv = memoryview(buf)
    if mv.nbytes == 0 or not mv.c_contiguous:
        return None
    with warnings.catch_warnings():  # read-only views: the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(mv.cast("B"), dtype=torch.uint8)
    return t if t.is_pinned() else None


def _copy_pieces(dst: np.ndarray, pieces: Sequence[tuple[int, object, int, int]]) -> None:
    """``dst[off : off + n] = buf[start : start + n]`` for each piece (GIL released)."""
    for off, buf, start, n in pieces:
        dst[off : off + n] = np.frombuffer(buf, dtype=np.uint8, count=n, offset=start)


class HostStaging:
    """A grow-only pinned host buffer and the upload of byte ranges through it.

    Thread-safe: one upload at a time fills the buffer; the next waits until the device
    has read it (a CUDA event recorded after the last host-to-device copy).

    Args:
        device: where :meth:`upload` puts the bytes (CUDA; ``cpu`` for dry runs).
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.uint8)
        self._host_np = self._host.numpy()
        self._done: torch.cuda.Event | None = None  # the last upload's copies
        self._held: list[torch.Tensor] = []  # page-locked sources of those copies
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Bytes of the pinned buffer held now."""
        return self._host.numel()

    def release(self) -> None:
        """Give the pinned buffer back (the next upload allocates again)."""
        with self._lock:
            self._wait()
            self._host = torch.empty(0, dtype=torch.uint8)
            self._host_np = self._host.numpy()

    def _wait(self) -> None:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        self._held = []

    def _reserve(self, nbytes: int) -> None:
        grown = _grown(self._host, nbytes, self._cuda)
        if grown is not self._host:
            self._host, self._host_np = grown, grown.numpy()

    def upload(self, parts: Sequence[tuple[int, object]], nbytes: int) -> torch.Tensor:
        """Copy each ``(offset, buffer)`` of ``parts`` to ``offset`` of a new uint8 device
        tensor of ``nbytes`` bytes, through the pinned buffer.

        A part in page-locked host memory (a view of a pinned CPU tier,
        :mod:`kvtc_store.backends.pinned`) is copied to the device directly, by DMA,
        without passing through the buffer (on CUDA; this object keeps it referenced
        until the next upload or :meth:`release`, which wait for the copy); the other
        parts of the same call go through the buffer.

        Args:
            parts: destination byte offset and a bytes-like object (bytes, memoryview,
                numpy array), in increasing, non-overlapping destination order. Bytes
                between parts are left undefined.
            nbytes: size of the device tensor.

        Returns:
            uint8 ``(nbytes,)`` on :attr:`device`. The copies are queued on the current
            stream (asynchronous on CUDA): work queued after them sees the bytes.

        Raises:
            ValueError: a part that ends past ``nbytes``.
        """
        for off, buf in parts:
            n = memoryview(buf).nbytes
            if off < 0 or off + n > nbytes:
                raise ValueError(f"part [{off}, {off + n}) outside {nbytes} bytes")
        direct = []
        if self._cuda:
            locked = [_page_locked(buf) for _, buf in parts]
            direct = [(off, t) for (off, _), t in zip(parts, locked) if t is not None]
            if direct:
                rest = [part for part, t in zip(parts, locked) if t is None]
                return self._upload_direct(direct, rest, nbytes)
        pieces: list[tuple[int, object, int, int]] = []  # (dst offset, buffer, start, n)
        for off, buf in parts:
            n = memoryview(buf).nbytes
            for s in range(0, n, PIECE):
                pieces.append((off + s, buf, s, min(PIECE, n - s)))
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            self._wait()  # the last upload's copies have read the buffer
            self._reserve(nbytes)
            host, dst = self._host, self._host_np
            if nbytes < POOL_MIN or host_workers() == 1:
                _copy_pieces(dst, pieces)
                out.copy_(host[:nbytes], non_blocking=True)
            else:
                self._fill_and_send(dst, pieces, nbytes, host, out)
            if self._cuda:
                self._done = torch.cuda.Event()
                self._done.record()
        return out

    def _upload_direct(self, direct, rest, nbytes: int) -> torch.Tensor:
        """:meth:`upload` with page-locked parts (``direct``: offset and a CPU tensor
        over them): those are copied to the device as they are, first; the other parts
        (``rest``: the offset table, and the blobs of a batch that came partly from
        pageable tiers) are packed into the buffer by the host threads, then each sent
        to its place."""
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            self._wait()
            for off, t in direct:
                out[off : off + t.numel()].copy_(t, non_blocking=True)
            pieces, places, at = [], [], 0  # packed: (buffer offset, part, start, n)
            for off, buf in rest:
                n = memoryview(buf).nbytes
                pieces += [(at + s, buf, s, min(PIECE, n - s)) for s in range(0, n, PIECE)]
                places.append((off, at, n))
                at += n
            self._reserve(at)
            host, dst = self._host, self._host_np
            if at < POOL_MIN or host_workers() == 1:
                _copy_pieces(dst, pieces)
            else:
                step = max(1, -(-len(pieces) // host_workers()))
                futures = [host_pool().submit(_copy_pieces, dst, pieces[i : i + step])
                           for i in range(0, len(pieces), step)]  # fmt: skip
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:  # no copy may write into the buffer after we return
                        f.cancel() or f.exception()
                    raise
            for off, a, n in places:
                out[off : off + n].copy_(host[a : a + n], non_blocking=True)
            self._held = [t for _, t in direct]
            self._done = torch.cuda.Event()
            self._done.record()
        return out

    @staticmethod
    def _fill_and_send(dst: np.ndarray, pieces, nbytes: int, host, out) -> None:
        """Copy the pieces into ``dst`` (the pinned buffer, numpy view of ``host``) on the
        pool, all queued at once in slices of the buffer; send each slice to ``out`` once
        its pieces are copied."""
        n_slices = SLICES if nbytes >= SLICE_MIN else 1
        bounds = [nbytes * i // n_slices for i in range(n_slices + 1)]
        groups: list[list] = [[] for _ in range(n_slices)]
        for piece in pieces:  # a piece belongs to the slice it starts in
            g = int(np.searchsorted(bounds, piece[0], "right")) - 1
            groups[min(n_slices - 1, g)].append(piece)
        pool, workers = host_pool(), host_workers()
        futures: list[list[Future]] = []
        for group in groups:
            step = max(1, -(-len(group) // workers))
            futures.append(
                [pool.submit(_copy_pieces, dst, group[i : i + step])
                 for i in range(0, len(group), step)]
            )  # fmt: skip
        try:
            lo = 0
            for g, group in enumerate(groups):
                # the slice's last piece may run past its bound: send up to its end
                hi = max([lo, bounds[g + 1]] + [p[0] + p[3] for p in group])
                for f in futures[g]:
                    f.result()
                if hi > lo:
                    out[lo:hi].copy_(host[lo:hi], non_blocking=True)
                lo = hi
        except BaseException:
            for fs in futures:  # let no copy write into the buffer after we return
                for f in fs:
                    f.cancel() or f.exception()
            raise


class HostDownload:
    """A grow-only pinned host buffer that device bytes are copied into.

    The batched encoder's streams (a few hundred MB per 128 chunks of an 8B model) come
    off the device once per batch; into pageable memory that copy runs at a fraction of
    the link's rate and allocating pinned memory per call costs more than the copy, so the
    buffer is kept. Thread-safe: one borrower at a time (:meth:`download` holds a lock
    until its ``with`` block ends).

    Args:
        device: the device the bytes come from (CUDA; ``cpu`` for dry runs: not pinned).
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.uint8)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Bytes of the pinned buffer held now."""
        return self._host.numel()

    @contextmanager
    def download(self, data: torch.Tensor) -> Iterator[np.ndarray]:
        """Copy ``data``'s bytes into the pinned buffer and lend them out.

        Args:
            data: a contiguous tensor on :attr:`device` (any dtype; its bytes are copied).

        Yields:
            uint8 numpy ``(data.nbytes,)``: a view of the pinned buffer, valid inside the
            ``with`` block only (the next download overwrites it).
        """
        if data.numel() == 0:  # (an empty tensor's strides may not allow the byte view)
            data = torch.empty(0, dtype=torch.uint8, device=data.device)
        src = data.reshape(-1).view(torch.uint8)
        n = src.numel()
        with self._lock:
            self._host = _grown(self._host, n, self._cuda)
            host = self._host[:n]
            host.copy_(src, non_blocking=self._cuda)
            if self._cuda:
                torch.cuda.current_stream(self.device).synchronize()
            yield host.numpy()
