"""The SGLang connector through SGLang's own storage API (sglang 0.5.23).

The backend is made the way SGLang makes it: ``StorageBackendFactory.create_backend(
"dynamic", HiCacheStorageConfig(...), host_pool)`` imports the class named in the extra
config, then ``register_mem_pool_host`` hands it the host pool. Page keys are SGLang's
own page hashes (``sglang.srt.mem_cache.utils.get_storage_hash_str``, as the cache
controller computes them), the KV a page holds is checked against the codec's round
trip, and hits are counted the way SGLang's ``batch_exists`` defines (consecutive from
the first key).

The host pool: SGLang's ``MHATokenToKVPoolHost`` cannot be imported here (its package
imports torchvision, whose only wheels on this machine are CUDA builds that do not load
beside the CPU torch), so :class:`HostPool` lays out its buffer exactly as that class
does for each layout (``pool_host/mha.py``: ``init_kv_buffer``, ``get_data_page``,
``set_from_flat_data_page``, ``get_dummy_flat_data_page``), and writes and reads
tokens by its own indexing (the role of SGLang's device<->host copies), so the layouts
are checked independently of the connector's conversion.

Skipped without sglang (run by ``make test-engines`` in ``.venv-sglang``).
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch

hicache = pytest.importorskip(
    "sglang.srt.mem_cache.hicache_storage", reason="sglang not installed (make test-engines)"
)

from sglang.srt.mem_cache import utils as sglang_utils
from sglang.srt.mem_cache.storage import StorageBackendFactory

from kvtc_store.connectors.engine import open_engine_store, request_salt
from kvtc_store.connectors.sglang import KVTCHiCacheStorage
from kvtc_store.connectors.sglang_pages import PAGE_TOKENS, namespace_salt
from kvtc_store.errors import ConfigError

from .tiny_llama import (
    CHUNK,
    DIM,
    HEADS,
    LAYERS,
    promote,
    publish_two_versions,
    round_trip,
    tiny_llama_config,
    write_store_config,
)

P = 8  # SGLang's page size here: 4 pages per chunk
LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]


class HostPool:
    """SGLang 0.5.23's MHA host pool buffer for one layout (see the module docstring).

    ``kv_buffer`` dims: layer_first ``(2, L, size, H, D)``; page_first ``(2, size, L,
    H, D)``; page_first_direct ``(2, pages, L, P, H, D)``; page_head ``(2, pages, H,
    P, L, D)``. ``index`` arguments are token slots (a page starts at a multiple of P).
    """

    def __init__(
        self, layout: str, pages: int, page_size: int = P, heads: int = HEADS, dim: int = DIM
    ):
        self.layout, self.page_size = layout, page_size
        self.layer_num, self.head_num, self.head_dim, self.v_head_dim = LAYERS, heads, dim, dim
        self.dtype = torch.bfloat16
        L, H, D, S = LAYERS, heads, dim, pages * page_size
        dims = {
            "layer_first": (2, L, S, H, D),
            "page_first": (2, S, L, H, D),
            "page_first_direct": (2, pages, L, page_size, H, D),
            "page_head": (2, pages, H, page_size, L, D),
            "page_unified": (2, S, L, H, D),  # a layout the connector must refuse
        }[layout]
        self.kv_buffer = torch.zeros(dims, dtype=self.dtype)

    # SGLang's page accessors, as pool_host/mha.py defines them.
    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index : index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index : index + self.page_size]
        else:
            page = self.kv_buffer[:, index // self.page_size : index // self.page_size + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        shape = (2, self.layer_num, self.page_size, self.head_num, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        target = self.get_data_page(index, flat=False)
        target.copy_(data_page.reshape(target.shape))

    # Token-level access, independent of the page accessors above.
    def _token_view(self, kind: int, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A view of one page's tokens and the permutation from ``(L, H, P, D)``."""
        b, page = self.kv_buffer[kind], index // self.page_size
        if self.layout == "layer_first":
            return b[:, index : index + self.page_size], (0, 2, 1, 3)  # (L, P, H, D)
        if self.layout == "page_first":
            return b[index : index + self.page_size], (2, 0, 1, 3)  # (P, L, H, D)
        if self.layout == "page_first_direct":
            return b[page], (0, 2, 1, 3)  # (L, P, H, D)
        return b[page], (1, 2, 0, 3)  # page_head: (H, P, L, D)

    def write_tokens(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one page of KV, ``(L, H, P, D)`` each, at token slot ``index``."""
        for kind, x in enumerate((keys, values)):
            view, perm = self._token_view(kind, index)
            view.copy_(x.permute(perm))

    def read_tokens(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The page at token slot ``index`` as ``(L, H, P, D)`` keys and values."""
        out = []
        for kind in (0, 1):
            view, perm = self._token_view(kind, index)
            inverse = [perm.index(i) for i in range(4)]
            out.append(view.permute(inverse).clone())
        return out[0], out[1]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    tiny_llama_config().save_pretrained(path)
    return path


@pytest.fixture
def store_yaml(tmp_path):
    return write_store_config(tmp_path / "kvtc")


def storage_config(model_dir, store_yaml, tp_size: int = 1, layout: str = "layer_first", **extra):
    return hicache.HiCacheStorageConfig(
        tp_rank=0,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=layout == "page_first",
        model_name=str(model_dir),
        extra_config={
            "backend_name": "kvtc",
            "module_path": "kvtc_store.connectors.sglang",
            "class_name": "KVTCHiCacheStorage",
            "config": str(store_yaml),
            **extra,
        },
    )


def make_backend(model_dir, store_yaml, pool: HostPool, **extra) -> KVTCHiCacheStorage:
    """As SGLang's cache controller does in attach_storage_backend."""
    cfg = storage_config(model_dir, store_yaml, layout=pool.layout, **extra)
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    assert isinstance(backend, KVTCHiCacheStorage)
    assert isinstance(backend, hicache.HiCacheStorage)
    return backend


def sequence(n_tokens: int, seed: int = 0):
    """Token ids (a list, as SGLang holds them) and bf16 KV ``(L, H, n, D)``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (n_tokens,), generator=g).tolist()
    kv = torch.randn(2, LAYERS, HEADS, n_tokens, DIM, generator=g).to(torch.bfloat16)
    return tokens, kv[0], kv[1]


def page_hashes(tokens: list[int]) -> list[str]:
    """SGLang's keys for the pages of ``tokens``, computed as its controller does."""
    return sglang_utils.get_storage_hash_str(tokens, None, page_size=P)


def fill(pool: HostPool, keys, values, slots: list[int]) -> torch.Tensor:
    """Write page ``j`` of the KV at token slot ``slots[j]``; SGLang's host indices
    (one per token) for those pages."""
    for j, slot in enumerate(slots):
        pool.write_tokens(slot, keys[:, :, j * P : (j + 1) * P], values[:, :, j * P : (j + 1) * P])
    return torch.cat([torch.arange(s, s + P) for s in slots])


def read(pool: HostPool, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pages = [pool.read_tokens(s) for s in slots]
    return torch.cat([k for k, _ in pages], 2), torch.cat([v for _, v in pages], 2)


def prepared(model_dir, store_yaml, layout: str, n_pages: int, **extra):
    """A sequence of ``n_pages`` pages in a host pool (page ``j`` at slot ``j * P``),
    the backend over that pool, SGLang's page hashes and the pages as SGLang's generic
    API hands them over (attributes of the returned namespace)."""
    tokens, keys, values = sequence(n_pages * P)
    pool = HostPool(layout, n_pages)
    slots = [P * j for j in range(n_pages)]
    fill(pool, keys, values, slots)
    backend = make_backend(model_dir, store_yaml, pool, **extra)
    pages = [pool.get_data_page(s) for s in slots]
    hashes = page_hashes(tokens)
    return SimpleNamespace(
        backend=backend,
        pool=pool,
        tokens=tokens,
        keys=keys,
        values=values,
        hashes=hashes,
        pages=pages,
    )


@pytest.mark.parametrize("v1", [False, True], ids=["generic", "v1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_set_then_exists_then_get_serve_the_codec_round_trip(model_dir, store_yaml, layout, v1):
    n_pages = 3 * CHUNK // P + 2  # three full chunks and half of a fourth
    tokens, keys, values = sequence(n_pages * P)
    writer_pool = HostPool(layout, n_pages)
    slots = [P * j for j in reversed(range(n_pages))]  # pages anywhere in the pool
    host_indices = fill(writer_pool, keys, values, slots)
    backend = make_backend(model_dir, store_yaml, writer_pool, interface_v1=int(v1))
    hashes = page_hashes(tokens)
    assert len(hashes) == n_pages
    assert hashes == sglang_utils.get_hash_str.__wrapped__(tokens, None, P)  # tap: unchanged
    if v1:
        assert backend.batch_set_v1(hashes, host_indices) == [True] * n_pages
    else:
        pages = [writer_pool.get_data_page(s) for s in slots]
        assert backend.batch_set(hashes, pages) is True
    full = 3 * CHUNK // P
    assert backend.batch_exists(hashes) == full  # the half chunk is not stored
    assert backend.exists(hashes[0]) and not backend.exists(hashes[-1])

    reader_pool = writer_pool  # the pool SGLang registered; loads land in it
    reader_pool.kv_buffer.zero_()
    read_slots = list(range(0, n_pages * P, P))
    if v1:
        idx = torch.arange(n_pages * P)
        got = backend.batch_get_v1(hashes, idx)
        assert got == [True] * full + [False] * (n_pages - full)
    else:
        dst = [reader_pool.get_dummy_flat_data_page() for _ in hashes]
        pages = backend.batch_get(hashes, dst)
        assert [p is None for p in pages] == [False] * full + [True] * (n_pages - full)
        for s, page in zip(read_slots, pages[:full]):
            assert page is not None
            reader_pool.set_from_flat_data_page(s, page)
    got_k, got_v = read(reader_pool, read_slots[:full])
    want_k, want_v = round_trip(
        keys[:, :, : 3 * CHUNK], values[:, :, : 3 * CHUNK], dtype=torch.bfloat16
    )
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert not torch.equal(got_k, keys[:, :, : 3 * CHUNK])  # compressed, not copied
    for got, x in ((got_k, keys), (got_v, values)):  # ... and close to the input
        x = x[:, :, : 3 * CHUNK].float()
        assert (got.float() - x).norm() < 0.2 * x.norm()
    untouched = read(reader_pool, read_slots[full:])
    assert not untouched[0].any() and not untouched[1].any()
    backend.close()


def test_hits_are_consecutive_from_the_first_key(model_dir, store_yaml):
    c = prepared(model_dir, store_yaml, "page_first", 12)
    backend, pool, hashes, pages = c.backend, c.pool, c.hashes, c.pages
    assert backend.batch_set(hashes[:4], pages[:4])  # chunk 0
    assert backend.batch_set(hashes[8:], pages[8:])  # chunk 2, chunk 1 never written
    assert backend.batch_exists(hashes) == 4
    assert backend.batch_exists(hashes[2:]) == 2  # from inside chunk 0 to its end
    assert backend.batch_exists(hashes[4:]) == 0
    assert backend.batch_exists(hashes[8:]) == 4
    got = backend.batch_get(hashes, [pool.get_dummy_flat_data_page() for _ in hashes])
    assert [p is not None for p in got] == [True] * 4 + [False] * 8
    backend.close()


def test_a_chunk_split_across_two_writes_is_stored_whole(model_dir, store_yaml):
    """SGLang writes a radix node's pages as one operation; nodes start on any page."""
    c = prepared(model_dir, store_yaml, "layer_first", 9)
    backend, pool, keys, values, hashes, pages = (
        c.backend,
        c.pool,
        c.keys,
        c.values,
        c.hashes,
        c.pages,
    )
    assert backend.batch_set(hashes[:3], pages[:3])  # 3 of chunk 0's 4 pages
    assert backend.batch_exists(hashes) == 0
    assert backend.batch_set(hashes[3:], pages[3:])  # the rest of chunk 0, chunk 1, 1 page
    assert backend.batch_exists(hashes) == 8
    pool.kv_buffer.zero_()
    assert backend.batch_get_v1(hashes, torch.arange(9 * P)) == [True] * 8 + [False]
    want = round_trip(keys[:, :, : 2 * CHUNK], values[:, :, : 2 * CHUNK], dtype=torch.bfloat16)
    got = read(pool, [P * j for j in range(8)])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    backend.close()


def test_without_staging_the_split_chunk_is_lost_and_the_next_still_stored(model_dir, store_yaml):
    c = prepared(model_dir, store_yaml, "layer_first", 8, staging_pages=0)
    backend, hashes, pages = c.backend, c.hashes, c.pages
    assert backend.batch_set(hashes[:3], pages[:3])
    assert backend.batch_set(hashes[3:], pages[3:])
    assert backend.batch_exists(hashes) == 0  # chunk 0 was never whole
    assert backend.batch_exists(hashes[4:]) == 4
    backend.close()


def test_pages_whose_tokens_are_unknown_are_misses(model_dir, store_yaml):
    c = prepared(model_dir, store_yaml, "layer_first", 4)
    backend, tokens, pages = c.backend, c.tokens, c.pages
    # A chain seeded by a namespace the tap never saw computed (SGLang's own function,
    # unwrapped): its first page's prior hash is neither a page nor a known seed.
    seed = sglang_utils.storage_namespace_seed.__wrapped__("lora-unseen", None)
    salted = sglang_utils.get_storage_hash_str(tokens, seed, page_size=P)
    assert backend.batch_set(salted, pages) is False
    assert backend.batch_exists(salted) == 0
    assert backend.batch_get(salted) == [None] * 4
    made_up = ["ab" * 32, "cd" * 32]
    assert backend.batch_exists(made_up) == 0 and backend.batch_set(made_up, pages[:2]) is False
    # The same tokens unsalted are a different chain, stored as usual.
    assert backend.batch_set(c.hashes, pages) is True
    assert backend.batch_exists(salted) == 0 and backend.batch_exists(c.hashes) == 4
    backend.close()


def test_sglang_pages_and_a_direct_engine_store_share_chunks(model_dir, store_yaml):
    """What a vLLM worker (open_engine_store + store.put/get over token ids) writes,
    SGLang's backend serves by page hash, and the other way round."""
    c = prepared(model_dir, store_yaml, "page_head", 16)
    backend, tokens, keys, values, hashes = c.backend, c.tokens, c.keys, c.values, c.hashes
    with open_engine_store(store_yaml, tiny_llama_config(), dtype="bfloat16") as other:
        other.put(tokens[: 2 * CHUNK], keys[:, :, : 2 * CHUNK], values[:, :, : 2 * CHUNK])
        other.flush()
        assert backend.batch_exists(hashes) == 8  # via the shared disk tier
        assert backend.batch_set(hashes, c.pages)
        assert backend.store.flush(timeout=30)
        assert other.lookup(tokens) == 4 * CHUNK  # SGLang's chunks under the same keys
        assert backend.store.keys_for(tokens) == other.keys_for(tokens)
        k, v = other.get(tokens, dtype=torch.bfloat16)
        want = round_trip(keys, values, dtype=torch.bfloat16)
        assert torch.equal(k, want[0]) and torch.equal(v, want[1])
    backend.close()


def test_two_codec_versions_in_one_shared_tier_are_both_read(model_dir, tmp_path):
    """Through the registry config (``codec.registry``): pages saved before a promotion
    (version 1) and after it (version 2) share one disk tier; another backend (a replica
    with its own memory tier) reads both, each as its own version's round trip."""
    registry, shared = tmp_path / "registry", tmp_path / "shared"
    v1, v2 = publish_two_versions(registry)
    store_yaml = write_store_config(tmp_path / "kvtc", disk=shared, registry=registry)
    n_pages = 2 * CHUNK // P
    seqs = [sequence(n_pages * P, seed) for seed in (1, 2)]
    slots = [[P * j for j in range(n_pages)], [P * (n_pages + j) for j in range(n_pages)]]
    pool = HostPool("page_first", 2 * n_pages)
    for (_, keys, values), s in zip(seqs, slots):
        fill(pool, keys, values, s)
    writer = make_backend(model_dir, store_yaml, pool)
    hashes = [page_hashes(tokens) for tokens, _, _ in seqs]
    assert writer.store.codec.current_id == v1.artifact_id
    assert writer.batch_set(hashes[0], [pool.get_data_page(s) for s in slots[0]])
    promote(registry, v2)
    assert writer.store.codec.refresh() == v2.artifact_id  # no restart
    assert writer.batch_set(hashes[1], [pool.get_data_page(s) for s in slots[1]])
    assert writer.store.flush(timeout=30)
    writer.close()

    store_yaml = write_store_config(tmp_path / "replica", disk=shared, registry=registry)
    reader_pool = HostPool("page_first", 2 * n_pages)
    reader = make_backend(model_dir, store_yaml, reader_pool)
    for (tokens, keys, values), h, s, art in zip(seqs, hashes, slots, (v1, v2)):
        dst = [reader_pool.get_dummy_flat_data_page() for _ in h]
        pages = reader.batch_get(h, dst)
        assert all(page is not None for page in pages)
        for slot, page in zip(s, pages):
            reader_pool.set_from_flat_data_page(slot, page)
        got_k, got_v = read(reader_pool, s)
        want_k, want_v = round_trip(keys, values, dtype=torch.bfloat16, artifact=art)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    _, k0, v0 = seqs[0]
    assert not torch.equal(round_trip(k0, v0, artifact=v1)[0], round_trip(k0, v0, artifact=v2)[0])
    assert set(reader.store.codec.hits) == {v1.artifact_id, v2.artifact_id}
    reader.close()


def test_bad_settings_are_config_errors(model_dir, store_yaml):
    pool = HostPool("layer_first", 4)
    with pytest.raises(ConfigError, match="'config'"):
        cfg = storage_config(model_dir, store_yaml)
        del cfg.extra_config["config"]
        StorageBackendFactory.create_backend("dynamic", cfg, pool)
    with pytest.raises(ConfigError, match="parallel"):
        StorageBackendFactory.create_backend(
            "dynamic", storage_config(model_dir, store_yaml, tp_size=2), pool
        )
    for bad_pool, match in (
        (HostPool("page_unified", 4), "layouts"),
        (HostPool("layer_first", 4, page_size=12), "multiple of SGLang's page size"),
        (HostPool("layer_first", 4, heads=4), "host pool holds KV of shape"),
    ):
        backend = StorageBackendFactory.create_backend(
            "dynamic", storage_config(model_dir, store_yaml), bad_pool
        )
        with pytest.raises(ConfigError, match=match):
            backend.register_mem_pool_host(bad_pool)


class Key:
    """What SGLang's radix tree hashes: a ``RadixKey`` (raw ids in an ``array``, an
    optional LoRA ``extra_key`` / ``cache_salt``, bigram mode for EAGLE). The real class
    is not importable here (torchvision, as for the host pool); this has the attributes
    SGLang's hashing reads (``mem_cache/cpp_utils/native_hash.py``, ``utils.py``)."""

    def __init__(self, ids: list[int], extra_key=None, is_bigram: bool = False, cache_salt=None):
        self.token_ids = array("q", ids)
        self.extra_key, self.cache_salt, self.is_bigram = extra_key, cache_salt, is_bigram

    def raw_token_ids(self) -> array:
        return self.token_ids

    def __len__(self) -> int:
        n = len(self.token_ids)
        return max(0, n - 1) if self.is_bigram else n


def test_radix_keys_are_mapped_like_token_lists_namespaced_ones_with_their_salt(
    model_dir, store_yaml
):
    make_backend(model_dir, store_yaml, HostPool("layer_first", 4)).close()  # installs the tap
    ids = list(range(100, 100 + 4 * P))
    plain = sglang_utils.get_storage_hash_str(Key(ids), None, page_size=P)
    assert plain == page_hashes(ids)
    assert PAGE_TOKENS.chain(plain).tokens.tolist() == ids and PAGE_TOKENS.chain(plain).salt == ""
    lora = sglang_utils.get_storage_hash_str(Key(ids, extra_key="lora-a"), None, page_size=P)
    assert lora != plain and PAGE_TOKENS.chain(lora).tokens.tolist() == ids
    assert PAGE_TOKENS.chain(lora).salt == namespace_salt("lora-a", None) != ""
    assert PAGE_TOKENS.chain(lora[2:]).first == 2  # from a later page: walks to the seed
    bigram = sglang_utils.get_storage_hash_str(Key([*ids, 7], is_bigram=True), None, page_size=P)
    assert len(bigram) == 4 and PAGE_TOKENS.chain(bigram) is None


def test_each_sglang_namespace_shares_chunks_only_with_itself(model_dir, store_yaml):
    """Issue 20: SGLang seeds the page-hash chain of a request with an ``extra_key``
    (its LoRA id) or a ``cache_salt`` by ``storage_namespace_seed``; the same tokens
    under another namespace, or none, never share a chunk, and the same namespace on
    another replica is served."""
    c = prepared(model_dir, store_yaml, "layer_first", 2 * CHUNK // P)  # two chunks
    backend, tokens = c.backend, c.tokens

    def chain(extra_key=None, cache_salt=None) -> list[str]:  # as SGLang's radix tree hashes
        key = Key(tokens, extra_key=extra_key, cache_salt=cache_salt)
        return sglang_utils.get_storage_hash_str(key, None, page_size=P)

    lora_a, lora_b, salted, plain = chain("lora-a"), chain("lora-b"), chain(None, "t1"), c.hashes
    n = len(plain)
    assert len({lora_a[0], lora_b[0], salted[0], plain[0]}) == 4
    assert backend.batch_set(lora_a, c.pages) is True
    assert backend.store.flush(timeout=30)
    assert backend.batch_exists(lora_a) == n
    for other in (lora_b, salted, plain):
        assert backend.batch_exists(other) == 0
        assert backend.batch_get(other) == [None] * n
    salt = namespace_salt("lora-a", None)
    assert (
        backend.store.lookup(tokens, salt=salt) == 2 * CHUNK and backend.store.lookup(tokens) == 0
    )
    assert not set(backend.store.keys_for(tokens, salt)) & set(backend.store.keys_for(tokens))

    # Another replica (its own memory tier, the shared disk) serves that namespace.
    pool = HostPool("layer_first", n)
    replica = make_backend(model_dir, store_yaml, pool)
    assert replica.batch_exists(lora_a) == n and replica.batch_exists(lora_b) == 0
    got = replica.batch_get(lora_a, [pool.get_dummy_flat_data_page() for _ in lora_a])
    for j, page in enumerate(got):
        assert page is not None
        pool.set_from_flat_data_page(j * P, page)
    want = round_trip(c.keys, c.values, dtype=torch.bfloat16)
    k, v = read(pool, [j * P for j in range(n)])
    assert torch.equal(k, want[0]) and torch.equal(v, want[1])

    # Plain pages stored next: still nothing for lora-b or the salted namespace.
    assert backend.batch_set(plain, c.pages) is True
    assert backend.batch_exists(plain) == n and backend.batch_exists(lora_b) == 0
    assert backend.batch_exists(salted) == 0
    # A cache salt alone is the salt vLLM's connector gives that cache salt; absent and
    # empty parts stay apart, as in SGLang's seed.
    assert namespace_salt(None, "t1") == request_salt("t1")
    assert len({namespace_salt(None, ""), namespace_salt("", None), ""}) == 3
    replica.close()
    backend.close()
