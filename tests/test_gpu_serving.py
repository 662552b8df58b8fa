"""Decode into the caller's memory on the GPU codec (issue 21): the paged decode equals the
contiguous decode followed by a scatter, poisoned pages are fully written, encoding reads
the pages, and a GPU tier's hits decode with no host-to-device blob bytes (counted).

Marked ``gpu``: skipped without CUDA (``KVTC_GPU_TEST_DEVICE=cpu`` with
``TRITON_INTERPRET=1`` runs them in Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from kvtc_store.backends import GPUBackend, MemoryBackend
from kvtc_store.codec import ChunkBatch, ChunkKV, KVTCCodec
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import TieredStore
from tests.test_codec import D, H, L, arts, make_chunk  # noqa: F401 - artifact fixture
from tests.test_serving_path import PAGES, S, T, _scatter_reference, decode_three_ways

DEV = os.environ.get("KVTC_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
    # the GPU codec codes rANS artifacts only: the fixture's minmax case is never built
    pytest.mark.parametrize("arts", ["rans"], indirect=True),
]
triton = pytest.importorskip("triton")

from kvtc_store.codec.gpu import GpuCodec


def _art(arts):  # noqa: F811
    art = arts["all", 8.0]
    assert art.quantizer == "rans"
    return art


def _pages(dtype=torch.bfloat16):
    """vLLM-style per-layer caches ``(P, H, S, 2D)`` on the device, NaN-poisoned."""
    caches = [torch.full((PAGES, H, S, 2 * D), float("nan"), dtype=dtype, device=DEV)
              for _ in range(L)]  # fmt: skip
    return caches, [c[..., :D] for c in caches], [c[..., D:] for c in caches]


def _sequence(chunks: int, seed: int = 0):
    k, v = make_chunk(chunks * T, 0, seed=seed)
    return k.to(DEV, torch.bfloat16), v.to(DEV, torch.bfloat16)


def test_paged_decode_equals_contiguous_then_scatter(arts) -> None:  # noqa: F811
    gpu = GpuCodec(_art(arts), device=DEV)
    caches, kp, vp = _pages()
    blobs, dense, page_ids = decode_three_ways(gpu, *_sequence(3), (caches, kp, vp))
    used = page_ids.flatten().tolist()
    for layer in range(L):
        assert not caches[layer][used].isnan().any()  # every slot of every page written
        rest = sorted(set(range(PAGES)) - set(used))
        assert caches[layer][rest].isnan().all()  # and nothing else
    want, _, _ = _pages()
    _scatter_reference(want, page_ids, dense.keys, dense.values)
    for layer in range(L):
        assert torch.equal(caches[layer][used], want[layer][used])
    # the CPU reference decodes the same blobs into host pages within float tolerance
    ref_caches = [c.cpu() for c in _pages()[0]]
    KVTCCodec(gpu.artifact).decode_batch(
        blobs, ChunkKV.paged([c[..., :D] for c in ref_caches], [c[..., D:] for c in ref_caches],
                             page_ids))  # fmt: skip
    for layer in range(L):
        a, b = caches[layer][used].float().cpu(), ref_caches[layer][used].float()
        assert (a - b).abs().max() < 2e-2 * b.abs().max()


def test_host_pages_get_one_copy_from_the_device(arts) -> None:  # noqa: F811
    """Host pages (SGLang's pool) with a CUDA codec: decoded on the device, copied once."""
    gpu = GpuCodec(_art(arts), device=DEV)
    k, v = _sequence(2, seed=2)
    blobs = gpu.encode_sequence(k, v, chunk_tokens=T)
    host = [torch.full((PAGES, H, S, D), float("nan"), dtype=torch.bfloat16) for _ in range(2 * L)]
    page_ids = torch.tensor([[3, 1, 7, 2], [0, 9, 4, 11]])
    got = gpu.decode_batch(blobs, ChunkKV.paged(host[:L], host[L:], page_ids))
    dense = gpu.decode_batch(blobs)
    assert got.count == 2
    assert torch.equal(host[0][3, :, 0], dense.keys[0, 0, :, 0].cpu())
    assert torch.equal(host[L + 1][11, :, S - 1], dense.values[1, 1, :, T - 1].cpu())


def test_encoding_reads_the_pages(arts) -> None:  # noqa: F811
    gpu = GpuCodec(_art(arts), device=DEV)
    k, v = _sequence(2, seed=3)
    batch_k = k.unflatten(2, (2, T)).movedim(2, 0)
    batch_v = v.unflatten(2, (2, T)).movedim(2, 0)
    page_ids = torch.tensor([[5, 1, 9, 2], [0, 7, 3, 11]])
    _, kp, vp = _pages()
    dest = ChunkKV.paged(kp, vp, page_ids)
    dest.write(range(2), torch.arange(T), batch_k, batch_v)
    firsts, tails = [0, T], [0, 12]
    from_pages = gpu.encode_batch(ChunkBatch(dest, firsts, tails, ["a", "b"]))
    dense = gpu.encode_batch(ChunkBatch.of(batch_k, batch_v, firsts, tails, ["a", "b"]))
    assert from_pages == dense


def test_gpu_tier_hits_send_no_blob_bytes_from_the_host(arts) -> None:  # noqa: F811
    """A store over a GPU tier with the GPU codec: ``get(out=pages)`` decodes the tier's
    device blobs with zero host-to-device blob bytes (the codec's counters), a pinned
    CPU tier's with all of them, and both write the same pages."""
    art = _art(arts)
    k, v = _sequence(4, seed=4)
    tokens = torch.randint(0, 50_000, (4 * T,), generator=torch.Generator().manual_seed(5))
    ns = ChunkNamespace(art.model_fingerprint, "layout", tenant="t")
    results = {}
    for name, tier in (("gpu", GPUBackend(64 << 20, device=DEV)),
                       ("memory", MemoryBackend(64 << 20))):  # fmt: skip
        gpu = GpuCodec(art, device=DEV)
        if gpu._deflater is None:  # no nvCOMP: deflate64k blobs (those with exact tokens)
            # inflate on the host; their device path is tested with a stand-in nvCOMP in
            # test_gpu_deflate_flow.py, so here the exact tokens are stored as cached
            gpu = GpuCodec(art, device=DEV, exact_dtype="bfloat16")
        with TieredStore([tier], gpu, ns, chunk_tokens=T) as store:
            store.put(tokens, k, v)
            caches, kp, vp = _pages()
            before = dict(gpu.transfers)
            n = store.get(tokens, out=ChunkKV.paged(kp, vp, torch.arange(16).reshape(4, 4)))
            moved = {x: gpu.transfers[x] - before[x] for x in before}
            assert n == 4 * T
            results[name] = (caches, moved)
    (gpu_caches, gpu_moved), (mem_caches, mem_moved) = results["gpu"], results["memory"]
    assert gpu_moved["h2d_blob_bytes"] == 0 and gpu_moved["d2d_blob_bytes"] > 0
    assert mem_moved["h2d_blob_bytes"] == gpu_moved["d2d_blob_bytes"]
    for a, b in zip(gpu_caches, mem_caches):
        assert torch.equal(a[:16], b[:16])


def _store(art, tier=None) -> TieredStore:
    ns = ChunkNamespace(art.model_fingerprint, "layout", tenant="t")
    return TieredStore([tier or MemoryBackend(64 << 20)], GpuCodec(art, device=DEV), ns,
                       chunk_tokens=T)  # fmt: skip


def test_sglang_pages_decode_as_one_batch_and_copy_once(arts) -> None:  # noqa: F811
    """SGLang's batch_get path (:mod:`kvtc_store.connectors.sglang_host`) with the GPU
    codec: the chunks decode into flat pages on the device, equal to the store's own
    decode laid out page by page, and each lands in its (pinned) host page."""
    from kvtc_store.connectors.sglang_host import HostPageLayout, copy_pages, fetch_pages

    art = _art(arts)
    k, v = _sequence(3, seed=6)
    tokens = torch.randint(0, 50_000, (3 * T,), generator=torch.Generator().manual_seed(6))
    with _store(art) as store:
        store.put(tokens, k, v)
        want_k, want_v = store.get(tokens)
        both = torch.stack([want_k, want_v])  # (2, L, H, n, D)
        for name in ("layer_first", "page_first", "page_head"):
            layout = HostPageLayout(name, L, S, H, D, torch.bfloat16)
            pages = fetch_pages(store, layout, tokens, T)  # from the second chunk on
            assert pages.device == store.codec.device and pages.shape[0] == 2 * T // S
            for j in range(pages.shape[0]):
                s = T + j * S
                ref = layout.to_flat(both[:, :, :, s : s + S].permute(0, 1, 3, 2, 4))
                assert torch.equal(pages[j], ref)
            pin = torch.cuda.is_available()
            host = [torch.full((pages.shape[1],), float("nan"), dtype=torch.bfloat16,
                               pin_memory=pin) for _ in range(pages.shape[0])]  # fmt: skip
            copy_pages(list(pages), host)
            assert all(torch.equal(h, p.cpu()) for h, p in zip(host, pages))


def test_vllm_saves_copy_the_blocks_before_the_next_step_reuses_them(arts) -> None:  # noqa: F811
    """The vLLM worker's saves (:class:`~kvtc_store.connectors.vllm_save.PagedSaver`) on
    the KV's device: the hook returns before the encode; blocks overwritten by the next
    step's work (queued after the hook on the current stream) do not reach the store."""
    from kvtc_store.connectors.vllm_layout import PagedKVLayout
    from kvtc_store.connectors.vllm_save import PagedSaver, RequestPlan

    art = _art(arts)
    k, v = _sequence(4, seed=7)
    tokens = torch.randint(0, 50_000, (4 * T,), generator=torch.Generator().manual_seed(7))
    views = {f"model.layers.{i}.self_attn.attn": c for i, c in enumerate(_pages()[0])}
    layout = PagedKVLayout.from_views(views, "FLASH_ATTN", block_size=S, num_blocks=PAGES,
                                      num_kv_heads=H, head_size=D, head_size_v=D,
                                      dtype=torch.bfloat16)  # fmt: skip
    blocks = torch.randperm(PAGES, generator=torch.Generator().manual_seed(8))[:16].tolist()
    layout.scatter(blocks, k, v)
    with _store(art) as store, _store(art) as ref:
        saver = PagedSaver(store, layout, S)
        saver.save([RequestPlan("a", tokens.tolist(), blocks, save_end=4 * T),
                    RequestPlan("b", tokens.tolist(), blocks, save_end=0)])  # fmt: skip
        for view in layout.views:  # the next step reuses the blocks
            view.fill_(float("nan"))
        assert saver.wait(60) and not saver.pending()
        ref.put(tokens, k, v)
        got, want = store.get(tokens), ref.get(tokens)
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want))
        saver.close()


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "CPU_ATTN"])
def test_fused_gather_of_blocks_equals_one_copy_per_layer(arts, backend: str) -> None:  # noqa: F811
    """The save hook's gather in one Triton launch per kind (what keeps the hook's GIL
    retakes few) copies the same values as one ``index_select`` per layer and kind, for
    both meanings of vLLM's content dim; blocks outside the request are not read."""
    from kvtc_store.connectors.vllm_layout import PagedKVLayout

    g = torch.Generator().manual_seed(9)
    caches = [torch.randn((PAGES, H, S, 2 * D), generator=g).to(DEV, torch.bfloat16)
              for _ in range(L)]  # fmt: skip
    views = {f"model.layers.{i}.self_attn.attn": c for i, c in enumerate(caches)}
    layout = PagedKVLayout.from_views(views, backend, block_size=S, num_blocks=PAGES,
                                      num_kv_heads=H, head_size=D, head_size_v=D,
                                      dtype=torch.bfloat16)  # fmt: skip
    blocks = torch.randperm(PAGES, generator=g)[:5].tolist()
    fused = layout.gather(blocks, fused=True)
    each = layout.gather(blocks, fused=False)
    for a, b in zip(fused, each):
        assert a.shape == (L, H, 5 * S, D)
        assert torch.equal(a, b)
    keys, values = fused
    scatter_back = PagedKVLayout.from_views(
        {n: torch.zeros_like(c) for n, c in views.items()}, backend, block_size=S,
        num_blocks=PAGES, num_kv_heads=H, head_size=D, head_size_v=D, dtype=torch.bfloat16,
    )  # fmt: skip
    scatter_back.scatter(blocks, keys, values)
    for src, back in zip(caches, scatter_back.views):
        assert torch.equal(src[blocks], back[blocks])  # the round trip is exact
