"""Decode into the caller's memory (issue 21), on the CPU reference codec: a batch decoded
into an engine's pages equals the contiguous decode followed by a scatter; encoding reads
the pages the same way; the store's get writes straight into pages."""

from __future__ import annotations

import pytest
import torch

from kvtc_store.backends import MemoryBackend
from kvtc_store.codec import ChunkBatch, ChunkKV, Codec, KVTCCodec, default_groups, fit_artifacts
from kvtc_store.codec.format import ChunkBinding, pack_blob, unpack_blob
from kvtc_store.errors import BlobCorruptError, BlobMisfiledError
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import TieredStore
from tests.test_codec import FP, HOLDOUT, WINDOW, D, H, L, _stats, make_chunk

pytestmark = pytest.mark.usefixtures("one_thread")

T = 32  # tokens per chunk
S = 8  # token slots per page
PAGES = 24


@pytest.fixture(scope="module")
def codec() -> KVTCCodec:
    (art,) = fit_artifacts(_stats(default_groups(L)), [8.0], FP, "synthetic",
                           holdout=[HOLDOUT], block=8, window=WINDOW,
                           calibration={"data_hash": "abc"}, quantizer="rans")  # fmt: skip
    return KVTCCodec(art)


def _sequence(chunks: int, seed: int = 0):
    k, v = make_chunk(chunks * T, 0, seed=seed)
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def _engine_pages(dtype=torch.bfloat16):
    """vLLM-style per-layer caches ``(P, H, S, 2D)`` (K then V on the last dim; separate
    allocations per layer), poisoned with NaN, and their K and V page views."""
    caches = [torch.full((PAGES, H, S, 2 * D), float("nan"), dtype=dtype) for _ in range(L)]
    return caches, [c[..., :D] for c in caches], [c[..., D:] for c in caches]


