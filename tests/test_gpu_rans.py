"""The rANS coder and the codec on CUDA (kvtc_store.codec.gpu): streams byte-identical
to the numpy reference, blobs that cross devices both ways, every output element written.

Skipped without CUDA and Triton (CI has neither); run on the lent H200 and recorded in
``benchmarks/results/gpu_codec.md``. Set ``KVTC_GPU_RANS_DATA`` to a folder holding
``artifact/`` (a saved SmolLM2 ``rans`` codec) and ``chunk.safetensors`` (``keys`` /
``values`` ``(30, 3, 256, 64)`` bf16 of real text at position 256) to add real KV.
``KVTC_GPU_TEST_DEVICE=cpu`` with ``TRITON_INTERPRET=1`` runs them in Triton's CPU
interpreter (slow; for developing the kernels without a GPU).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtc_store.codec import CodecArtifact, KVTCCodec, make_codec
from kvtc_store.codec.blob import pack_blob, unpack_blob
from kvtc_store.codec.entropy import get_coder, writer_coder
from kvtc_store.codec.rans import MAX_SHIFT, RansTables, laplace_tables
from kvtc_store.errors import BlobCorruptError
from tests.test_codec import RANS_ONLY, arts, make_chunk  # noqa: F401 - synthetic artifact fixture

DEV = os.environ.get("KVTC_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton", reason="needs CUDA (Triton comes with the CUDA torch)")

from kvtc_store.codec.gpu.codec_gpu import GpuCodec, _step_parts
from kvtc_store.codec.gpu.rans_triton import (
    DeviceTables,
    RansDecode,
    decode_symbols_gpu,
    decode_words_gpu,
    encode_symbols_gpu,
    upload_streams,
)
from kvtc_store.codec.gpu.staging import HostStaging

TABLES = laplace_tables()
COUNTS = [256, 1, 17, 0, 100, 64, 3, 255]  # tokens per chunk, a chunk of none included


def _random_case(n_comp: int, counts: list[int], interleave: int, seed: int):
    """Tables with every kind of component (shifts 0..MAX_SHIFT, narrow and wide classes)
    and symbols drawn near each component's own scale, plus outliers that escape."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(0, MAX_SHIFT + 1, n_comp)
    shift[rng.random(n_comp) < 0.5] = 0
    cls = rng.integers(0, TABLES.shape[1], n_comp)
    scale = np.exp(rng.uniform(np.log(0.05), np.log(4), n_comp)) * 2.0**shift
    q = np.round(rng.laplace(0, scale[:, None], (n_comp, sum(counts))))
    out = rng.random(q.shape) < 0.002
    q[out] = rng.integers(-32767, 32768, out.sum())
    q = np.clip(q, -32767, 32767).astype(np.int32)
    return q, RansTables(TABLES, shift, cls, interleave)


@pytest.mark.parametrize("interleave", [1, 2, 3, 4])
def test_streams_byte_identical_to_numpy(interleave):
    """Many chunks of different lengths, shifts, escapes: the GPU writes the reference's
    bytes from int32, int16 and token-major input and decodes the reference's streams."""
    q, ref = _random_case(203, COUNTS, interleave, seed=interleave)
    want = ref.encode(q, COUNTS)
    tables = DeviceTables.from_rans(ref, DEV)
    qd = torch.from_numpy(q).to(DEV)
    assert encode_symbols_gpu(qd, tables, COUNTS) == want
    assert encode_symbols_gpu(qd.to(torch.int16), tables, COUNTS) == want
    assert encode_symbols_gpu(qd.T.contiguous().T, tables, COUNTS) == want  # token-major
    assert encode_symbols_gpu(qd, tables, COUNTS, capacity=8) == want  # buffer overflows
    assert torch.equal(decode_symbols_gpu(want, tables, COUNTS).cpu(), torch.from_numpy(q))
    q16 = decode_symbols_gpu(want, tables, COUNTS, dtype=torch.int16)
    assert torch.equal(q16.cpu().int(), torch.from_numpy(q))


