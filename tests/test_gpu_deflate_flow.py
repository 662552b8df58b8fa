"""The GPU codec's ``deflate64k`` flow without a GPU: nvCOMP replaced by zlib behind the
nvCOMP Python API calls that :class:`~kvtc_store.codec.gpu.nvcomp_coder.NvcompCoder`
makes (a batch carved out of one buffer by offset and size tables, one encode or decode
per batch), the rest of the codec real, in Triton's CPU interpreter.

Checks the bookkeeping that the GPU tests (``tests/test_gpu_nvcomp.py``) check with
nvCOMP: which pieces go where in the staging buffer and the raw layout, one nvCOMP call a
batch, blobs crossing to and from the CPU codec, older single-stream ``deflate`` blobs,
corrupt payloads ending the prefix with the CPU decoder's error, the host fallback.
Runs only with ``KVTC_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1`` (slow: keep ``-k``
narrow); pieces are made small (``PIECE_SIZE`` patched) so the tiny test chunks span many.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib

import numpy as np
import pytest
import torch

from kvtc_store.backends.gpu import HEAD_BYTES, DeviceBlob
from kvtc_store.codec import KVTCCodec, entropy
from kvtc_store.codec.blob import PAYLOAD_CHECKSUM_MISMATCH, pack_blob, unpack_blob
from kvtc_store.codec.entropy import DeflateCoder
from kvtc_store.errors import BlobCorruptError
from tests.test_codec import RANS_ONLY, arts, make_chunk  # noqa: F401 - synthetic artifact fixture

pytestmark = pytest.mark.skipif(
    os.environ.get("KVTC_GPU_TEST_DEVICE") != "cpu",
    reason="runs in Triton's CPU interpreter only: KVTC_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1 "
    "(`make test-triton-cpu`, which CI runs)",
)
triton = pytest.importorskip("triton", reason="needs Triton (`make test-triton-cpu` has it)")

from kvtc_store.codec.gpu import codec_gpu, nvcomp_coder
from kvtc_store.codec.gpu.codec_gpu import GpuCodec
from tests.test_gpu_rans import _codec_cases

SMALL = 512  # bytes a piece here: the tiny chunks' payloads span several


class _Batch(list):
    """A stand-in nvCOMP BatchArray: tensor views, and the sizes nvCOMP reports."""

    def __init__(self, items, sizes=None):
        super().__init__(items)
        self.buffer_sizes = sizes if sizes is not None else [t.numel() for t in items]


class _Stream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class _ZlibCodec:
    """nvCOMP's RAW Deflate codec, as zlib; counts its calls."""

    def __init__(self, calls: list):
        self.calls = calls

    def compression_config(self, sizes):
        return list(sizes)

    def decompression_config(self, config):
        return config

    def get_max_comp_buffer_size(self, array):
        return array.numel() + array.numel() // 8 + 64

    def encode(self, batch, out=None):
        self.calls.append(("encode", len(batch)))
        written = []
        for t, o in zip(batch, out):
            c = zlib.compressobj(1, zlib.DEFLATED, -15)
            data = c.compress(t.numpy().tobytes()) + c.flush()
            o[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            written.append(o[: len(data)])
        return _Batch(written)

    def decode(self, src, out=None, decompression_config=None):
        self.calls.append(("decode", len(src)))
        sizes = []
        for s, o in zip(src, out):
            try:
                data = zlib.decompress(s.numpy().tobytes(), -15)
            except zlib.error:
                data = b""  # nvCOMP reports a size it did not reach (or raises)
            n = min(len(data), o.numel())
            o[:n] = torch.frombuffer(bytearray(data[:n]), dtype=torch.uint8)
            sizes.append(len(data))
        return _Batch(list(out), sizes)


class _ZlibNvcomp:
    """``nvidia.nvcomp``: ``as_arrays`` in both forms, ``as_array``."""

    def as_arrays(self, sources, offsets=None, sizes=None, cuda_stream=None):
        if offsets is None:
            return _Batch([s.tensor for s in sources])
        t = sources.tensor
        return _Batch([t[o : o + n] for o, n in zip(offsets, sizes)])

    def as_array(self, source):
        return source.tensor


def _standin(calls: list) -> nvcomp_coder.NvcompCoder:
    """A real NvcompCoder on the CPU whose nvCOMP is zlib."""
    coder = object.__new__(nvcomp_coder.NvcompCoder)
    coder.algorithm, coder.device, coder.level = "deflate", torch.device("cpu"), 1
    coder._nv, coder.version, coder._carved = _ZlibNvcomp(), "zlib stand-in", True
    coder._local = threading.local()
    codec = _ZlibCodec(calls)
    coder._codec = lambda largest: (codec, _Stream())
    return coder


@pytest.fixture
def calls(monkeypatch):
    """nvCOMP calls made; GpuCodec(nvcomp=True) gets the stand-in; pieces of SMALL bytes."""
    made: list = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(
        codec_gpu, "_device_deflater", lambda device, wanted: _standin(made) if wanted else None
    )
    monkeypatch.setattr(entropy, "PIECE_SIZE", SMALL)
    monkeypatch.setattr(codec_gpu, "PIECE_SIZE", SMALL)
    return made


def altered(blob: bytes, how: str) -> bytes:
    """``blob`` with its payload altered: checksum left as it was (``checksum``) or
    recomputed (the payload's own checks must tell)."""
    header, payload = unpack_blob(blob)
    p = bytearray(payload)
    if how == "checksum":
        flip = bytearray(blob)
        flip[-len(p) // 2] ^= 0x5A
        return bytes(flip)
    if how == "truncated":
        return pack_blob(header, bytes(p[: len(p) // 2]))
    if how == "flipped":  # inside the last piece
        p[-3] ^= 0xFF
        return pack_blob(header, bytes(p))
    if how == "table":  # one piece fewer listed
        p[0] -= 1
        return pack_blob(header, bytes(p))
    raise ValueError(how)


def _case(arts):  # noqa: F811
    cases = [c for c in _codec_cases(arts) if any(c[0] is a for a in arts.values())]
    assert cases
    return cases[0]


@RANS_ONLY
def test_blobs_cross_both_ways_in_one_call_a_batch(arts, calls):  # noqa: F811
    art, keys, values, firsts = _case(arts)
    cpu = KVTCCodec(art, coder="deflate")
    gpu = GpuCodec(art, "cpu", coder="deflate", nvcomp=True)
    host = GpuCodec(art, "cpu", coder="deflate", nvcomp=False)
    assert cpu.coder.name == gpu.coder.name == "deflate64k"
    tails = [0, 17]
    blob_g = gpu.encode_batch(keys, values, firsts, tails)
    blob_h = host.encode_batch(keys, values, firsts, tails)
    assert calls == [("encode", sum(len(entropy.read_piece_table(unpack_blob(b)[1],
                     sum(unpack_blob(b)[0].sections.values()))[1]) for b in blob_g))]  # fmt: skip
    assert calls[0][1] > 4  # several pieces a blob
    for g, h in zip(blob_g, blob_h):
        (hg, pg), (hh, ph) = unpack_blob(g), unpack_blob(h)
        assert hg.coder == hh.coder == "deflate64k" and hg.sections == hh.sections
        raw = sum(hg.sections.values())
        inflate = entropy.get_coder("deflate64k").decode
        assert inflate(pg, raw) == inflate(ph, raw)
    legacy = []  # older single-stream deflate blobs, as the CPU codec wrote them
    for i in range(2):
        b = KVTCCodec(art, coder="none").encode(keys[i], values[i], firsts[i], tails[i])
        header, payload = unpack_blob(b)
        h = dataclasses.replace(header, coder="deflate")
        legacy.append(pack_blob(h, DeflateCoder().encode(bytes(payload))))
    blob_c = [cpu.encode(keys[i], values[i], firsts[i], tails[i]) for i in range(2)]
    mixed = [blob_c[0], legacy[1], blob_g[0], legacy[0]]
    scale = keys.float().abs().max().item()
    for blobs in (blob_c, blob_g, legacy, mixed):
        del calls[:]
        dec = gpu.decode_batch(blobs, dtype=torch.float32)
        assert dec.count == len(blobs) and dec.error is None
        assert [c[0] for c in calls] == ["decode"]  # one nvCOMP call for the batch
        for b, blob in enumerate(blobs):
            ref = cpu.decode(blob, dtype=torch.float32)
            assert (dec.keys[b] - ref.keys).abs().max().item() < 2e-3 * scale
            assert (dec.values[b] - ref.values).abs().max().item() < 2e-3 * scale
    for b in range(2):  # GPU-written blobs decode on the CPU as host-written ones do
        a, r = cpu.decode(blob_g[b]), cpu.decode(blob_h[b])
        assert torch.equal(a.keys, r.keys) and torch.equal(a.values, r.values)


def test_pieces_of_a_batch_with_empty_payloads(calls):
    """``_deflate_pieces`` over payloads of 0, 1, SMALL - 1 .. SMALL + 1 and many pieces'
    bytes, one of them empty at each end: the CPU coder reads every payload."""
    gpu = object.__new__(GpuCodec)
    gpu._deflater = _standin(calls)
    rng = np.random.default_rng(0)
    lens = [0, 1, SMALL - 1, SMALL, SMALL + 1, 7 * SMALL + 3, 0]
    data = [bytes(rng.integers(0, 4, n, dtype=np.uint8)) for n in lens]
    coded = gpu._deflate_pieces(data)
    assert calls == [("encode", sum(-(-n // SMALL) for n in lens))]
    assert coded[0] == coded[-1] == b"\x00\x00\x00\x00"
    for c, d in zip(coded, data):
        assert entropy.get_coder("deflate64k").decode(c, len(d)) == d


@pytest.mark.parametrize("how", ["checksum", "truncated", "flipped", "table"])
@RANS_ONLY
def test_a_corrupt_payload_ends_the_prefix_as_on_the_cpu(arts, calls, how):  # noqa: F811
    art, keys, values, firsts = _case(arts)
    cpu = KVTCCodec(art, coder="deflate")
    gpu = GpuCodec(art, "cpu", coder="deflate", nvcomp=True)
    good = [cpu.encode(keys[i], values[i], firsts[i]) for i in range(2)]
    blobs = [good[0], altered(good[1], how), good[0]]
    want, want_err = cpu.decode_prefix(blobs, dtype=torch.float32)
    dec = gpu.decode_batch(blobs, dtype=torch.float32)
    assert dec.count == len(want) == 1
    assert isinstance(dec.error, BlobCorruptError) and isinstance(want_err, BlobCorruptError)
    if how != "flipped":  # the payload's checks (a flipped piece may inflate: rANS tells)
        assert str(dec.error) == str(want_err)
    if how == "checksum":
        assert str(dec.error) == PAYLOAD_CHECKSUM_MISMATCH


@RANS_ONLY
def test_host_fallback_when_nvcomp_fails(arts, calls, monkeypatch, caplog):  # noqa: F811
    art, keys, values, firsts = _case(arts)
    cpu = KVTCCodec(art, coder="deflate")
    gpu = GpuCodec(art, "cpu", coder="deflate", nvcomp=True)
    blobs = [cpu.encode(keys[i], values[i], firsts[i]) for i in range(2)]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated nvCOMP failure")

    monkeypatch.setattr(gpu._deflater, "decompress_spans", broken)
    dec = gpu.decode_batch(blobs, dtype=torch.float32)
    assert dec.count == 2 and dec.error is None
    assert "simulated nvCOMP failure" in caplog.text
    for b in range(2):
        ref = cpu.decode(blobs[b], dtype=torch.float32)
        assert (dec.keys[b] - ref.keys).abs().max().item() < 2e-3 * keys.abs().max().item()


@RANS_ONLY
def test_default_coder_per_blob_and_device_blobs_inflate_in_place(arts, calls):  # noqa: F811
    """With the default coder the GPU codec writes what the CPU codec writes: ``deflate64k``
    for the blob with exact tokens (``bfloat16-planes``), ``none`` for the one without.
    Given as device blobs (a GPU tier's), the ``deflate64k`` one is inflated by nvCOMP
    from its device copy: no blob byte crosses from the host, and the chunks decode as
    from host bytes."""
    art, keys, values, firsts = _case(arts)
    cpu = KVTCCodec(art)
    gpu = GpuCodec(art, "cpu", nvcomp=True)
    tails = [0, 17]
    firsts = [max(int(f), 4) for f in firsts]  # no sinks: only the tail is exact
    blob_g = gpu.encode_batch(keys, values, firsts, tails)
    blob_c = [cpu.encode(keys[i], values[i], firsts[i], tails[i]) for i in range(2)]
    for blobs in (blob_g, blob_c):
        coders = [unpack_blob(b)[0].coder for b in blobs]
        assert coders == ["none", "deflate64k"]
        assert unpack_blob(blobs[1])[0].exact_dtype == "bfloat16-planes"
    on_host = gpu.decode_batch(blob_g, dtype=torch.float32)
    device_blobs = [  # as GPUBackend.get_device hands them out
        DeviceBlob(torch.frombuffer(bytearray(b), dtype=torch.uint8), b[:HEAD_BYTES])
        for b in blob_g
    ]
    before = dict(gpu.transfers)
    del calls[:]
    on_device = gpu.decode_batch(device_blobs, dtype=torch.float32)
    moved = {x: gpu.transfers[x] - before[x] for x in before}
    assert on_device.count == 2 and on_device.error is None
    assert [c[0] for c in calls] == ["decode"]  # inflated by the (stand-in) nvCOMP
    assert moved["h2d_blob_bytes"] == 0 and moved["d2d_blob_bytes"] > 0
    assert torch.equal(on_device.keys[:2], on_host.keys[:2])
    assert torch.equal(on_device.values[:2], on_host.values[:2])