def _scatter_reference(caches, page_ids, keys, values):
    """The old path's scatter: contiguous ``(B, L, H, T, D)`` into the pages."""
    for b in range(keys.shape[0]):
        for t in range(T):
            page, slot = int(page_ids[b, t // S]), t % S
            for layer in range(L):
                caches[layer][page, :, slot, :D] = keys[b, layer, :, t]
                caches[layer][page, :, slot, D:] = values[b, layer, :, t]


def test_the_reference_follows_the_protocol(codec) -> None:
    assert isinstance(codec, Codec)


def decode_three_ways(codec, keys, values, pages):
    """Encode 3 chunks, decode them contiguously and into ``pages`` (``(caches, key
    pages, value pages)``) at random pages; checks both decoded all. Returns the blobs,
    the dense batch and the page ids."""
    blobs = codec.encode_sequence(keys, values, chunk_tokens=T)
    dense = codec.decode_batch(blobs)
    assert dense.count == 3 and dense.error is None
    page_ids = torch.randperm(PAGES, generator=torch.Generator().manual_seed(0))[:12]
    page_ids = page_ids.reshape(3, T // S)
    _, kp, vp = pages
    got = codec.decode_batch(blobs, ChunkKV.paged(kp, vp, page_ids))
    assert got.count == 3 and got.error is None and got.first_positions == [0, T, 2 * T]
    return blobs, dense, page_ids


def test_paged_decode_equals_contiguous_decode_then_scatter(codec) -> None:
    caches, kp, vp = _engine_pages()
    _, dense, page_ids = decode_three_ways(codec, *_sequence(3), (caches, kp, vp))
    want, _, _ = _engine_pages()
    _scatter_reference(want, page_ids, dense.keys, dense.values)
    for layer in range(L):  # equal where written, NaN (untouched) elsewhere
        assert torch.equal(caches[layer].isnan(), want[layer].isnan())
        assert torch.equal(caches[layer].nan_to_num(), want[layer].nan_to_num())
    used = set(page_ids.flatten().tolist())
    for layer in range(L):
        assert not caches[layer][sorted(used)].isnan().any()  # every slot of every page
        rest = sorted(set(range(PAGES)) - used)
        assert caches[layer][rest].isnan().all()


def test_encoding_reads_the_pages(codec) -> None:
    """Blobs encoded from pages are the bytes encoded from the contiguous chunks."""
    k, v = _sequence(2, seed=3)
    batch_k = k.unflatten(2, (2, T)).movedim(2, 0)
    batch_v = v.unflatten(2, (2, T)).movedim(2, 0)
    page_ids = torch.tensor([[5, 1, 9, 2], [0, 7, 3, 11]])
    caches, kp, vp = _engine_pages()
    _scatter_reference(caches, page_ids, batch_k, batch_v)
    firsts, tails = [0, T], [0, 12]
    from_pages = codec.encode_batch(
        ChunkBatch(ChunkKV.paged(kp, vp, page_ids), firsts, tails, ["a", "b"])
    )
    dense = codec.encode_batch(ChunkBatch.of(batch_k, batch_v, firsts, tails, ["a", "b"]))
    assert from_pages == dense


def test_a_bad_blob_ends_the_prefix_in_the_pages(codec) -> None:
    """Chunks after a corrupt blob are not written; the error names it; a blob bound to
    another chunk ends the prefix as misfiled."""
    k, v = _sequence(3, seed=5)
    blobs = codec.encode_sequence(k, v, chunk_tokens=T, chunk_keys=["k0", "k1", "k2"])
    header, payload = unpack_blob(blobs[1])
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0xFF
    page_ids = torch.arange(12).reshape(3, T // S)
    caches, kp, vp = _engine_pages()
    damaged = pack_blob(header, bytes(payload))  # the header's checksum of the intact one
    damaged = damaged[: len(damaged) - len(bad)] + bytes(bad)
    got = codec.decode_batch([blobs[0], damaged, blobs[2]], ChunkKV.paged(kp, vp, page_ids))
    assert got.count == 1 and isinstance(got.error, BlobCorruptError)
    for layer in range(L):
        assert not caches[layer][0:4].isnan().any()
        assert caches[layer][4:].isnan().all()
    expect = [ChunkBinding("k0", 0, T), ChunkBinding("kX", T, T), ChunkBinding("k2", 2 * T, T)]
    _, kp2, vp2 = _engine_pages()
    got = codec.decode_batch(blobs, ChunkKV.paged(kp2, vp2, page_ids), expect=expect)
    assert got.count == 1 and isinstance(got.error, BlobMisfiledError)


def test_a_destination_that_does_not_fit_is_refused(codec) -> None:
    k, v = _sequence(2)
    blobs = codec.encode_sequence(k, v, chunk_tokens=T)
    _, kp, vp = _engine_pages()
    with pytest.raises(ValueError, match="does not fit"):
        codec.decode_batch(blobs, ChunkKV.paged(kp, vp, torch.arange(4).reshape(1, 4)))
    with pytest.raises(ValueError, match="page ids outside"):
        ChunkKV.paged(kp, vp, torch.tensor([[0, 1, 2, PAGES]]))


def test_store_get_writes_into_pages(codec) -> None:
    """``TieredStore.get(out=pages)`` writes the cached prefix straight into the pages,
    equal to ``get()`` followed by a scatter, and reports the tokens written."""
    k, v = _sequence(4, seed=7)
    tokens = torch.randint(0, 50_000, (4 * T,), generator=torch.Generator().manual_seed(1))
    ns = ChunkNamespace(codec.artifact.model_fingerprint, "layout", tenant="t")
    with TieredStore([MemoryBackend(64 << 20)], codec, ns, chunk_tokens=T) as store:
        store.put(tokens, k, v)
        ref_k, ref_v = store.get(tokens)
        page_ids = torch.randperm(PAGES, generator=torch.Generator().manual_seed(2))[:16]
        page_ids = page_ids.reshape(4, T // S)
        caches, kp, vp = _engine_pages()
        n = store.get(tokens, out=ChunkKV.paged(kp, vp, page_ids))
        assert n == 4 * T
        want, _, _ = _engine_pages()
        as_batch = [x.unflatten(2, (4, T)).movedim(2, 0) for x in (ref_k, ref_v)]
        _scatter_reference(want, page_ids, *as_batch)
        for layer in range(L):
            assert torch.equal(caches[layer].nan_to_num(), want[layer].nan_to_num())
        # from chunk 2 on, into a destination of 2 chunks: the chunks [2, 4)
        _, kp2, vp2 = _engine_pages()
        n = store.get(tokens, start=2 * T, out=ChunkKV.paged(kp2, vp2, page_ids[:2]))
        assert n == 2 * T
        assert torch.equal(kp2[0][page_ids[0, 0], :, 0], as_batch[0][2, 0, :, 0])
        assert store.get(torch.zeros(4 * T, dtype=torch.long), out=ChunkKV.paged(
            kp2, vp2, page_ids[:2])) == 0  # fmt: skip


class _DeviceBlobCodec(KVTCCodec):
    """The reference codec asking for a GPU tier's blobs in device memory, as the GPU
    codec does (on the CPU the "device" is host memory: the tier's tensors)."""

    takes_device_blobs = True


def test_a_gpu_tier_hands_out_device_blobs(codec) -> None:
    """The GPU tier's ``get_device`` returns its own tensors with a host copy of the
    head; a codec that takes device blobs gets them from ``get`` unchanged (the store
    asks for them), and they decode to the same KV as the bytes."""
    from kvtc_store.backends import DeviceBlob, GPUBackend
    from kvtc_store.codec.format import is_device_blob, unpack_blob_header

    k, v = _sequence(3, seed=11)
    tokens = torch.randint(0, 50_000, (3 * T,), generator=torch.Generator().manual_seed(4))
    ns = ChunkNamespace(codec.artifact.model_fingerprint, "layout", tenant="t")
    dev_codec = _DeviceBlobCodec(codec.artifact)
    tier = GPUBackend(64 << 20, device="cpu")
    with TieredStore([tier, MemoryBackend(64 << 20)], dev_codec, ns, chunk_tokens=T) as store:
        store.put(tokens, k, v)
        keys = store.keys_for(tokens)
        held = tier.get_device(keys)
        assert all(isinstance(b, DeviceBlob) and is_device_blob(b) for b in held)
        as_bytes = tier.get(keys)
        assert [bytes(b) for b in held] == as_bytes
        for b, raw in zip(held, as_bytes):
            assert unpack_blob_header(b)[0] == unpack_blob_header(raw)[0]
        short = DeviceBlob(held[0].data, held[0].head[:20])  # header read from the device
        assert unpack_blob_header(short)[0] == unpack_blob_header(as_bytes[0])[0]
        fetched, sources, _ = store._fetch(keys, device_blobs=True)
        assert all(is_device_blob(b) for b in fetched) and set(sources) == {"gpu"}
        _, kp, vp = _engine_pages()
        page_ids = torch.arange(12).reshape(3, T // S)
        assert store.get(tokens, out=ChunkKV.paged(kp, vp, page_ids)) == 3 * T
        ref_k, _ = store.get(tokens)
        assert torch.equal(kp[1][page_ids[2, 1], :, 3], ref_k[1, :, 2 * T + S + 3])


def test_get_batch_loads_several_requests_in_one_decode(codec) -> None:
    """``get_batch``: two requests' prefixes decoded together into their pages; a corrupt
    chunk of one ends only that request's run (dropped from the tier, counted missed)."""
    from kvtc_store.store import Load

    k, v = _sequence(3, seed=13)
    g = torch.Generator().manual_seed(6)
    tok_a, tok_b = (torch.randint(0, 50_000, (3 * T,), generator=g) for _ in range(2))
    ns = ChunkNamespace(codec.artifact.model_fingerprint, "layout", tenant="t")
    tier = MemoryBackend(64 << 20)
    with TieredStore([tier], codec, ns, chunk_tokens=T) as store:
        store.put(tok_a, k, v)
        store.put(tok_b, k, v)
        ref_k, _ = store.get(tok_a)
        key = store.keys_for(tok_b)[1]
        blob = bytearray(tier.get([key])[0])
        blob[-5] ^= 0xFF
        tier.delete([key])
        tier.put([(key, bytes(blob))])
        _, kp, vp = _engine_pages()
        page_ids = torch.randperm(PAGES, generator=g)[:20].reshape(5, T // S)
        dest = ChunkKV.paged(kp, vp, page_ids)
        calls = []
        decode = store.codec.decode_batch
        store.codec.decode_batch = lambda *a, **kw: calls.append(1) or decode(*a, **kw)
        try:
            got = store.get_batch([Load(tok_b, at=0, n_tokens=2 * T), Load(tok_a, at=2)], dest)
        finally:
            del store.codec.decode_batch
        assert got == [T, 3 * T]
        assert len(calls) == 2  # one batch, and the rest of it after the corrupt chunk
        assert store.stats.corrupt_dropped == 1 and tier.get([key]) == [None]
        ref = ref_k.unflatten(2, (3, T)).movedim(2, 0)
        for c, want in ((0, 0), (2, 0), (3, 1), (4, 2)):  # b's first chunk, a's three
            for t in (0, T - 1):
                page, slot = int(page_ids[c, t // S]), t % S
                assert torch.equal(kp[1][page, :, slot], ref[want, 1, :, t])
        assert kp[0][int(page_ids[1, 0])].isnan().all()  # b's chunk 1: not written


def test_an_engine_is_told_once_when_its_codec_runs_on_the_cpu(codec, monkeypatch, caplog) -> None:
    """With CUDA present and the CPU reference codec, the engine connectors' check logs
    one line and sets ``kvtc_codec_on_cpu``; without CUDA it stays 0. (CUDA's presence
    is faked: this machine has none.)"""
    from kvtc_store.connectors.engine import warn_if_codec_on_cpu

    ns = ChunkNamespace(codec.artifact.model_fingerprint, "layout", tenant="t")
    with TieredStore([MemoryBackend(1 << 20)], codec, ns, chunk_tokens=T) as store:
        gauge = store.metrics.registry.get_sample_value
        assert warn_if_codec_on_cpu(store, "SGLang") is torch.cuda.is_available()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with caplog.at_level("WARNING"):
            assert warn_if_codec_on_cpu(store, "SGLang")
            assert warn_if_codec_on_cpu(store, "SGLang")
        said = [r for r in caplog.records if "CPU reference codec" in r.getMessage()]
        assert len(said) == 1 and "SGLang" in said[0].getMessage()
        assert gauge("kvtc_codec_on_cpu") == 1.0
