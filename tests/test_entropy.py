"""Entropy coders (kvtc_store.codec.entropy): ``deflate64k`` round trips at piece
boundaries, each piece a raw DEFLATE stream plain zlib inflates, the table and pieces
checked (BlobCorruptError, never garbage); the older single-stream ``deflate`` still read;
what a request for ``deflate`` writes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.codec.entropy import (
    PIECE_ALIGN,
    PIECE_SIZE,
    STORED_BLOCK_MAX,
    deflate_stored,
    get_coder,
    pack_pieces,
    piece_count,
    read_piece_table,
    stored_parts,
    stored_size,
    writer_coder,
)
from kvtc_store.errors import BlobCorruptError, BlobFormatError

SIZES = [0, 1, 65535, 65536, 65537, 3 << 20]


def _data(n: int, seed: int = 0) -> bytes:
    """Compressible, not trivially: bf16-like bytes of Gaussian values, a run of zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 1) // 2).astype(np.float32).view(np.uint32) >> 16
    b = bytearray(x.astype("<u2").tobytes()[:n])
    assert len(b) == n
    b[: n // 8] = bytes(n // 8)
    return bytes(b)


@pytest.fixture(scope="module")
def coder():
    return get_coder("deflate64k")


@pytest.mark.parametrize("n", SIZES)
def test_round_trip_at_piece_boundaries(coder, n) -> None:
    data = _data(n, n)
    coded = coder.encode(data)
    assert coder.decode(coded, n) == data
    starts, sizes = read_piece_table(coded, n)
    assert len(sizes) == piece_count(n) == -(-n // PIECE_SIZE)
    assert all(s % PIECE_ALIGN == 0 for s in starts.tolist())
    # every piece on its own, plain zlib: raw bytes [k * 64 KiB, (k + 1) * 64 KiB)
    for k, (s, c) in enumerate(zip(starts.tolist(), sizes.tolist())):
        assert zlib.decompress(coded[s : s + c], -15) == data[k * PIECE_SIZE : (k + 1) * PIECE_SIZE]
    if n == 0:
        assert coded == b"\x00\x00\x00\x00"
    if n >= 1 << 20:
        assert len(coded) < 0.9 * n


def test_pieces_from_zlib_decode(coder) -> None:
    """Pieces written by another DEFLATE writer (zlib at several levels) read the same."""
    data = _data(200_000, 3)
    pieces = []
    for k, s in enumerate(range(0, len(data), PIECE_SIZE)):
        c = zlib.compressobj(1 + 4 * (k % 3), zlib.DEFLATED, -15)
        pieces.append(c.compress(data[s : s + PIECE_SIZE]) + c.flush())
    assert coder.decode(pack_pieces(pieces), len(data)) == data


def _forge(coded: bytes, count: int | None = None, sizes=None) -> bytes:
    """``coded`` with its table's count or sizes replaced."""
    (n,) = struct.unpack_from("<I", coded)
    out = bytearray(coded)
    if count is not None:
        out[:4] = struct.pack("<I", count)
    if sizes is not None:
        out[4 : 4 + 4 * n] = struct.pack(f"<{n}I", *sizes)
    return bytes(out)


def test_corrupt_table_or_payload_raises(coder) -> None:
    n = 3 * PIECE_SIZE + 10
    data = _data(n, 5)
    coded = coder.encode(data)
    _, sizes = read_piece_table(coded, n)
    s = sizes.tolist()
    bad = {
        "short by one byte": coded[:-1],
        "one byte more": coded + b"\x00",
        "ends inside the table": coded[:9],
        "empty": b"",
        "count one too many": _forge(coded, count=5),
        "count one too few": _forge(coded, count=3),
        "count huge": _forge(coded, count=0xFFFFFFFF),
        "sizes shifted": _forge(coded, sizes=[s[0] + 1, s[1] - 1, *s[2:]]),
        "an empty piece": _forge(coded, sizes=[0, *s[1:]]),
        "a size past the end": _forge(coded, sizes=[*s[:-1], 0xFFFFFFF0]),
    }
    for what, payload in bad.items():
        with pytest.raises(BlobCorruptError):
            coder.decode(payload, n)
            pytest.fail(what)
    flipped = bytearray(coded)
    starts, _ = read_piece_table(coded, n)
    flipped[int(starts[1]) + 2] ^= 0xFF  # inside piece 1: it no longer inflates to 64 KiB
    with pytest.raises(BlobCorruptError, match="piece"):
        coder.decode(bytes(flipped), n)
    with pytest.raises(BlobCorruptError):
        coder.decode(coded, n + 1)  # the sections say another size
    with pytest.raises(BlobCorruptError):
        coder.decode(coded, n - PIECE_SIZE)


def test_single_stream_deflate_still_decodes() -> None:
    data = _data(150_000, 7)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert get_coder("deflate").decode(c.compress(data) + c.flush(), len(data)) == data


@pytest.mark.parametrize("n", [0, 1, 65535, 65536, 2 * 65535 + 1, 200_000])
def test_stored_blocks_inflate_with_zlib(n) -> None:
    """RFC 1951 stored blocks: zlib inflates them to the bytes, each block header byte
    BTYPE 00 (BFINAL on the last only), LEN / NLEN, :func:`stored_size` bytes in all; the
    CPU coder reads a payload of stored pieces."""
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    out = deflate_stored(data)
    assert len(out) == stored_size(n) == n + 5 * max(1, -(-n // STORED_BLOCK_MAX))
    assert zlib.decompress(out, -15) == data
    at, blocks = 0, []
    while at < len(out):
        flags, size, nsize = struct.unpack_from("<BHH", out, at)
        assert size ^ nsize == 0xFFFF
        blocks.append((flags, size))
        at += 5 + size
    assert [f for f, _ in blocks] == [0] * (len(blocks) - 1) + [1]
    assert sum(k for _, k in blocks) == n
    pieces = [deflate_stored(data[s : s + PIECE_SIZE]) for s in range(0, n, PIECE_SIZE)]
    payload = pack_pieces(pieces)
    assert get_coder("deflate64k").decode(payload, n) == data
    # the same payload from the parts (headers and views of ``data``, as GpuCodec packs)
    parts = [stored_parts(data[s : s + PIECE_SIZE]) for s in range(0, n, PIECE_SIZE)]
    assert pack_pieces(parts) == payload


def test_deflate_requests_write_deflate64k() -> None:
    assert writer_coder("deflate").name == "deflate64k"
    assert writer_coder("deflate64k").name == "deflate64k"
    assert writer_coder("none").name == "none"
    with pytest.raises(BlobFormatError):
        writer_coder("zstd")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3 * PIECE_SIZE + 5)
    | st.sampled_from([PIECE_SIZE - 1, PIECE_SIZE, PIECE_SIZE + 1, 2 * PIECE_SIZE]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(n, seed) -> None:
    data = _data(n, seed)
    coder = get_coder("deflate64k")
    coded = coder.encode(data)
    assert coder.decode(coded, n) == data
    if n:  # a truncated payload is an error, never other bytes
        with pytest.raises(BlobCorruptError):
            coder.decode(coded[: len(coded) - 1 - seed % min(len(coded) - 1, 40)], n)
