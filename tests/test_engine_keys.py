"""One cache across engines: stores opened by ``open_engine_store`` the way a vLLM worker
and an SGLang worker open them (one config, one transformers config) derive the same
chunk keys and read each other's chunks through a shared disk tier; another model or
tenant does not share. Runs without any engine installed. (SGLang's connector puts and
gets under these keys: tests/test_sglang_storage.py; both real connectors sharing one
cache: tests/test_cross_engine.py.)
"""

from __future__ import annotations

import pytest
import torch

from kvtc_store.connectors.engine import open_engine_store
from kvtc_store.errors import ArtifactModelMismatchError

from .tiny_llama import CHUNK, round_trip, tiny_llama_config, write_store_config


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def _kv(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g)


def test_two_engines_share_keys_and_chunks(tmp_path):
    shared = tmp_path / "shared-disk"
    # Each worker has its own config folder and memory tier; the disk tier is shared.
    cfg_a = write_store_config(tmp_path / "vllm", disk=shared)
    cfg_b = write_store_config(tmp_path / "sglang", disk=shared)
    tokens = _tokens(3 * CHUNK + 5)
    keys, values = _kv(3 * CHUNK)
    with (
        open_engine_store(cfg_a, tiny_llama_config(), dtype="bfloat16") as a,
        open_engine_store(cfg_b, tiny_llama_config(), dtype="bfloat16") as b,
    ):
        assert a.keys_for(tokens) == b.keys_for(tokens)
        assert len(a.keys_for(tokens)) == 3
        a.put(tokens, keys, values)
        a.flush()
        assert b.lookup(tokens) == 3 * CHUNK
        got = b.get(tokens)
        assert got is not None and b.stats.chunks_hit == {"disk": 3}
        want_k, want_v = round_trip(keys, values)
        torch.testing.assert_close(got[0], want_k)
        torch.testing.assert_close(got[1], want_v)
        assert not torch.equal(got[0], keys)  # lossy: the codec ran


def test_other_model_or_tenant_does_not_share(tmp_path):
    shared = tmp_path / "shared-disk"
    tokens = _tokens(2 * CHUNK)
    keys, values = _kv(2 * CHUNK)
    base = write_store_config(tmp_path / "base", disk=shared)
    with open_engine_store(base, tiny_llama_config()) as a:
        a.put(tokens, keys, values)
        a.flush()
        ref = a.keys_for(tokens)
    # Another tenant, another model (artifact fingerprint), another KV dtype.
    tenant = write_store_config(tmp_path / "tenant", disk=shared, tenant="acme")
    other = write_store_config(tmp_path / "other", disk=shared, fingerprint="b" * 64)
    for cfg, dtype in ((tenant, "bfloat16"), (other, "bfloat16"), (base, "float16")):
        with open_engine_store(cfg, tiny_llama_config(), dtype=dtype) as s:
            assert set(s.keys_for(tokens)).isdisjoint(ref)
            assert s.lookup(tokens) == 0 and s.get(tokens) is None
    # A model of another shape cannot open the store with this artifact at all.
    with pytest.raises(ArtifactModelMismatchError):
        open_engine_store(base, tiny_llama_config(num_key_value_heads=4))
    with pytest.raises(ArtifactModelMismatchError):
        open_engine_store(base, tiny_llama_config(rope_theta=500000.0))
