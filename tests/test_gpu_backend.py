"""The GPU tier: blobs as uint8 tensors in device memory.

Its shared logic (policies, cap, counters, listener) runs on every machine through the
``gpu-code-on-cpu`` cases of test_backends.py and test_eviction.py. Here: the config's
behaviour without CUDA (runs everywhere), and the tier on a real GPU (marked ``gpu``,
skipped without CUDA; run on the lent H200, see benchmarks/results/tiers.md).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from kvtc_store.backends import DiskBackend, GPUBackend, MemoryBackend
from kvtc_store.config import build_tiers, load_config
from kvtc_store.errors import CapacityError, ConfigError
from kvtc_store.store import TieredStore
from tests.tiny_codec import tiny_codec, tiny_namespace, tiny_sequence

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def k(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


GPU_CONFIG = """
tiers:
  - {kind: gpu, capacity: 64MiB, OPTIONAL}
  - {kind: memory, capacity: 64MiB}
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_tier_without_cuda_is_a_config_error_or_skipped_when_optional(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(GPU_CONFIG.replace(", OPTIONAL", ""))
    with pytest.raises(ConfigError, match=r"^tiers\.0: gpu tier: .*CUDA is not available"):
        build_tiers(load_config(path, env={}))
    with pytest.raises(ConfigError, match="CUDA is not available"):
        GPUBackend(1 << 20)
    path.write_text(GPU_CONFIG.replace("OPTIONAL", "optional: true"))
    with caplog.at_level(logging.WARNING, logger="kvtc_store.config"):
        tiers = build_tiers(load_config(path, env={}))
    assert [type(t) for t in tiers] == [MemoryBackend]
    assert "optional tier gpu left out" in caplog.text


def test_gpu_config_fields_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "store.yaml"
    path.write_text(GPU_CONFIG.replace("OPTIONAL", "device: cpu"))
    with pytest.raises(ConfigError, match=r"tiers\.0\.device"):
        load_config(path, env={})
    path.write_text(GPU_CONFIG.replace("OPTIONAL", "optional: yes please"))
    with pytest.raises(ConfigError, match=r"tiers\.0\.optional"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="not a torch device"):
        GPUBackend(1 << 20, device="tpu-ish")


# --- on a real GPU -------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_blobs_live_in_device_memory_and_round_trip(policy: str) -> None:
    tier = GPUBackend(10_000, device="cuda", policy=policy)  # type: ignore[arg-type]
    values = {k(i): bytes(range(256)) * (i + 1) for i in range(8)}
    tier.put(list(values.items()))
    stored = tier._policy._values
    assert all(
        b.data.device.type == "cuda" and b.data.dtype == torch.uint8 for b in stored.values()
    )
    keys = [*values, k(99)]
    assert tier.get(keys) == [*values.values(), None]
    assert tier.usage().used_bytes == sum(map(len, values.values())) <= 10_000
    with pytest.raises(CapacityError):
        tier.put([(k(100), b"z" * 10_001)])


@pytest.mark.gpu
@cuda
def test_each_chunk_owns_its_device_memory() -> None:
    """A batch is copied once, but every chunk gets its own allocation: evicting one
    frees its bytes, not the whole batch's staging buffer."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    tier = GPUBackend(64 << 20, device="cuda")
    tier.put([(k(i), bytes([i]) * (4 << 20)) for i in range(8)])  # 32 MiB in one batch
    full = torch.cuda.memory_allocated() - base
    assert 32 << 20 <= full < 40 << 20  # the staging copy is gone
    tier.delete([k(i) for i in range(4)])
    assert torch.cuda.memory_allocated() - base <= full - (16 << 20)


@pytest.mark.gpu
@cuda
def test_eviction_hands_host_bytes_to_the_listener() -> None:
    tier = GPUBackend(1000, device="cuda")
    seen: list = []
    tier.set_eviction_listener(seen.extend)
    tier.put([(k(i), bytes([i]) * 400) for i in range(3)])
    assert seen == [(k(0), bytes([0]) * 400)]


@pytest.mark.gpu
@cuda
def test_store_with_a_gpu_top_tier(tmp_path: Path) -> None:
    tokens, keys, values = tiny_sequence(8, seed=1)
    with TieredStore(
        [GPUBackend(1 << 20, device="cuda"), DiskBackend(tmp_path, 1 << 30)],
        tiny_codec(),
        tiny_namespace(),
        chunk_tokens=16,
    ) as store:
        assert store.put(tokens, keys, values).chunks_written == 8
        k_gpu, v_gpu = store.get(tokens)
        assert store.stats.chunks_hit == {"gpu": 8}
    with TieredStore(
        [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 30)],
        tiny_codec(),
        tiny_namespace(),
        chunk_tokens=16,
    ) as replica:  # the same blobs, written down to disk by the GPU-topped store
        k_disk, v_disk = replica.get(tokens)
        assert replica.stats.chunks_hit == {"disk": 8}
    assert torch.equal(k_gpu, k_disk) and torch.equal(v_gpu, v_disk)
