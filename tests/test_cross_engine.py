"""One cache across engines, through both real connectors (issue 5): what vLLM's
``KVTCConnector`` saves, SGLang's ``KVTCHiCacheStorage`` finds and serves by SGLang's own
page hashes, and the other way round, through a disk tier the two share.

Each side is driven the way its own test file drives it, with that file's helpers:

- vLLM (tests/test_vllm_connector.py): its v1 ``Scheduler`` schedules the request, and
  the worker-side connector saves from / loads into KV views from vLLM's own
  ``allocate_kv_cache`` (``Engine``: CPU_ATTN backend, LBHNC, 16-token blocks).
- SGLang (tests/test_sglang_storage.py): the backend made by SGLang's
  ``StorageBackendFactory`` over a host pool laid out as ``MHATokenToKVPoolHost`` does,
  with SGLang's page hashes (``get_storage_hash_str``, 8-token pages) as its keys.

Each engine has its own config file and memory tier; only the disk tier is shared, so
every hit below is a read of the other engine's blobs. The model is the vLLM test's tiny
Llama (2 layers, 2 KV heads, head dim 32, its hand-made artifact: 16 exact tail tokens),
so what is served must equal the codec's round trip of the sequence as it was put.

Needs vllm and sglang in one environment (``.venv-vllm``, made by ``make
test-engines``); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-engines installs it)")
pytest.importorskip(
    "sglang.srt.mem_cache.hicache_storage",
    reason="sglang is not installed beside vllm (make test-engines installs it in .venv-vllm)",
)

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from .test_sglang_storage import HostPool, P, fill, make_backend, page_hashes, read

# model_config and model_dir are the vLLM test's fixtures (the tiny model's folder), used
# by name as arguments below (hence F401 here, F811 there).
from .test_vllm_connector import (  # noqa: F401
    CHUNK,
    DIM,
    Engine,
    model_config,
    model_dir,
    read_tokens,
    round_trip,
    source_kv,
)
from .tiny_llama import write_store_config

pytestmark = pytest.mark.usefixtures("one_thread")


def engine_configs(model_folder, tmp_path):
    """Store YAMLs of a vLLM and an SGLang replica: one artifact, own memory tiers, one
    shared disk tier."""
    shared = tmp_path / "shared-disk"
    artifact = model_folder / "codec"
    return (
        write_store_config(tmp_path / "vllm", disk=shared, artifact=artifact),
        write_store_config(tmp_path / "sglang", disk=shared, artifact=artifact),
    )


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_sglang_serves_the_chunks_vllm_saved(model_config, model_dir, tmp_path):  # noqa: F811
    vllm_yaml, sglang_yaml = engine_configs(model_dir, tmp_path)
    tokens = prompt(3 * CHUNK + 24, seed=11)  # 3 full chunks and 24 tokens (3 pages)

    engine = Engine(model_config, vllm_yaml)
    engine.add("a", tokens)
    _, meta, _ = engine.step()  # prefill: the forward writes, the worker saves
    assert [(p.req_id, p.save_end) for p in meta.requests] == [("a", 3 * CHUNK)]
    saver = engine.worker._store
    assert saver.flush(timeout=30)  # down to the shared disk tier

    n_pages = len(tokens) // P  # the full pages SGLang hashes: 15
    pool = HostPool("page_head", n_pages, dim=DIM)
    backend = make_backend(model_dir, sglang_yaml, pool)
    hashes = page_hashes(tokens)
    assert len(hashes) == n_pages
    assert backend.store.keys_for(tokens) == saver.keys_for(tokens)
    stored = 3 * CHUNK // P
    assert backend.batch_exists(hashes) == stored
    assert backend.batch_exists(hashes[stored:]) == 0

    pages = backend.batch_get(hashes, [pool.get_dummy_flat_data_page() for _ in hashes])
    assert [p is not None for p in pages] == [True] * stored + [False] * (n_pages - stored)
    slots = [P * j for j in range(stored)]
    for slot, page in zip(slots, pages):
        pool.set_from_flat_data_page(slot, page)
    got_k, got_v = read(pool, slots)
    want_k, want_v = round_trip(*source_kv(tokens[: 3 * CHUNK]))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(got_k, source_kv(tokens[: 3 * CHUNK])[0])  # the codec ran
    assert backend.store.stats.chunks_hit == {"disk": 3}  # vLLM's blobs, not a memory tier
    backend.close()


def test_vllm_loads_the_chunks_sglang_saved(model_config, model_dir, tmp_path):  # noqa: F811
    vllm_yaml, sglang_yaml = engine_configs(model_dir, tmp_path)
    tokens = prompt(3 * CHUNK + 16, seed=12)  # 3 full chunks and 2 pages
    keys, values = source_kv(tokens)

    n_pages = len(tokens) // P
    pool = HostPool("page_first", n_pages, dim=DIM)
    slots = [P * j for j in reversed(range(n_pages))]  # pages anywhere in the pool
    fill(pool, keys, values, slots)
    backend = make_backend(model_dir, sglang_yaml, pool)
    hashes = page_hashes(tokens)
    assert backend.batch_set(hashes, [pool.get_data_page(s) for s in slots]) is True
    assert backend.store.flush(timeout=30)

    engine = Engine(model_config, vllm_yaml)
    loader = engine.worker._store
    assert loader.keys_for(tokens) == backend.store.keys_for(tokens)
    engine.add("b", tokens, max_tokens=1)
    # vLLM's scheduler asked the connector: 3 chunks (the 2 staged pages were not stored),
    # loaded asynchronously in the first step, while the request waits for them
    so, meta, errors = engine.step()
    assert "b" not in so.num_scheduled_tokens and engine.recving == {"b"}
    (plan,) = meta.requests
    assert (plan.load_start, plan.load_end) == (0, 3 * CHUNK) and errors == set()
    so, meta, errors = engine.step()  # then it is scheduled past the loaded chunks
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 3 * CHUNK
    assert so.num_scheduled_tokens["b"] == len(tokens) - 3 * CHUNK

    blocks = engine.blocks["b"]
    got_k, got_v = read_tokens(engine.kv, CPUAttentionBackend, blocks, 0, 3 * CHUNK, Engine.BLOCK)
    want_k, want_v = round_trip(keys[:, :, : 3 * CHUNK], values[:, :, : 3 * CHUNK])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(got_k, keys[:, :, : 3 * CHUNK])  # the codec ran
    assert loader.stats.chunks_hit == {"disk": 3}  # SGLang's blobs, not a memory tier
    backend.close()