def test_a_large_batch_of_full_chunks():
    """More chunks than the H200 has multiprocessors, 256 tokens each, 4 lanes."""
    counts = [256] * 140
    q, ref = _random_case(61, counts, 4, seed=7)
    tables = DeviceTables.from_rans(ref, DEV)
    want = ref.encode(q, counts)
    assert encode_symbols_gpu(torch.from_numpy(q).to(DEV), tables, counts) == want
    assert torch.equal(decode_symbols_gpu(want, tables, counts).cpu(), torch.from_numpy(q))


def _alterations(stream: bytes, lanes: int):
    s = bytearray(stream)
    flip = bytearray(s)
    flip[4 * lanes + 10] ^= 0x5A  # a word
    low_state = bytearray(s)
    low_state[2:4] = b"\x00\x00"  # lane 0's state below 2**16
    return {
        "word": bytes(flip),
        "state": bytes(low_state),
        "short": bytes(s[:-2]),
        "long": bytes(s) + b"\x01\x00",
    }


def test_altered_streams_raise_where_numpy_does():
    counts = [40, 40]
    q, ref = _random_case(50, counts, 4, seed=11)
    tables = DeviceTables.from_rans(ref, DEV)
    good = ref.encode(q, counts)
    raised = 0
    for name, bad in _alterations(good[1], 40 * 4).items():
        streams = [good[0], bad]
        try:
            ref.decode(streams, counts)
            cpu_raises = False
        except BlobCorruptError:
            cpu_raises = True
        if cpu_raises:
            raised += 1
            with pytest.raises(BlobCorruptError):
                decode_symbols_gpu(streams, tables, counts)
        else:  # undetected on the CPU: the GPU decodes the same symbols
            want = ref.decode(streams, counts)
            got = decode_symbols_gpu(streams, tables, counts).cpu().numpy()
            assert np.array_equal(got, want), name
    assert raised >= 3


def test_decoder_writes_every_element():
    """Outputs poisoned with 0x7f7f7f7f (symbols) and NaN (dequantised, fp16 and
    float32, scattered through a column map into a token-major matrix)."""
    q, ref = _random_case(77, COUNTS, 3, seed=5)
    tables = DeviceTables.from_rans(ref, DEV)
    streams = ref.encode(q, COUNTS)
    words, base, end = upload_streams(streams, DEV)
    n, t = q.shape
    out = torch.full((n, t), 0x7F7F7F7F, dtype=torch.int32, device=DEV)
    assert decode_words_gpu(words, base, end, tables, COUNTS, out).all()
    assert torch.equal(out.cpu(), torch.from_numpy(q))
    steps = torch.rand(n, device=DEV) + 0.1
    perm = torch.randperm(n, device=DEV)
    qt = torch.from_numpy(q).to(DEV).float()
    for dtype in (torch.float16, torch.float32):
        tm = torch.full((t, n), float("nan"), dtype=dtype, device=DEV)  # token-major
        ok = decode_words_gpu(
            words, base, end, tables, COUNTS, tm.T, colmap=perm, steps=steps, bias=0.25
        )
        assert ok.all() and not tm.isnan().any()
        want = ((qt - torch.sign(qt) * 0.25) * steps[:, None]).to(dtype)
        assert torch.equal(tm.T[perm], want)


