"""Batched entropy coding of byte buffers on CUDA with nvCOMP (``nvidia-nvcomp-cu13``).

Two formats, each coded in one nvCOMP call per batch of buffers (no Python loop over the
device work):

- ``deflate``: RAW Deflate (RFC 1951 with no zlib or nvCOMP header: nvCOMP's
  ``BitstreamKind.RAW``), the portable format. Each buffer is one DEFLATE stream, so a
  stream written here inflates with ``zlib.decompress(data, -15)``, and a raw DEFLATE
  stream written by zlib or ISA-L (:class:`~kvtc_store.codec.entropy.DeflateCoder`)
  inflates here. A DEFLATE stream inflates serially: one buffer is one nvCOMP chunk, and
  the batch supplies the parallelism, so blobs hand over their 64 KiB pieces
  (``deflate64k``), thousands a batch, not one stream each.
- ``ans``: nvCOMP's ANS in nvCOMP's own container (``BitstreamKind.NVCOMP_NATIVE``,
  64 KiB chunks coded in parallel), the fast GPU format; only nvCOMP reads it.

Buffers are 1-D uint8 CUDA tensors, or spans of one such tensor (offset and size tables:
:meth:`NvcompCoder.compress_spans`, :meth:`NvcompCoder.decompress_spans`, which hand
nvCOMP one buffer carved by the tables, ``nvcomp.as_arrays(buffer, offsets, sizes)``, so
a batch of thousands of streams costs no Python per stream). They reach nvCOMP through
the CUDA Array Interface
(version 2, no stream: :class:`_DeviceBytes`), never through DLPack; buffers that nvCOMP
allocates (compressed output) are copied into torch memory through theirs. nvCOMP runs on
a side stream of the calling thread that first waits for the caller's current stream;
each call returns once nvCOMP's work is done (it reads the output sizes back), so the
results are ready on any stream. One :class:`NvcompCoder` may be shared by threads: each
thread gets its own nvCOMP codec, as nvCOMP requires.

nvCOMP does not validate what it inflates ("Providing a corrupt buffer for decompression
will result in undefined behavior", ``nvcomp/deflate.h``): verify a stream's checksum
before handing it to :meth:`NvcompCoder.decompress`.

Source: nvCOMP 6.0 Python API reference (https://docs.nvidia.com/cuda/nvcomp/py_api.html)
and its C headers ``nvcomp/deflate.h``, ``nvcomp/ans.h`` (chunk sizes, alignments).
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import BlobCorruptError, NvcompUnavailableError

log = logging.getLogger(__name__)

ALGORITHMS = ("deflate", "ans")
_NVCOMP_NAMES = {"deflate": "Deflate", "ans": "ANS"}
ALIGN = 16  # bytes: nvCOMP's strictest buffer alignment of the two formats (ANS's)
EMPTY_DEFLATE = b"\x03\x00"  # one final fixed-Huffman block, end-of-block only: zlib's b""
_MIN_CHUNK = 1 << 16  # nvCOMP's default chunk size


def load_nvcomp():
    """The ``nvidia.nvcomp`` module.

    Raises:
        NvcompUnavailableError: not installed, or its library (``libnvcomp.so.6``, from
            ``nvidia-libnvcomp-cu13``) does not load.
    """
    try:
        from nvidia import nvcomp
    except Exception as exc:  # ImportError, OSError, or a broken install
        raise NvcompUnavailableError(
            f"nvCOMP is not importable (pip install nvidia-nvcomp-cu13, the gpu extra): {exc}"
        ) from exc
    return nvcomp


def nvcomp_available(device: str | torch.device = "cuda") -> bool:
    """Whether :class:`NvcompCoder` can run on ``device`` (nvCOMP importable, CUDA there)."""
    try:
        _cuda_device(device)
        load_nvcomp()
    except NvcompUnavailableError:
        return False
    return True


def _cuda_device(device: str | torch.device) -> torch.device:
    """``device`` with its index filled in; raises NvcompUnavailableError if not CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        raise NvcompUnavailableError(f"nvCOMP needs a CUDA device, not {device}")
    if not torch.cuda.is_available():
        raise NvcompUnavailableError("nvCOMP needs a CUDA device; torch sees none")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def aligned(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN` bytes (offsets of buffers nvCOMP reads or writes)."""
    return -(-n // ALIGN) * ALIGN


class _DeviceBytes:
    """A 1-D uint8 CUDA tensor as nvCOMP reads it: the CUDA Array Interface, version 2
    (no stream: the caller orders the work), holding the tensor alive."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def __cuda_array_interface__(self) -> dict:
        t = self.tensor
        return {
            "shape": (t.numel(),),
            "typestr": "|u1",
            "data": (t.data_ptr(), False),
            "strides": None,
            "version": 2,
        }


class _Borrowed:
    """An nvCOMP array's CUDA Array Interface without its stream entry (its work is done
    when this is read), for ``torch.as_tensor``; holds the array alive."""

    def __init__(self, array):
        self.array = array
        cai = dict(array.__cuda_array_interface__)
        cai.pop("stream", None)
        self.__cuda_array_interface__ = cai


class NvcompCoder:
    """Compress and decompress batches of byte buffers with nvCOMP on one CUDA device.

    Args:
        algorithm: ``"deflate"`` (RAW Deflate, zlib-compatible) or ``"ans"`` (nvCOMP ANS).
        device: the CUDA device.
        level: nvCOMP's Deflate ``algorithm_type``, 0 (entropy only, fastest) to 5
            (highest ratio); 1 is nvCOMP's default. Ignored for ANS.

    Raises:
        NvcompUnavailableError: nvCOMP is not importable, or ``device`` is not CUDA.
        ValueError: an unknown algorithm.
    """

    def __init__(self, algorithm: str, device: str | torch.device = "cuda", level: int = 1):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"nvCOMP algorithm {algorithm!r} is not one of {ALGORITHMS}")
        self.algorithm = algorithm
        self.device = _cuda_device(device)
        self.level = level
        self._nv = load_nvcomp()
        self.version: str = self._nv.__version__
        self._local = threading.local()  # per thread: side stream, nvCOMP codecs
        self._carved = True  # nvCOMP takes a batch carved out of one buffer (6.0 does)

    # -- device buffers -------------------------------------------------------------------

    def compress(self, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Compress each buffer, all in one nvCOMP call.

        Args:
            buffers: 1-D uint8 tensors on :attr:`device` (any sizes, empty ones included;
                copied first where not 16-byte aligned).

        Returns:
            One compressed uint8 tensor per buffer, views of one new device buffer. An
            empty buffer gives ``EMPTY_DEFLATE`` (deflate) or an empty tensor (ans).

        Raises:
            ValueError: a buffer that is not uint8 on this device.
            RuntimeError: nvCOMP failed (its message).
        """
        sizes = [self._check(t, "buffer").numel() for t in buffers]
        todo = [i for i, n in enumerate(sizes) if n]
        coded: dict[int, object] = {}
        stream = None
        if todo:
            codec, stream = self._codec(max(sizes))
            srcs = [self._input(buffers[i]) for i in todo]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            batch = self._nv.as_arrays(
                [_DeviceBytes(t) for t in srcs], cuda_stream=stream.cuda_stream
            )
            result = codec.encode(batch)
            comp_sizes = result.buffer_sizes  # waits for the device
            coded = {i: (result, j, n) for j, (i, n) in enumerate(zip(todo, comp_sizes))}
        empty = EMPTY_DEFLATE if self.algorithm == "deflate" else b""
        lengths = [coded[i][2] if i in coded else len(empty) for i in range(len(sizes))]
        _, views = self._alloc(lengths)
        if empty and len(todo) < len(sizes):
            fill = torch.tensor(list(empty), dtype=torch.uint8, device=self.device)
            for i, v in enumerate(views):
                if i not in coded:
                    v.copy_(fill)
        if coded:
            with torch.cuda.stream(stream):
                for i, (result, j, n) in coded.items():
                    views[i].copy_(self._as_torch(result[j])[:n])
            stream.synchronize()  # before nvCOMP's output buffers are freed
        return views

    def decompress(
        self,
        buffers: Sequence[torch.Tensor],
        sizes: Sequence[int],
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Decompress each buffer to exactly its size, all in one nvCOMP call.

        Args:
            buffers: compressed 1-D uint8 tensors on :attr:`device` (checksums verified:
                see the module docstring).
            sizes: each buffer's decompressed size in bytes (the caller knows it: nvCOMP
                is not asked to find it, which for RAW Deflate is a whole extra pass).
            out: optional destinations, 1-D uint8 tensors of exactly ``sizes`` bytes on
                this device, each 16-byte aligned (e.g. views of a staging buffer).

        Returns:
            The decompressed tensors (``out`` when given, else views of one new buffer).

        Raises:
            BlobCorruptError: a stream that does not decompress to its size (where nvCOMP
                reports it; it does not promise to for corrupt input), or any nvCOMP
                failure while decoding the batch (RuntimeError/ValueError from nvCOMP,
                e.g. out of device memory, is reported as "cannot decode the batch").
            ValueError: mismatched lengths, or an ``out`` entry of the wrong size, dtype,
                device or alignment.
        """
        if len(sizes) != len(buffers) or (out is not None and len(out) != len(sizes)):
            raise ValueError(f"{len(buffers)} buffers, {len(sizes)} sizes, out {out and len(out)}")
        for t in buffers:
            self._check(t, "buffer")
        if out is None:
            _, out = self._alloc(sizes)
        for t, n in zip(out, sizes):
            self._check(t, "out")
            if t.numel() != n or (n and t.data_ptr() % ALIGN):
                raise ValueError(f"out entry of {t.numel()} bytes for {n}, or not aligned")
        todo = [i for i, n in enumerate(sizes) if n]
        for i, n in enumerate(sizes):
            if not n:
                self._check_empty(buffers[i])
            elif not buffers[i].numel():
                raise BlobCorruptError(f"empty {self.algorithm} stream for {n} bytes")
        if not todo:
            return list(out)
        want = [int(sizes[i]) for i in todo]
        codec, stream = self._codec(max(want))
        srcs = [self._input(buffers[i]) for i in todo]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        src = self._nv.as_arrays([_DeviceBytes(t) for t in srcs], cuda_stream=stream.cuda_stream)
        dst = self._nv.as_arrays(
            [_DeviceBytes(out[i]) for i in todo], cuda_stream=stream.cuda_stream
        )
        got = self._decode(codec, stream, src, dst, want)
        bad = [(i, g, n) for i, g, n in zip(todo, got, want) if g != n]
        if bad:
            i, g, n = bad[0]
            raise BlobCorruptError(
                f"{self.algorithm} stream {i} decompressed to {g} bytes, not {n} "
                f"({len(bad)} of {len(todo)} streams)"
            )
        return list(out)

    # -- spans of one buffer --------------------------------------------------------------

    def decompress_spans(
        self,
        src: torch.Tensor,
        src_offsets: Sequence[int] | np.ndarray,
        src_sizes: Sequence[int] | np.ndarray,
        dst: torch.Tensor,
        dst_offsets: Sequence[int] | np.ndarray,
        dst_sizes: Sequence[int] | np.ndarray,
    ) -> None:
        """Decompress the streams at spans of ``src`` into spans of ``dst``, all in one
        nvCOMP call.

        Args:
            src: 1-D uint8 tensor on :attr:`device` holding the compressed streams
                (checksums verified: see the module docstring).
            src_offsets, src_sizes: each stream's byte offset in ``src`` (a multiple of
                :data:`ALIGN` from ``src``'s start, which is aligned too) and length (> 0).
            dst: 1-D uint8 tensor on :attr:`device` (may be ``src``: spans must not overlap).
            dst_offsets, dst_sizes: where each stream's bytes go, exactly ``dst_sizes``
                of them (> 0), offsets multiples of :data:`ALIGN`.

        Raises:
            BlobCorruptError: nvCOMP refuses the batch, or reports a stream of another
                size. It is handed the expected sizes (so that it plans without reading the
                streams), and then reports those: on the H200 a stream said to be longer
                than it inflates to raised nothing, so the blob checksums, verified before,
                are the guard.
            ValueError: tables of different lengths, or spans that are empty, unaligned or
                outside their buffer.
        """
        so, ss = self._spans(src, src_offsets, src_sizes, "src")
        do, ds = self._spans(dst, dst_offsets, dst_sizes, "dst")
        if len(so) != len(do):
            raise ValueError(f"{len(so)} streams for {len(do)} destinations")
        if not so:
            return
        codec, stream = self._codec(max(ds))
        stream.wait_stream(torch.cuda.current_stream(self.device))
        src_b = self._carve(src, so, ss, stream)
        dst_b = self._carve(dst, do, ds, stream)
        got = self._decode(codec, stream, src_b, dst_b, ds)
        bad = [(j, g, n) for j, (g, n) in enumerate(zip(got, ds)) if g != n]
        if bad:
            j, g, n = bad[0]
            raise BlobCorruptError(
                f"{self.algorithm} stream {j} decompressed to {g} bytes, not {n} "
                f"({len(bad)} of {len(ds)} streams)"
            )

    def compress_spans(
        self,
        src: torch.Tensor,
        offsets: Sequence[int] | np.ndarray,
        sizes: Sequence[int] | np.ndarray,
    ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Compress the spans of ``src``, each to a stream of its own, all in one nvCOMP call.

        Args:
            src: 1-D uint8 tensor on :attr:`device`.
            offsets, sizes: each span's byte offset (a multiple of :data:`ALIGN` from
                ``src``'s start, which is aligned too) and length (> 0).

        Returns:
            ``(out, out_offsets, out_sizes)``: stream ``j`` is
            ``out[out_offsets[j] : out_offsets[j] + out_sizes[j]]`` (``out`` holds a slot
            of nvCOMP's worst-case size per stream).

        Raises:
            ValueError: spans that are empty, unaligned or outside ``src``.
            RuntimeError: nvCOMP failed (its message).
        """
        so, ss = self._spans(src, offsets, sizes, "src")
        if not so:
            return torch.empty(0, dtype=torch.uint8, device=self.device), [], []
        codec, stream = self._codec(max(ss))
        stream.wait_stream(torch.cuda.current_stream(self.device))
        batch = self._carve(src, so, ss, stream)
        cap = self._max_compressed(codec, src, so, ss)
        slot = aligned(cap)
        out = torch.empty(slot * len(so), dtype=torch.uint8, device=self.device)
        out_offsets = [slot * j for j in range(len(so))]
        try:
            result = codec.encode(batch, out=self._carve(out, out_offsets, [cap] * len(so), stream))
            comp = [int(n) for n in result.buffer_sizes]  # waits for the device
            if all(n == cap for n in comp):  # capacities, not what was written
                raise ValueError("nvCOMP reported the output capacities as sizes")
        except (RuntimeError, ValueError, TypeError) as exc:
            log.debug("nvCOMP %s: no encode into given buffers (%s)", self.algorithm, exc)
            result = codec.encode(batch)
            comp = [int(n) for n in result.buffer_sizes]
            if max(comp) > slot:
                raise RuntimeError(f"nvCOMP wrote {max(comp)} bytes, above its bound {cap}")
            with torch.cuda.stream(stream):
                for j, n in enumerate(comp):
                    out[out_offsets[j] : out_offsets[j] + n].copy_(self._as_torch(result[j])[:n])
        stream.synchronize()  # the output is written (and nvCOMP's buffers may go)
        return out, out_offsets, comp

    # -- host bytes -----------------------------------------------------------------------

    def compress_host(self, buffers: Sequence[bytes | memoryview]) -> list[bytes]:
        """:meth:`compress` of host bytes: one copy to the device, one copy back.

        Returns:
            One compressed ``bytes`` per buffer, in order.

        Raises:
            Whatever :meth:`compress` raises.
        """
        comp = self.compress(self.to_device(buffers))
        return _to_host(comp)

    def decompress_host(self, buffers: Sequence[bytes | memoryview], sizes: Sequence[int]):
        """:meth:`decompress` of host bytes to host bytes.

        Returns:
            One decompressed ``bytes`` per buffer, of ``sizes`` bytes each.

        Raises:
            Whatever :meth:`decompress` raises.
        """
        return _to_host(self.decompress(self.to_device(buffers), sizes))

    def to_device(self, buffers: Sequence[bytes | memoryview]) -> list[torch.Tensor]:
        """Host bytes as 16-byte aligned views of one device buffer (one copy).

        Returns:
            1-D uint8 tensors on this coder's device, one per buffer, each starting at a
            16-byte aligned offset of one shared allocation.
        """
        dev, starts = self.to_device_packed(buffers)
        return [dev[s : s + memoryview(b).nbytes] for s, b in zip(starts, buffers)]

    def to_device_packed(
        self, buffers: Sequence[bytes | memoryview]
    ) -> tuple[torch.Tensor, list[int]]:
        """Host bytes copied into one device buffer (one copy), each at a multiple of
        :data:`ALIGN`.

        Returns:
            The 1-D uint8 device buffer and each input's byte offset in it.
        """
        lengths = [memoryview(b).nbytes for b in buffers]
        starts = np.concatenate([[0], np.cumsum([aligned(n) for n in lengths])]).astype(int)
        host = np.zeros(max(int(starts[-1]), 1), dtype=np.uint8)
        for s, b, n in zip(starts, buffers, lengths):
            host[s : s + n] = np.frombuffer(b, dtype=np.uint8, count=n)
        return torch.from_numpy(host).to(self.device), starts[:-1].tolist()

    # -- helpers --------------------------------------------------------------------------

    def _decode(self, codec, stream: torch.cuda.Stream, src, dst, want: list[int]) -> list[int]:
        """One nvCOMP decode of the batch ``src`` into ``dst``; the sizes nvCOMP reports.
        First with a configuration built from the known sizes (nvCOMP then reads nothing
        from the streams to plan the work), then, should nvCOMP refuse that, without."""
        try:
            configs = [codec.decompression_config(codec.compression_config(want)), None]
        except (RuntimeError, ValueError, TypeError) as exc:
            log.debug("nvCOMP %s: no preconfigured decompression (%s)", self.algorithm, exc)
            configs = [None]
        for config in configs:
            try:
                result = codec.decode(src, out=dst, decompression_config=config)
                got = list(result.buffer_sizes)  # waits for the device
                stream.synchronize()  # and for the whole stream, to be sure
                return got
            except (RuntimeError, ValueError) as exc:
                stream.synchronize()
                if config is None:
                    raise BlobCorruptError(
                        f"nvCOMP {self.algorithm} cannot decode the batch: {exc}"
                    ) from exc
                log.debug("nvCOMP %s: preconfigured decode failed (%s)", self.algorithm, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spans(self, t: torch.Tensor, offsets, sizes, what: str) -> tuple[list[int], list[int]]:
        """Offset and size tables as int lists, checked against ``t``."""
        self._check(t, what)
        o = np.asarray(offsets, dtype=np.int64).reshape(-1)
        n = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if len(o) != len(n):
            raise ValueError(f"{what}: {len(o)} offsets, {len(n)} sizes")
        if len(o) and (
            n.min() <= 0 or o.min() < 0 or (o + n).max() > t.numel() or (o % ALIGN).any()
        ):
            raise ValueError(f"{what}: spans empty, unaligned or outside {t.numel()} bytes")
        if t.data_ptr() % ALIGN:
            raise ValueError(f"{what}: buffer not {ALIGN}-byte aligned")
        return o.tolist(), n.tolist()

    def _carve(self, t: torch.Tensor, offsets: list[int], sizes: list[int], stream):
        """An nvCOMP batch of the spans of ``t``: one buffer carved by the tables, or, for
        an nvCOMP without that form, a list of views (Python per span)."""
        if self._carved:
            try:
                return self._nv.as_arrays(
                    _DeviceBytes(t), offsets, sizes, cuda_stream=stream.cuda_stream
                )
            except (TypeError, ValueError, RuntimeError) as exc:
                log.warning("nvCOMP cannot carve a batch out of one buffer (%s): views", exc)
                self._carved = False
        return self._nv.as_arrays(
            [_DeviceBytes(t[o : o + n]) for o, n in zip(offsets, sizes)],
            cuda_stream=stream.cuda_stream,
        )

    def _max_compressed(self, codec, src: torch.Tensor, offsets: list[int], sizes: list[int]):
        """nvCOMP's bound on the compressed size of the largest span (its own query, else a
        generous DEFLATE bound: 9 bits a byte plus block headers)."""
        j = int(np.argmax(sizes))
        largest = sizes[j]
        try:
            view = _DeviceBytes(src[offsets[j] : offsets[j] + largest])
            return int(codec.get_max_comp_buffer_size(self._nv.as_array(view)))
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            log.debug("nvCOMP %s: no max compressed size (%s)", self.algorithm, exc)
            return largest + largest // 8 + 1024

    def _codec(self, largest: int):
        """This thread's side stream and its nvCOMP codec for buffers of up to ``largest``
        bytes. RAW Deflate codes each buffer as one chunk: its chunk size is raised to
        cover the largest (a power of two, at least nvCOMP's default 64 KiB)."""
        local = self._local
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(self.device)
            local.codecs = {}
        chunk = None
        if self.algorithm == "deflate":
            chunk = max(_MIN_CHUNK, 1 << (int(largest) - 1).bit_length())
        codec = local.codecs.get(chunk)
        if codec is None:
            codec = local.codecs[chunk] = self._new_codec(local.stream, chunk)
        return codec, local.stream

    def _new_codec(self, stream: torch.cuda.Stream, chunk: int | None):
        nv = self._nv
        kwargs = {
            "algorithm": _NVCOMP_NAMES[self.algorithm],
            "device_id": self.device.index,
            "cuda_stream": stream.cuda_stream,
        }
        if self.algorithm == "ans":
            return nv.Codec(**kwargs, bitstream_kind=nv.BitstreamKind.NVCOMP_NATIVE)
        kwargs.update(bitstream_kind=nv.BitstreamKind.RAW, algorithm_type=self.level)
        try:
            return nv.Codec(**kwargs, uncomp_chunk_size=chunk)
        except (RuntimeError, ValueError) as exc:  # the chunk size may not apply to RAW
            log.debug("nvCOMP Deflate: no chunk size %d (%s); nvCOMP's default", chunk, exc)
            return nv.Codec(**kwargs)

    def _as_torch(self, array) -> torch.Tensor:
        """An nvCOMP device array as a 1-D uint8 torch tensor sharing its memory: through
        its CUDA Array Interface, else (a torch that refuses it) through DLPack."""
        try:
            t = torch.as_tensor(_Borrowed(array), device=self.device)
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            log.debug("nvCOMP array via DLPack (%s)", exc)
            t = torch.from_dlpack(array)
        return t.view(torch.uint8).reshape(-1)

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if t.dtype != torch.uint8 or t.device != self.device or t.dim() != 1:
            raise ValueError(f"{what}: want 1-D uint8 on {self.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")  # fmt: skip
        return t

    @staticmethod
    def _input(t: torch.Tensor) -> torch.Tensor:
        """``t`` contiguous and 16-byte aligned (copied if not)."""
        if not t.is_contiguous() or t.data_ptr() % ALIGN:
            return t.clone(memory_format=torch.contiguous_format)
        return t

    def _alloc(self, lengths: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        starts = np.concatenate([[0], np.cumsum([aligned(int(n)) for n in lengths])])
        buf = torch.empty(max(int(starts[-1]), 1), dtype=torch.uint8, device=self.device)
        return buf, [buf[int(s) : int(s) + int(n)] for s, n in zip(starts, lengths)]

    def _check_empty(self, t: torch.Tensor) -> None:
        """A stream whose decompressed size is 0: empty (ans), or a DEFLATE stream that
        inflates to nothing (checked on the host: it is a few bytes)."""
        data = t.cpu().numpy().tobytes()
        if self.algorithm == "ans":
            if data:
                raise BlobCorruptError(f"ans stream of {len(data)} bytes for 0 bytes")
            return
        try:
            d = zlib.decompressobj(-15)
            got = d.decompress(data) + d.flush()
        except zlib.error as exc:
            raise BlobCorruptError(f"DEFLATE stream does not inflate: {exc}") from exc
        if got or not d.eof:
            raise BlobCorruptError("DEFLATE stream for 0 bytes is not an empty stream")


def _to_host(tensors: Sequence[torch.Tensor]) -> list[bytes]:
    """Device tensors as host bytes, with one copy."""
    if not tensors:
        return []
    host = torch.cat([t.reshape(-1) for t in tensors]).cpu().numpy().tobytes()
    out, o = [], 0
    for t in tensors:
        out.append(host[o : o + t.numel()])
        o += t.numel()
    return out
