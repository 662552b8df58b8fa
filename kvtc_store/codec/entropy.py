"""Entropy coders, by name, in a registry.

``deflate64k`` is the portable format that new blobs get when ``deflate`` is asked for
(:func:`writer_coder`): the payload cut into pieces of :data:`PIECE_SIZE` bytes, each a
raw DEFLATE stream of its own (RFC 1951, no zlib header), after a table of the pieces'
coded sizes (layout: :class:`PiecewiseDeflateCoder`). Every piece inflates with
``zlib.decompress(piece, -15)`` on any host, and a GPU inflates all pieces of a batch of
blobs at once (nvCOMP's RAW Deflate parallelises over streams, not within one).

``deflate`` is the older layout, still read everywhere: the whole payload as one raw
DEFLATE stream. Both are written with python-isal (ISA-L's fast DEFLATE) when installed,
else with zlib; the streams are interchangeable. ``none`` stores bytes as they are. New
coders register themselves with :func:`register_coder` (nvCOMP's ANS is not one: on the
rANS streams it saves nothing, see benchmarks/results/gpu_codec.md).
"""

from __future__ import annotations

import struct
import zlib
from typing import Protocol

import numpy as np

from ..errors import BlobCorruptError, BlobFormatError

try:  # ISA-L: same format, several times faster than zlib
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    _isal = None


class EntropyCoder(Protocol):
    """Lossless byte coder. ``decode(encode(x), len(x)) == x``."""

    name: str

    def encode(self, data: bytes) -> bytes:
        """Compress ``data``."""

    def decode(self, data: bytes, raw_size: int) -> bytes:
        """Decompress to exactly ``raw_size`` bytes; raise BlobCorruptError otherwise."""


class DeflateCoder:
    """Raw DEFLATE (wbits = -15), python-isal when installed, else zlib: the payload as one
    stream (coder ``deflate``, older blobs), and each piece of ``deflate64k``."""

    name = "deflate"

    def __init__(self, level: int = 1):
        self.level = level

    def encode(self, data: bytes) -> bytes:
        if _isal is not None:
            # isal levels are 0..3; map zlib-style levels onto them.
            return _isal.compress(data, min(self.level, 3), wbits=-15)
        c = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    def decode(self, data: bytes, raw_size: int) -> bytes:
        try:
            if _isal is not None:
                out = _isal.decompress(data, wbits=-15)
            else:
                out = zlib.decompress(data, -15)
        except Exception as exc:  # isal raises its own error class
            raise BlobCorruptError(f"DEFLATE stream does not inflate: {exc}") from exc
        if len(out) != raw_size:
            raise BlobCorruptError(f"DEFLATE stream inflated to {len(out)} bytes, not {raw_size}")
        return out


PIECE_SIZE = 1 << 16  # raw bytes per piece of ``deflate64k`` (nvCOMP's usual chunk size)
PIECE_ALIGN = 16  # coded pieces start at multiples of this from the payload's start
STORED_BLOCK_MAX = 65535  # raw bytes a stored DEFLATE block holds at most (RFC 1951 §3.2.4)
_COUNT = struct.Struct("<I")
_STORED = struct.Struct("<BHH")  # BFINAL | BTYPE 00 << 1, then LEN and NLEN