def test_decoder_in_ranges_of_steps_equals_one_launch():
    """The decoder queued in ranges of steps (the lanes' states kept on the device in
    between) writes what one launch writes, and flags the same corrupt stream; ranges
    out of order are refused."""
    counts = [40, 0, 17, 40]
    q, ref = _random_case(61, counts, 3, seed=8)
    tables = DeviceTables.from_rans(ref, DEV)
    streams = ref.encode(q, counts)
    streams[3] = streams[3][:-4] + bytes(4)  # corrupt: the last chunk ends wrong
    words, base, end = upload_streams(streams, DEV)
    lanes = np.asarray(counts) * 3
    col0 = np.concatenate([[0], np.cumsum(counts)[:-1]])
    meta = torch.as_tensor(np.stack([base, end, lanes, col0]).astype(np.int64), device=DEV)
    outs = []
    n = tables.n_steps
    for bounds in ([0, n], [0, 5, 5, 12, n, n]):  # empty ranges inside and at the end
        out = torch.full(q.shape, 0x7F7F7F7F, dtype=torch.int32, device=DEV)
        run = RansDecode(words, *meta, int(lanes.max()), tables, out)
        for a, b in itertools.pairwise(bounds):
            run.launch(a, b)
        outs.append((out.cpu(), run.status.cpu()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[1][1].tolist() == [0, 0, 0, 1]
    assert torch.equal(outs[1][0][:, :57], torch.from_numpy(q)[:, :57])  # the good chunks
    with pytest.raises(ValueError, match="steps"):
        run = RansDecode(words, *meta, int(lanes.max()), tables, out)
        run.launch(3, 5)


def test_step_parts_cover_each_group_once():
    """The decoder's step ranges and the projections each one completes: group-major
    plans cut into ranges (a group shared by two ranges accumulates in the second), a
    group no range codes projected once (zeros) so that its features are written, bounds
    on multiples of 8 components, and None for a plan that interleaves a group's rows."""
    # K rows 0-5 and V rows 8-13 coded (6, 7, 14, 15 uncoded), 4 lanes a token, 3 steps
    parts = _step_parts(list(range(6)) + list(range(8, 14)), [0, 8, 16], 4, 3, 4)
    assert parts == [(0, 2, [(0, 0, 6, False), (1, 0, 2, False)]), (2, 3, [(1, 2, 6, True)])]
    parts = _step_parts(list(range(16)), [0, 8, 16, 20], 4, 4, 4)  # group 2 codes nothing
    assert parts[0][2][0] == (2, 0, 4, False)
    assert [(a, b) for a, b, _ in parts] == [(0, 2), (2, 4)]
    assert _step_parts([0, 9, 1, 10, 2, 11, 3, 12], [0, 8, 16], 1, 8, 4) is not None
    shuffled = [0, 2, 4, 6, 8, 9, 10, 11, 1, 3, 5, 7, 12, 13, 14, 15]  # K: 0-6, then 1-7
    assert _step_parts(shuffled, [0, 8, 16], 1, 16, 2) is None
    assert _step_parts([], [0, 8], 4, 0, 4) is None


# -- real SmolLM2 KV and the whole codec ---------------------------------------------------


def _real():
    root = os.environ.get("KVTC_GPU_RANS_DATA")
    if not root:
        return None
    from safetensors.torch import load_file

    t = load_file(str(Path(root) / "chunk.safetensors"))
    return CodecArtifact.load(Path(root) / "artifact"), t["keys"], t["values"], 256


def test_real_chunk_streams_byte_identical():
    real = _real()
    if real is None:
        pytest.skip(
            "needs a CUDA GPU run with real SmolLM2 data: KVTC_GPU_RANS_DATA names the folder "
            "benchmarks/gpu_h200_run.sh writes (artifact/ and chunk.safetensors)"
        )
    art, k, v, first = real
    cpu = KVTCCodec(art)
    blobs = [cpu.encode(k, v, first), cpu.encode(k[:, :, :200], v[:, :, :200], first + 56)]
    streams, counts = [], []
    for blob in blobs:
        header, payload = unpack_blob(blob)
        streams.append(bytes(payload[: header.sections["stream"]]))
        counts.append(header.shape[3])
    q = cpu.rans_tables.decode(streams, counts)
    tables = DeviceTables.from_rans(cpu.rans_tables, DEV)
    got = decode_symbols_gpu(streams, tables, counts)
    assert np.array_equal(got.cpu().numpy(), q)
    assert encode_symbols_gpu(torch.from_numpy(q).to(DEV), tables, counts) == streams


def _codec_cases(arts):  # noqa: F811
    k, v = make_chunk(64, 300, seed=5)
    k2, v2 = make_chunk(64, 364, seed=6)
    cases = []
    for key in (("all", 8.0), ("layer", 4.0)):
        if arts[key].quantizer == "rans":
            cases.append((arts[key], torch.stack([k, k2]), torch.stack([v, v2]), [300, 364]))
    real = _real()
    if real is not None:
        art, k, v, first = real
        cases.append((art, torch.stack([k, k]), torch.stack([v, v]), [first, first + 256]))
    return cases


def _assert_batch_decodes_as_on_cpu(gpu, cpu, blobs, scale) -> None:
    """``gpu.decode_batch(blobs)`` decodes every blob, each within 2e-3 of ``scale`` (the
    chunk's largest magnitude) of what ``cpu.decode`` makes of it."""
    dec = gpu.decode_batch(blobs, dtype=torch.float32)
    assert dec.count == len(blobs) and dec.error is None
    for b, blob in enumerate(blobs):
        ref = cpu.decode(blob, dtype=torch.float32)
        assert (dec.keys[b].cpu() - ref.keys).abs().max().item() < 2e-3 * scale
        assert (dec.values[b].cpu() - ref.values).abs().max().item() < 2e-3 * scale


@pytest.mark.parametrize("gemm_dtype", [torch.float16, torch.float32])
@RANS_ONLY
def test_codec_blobs_cross_devices(arts, gemm_dtype):  # noqa: F811
    """GPU blobs decode on the CPU and CPU blobs on the GPU, with exact tails and sinks;
    the same blob decodes to the same values on both (float tolerance), and GPU-written
    blobs reconstruct the chunks as well as CPU-written ones."""
    cases = _codec_cases(arts)
    assert cases
    for art, keys, values, firsts in cases:
        cpu, gpu = KVTCCodec(art), GpuCodec(art, device=DEV, gemm_dtype=gemm_dtype)
        tails = [0, 17]
        blob_g = gpu.encode_batch(keys.to(DEV), values.to(DEV), firsts, tails)
        blob_c = [cpu.encode(keys[i], values[i], firsts[i], tails[i]) for i in range(2)]
        scale = keys.float().abs().max().item()
        for b in range(2):
            assert cpu.read_header(blob_g[b]).sections.keys() == {"stream", "exact"}
            ref = cpu.decode(blob_c[b])
            err_c = ((ref.keys.float() - keys[b].float()) ** 2).sum().item()
            err_g = ((cpu.decode(blob_g[b]).keys.float() - keys[b].float()) ** 2).sum().item()
            assert err_g < 1.05 * err_c + 1e-6
        assert len(gpu._parts) > 1  # these plans list each group's components in order
        for ranges in (False, True):  # the decoder in one launch, then in step ranges
            gpu.decode_ranges_min_tokens = 0 if ranges else 1 << 40
            for blobs in (blob_c, blob_g):
                _assert_batch_decodes_as_on_cpu(gpu, cpu, blobs, scale)


@pytest.mark.parametrize("ranges", [False, True])
@RANS_ONLY
def test_codec_decode_writes_every_element_and_stops_at_a_bad_stream(arts, ranges):  # noqa: F811
    """Poisoned outputs all written, exact tails in place, a bad stream ending the
    prefix; with the decoder in one launch and in ranges of steps (the projections of
    each range on a side stream behind it)."""
    cases = _codec_cases(arts)
    assert cases
    for art, keys, values, firsts in cases:
        gpu = GpuCodec(art, device=DEV)
        gpu.decode_ranges_min_tokens = 0 if ranges else 1 << 40
        assert len(gpu._parts) > 1
        blobs = gpu.encode_batch(keys.to(DEV), values.to(DEV), firsts, [0, 9])
        for dtype in (torch.bfloat16, torch.float32):
            out = tuple(torch.full(keys.shape, float("nan"), dtype=dtype, device=DEV)
                        for _ in range(2))  # fmt: skip
            dec = gpu.decode_batch(blobs, out=out)
            assert dec.keys is out[0] and not out[0].isnan().any() and not out[1].isnan().any()
            exact = keys[1, :, :, -9:].to(torch.bfloat16).to(dtype)
            assert torch.equal(out[0][1, :, :, -9:].cpu(), exact)
        header, payload = unpack_blob(blobs[1])
        bad = bytearray(payload)
        bad[2:4] = b"\x00\x00"  # a lane state below 2**16, checksum recomputed
        dec = gpu.decode_batch([blobs[0], pack_blob(header, bytes(bad))])
        assert dec.count == 1 and isinstance(dec.error, BlobCorruptError)


@pytest.mark.parametrize("coder", ["none", "deflate"])
@RANS_ONLY
def test_kvtc_codec_hands_sequences_to_the_batched_codec(arts, coder):  # noqa: F811
    """``make_codec(..., device=cuda)`` (the batched GpuCodec) encodes a stored sequence in
    batches (full chunks, then the short last one) and decodes a prefix batch by batch:
    blobs that the per-chunk CPU codec reads, values within float tolerance of its decode,
    and a bad blob ending the prefix there."""
    cases = [c for c in _codec_cases(arts) if any(c[0] is a for a in arts.values())]
    assert cases
    art = cases[0][0]
    keys, values = make_chunk(600, 0, seed=31)  # 2 full 256-token chunks + 88 tokens
    cpu = KVTCCodec(art, coder=coder)
    gpu = make_codec(art, coder=coder, device=DEV, batched=True)
    assert isinstance(gpu, GpuCodec) and not isinstance(cpu, GpuCodec)
    blobs = gpu.encode_sequence(keys.to(DEV), values.to(DEV), 0)
    ref = cpu.encode_sequence(keys, values, 0)
    heads = [(h.shape, h.coder) for h in map(cpu.read_header, blobs)]
    assert heads == [(h.shape, h.coder) for h in map(cpu.read_header, ref)]
    assert {c for _, c in heads} == {writer_coder(coder).name}  # deflate writes deflate64k
    scale = keys.abs().max().item()
    for got in (blobs, ref):
        chunks, error = gpu.decode_prefix(got, device="cpu", dtype=torch.float32)
        want, _ = cpu.decode_prefix(got, dtype=torch.float32)
        assert error is None and len(chunks) == 3
        for c, w in zip(chunks, want):
            assert c.first_position == w.first_position and c.keys.device.type == "cpu"
            assert (c.keys - w.keys).abs().max().item() < 2e-3 * scale
            assert (c.values - w.values).abs().max().item() < 2e-3 * scale
    header, payload = unpack_blob(blobs[1])
    blob_coder = get_coder(header.coder)
    bad = bytearray(blob_coder.decode(bytes(payload), sum(header.sections.values())))
    bad[2:4] = b"\x00\x00"  # a lane state below 2**16, coded again, checksum recomputed
    bad_blob = pack_blob(header, blob_coder.encode(bytes(bad)))
    chunks, error = gpu.decode_prefix([blobs[0], bad_blob, blobs[2]])
    assert len(chunks) == 1 and isinstance(error, BlobCorruptError)
    flip = bytearray(blobs[1])
    flip[-5] ^= 0x40  # payload altered, checksum not recomputed: the CPU decoder's error
    altered = [blobs[0], bytes(flip), blobs[2]]
    (chunks, error), (want, want_err) = gpu.decode_prefix(altered), cpu.decode_prefix(altered)
    assert len(chunks) == len(want) == 1 and str(error) == str(want_err)


@RANS_ONLY
def test_codec_prefix_and_errors_match_the_cpu_decoder(arts):  # noqa: F811
    """The batched decoder verifies payload checksums after queueing the device work; the
    prefix it returns and the error that ends it are still the CPU decoder's: an altered
    payload ends the prefix at its blob (before a later bad header), a foreign blob is a
    CodecMismatchError unless its payload is altered too (the checksum comes first), a
    bad first blob decodes nothing (``out`` untouched), and the pinned staging buffer is
    reused, not regrown, by a second call of the same size."""
    cases = [c for c in _codec_cases(arts) if any(c[0] is a for a in arts.values())]
    assert cases
    art, keys, values, firsts = cases[0]
    other = next(a for a in arts.values() if a.artifact_id != art.artifact_id)
    cpu, gpu = KVTCCodec(art), GpuCodec(art, device=DEV)
    good = [cpu.encode(keys[i], values[i], firsts[i] + 64 * i, 5 * i) for i in range(2)]
    good.append(cpu.encode(keys[0], values[0], 0))  # sink tokens stored exactly
    flip = bytearray(good[1])
    flip[-7] ^= 0x21  # payload byte: checksum no longer matches
    bad_sum = bytes(flip)
    flip = bytearray(good[2])
    flip[20] ^= 0x01  # header byte: header checksum fails
    bad_head = bytes(flip)
    foreign = KVTCCodec(other).encode(keys[0], values[0], 4096)
    flip = bytearray(foreign)
    flip[-3] ^= 0x10
    foreign_bad = bytes(flip)
    cases = {
        "good": good,
        "checksum": [good[0], bad_sum, good[2]],
        "checksum before header": [good[0], bad_sum, bad_head],
        "foreign": [good[0], foreign],
        "foreign, altered": [good[0], foreign_bad, good[2]],
        "bad first": [bad_head, good[0]],
    }
    scale = keys.float().abs().max().item()
    for name, blobs in cases.items():
        want, want_err = cpu.decode_prefix(blobs, dtype=torch.float32)
        out = tuple(torch.full((len(blobs), *keys.shape[1:]), float("nan"), device=DEV)
                    for _ in range(2))  # fmt: skip
        dec = gpu.decode_batch(blobs, out=out)
        assert dec.count == len(want), name
        assert type(dec.error) is type(want_err) and str(dec.error) == str(want_err), name
        for b, w in enumerate(want):
            assert dec.first_positions[b] == w.first_position
            assert (out[0][b].cpu() - w.keys).abs().max().item() < 2e-3 * scale, name
            assert (out[1][b].cpu() - w.values).abs().max().item() < 2e-3 * scale, name
        if not want:
            assert out[0].isnan().all() and out[1].isnan().all(), name
    capacity = gpu._staging.capacity
    assert capacity > 0
    gpu.decode_batch(good)
    assert gpu._staging.capacity == capacity


@pytest.mark.skipif(DEV != "cuda", reason="page-locked host memory needs CUDA")
@RANS_ONLY
def test_pinned_memory_tier_is_read_by_dma(arts, monkeypatch):  # noqa: F811
    """A pinned CPU tier keeps blobs page-locked and returns read-only views of them; the
    GPU decoder copies those to the device directly (its staging buffer takes only the
    small offset table, and the pageable blobs of a mixed batch) and decodes them to
    what it makes of the same bytes; an evicted blob's view stays readable while held."""
    from kvtc_store.backends import MemoryBackend

    cases = _codec_cases(arts)
    assert cases
    art, keys, values, firsts = cases[0]
    cpu = KVTCCodec(art)
    blobs = [cpu.encode(keys[i], values[i], firsts[i]) for i in range(2)]
    blobs.append(cpu.encode(keys[0], values[0], firsts[0] + 2048, 7))
    names = [f"{i:064x}" for i in range(len(blobs))]
    tier = MemoryBackend(sum(map(len, blobs)), pinned=True)
    tier.put(list(zip(names, blobs)))
    got = tier.get(names)
    assert all(isinstance(g, memoryview) and g.readonly for g in got)
    assert [bytes(g) for g in got] == blobs
    want = GpuCodec(art, device=DEV).decode_batch(blobs)
    calls = []  # which parts go straight to the device (the real method, observed)
    direct = HostStaging._upload_direct

    def observed(self, page_locked, rest, nbytes):
        calls.append((len(page_locked), len(rest)))
        return direct(self, page_locked, rest, nbytes)

    monkeypatch.setattr(HostStaging, "_upload_direct", observed)
    dec = GpuCodec(art, device=DEV).decode_batch(got)
    assert dec.count == len(blobs) and dec.error is None
    assert torch.equal(dec.keys, want.keys) and torch.equal(dec.values, want.values)
    assert calls == [(len(blobs), 1)]  # every payload by DMA, the offset table staged
    mixed = [got[0], blobs[1], got[2]]  # a prefix partly from a pageable tier
    dec = GpuCodec(art, device=DEV).decode_batch(mixed)
    assert dec.count == len(blobs) and dec.error is None
    assert torch.equal(dec.keys, want.keys) and torch.equal(dec.values, want.values)
    assert calls[-1] == (2, 2)
    held = got[0]
    tier.put([("ff" * 32, blobs[1])])  # over the cap: the least recently used goes
    assert tier.get([names[0]]) == [None] and bytes(held) == blobs[0]


def test_host_staging_places_every_part(monkeypatch):
    """Parts of many sizes (below, at and above a piece), gaps between them, through the
    threaded path in slices and the single-thread path: each lands at its offset."""
    from kvtc_store.codec.gpu import staging

    rng = np.random.default_rng(3)
    for workers, piece in ((3, 4096), (1, 1 << 20)):
        monkeypatch.setattr(staging, "host_workers", lambda w=workers: w)
        monkeypatch.setattr(staging, "PIECE", piece)
        monkeypatch.setattr(staging, "POOL_MIN", 0)
        monkeypatch.setattr(staging, "SLICE_MIN", 0)
        st = staging.HostStaging(DEV)
        for _ in range(3):
            parts, off = [], 0
            for size in rng.integers(0, 3 * piece, 40):
                off += int(rng.integers(0, 9))
                data = rng.integers(0, 256, int(size), dtype=np.uint8)
                parts.append((off, data.tobytes() if size % 2 else memoryview(data)))
                off += int(size)
            got = st.upload(parts, off + 5).cpu().numpy()
            for o, data in parts:
                assert np.array_equal(got[o : o + len(data)], np.frombuffer(data, np.uint8))
        with pytest.raises(ValueError):
            st.upload([(4, b"abc")], 6)


def test_host_download_lends_the_bytes_and_grows():
    """The encoder's streams come back through one kept buffer: any dtype's bytes, larger
    downloads grow it, smaller ones reuse it, and one borrower at a time."""
    from kvtc_store.codec.gpu.staging import HostDownload

    dl = HostDownload(DEV)
    rng = np.random.default_rng(5)
    most = 0
    for n in (1000, 3 << 20, 17, 0):
        data = torch.from_numpy(rng.integers(-(2**15), 2**15, n, dtype=np.int16)).to(DEV)
        with dl.download(data) as host:
            assert host.dtype == np.uint8 and host.nbytes == 2 * n
            assert host.tobytes() == data.cpu().numpy().tobytes()
        most = max(most, 2 * n)
        assert dl.capacity >= most
    with dl.download(torch.ones(4, dtype=torch.int16, device=DEV)):
        assert not dl._lock.acquire(blocking=False)  # lent out: a second borrower waits
    assert dl._lock.acquire(blocking=False)
    dl._lock.release()
