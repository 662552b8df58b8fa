"""nvCOMP on CUDA (kvtc_store.codec.gpu.nvcomp_coder): RAW Deflate streams interchangeable
with zlib and ISA-L both ways, ANS round trips, batches with empty buffers, spans of one
buffer (``deflate64k`` pieces) both ways, and the GPU codec's ``deflate64k`` blobs (and
older single-stream ``deflate`` ones) crossing devices both ways with corrupt ones caught.

Skipped without CUDA, Triton or nvCOMP (``nvidia-nvcomp-cu13``; CI has none of them); run
on the lent H200 after ``benchmarks/nvcomp_smoke.py``, in a pytest process of its own: the
last tests hand nvCOMP streams that are corrupt but carry a valid checksum (a buggy
writer), on which nvCOMP promises nothing ("undefined behavior", ``nvcomp/deflate.h``); a
failure there must not take other test files' CUDA context with it.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
import torch

from kvtc_store.codec import KVTCCodec, entropy
from kvtc_store.codec.blob import PAYLOAD_CHECKSUM_MISMATCH, pack_blob, unpack_blob
from kvtc_store.codec.entropy import PIECE_SIZE, DeflateCoder, get_coder, read_piece_table
from kvtc_store.errors import BlobCorruptError
from tests.test_codec import RANS_ONLY, arts, make_chunk  # noqa: F401 - synthetic artifact fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton", reason="needs CUDA (Triton comes with the CUDA torch)")
nvcomp = pytest.importorskip("nvidia.nvcomp", reason="needs CUDA and nvCOMP (nvidia-nvcomp-cu12)")

from kvtc_store.codec.gpu import codec_gpu
from kvtc_store.codec.gpu.codec_gpu import GpuCodec
from kvtc_store.codec.gpu.nvcomp_coder import EMPTY_DEFLATE, NvcompCoder
from tests.test_gpu_rans import _assert_batch_decodes_as_on_cpu, _codec_cases

SIZES = [0, 1, 100, 4096, 65535, 65536, 65537, 1 << 20, (2 << 20) + 3]


def _payload(n: int, seed: int) -> bytes:
    """Bytes like a blob's payload: bf16 of Gaussian values (compressible, not trivially),
    a run of zeros at the start."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n + 1) // 2).astype(np.float32))
    b = bytearray(x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()[:n])
    b[: n // 8] = bytes(n // 8)
    return bytes(b)


def _raw_zlib(data: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.fixture(scope="module")
def deflate():
    return NvcompCoder("deflate", "cuda")


@pytest.fixture(scope="module")
def ans():
    return NvcompCoder("ans", "cuda")


def test_gpu_deflate_inflates_with_zlib(deflate):
    data = [_payload(n, i) for i, n in enumerate(SIZES)]
    comp = deflate.compress_host(data)
    assert comp[0] == EMPTY_DEFLATE
    assert [zlib.decompress(c, -15) for c in comp] == data
    assert sum(map(len, comp)) < sum(SIZES)


@pytest.mark.parametrize("writer", ["zlib-1", "zlib-9", "isal"])
def test_host_deflate_inflates_on_the_gpu(deflate, writer):
    data = [_payload(n, 10 + i) for i, n in enumerate(SIZES)]
    if writer == "isal":
        from isal import isal_zlib

        streams = [isal_zlib.compress(d, 1, wbits=-15) for d in data]
    else:
        streams = [_raw_zlib(d, int(writer[-1])) for d in data]
    assert deflate.decompress_host(streams, SIZES) == data


def test_ans_round_trip(ans):
    data = [_payload(n, 20 + i) for i, n in enumerate(SIZES)]
    comp = ans.compress_host(data)
    assert comp[0] == b""
    assert ans.decompress_host(comp, SIZES) == data


@pytest.mark.parametrize("algorithm", ["deflate", "ans"])
def test_a_batch_of_128_unequal_sizes_with_an_empty_one(algorithm):
    """Device tensors in, device tensors out: unaligned inputs (views at odd offsets) and
    decompression into given buffers of one staging tensor."""
    coder = NvcompCoder(algorithm, "cuda")
    rng = np.random.default_rng(3)
    lens = [int(n) for n in rng.integers(1, 150_000, 128)]
    lens[41] = 0
    data = [_payload(n, i) for i, n in enumerate(lens)]
    dev = coder.to_device(data)
    odd = torch.empty(sum(lens) + 128, dtype=torch.uint8, device="cuda")
    unaligned, o = [], 1
    for t in dev:  # the same bytes at offsets that are not 16-byte aligned
        unaligned.append(odd[o : o + t.numel()])
        unaligned[-1].copy_(t)
        o += t.numel() + 1
    comp = coder.compress(unaligned)
    staging, out = coder._alloc(lens)
    staging.fill_(0xA5)
    got = coder.decompress(comp, lens, out=out)
    assert all(g is b for g, b in zip(got, out))
    assert all(torch.equal(g, t) for g, t in zip(got, dev))
    host = [c.cpu().numpy().tobytes() for c in comp]
    if algorithm == "deflate":
        assert [zlib.decompress(c, -15) for c in host] == data
    assert coder.decompress_host(host, lens) == data


def test_wrong_sizes_raise(deflate):
    data = _payload(70_000, 1)
    comp = deflate.compress_host([data])
    with pytest.raises(BlobCorruptError):
        deflate.decompress_host([b""], [10])  # nothing for 10 bytes
    with pytest.raises(BlobCorruptError):
        deflate.decompress_host([comp[0]], [0])  # a stream of 70 kB for 0 bytes
    with pytest.raises(ValueError):
        deflate.decompress(deflate.to_device(comp), [len(data)], out=[torch.empty(5)])


# -- deflate64k pieces: spans of one buffer ------------------------------------------------


def _zlib_inflate64k(payload, raw_size: int) -> bytes:
    """A ``deflate64k`` payload inflated piece by piece with plain zlib."""
    payload = bytes(payload)
    starts, sizes = read_piece_table(payload, raw_size)
    return b"".join(
        zlib.decompress(payload[s : s + n], -15) for s, n in zip(starts.tolist(), sizes.tolist())
    )


def test_gpu_pieces_decode_on_the_cpu_with_an_empty_payload(deflate):
    """``GpuCodec._deflate_pieces`` (one nvCOMP call over every piece of the batch):
    payloads of 0 bytes (first and last), piece boundaries and MBs; plain zlib and the CPU
    coder read every one."""
    gpu = object.__new__(GpuCodec)
    gpu._deflater = deflate
    sizes = [*SIZES, 0]
    data = [_payload(n, 30 + i) for i, n in enumerate(sizes)]
    coded = gpu._deflate_pieces(data)
    assert coded[0] == coded[-1] == b"\x00\x00\x00\x00"
    cpu = get_coder("deflate64k")
    for c, d in zip(coded, data):
        assert cpu.decode(c, len(d)) == d
        assert _zlib_inflate64k(c, len(d)) == d
    assert sum(map(len, coded)) < sum(sizes)


def _first_bytes(payload, raw_size: int) -> list[int]:
    """The first byte of each piece of a ``deflate64k`` payload (BTYPE in bits 1-2)."""
    starts, _ = read_piece_table(payload, raw_size)
    return [payload[s] for s in starts.tolist()]


def test_gpu_pieces_nvcomp_cannot_shrink_are_stored(deflate):
    """Random bytes (like a rANS stream): every piece GpuCodec writes is stored blocks
    (BTYPE 00), no longer than :func:`entropy.stored_size`; compressible bytes stay
    Huffman-coded; both read by zlib and inflated by one nvCOMP call on the device."""
    gpu = object.__new__(GpuCodec)
    gpu._deflater = deflate
    rng = np.random.default_rng(7)
    n = 5 * PIECE_SIZE + 123
    data = [rng.integers(0, 256, n, dtype=np.uint8).tobytes(), _payload(n, 8)]
    noise, smooth = gpu._deflate_pieces(data)
    assert all((b >> 1) & 3 == 0 for b in _first_bytes(noise, n))
    sizes = read_piece_table(noise, n)[1]
    raw = entropy.piece_raw_sizes(n)
    assert sizes.tolist() == [entropy.stored_size(r) for r in raw.tolist()]
    # every full piece shrinks; the last, 123 bytes, may not (then it is stored too)
    assert all((b >> 1) & 3 != 0 for b in _first_bytes(smooth, n)[:-1])
    assert len(smooth) < 0.9 * n
    for c, d in zip((noise, smooth), data):
        assert _zlib_inflate64k(c, n) == d
    src, at = deflate.to_device_packed([noise, smooth])
    dst = torch.full((2 * n + 16,), 0xA5, dtype=torch.uint8, device="cuda")
    out_at = [0, -(-n // 16) * 16]
    tables = [[], [], [], []]
    for a, c, o in zip(at, (noise, smooth), out_at):
        starts, lens = read_piece_table(c, n)
        for t, part in zip(tables, (a + starts, lens, o + PIECE_SIZE * np.arange(len(raw)), raw)):
            t.append(part)
    so, ss, do, ds = (np.concatenate(t) for t in tables)
    deflate.decompress_spans(src, so, ss, dst, do, ds)
    host = dst.cpu().numpy()
    assert [host[o : o + n].tobytes() for o in out_at] == data


@pytest.mark.parametrize("writer", ["isal", "zlib-6"])
def test_cpu_pieces_inflate_on_the_gpu_in_one_call(deflate, writer):
    """CPU-written ``deflate64k`` payloads (ISA-L, or zlib piece by piece), staged as
    ``GpuCodec._upload`` does (each payload at an aligned offset), inflated by one
    :meth:`decompress_spans` into their places (adjacent pieces contiguous)."""
    sizes = [*SIZES, 0, 3 << 20]
    data = [_payload(n, 40 + i) for i, n in enumerate(sizes)]
    if writer == "isal":
        coded = [get_coder("deflate64k").encode(d) for d in data]
    else:
        coded = []
        for d in data:
            pieces = []
            for s in range(0, len(d), PIECE_SIZE):
                c = zlib.compressobj(6, zlib.DEFLATED, -15)
                pieces.append(c.compress(d[s : s + PIECE_SIZE]) + c.flush())
            coded.append(entropy.pack_pieces(pieces))
    src, at = deflate.to_device_packed(coded)
    raw_at = np.concatenate([[0], np.cumsum([-(-n // 16) * 16 for n in sizes])]).astype(np.int64)
    dst = torch.full((int(raw_at[-1]) + 16,), 0xA5, dtype=torch.uint8, device="cuda")
    tables = [[], [], [], []]
    for a, c, r, n in zip(at, coded, raw_at.tolist(), sizes):
        starts, lens = read_piece_table(c, n)
        raw = entropy.piece_raw_sizes(n)
        for t, part in zip(tables, (a + starts, lens, r + PIECE_SIZE * np.arange(len(raw)), raw)):
            t.append(part)
    so, ss, do, ds = (np.concatenate(t) for t in tables)
    assert len(so) > 100  # thousands in a real batch; here the pieces of 19 MB
    deflate.decompress_spans(src, so, ss, dst, do, ds)
    host = dst.cpu().numpy()
    for r, n, d in zip(raw_at.tolist(), sizes, data):
        assert host[r : r + n].tobytes() == d


def test_spans_round_trip_and_wrong_sizes(deflate):
    data = _payload(5 * PIECE_SIZE + 7, 50)
    src, (at,) = deflate.to_device_packed([data])
    raw = entropy.piece_raw_sizes(len(data))
    offs = at + PIECE_SIZE * np.arange(len(raw))
    out, out_at, comp = deflate.compress_spans(src, offs, raw)
    assert len(comp) == len(raw) and all(o % 16 == 0 for o in out_at)
    host = out.cpu().numpy()
    for k, (o, n) in enumerate(zip(out_at, comp)):
        got = zlib.decompress(host[o : o + n].tobytes(), -15)
        assert got == data[k * PIECE_SIZE : (k + 1) * PIECE_SIZE]
    dst = torch.empty(len(data) + 64, dtype=torch.uint8, device="cuda")
    deflate.decompress_spans(out, out_at, comp, dst, offs - at, raw)
    assert dst[: len(data)].cpu().numpy().tobytes() == data
    with pytest.raises(ValueError):  # unaligned destination
        deflate.decompress_spans(out, out_at[:1], comp[:1], dst, [8], [PIECE_SIZE])


# -- the GPU codec with coder "deflate" (writes deflate64k) ---------------------------------


def _spy_inflate(gpu: GpuCodec) -> list[bool]:
    """Record what each of ``gpu``'s nvCOMP inflates returns (False: fell back to host)."""
    calls: list[bool] = []
    real = gpu._inflate

    def spy(dev, jobs):
        calls.append(real(dev, jobs))
        return calls[-1]

    gpu._inflate = spy
    return calls


@pytest.mark.parametrize("piece", [PIECE_SIZE, 1024])
@RANS_ONLY
def test_deflate_blobs_cross_devices(arts, caplog, monkeypatch, piece):  # noqa: F811
    """GPU-deflated blobs (nvCOMP, ``deflate64k``) decode with the CPU codec, their
    inflated payloads equal the host-deflated ones; CPU-deflated blobs, and older
    single-stream ``deflate`` ones, decode on the GPU through one nvCOMP call a batch;
    values within the tolerance of the other GPU tests. ``piece`` 1024 (patched) makes
    the test chunks' payloads span several pieces."""
    monkeypatch.setattr(entropy, "PIECE_SIZE", piece)
    monkeypatch.setattr(codec_gpu, "PIECE_SIZE", piece)
    cases = _codec_cases(arts)
    assert cases
    caplog.set_level(logging.WARNING, logger="kvtc_store.codec.gpu")
    for art, keys, values, firsts in cases:
        cpu = KVTCCodec(art, coder="deflate")
        gpu = GpuCodec(art, coder="deflate", nvcomp=True)
        host = GpuCodec(art, coder="deflate", nvcomp=False)
        assert gpu._deflater is not None and host._deflater is None
        calls = _spy_inflate(gpu)
        tails = [0, 17]
        kd, vd = keys.cuda(), values.cuda()
        blob_g = gpu.encode_batch(kd, vd, firsts, tails)
        blob_h = host.encode_batch(kd, vd, firsts, tails)
        blob_c = [cpu.encode(keys[i], values[i], firsts[i], tails[i]) for i in range(2)]
        legacy = []  # single-stream deflate blobs, as older writers made them
        for b in blob_c:
            header, payload = unpack_blob(b)
            raw = get_coder(header.coder).decode(bytes(payload), sum(header.sections.values()))
            header.coder = "deflate"
            legacy.append(pack_blob(header, DeflateCoder().encode(raw)))
        scale = keys.float().abs().max().item()
        for g, h in zip(blob_g, blob_h):
            (hg, pg), (hh, ph) = unpack_blob(g), unpack_blob(h)
            assert hg.coder == hh.coder == "deflate64k" and hg.sections == hh.sections
            raw = sum(hg.sections.values())
            assert _zlib_inflate64k(pg, raw) == _zlib_inflate64k(ph, raw)
        for b in range(2):
            on_cpu = cpu.decode(blob_g[b], dtype=torch.float32)
            ref = cpu.decode(blob_h[b], dtype=torch.float32)
            assert torch.equal(on_cpu.keys, ref.keys) and torch.equal(on_cpu.values, ref.values)
        for blobs in (blob_c, blob_g, legacy, [legacy[0], blob_g[1]]):
            _assert_batch_decodes_as_on_cpu(gpu, cpu, blobs, scale)
        assert calls == [True] * 4  # every batch inflated by nvCOMP, no host fallback
        del calls[:]
    assert not [r for r in caplog.records if "nvCOMP" in r.getMessage()]


def _deflate_pair(arts):  # noqa: F811
    """The first synthetic rans case: ``(cpu, gpu, keys, [two deflate64k blobs])``, the
    codecs writing ``deflate`` (the GPU one through nvCOMP); runs on rans artifacts only (:data:`RANS_ONLY`)."""
    cases = [c for c in _codec_cases(arts) if any(c[0] is a for a in arts.values())]
    assert cases
    art, keys, values, firsts = cases[0]
    cpu = KVTCCodec(art, coder="deflate")
    gpu = GpuCodec(art, coder="deflate", nvcomp=True)
    return cpu, gpu, keys, [cpu.encode(keys[i], values[i], firsts[i]) for i in range(2)]


@RANS_ONLY
def test_host_fallback_when_nvcomp_fails(arts, monkeypatch, caplog):  # noqa: F811
    """nvCOMP raising mid-batch: the batch is inflated on the host instead, same values."""
    cpu, gpu, keys, blobs = _deflate_pair(arts)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated nvCOMP failure")

    monkeypatch.setattr(gpu._deflater, "decompress_spans", broken)
    _assert_batch_decodes_as_on_cpu(gpu, cpu, blobs, keys.float().abs().max().item())
    assert "simulated nvCOMP failure" in caplog.text


def _altered(blob: bytes, how: str) -> bytes:
    header, payload = unpack_blob(blob)
    p = bytearray(payload)
    if how == "checksum":  # a payload byte flipped, checksum left as it was
        flip = bytearray(blob)
        flip[-len(p) // 2] ^= 0x5A
        return bytes(flip)
    if how == "truncated":  # checksum recomputed: only the stream itself can tell
        return pack_blob(header, bytes(p[: len(p) // 2]))
    if how == "flipped":
        p[len(p) // 3] ^= 0xFF
        return pack_blob(header, bytes(p))
    if how == "garbage":
        rng = np.random.default_rng(4)
        return pack_blob(header, rng.integers(0, 256, len(p), dtype=np.uint8).tobytes())
    raise ValueError(how)


@pytest.mark.parametrize("how", ["checksum", "truncated", "flipped", "garbage"])
@RANS_ONLY
def test_a_corrupt_deflate_payload_raises_never_garbage(arts, how):  # noqa: F811
    """A payload altered with its checksum left (the checksum error, before nvCOMP sees
    it) or recomputed (the stream's own error, as the CPU decoder reports it): the prefix
    ends at that blob with a BlobCorruptError; blobs before it decode."""
    cpu, gpu, keys, good = _deflate_pair(arts)
    blobs = [good[0], _altered(good[1], how), good[0]]
    want, want_err = cpu.decode_prefix(blobs, dtype=torch.float32)
    dec = gpu.decode_batch(blobs, dtype=torch.float32)
    scale = keys.float().abs().max().item()
    assert dec.count == len(want)
    if want_err is None:  # the CPU decoder saw nothing wrong: the same values
        assert dec.error is None
    else:
        assert isinstance(dec.error, BlobCorruptError)
    if how == "checksum":
        assert len(want) == 1 and str(dec.error) == str(want_err) == PAYLOAD_CHECKSUM_MISMATCH
    for b, w in enumerate(want):
        assert (dec.keys[b].cpu() - w.keys).abs().max().item() < 2e-3 * scale
        assert (dec.values[b].cpu() - w.values).abs().max().item() < 2e-3 * scale