def stored_size(n: int) -> int:
    """Bytes of ``n`` (>= 0) raw bytes written as stored DEFLATE blocks
    (:func:`deflate_stored`): five header bytes per block of up to :data:`STORED_BLOCK_MAX`
    bytes, one block at least."""
    return n + _STORED.size * max(1, -(-n // STORED_BLOCK_MAX))


def deflate_stored(data) -> bytes:
    """``data`` (bytes-like) as a raw DEFLATE stream of stored blocks (RFC 1951 §3.2.4:
    each block a header byte with BFINAL and BTYPE 00, LEN, NLEN, then LEN bytes as they
    are): what zlib and ISA-L write for bytes they cannot shrink, and what the GPU writer
    uses where nvCOMP's coded piece is not shorter. ``zlib.decompress(out, -15)`` gives
    ``data`` back; :func:`stored_size` bytes."""
    return b"".join(stored_parts(data))


def stored_parts(data) -> list:
    """:func:`deflate_stored`'s stream as its parts, in order: each block's five header
    bytes and a memoryview of ``data`` (no copy of the bytes; ``data`` must be
    C-contiguous, and stays exported, so a bytearray cannot be resized, while the parts
    live)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    parts = []
    for s in range(0, max(n, 1), STORED_BLOCK_MAX):
        k = min(STORED_BLOCK_MAX, n - s)
        parts += [_STORED.pack(int(s + k >= n), k, k ^ 0xFFFF), mv[s : s + k]]
    return parts


def piece_count(raw_size: int) -> int:
    """Pieces of a ``deflate64k`` payload of ``raw_size`` raw bytes."""
    return -(-raw_size // PIECE_SIZE)


def table_size(raw_size: int) -> int:
    """Bytes of the piece table that starts a ``deflate64k`` payload of ``raw_size`` raw
    bytes (the count, then each piece's coded size)."""
    return _COUNT.size * (1 + piece_count(raw_size))


def piece_raw_sizes(raw_size: int) -> np.ndarray:
    """int64 raw size of each piece: :data:`PIECE_SIZE`, the last one the rest."""
    n = piece_count(raw_size)
    sizes = np.full(n, PIECE_SIZE, dtype=np.int64)
    if n:
        sizes[-1] = raw_size - (n - 1) * PIECE_SIZE
    return sizes


def _align(n):
    return -(-n // PIECE_ALIGN) * PIECE_ALIGN


def piece_offsets(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Where pieces of coded ``sizes`` start in a ``deflate64k`` payload (int64) and the
    payload's length: after the table, each piece at the next multiple of
    :data:`PIECE_ALIGN`, zero bytes between."""
    sizes = np.asarray(sizes, dtype=np.int64)
    table = _COUNT.size * (1 + len(sizes))
    if not len(sizes):
        return np.zeros(0, dtype=np.int64), table
    gaps = _align(sizes[:-1]) if len(sizes) > 1 else np.zeros(0, dtype=np.int64)
    starts = _align(table) + np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
    return starts, int(starts[-1] + sizes[-1])


def pack_pieces(coded: list) -> bytes:
    """A ``deflate64k`` payload of these coded pieces, in order: each bytes-like, or a list
    or tuple of bytes-like parts laid end to end (as :func:`stored_parts` gives)."""
    coded = [c if isinstance(c, (list, tuple)) else [c] for c in coded]
    sizes = np.array([sum(memoryview(p).nbytes for p in c) for c in coded], dtype=np.int64)
    starts, total = piece_offsets(sizes)
    out = bytearray(total)
    out[: _COUNT.size] = _COUNT.pack(len(coded))
    out[_COUNT.size : _COUNT.size * (1 + len(coded))] = sizes.astype("<u4").tobytes()
    for s, c in zip(starts.tolist(), coded):
        for part in c:
            mv = memoryview(part).cast("B")
            out[s : s + len(mv)] = mv
            s += len(mv)
    return bytes(out)


def read_piece_table(
    payload, raw_size: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and coded sizes (int64) of the pieces of a ``deflate64k`` payload that
    inflates to ``raw_size`` bytes, the table checked against the payload's length.

    Args:
        payload: the payload, or its first :func:`table_size` bytes at least (with
            ``length``: a payload in device memory, of which only the table was copied).
        raw_size: bytes it inflates to.
        length: the whole payload's bytes (default ``len(payload)``).

    Raises:
        BlobCorruptError: a table that does not fit the payload or ``raw_size``.
    """
    mv = memoryview(payload).cast("B")
    n = piece_count(raw_size)
    length = len(mv) if length is None else length
    if min(len(mv), length) < table_size(raw_size):
        raise BlobCorruptError(f"deflate64k payload of {len(mv)} bytes ends inside its table")
    (count,) = _COUNT.unpack_from(mv, 0)
    if count != n:
        raise BlobCorruptError(f"deflate64k table lists {count} pieces, {raw_size} bytes need {n}")
    sizes = np.frombuffer(mv, dtype="<u4", count=n, offset=_COUNT.size).astype(np.int64)
    if n and sizes.min() == 0:
        raise BlobCorruptError("deflate64k table lists an empty piece")
    starts, total = piece_offsets(sizes)
    if total != length:
        raise BlobCorruptError(f"deflate64k table spans {total} bytes, the payload is {length}")
    return starts, sizes


class PiecewiseDeflateCoder:
    """Raw DEFLATE in independent pieces of :data:`PIECE_SIZE` raw bytes.

    Payload layout (integers little-endian)::

        uint32 n                      pieces: ceil(raw_size / PIECE_SIZE), 0 for no bytes
        uint32 size[n]                coded bytes of each piece
        then each piece's raw DEFLATE stream, starting at the next multiple of
        PIECE_ALIGN (16) bytes from the payload's start (zero bytes between)

    Piece ``k`` inflates (``zlib.decompress(piece, -15)``) to raw bytes
    ``[k * PIECE_SIZE, min((k + 1) * PIECE_SIZE, raw_size))``. The alignment lets a
    payload copied to an aligned device address feed nvCOMP's batched RAW Deflate in place.
    """

    name = "deflate64k"

    def __init__(self, level: int = 1):
        self._piece = DeflateCoder(level)

    def encode(self, data: bytes) -> bytes:
        mv = memoryview(data).cast("B")
        return pack_pieces(
            [self._piece.encode(mv[s : s + PIECE_SIZE]) for s in range(0, len(mv), PIECE_SIZE)]
        )

    def decode(self, data: bytes, raw_size: int) -> bytes:
        mv = memoryview(data).cast("B")
        starts, sizes = read_piece_table(mv, raw_size)
        raw = piece_raw_sizes(raw_size).tolist()
        out = []
        for k, (s, n, want) in enumerate(zip(starts.tolist(), sizes.tolist(), raw)):
            try:
                out.append(self._piece.decode(mv[s : s + n], want))
            except BlobCorruptError as exc:
                raise BlobCorruptError(f"deflate64k piece {k} of {len(raw)}: {exc}") from exc
        return b"".join(out)


class NoCoder:
    """Identity coder (for measuring the ratio before entropy coding)."""

    name = "none"

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, raw_size: int) -> bytes:
        if len(data) != raw_size:
            raise BlobCorruptError(f"stored section is {len(data)} bytes, not {raw_size}")
        return bytes(data)


_CODERS: dict[str, EntropyCoder] = {}


def register_coder(coder: EntropyCoder) -> None:
    """Make ``coder`` available under ``coder.name`` (for blobs that name it)."""
    _CODERS[coder.name] = coder


def get_coder(name: str) -> EntropyCoder:
    """The coder registered as ``name``.

    Raises:
        BlobFormatError: no such coder here (e.g. a GPU-only coder on a CPU host).
    """
    try:
        return _CODERS[name]
    except KeyError:
        raise BlobFormatError(
            f"entropy coder {name!r} is not available here (have: {sorted(_CODERS)})"
        ) from None


WRITE_AS = {"deflate": "deflate64k"}
"""Coder names that writers replace: a request for ``deflate`` writes ``deflate64k``."""


def writer_coder(name: str) -> EntropyCoder:
    """The coder that writes new blobs when ``name`` is asked for (:data:`WRITE_AS`;
    readers use :func:`get_coder` with the blob's own name).

    Raises:
        BlobFormatError: no such coder here.
    """
    return get_coder(WRITE_AS.get(name, name))


register_coder(DeflateCoder())
register_coder(PiecewiseDeflateCoder())
register_coder(NoCoder())
