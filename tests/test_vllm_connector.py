"""The vLLM connector against the real vllm 0.33 classes (``make test-engines`` runs this
file in ``.venv-vllm``; without vllm every test here is skipped).

- Scheduler side: driven through vLLM's own v1 ``Scheduler`` on the CPU (it builds and
  schedules here; only the model forward needs vLLM's compiled kernels, which a CPU-only
  ``--no-deps`` install lacks). The "forward" of each step writes deterministic KV into
  the scheduled tokens' slots, the way the attention backend does.
- Worker side: KV cache views allocated by vLLM's own ``allocate_kv_cache`` in the
  layouts it offers (LBHNC, LBNHC, BLHNC; kernel-block splitting), read and written in
  the tests exactly as the attention backends' forwards split them (the lines quoted in
  ``backend_kv``), never through the connector's own layout code.

vLLM cannot build its attention layers on this CPU (no ``vllm._C``), so the layers the
connector asks for their backend are a minimal ``AttentionLayerBase`` subclass that
returns the real backend class; everything else is vLLM's.

A tiny hand-made codec artifact (2 layers, 2 KV heads, 32 channels: 48 of 128 components
at 8 bits, 16 exact tail tokens) matches a tiny ``LlamaConfig``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (make test-engines installs it)")

from transformers import LlamaConfig
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.sampling_params import SamplingParams
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from kvtc_store.codec import (
    CodecArtifact,
    KVTCCodec,
    PlanRange,
    RopeParams,
    default_groups,
)
from kvtc_store.codec.blob import unpack_blob
from kvtc_store.connectors.vllm import (
    KVTCConnector,
    KVTCConnectorMetadata,
    RequestPlan,
    _request_salt,
)
from kvtc_store.errors import ConfigError, KVLayoutError

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, DIM = 2, 2, 32
CHUNK = 32
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
DTYPE = torch.bfloat16


# ---- fixtures: a tiny model's config, artifact and store config --------------------------


def tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=HEADS,
        hidden_size=4 * DIM,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=2048,
    )


def tiny_artifact(bits: int = 8) -> CodecArtifact:
    """48 of the 128 components of all layers, at 8 bits (another ``bits``: another codec
    version); sinks and 16 tail tokens exact."""
    groups = default_groups(LAYERS)
    p = LAYERS * HEADS * DIM
    g = torch.Generator().manual_seed(7)
    bases = [torch.linalg.qr(torch.randn(p, p, generator=g))[0][:, :48] for _ in groups]
    return CodecArtifact(
        model_fingerprint="a" * 64,
        model_name="tiny-llama",
        kv_shape=(LAYERS, HEADS, DIM),
        rope=RopeParams(head_dim=DIM, theta=float(tiny_llama().rope_parameters["rope_theta"])),
        groups=groups,
        means=[torch.zeros(p) for _ in groups],
        bases=bases,
        plan=[PlanRange(i, 0, 48, bits) for i in range(len(groups))],
        target_ratio=4.0,
        window=16,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_artifact().save(folder / "codec")
    return folder


@pytest.fixture
def store_yaml(model_dir, tmp_path):
    path = tmp_path / "store.yaml"
    path.write_text(
        f"chunk_tokens: {CHUNK}\n"
        "tiers:\n  - kind: memory\n    capacity: 64MiB\n"
        f"codec:\n  artifact: {model_dir / 'codec'}\n"
    )
    return path


@pytest.fixture(scope="module")
def model_config(model_dir):
    return ModelConfig(
        model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024
    )


def make_vllm_config(
    model_config, store_yaml, block_size: int, batch_tokens: int = 512, **extra
) -> VllmConfig:
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=batch_tokens,
            max_model_len=1024,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=False),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVTCConnector",
            kv_connector_module_path="kvtc_store.connectors.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"config": str(store_yaml)},
            **extra,
        ),
        device_config=DeviceConfig(device="cpu"),
    )
    return config


def make_kv_cache_config(block_size: int, num_blocks: int, layout: KVCacheLayout):
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=DIM, dtype=DTYPE)
    page = spec.page_size_bytes
    if layout.is_layer_compact:
        strides = {"layer_stride": num_blocks * page, "block_stride": page}
    else:
        strides = {"layer_stride": page, "block_stride": LAYERS * page}
    tensor = KVCacheTensor(size=LAYERS * num_blocks * page, layers=NAMES, **strides)
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[tensor],
        kv_cache_groups=[KVCacheGroupSpec(list(NAMES), spec)],
    )


class _Layer(AttentionLayerBase):
    """Stands in for vLLM's attention layer (not constructible without vllm._C): it only
    names the real attention backend class, which is what the connector asks it."""

    def __init__(self, backend):
        self.backend = backend

    def get_attn_backend(self):
        return self.backend

    def get_kv_cache_spec(self, vllm_config):
        return None


def make_worker(vllm_config, kv_cache_config, backend, layout, kernel_block_size=None):
    """A worker-side connector over KV views from vLLM's own allocator."""
    ctx = vllm_config.compilation_config.static_forward_context
    for name in NAMES:
        ctx[name] = _Layer(backend)
    kernel = None if kernel_block_size is None else [kernel_block_size]
    kv = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout, kernel)
    worker = KVTCConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    worker.register_kv_caches(kv)
    return worker, kv


# ---- KV as the attention backends read and write it --------------------------------------


def backend_kv(view: torch.Tensor, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches ``(B, H, N, D)`` (views) as the backend's forward splits them.

    CPU_ATTN (cpu_attn.py): ``kv_cache.view((num_blocks, num_kv_heads, block_size * 2,
    -1)); key_cache, value_cache = kv_cache.chunk(2, dim=2)``. FLASH_ATTN and TRITON_ATTN
    (flash_attn.py, triton_attn.py): ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``.
    """
    if backend.get_name() == "CPU_ATTN":
        b, h, n, _ = view.shape
        return view.view((b, h, n * 2, -1)).chunk(2, dim=2)
    k, v = view.transpose(1, 2).split(DIM, dim=-1)
    return k.transpose(1, 2), v.transpose(1, 2)


def slots(block_ids, start, end, block_size, view_block_slots):
    """(view block, slot) of tokens [start, end) of a request with these manager blocks."""
    t = torch.arange(start, end)
    manager = torch.tensor(block_ids)[t // block_size]
    within = t % block_size
    sub = block_size // view_block_slots
    return manager * sub + within // view_block_slots, within % view_block_slots


def write_tokens(kv, backend, block_ids, start, keys, values, block_size):
    """The forward's cache write: keys/values ``(L, H, T, D)`` of tokens [start, start+T)."""
    for layer, name in enumerate(NAMES):
        kc, vc = backend_kv(kv[name], backend)
        vb, slot = slots(block_ids, start, start + keys.shape[2], block_size, kc.shape[2])
        kc[vb, :, slot] = keys[layer].transpose(0, 1).to(kc.dtype)
        vc[vb, :, slot] = values[layer].transpose(0, 1).to(vc.dtype)


def read_tokens(kv, backend, block_ids, start, end, block_size):
    """``(keys, values)`` ``(L, H, T, D)`` of tokens [start, end) as the backend reads them."""
    ks, vs = [], []
    for name in NAMES:
        kc, vc = backend_kv(kv[name], backend)
        vb, slot = slots(block_ids, start, end, block_size, kc.shape[2])
        ks.append(kc[vb, :, slot].transpose(0, 1))
        vs.append(vc[vb, :, slot].transpose(0, 1))
    return torch.stack(ks), torch.stack(vs)


_G = torch.Generator().manual_seed(3)
_BASE_K, _BASE_V = torch.randn(2, LAYERS, HEADS, 1024, DIM, generator=_G)
_EMB = torch.randn(1000, DIM, generator=_G)


def source_kv(tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic "model" KV ``(L, H, T, D)`` (bf16) of a prompt: equal prefixes give
    equal KV."""
    t = torch.as_tensor(tokens)
    emb = _EMB[t]  # (T, D)
    n = len(t)
    return (_BASE_K[:, :, :n] + emb).to(DTYPE), (_BASE_V[:, :, :n] - emb).to(DTYPE)


def round_trip(keys, values, artifact=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the codec gives back for a sequence put in one go (an independent codec of
    ``artifact``, default :func:`tiny_artifact`)."""
    codec = KVTCCodec(artifact or tiny_artifact())
    blobs = codec.encode_sequence(keys, values, chunk_tokens=CHUNK)
    chunks, error = codec.decode_prefix(blobs)
    assert error is None
    k = torch.cat([c.keys for c in chunks], dim=2)
    v = torch.cat([c.values for c in chunks], dim=2)
    return k.to(DTYPE), v.to(DTYPE)


def corrupt_chunk(store, tokens, index: int) -> None:
    """Flip one byte of chunk ``index``'s blob in the top tier (its checksum then fails)."""
    key = store.keys_for(tokens)[index]
    tier = store.tiers[0]
    (blob,) = tier.get([key])
    bad = bytearray(blob)
    bad[-1] ^= 0xFF
    tier.delete([key])
    tier.put([(key, bytes(bad))])


def finish(worker, *loaded: str) -> None:
    """Wait for the worker's loads and saves in flight (they run on its threads) and
    check that ``get_finished`` reports exactly the requests ``loaded``, once."""
    assert worker.wait_for_transfers(timeout=60)
    assert worker.get_finished(set()) == (None, set(loaded) or None)
    assert worker.get_finished(set()) == (None, None)


# ---- worker side --------------------------------------------------------------------------

WORKER_CASES = [
    (CPUAttentionBackend, KVCacheLayout.LBHNC, None),
    (FlashAttentionBackend, KVCacheLayout.LBNHC, None),
    (FlashAttentionBackend, KVCacheLayout.BLHNC, None),
    (TritonAttentionBackend, KVCacheLayout.LBHNC, None),
    (FlashAttentionBackend, KVCacheLayout.LBNHC, 16),  # 32-token blocks as 16-token kernel blocks
]


@pytest.mark.parametrize(
    ("backend", "layout", "kernel"),
    WORKER_CASES,
    ids=[f"{b.get_name()}-{lay.name}-k{k}" for b, lay, k in WORKER_CASES],
)
def test_worker_saves_then_loads_into_other_blocks(
    model_config, store_yaml, backend, layout, kernel
):
    block = 32
    config = make_vllm_config(model_config, store_yaml, block)
    kcc = make_kv_cache_config(block, 24, layout)
    worker, kv = make_worker(config, kcc, backend, layout, kernel)
    tokens = torch.randint(0, 1000, (4 * CHUNK + 7,), generator=_G).tolist()
    keys, values = source_kv(tokens)
    src_blocks = [3, 17, 5, 0, 9]  # 4 chunks + a partial block, scattered
    write_tokens(kv, backend, src_blocks, 0, keys, values, block)

    worker.bind_connector_metadata(
        KVTCConnectorMetadata([RequestPlan("a", tokens[: 4 * CHUNK], src_blocks[:4], save_end=128)])
    )
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    finish(worker)
    assert worker._store.lookup(tokens) == 4 * CHUNK

    dst_blocks = [20, 1, 12, 7]
    worker.bind_connector_metadata(
        KVTCConnectorMetadata(
            [RequestPlan("b", tokens[: 4 * CHUNK], dst_blocks, load_start=0, load_end=128)]
        )
    )
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    finish(worker, "b")
    assert worker.get_block_ids_with_load_errors() == set()

    got_k, got_v = read_tokens(kv, backend, dst_blocks, 0, 128, block)
    want_k, want_v = round_trip(keys[:, :, :128], values[:, :, :128])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # the sinks are stored exactly; the compressed tokens are not the source
    assert torch.equal(got_k[:, :, :4], keys[:, :, :4])
    assert not torch.equal(got_k[:, :, 4:100], keys[:, :, 4:100])
    # the source blocks were read, not changed
    src_k, _ = read_tokens(kv, backend, src_blocks, 0, len(tokens), block)
    assert torch.equal(src_k, keys)


def test_two_codec_versions_in_one_shared_tier_are_both_read(model_config, tmp_path):
    """Through the registry config (``codec.registry``): a prompt saved before a promotion
    (version 1) and one saved after it (version 2) share one disk tier; another worker
    loads both, each as its own version's round trip."""
    from kvtc_store.registry import open_registry

    v1, v2 = tiny_artifact(bits=8), tiny_artifact(bits=6)
    registry = open_registry(tmp_path / "registry", create=True)
    for art in (v1, v2):
        registry.publish(art)
    registry.promote(v1.model_fingerprint, v1.artifact_id, "default")
    store_yaml = tmp_path / "store.yaml"
    store_yaml.write_text(
        f"chunk_tokens: {CHUNK}\n"
        "tiers:\n  - kind: memory\n    capacity: 64MiB\n"
        f"  - kind: disk\n    path: {tmp_path / 'shared'}\n    capacity: 64MiB\n"
        f"codec:\n  registry: {tmp_path / 'registry'}\n  profile: default\n"
        f"  refresh_seconds: 0\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    block, backend, layout = 32, CPUAttentionBackend, KVCacheLayout.LBHNC
    config = make_vllm_config(model_config, store_yaml, block)
    writer, kv = make_worker(config, make_kv_cache_config(block, 24, layout), backend, layout)
    prompts = [torch.randint(0, 1000, (4 * CHUNK,), generator=_G).tolist() for _ in range(2)]
    for i, (tokens, blocks) in enumerate(zip(prompts, ([3, 17, 5, 0], [9, 11, 2, 6]))):
        if i == 1:
            registry.promote(v2.model_fingerprint, v2.artifact_id, "default")
            assert writer._store.codec.refresh() == v2.artifact_id  # no restart
        keys, values = source_kv(tokens)
        write_tokens(kv, backend, blocks, 0, keys, values, block)
        plan = RequestPlan(f"w{i}", tokens, blocks, save_end=4 * CHUNK)
        writer.bind_connector_metadata(KVTCConnectorMetadata([plan]))
        writer.start_load_kv(None)
        writer.wait_for_save()
        writer.clear_connector_metadata()
        finish(writer)
    assert writer._store.flush(timeout=30)
    ids = {unpack_blob(b)[0].artifact_id for b in writer._store.tiers[-1].get(
        writer._store.keys_for(prompts[0]) + writer._store.keys_for(prompts[1]))}  # fmt: skip
    assert ids == {v1.artifact_id, v2.artifact_id}  # both versions in the shared tier

    reader, kv2 = make_worker(config, make_kv_cache_config(block, 24, layout), backend, layout)
    for i, (tokens, art, dst) in enumerate(
        zip(prompts, (v1, v2), ([20, 1, 12, 7], [4, 8, 10, 13]))
    ):
        plan = RequestPlan(f"r{i}", tokens, dst, load_start=0, load_end=4 * CHUNK)
        reader.bind_connector_metadata(KVTCConnectorMetadata([plan]))
        reader.start_load_kv(None)
        reader.wait_for_save()
        reader.clear_connector_metadata()
        finish(reader, f"r{i}")
        assert reader.get_block_ids_with_load_errors() == set()
        got_k, got_v = read_tokens(kv2, backend, dst, 0, 4 * CHUNK, block)
        want_k, want_v = round_trip(*source_kv(tokens), artifact=art)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    other = round_trip(*source_kv(prompts[0]), artifact=v2)[0]
    assert not torch.equal(other, round_trip(*source_kv(prompts[0]), artifact=v1)[0])
    assert {v1.artifact_id, v2.artifact_id} <= set(reader._store.codec.hits)


def test_suffix_saves_and_loads_without_the_chunks_before(model_config, store_yaml):
    """vLLM may hold a prefix the store lacks (its own prefix cache): a save from
    ``save_start`` gathers and stores only the chunks from there, the scheduler's lookup
    counts the stored run from vLLM's computed prefix, and a load from ``load_start``
    fetches and decodes only the chunks from there."""
    block = 32
    config = make_vllm_config(model_config, store_yaml, block)
    kcc = make_kv_cache_config(block, 24, KVCacheLayout.LBHNC)
    worker, kv = make_worker(config, kcc, CPUAttentionBackend, KVCacheLayout.LBHNC)
    store = worker._store
    tokens = torch.randint(0, 1000, (4 * CHUNK + 7,), generator=_G).tolist()
    keys, values = source_kv(tokens)
    src_blocks = [3, 17, 5, 0, 9]
    write_tokens(kv, CPUAttentionBackend, src_blocks, 0, keys, values, block)
    plan = RequestPlan("a", tokens[: 4 * CHUNK], src_blocks[:4], save_end=128, save_start=64)
    worker.bind_connector_metadata(KVTCConnectorMetadata([plan]))
    worker.wait_for_save()
    worker.clear_connector_metadata()
    finish(worker)
    assert store.stats.chunks_put == 2  # chunks 2 and 3 only
    assert store.lookup(tokens) == 0  # chunk 0 is not stored: no prefix from 0
    assert store.lookup(tokens, start=64) == 128

    scheduler = KVTCConnector(config, KVConnectorRole.SCHEDULER, kcc)
    req = Request("b", tokens, SamplingParams(max_tokens=1), None)
    assert scheduler.get_num_new_matched_tokens(req, 64) == (64, True)  # loaded async
    assert scheduler.get_num_new_matched_tokens(req, 0) == (0, False)

    dst_blocks = [20, 1, 12, 7]
    plan = RequestPlan("b", tokens[: 4 * CHUNK], dst_blocks, load_start=64, load_end=128)
    worker.bind_connector_metadata(KVTCConnectorMetadata([plan]))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    finish(worker, "b")
    assert worker.get_block_ids_with_load_errors() == set()
    got_k, got_v = read_tokens(kv, CPUAttentionBackend, dst_blocks, 64, 128, block)
    want_k, want_v = round_trip(keys[:, :, :128], values[:, :, :128])
    assert torch.equal(got_k, want_k[:, :, 64:]) and torch.equal(got_v, want_v[:, :, 64:])


def test_worker_reports_blocks_of_a_corrupt_chunk(model_config, store_yaml):
    block = 16
    config = make_vllm_config(model_config, store_yaml, block)
    kcc = make_kv_cache_config(block, 32, KVCacheLayout.LBHNC)
    worker, kv = make_worker(config, kcc, CPUAttentionBackend, KVCacheLayout.LBHNC)
    tokens = torch.randint(0, 1000, (3 * CHUNK,), generator=_G).tolist()
    keys, values = source_kv(tokens)
    src = list(range(6))
    write_tokens(kv, CPUAttentionBackend, src, 0, keys, values, block)
    worker.bind_connector_metadata(
        KVTCConnectorMetadata([RequestPlan("a", tokens, src, save_end=96)])
    )
    worker.wait_for_save()
    finish(worker)
    corrupt_chunk(worker._store, tokens, 1)

    dst = list(range(10, 16))
    worker.bind_connector_metadata(
        KVTCConnectorMetadata([RequestPlan("b", tokens, dst, load_start=0, load_end=96)])
    )
    worker.start_load_kv(None)
    finish(worker, "b")
    # chunk 0 loaded, chunks 1 and 2 (blocks 2..5 of the request) left for recompute
    assert worker.get_block_ids_with_load_errors() == set(dst[2:])
    assert worker.get_block_ids_with_load_errors() == set()  # reported once
    got_k, _ = read_tokens(kv, CPUAttentionBackend, dst, 0, 32, block)
    assert torch.equal(got_k, round_trip(keys, values)[0][:, :, :32])
    assert worker._store.lookup(tokens) == CHUNK  # the corrupt chunk was dropped


def test_unknown_backend_and_bad_chunk_size_are_refused(model_config, store_yaml, tmp_path):
    class Unknown(FlashAttentionBackend):
        @staticmethod
        def get_name():
            return "ROCM_ATTN"

    config = make_vllm_config(model_config, store_yaml, 32)
    kcc = make_kv_cache_config(32, 8, KVCacheLayout.LBHNC)
    with pytest.raises(KVLayoutError, match="ROCM_ATTN is not supported"):
        make_worker(config, kcc, Unknown, KVCacheLayout.LBHNC)
    # CPU_ATTN reads each page as one run: an LBNHC view is refused, not misread
    with pytest.raises(KVLayoutError, match="contiguous"):
        make_worker(config, kcc, CPUAttentionBackend, KVCacheLayout.LBNHC)
    config = make_vllm_config(model_config, store_yaml, 48)
    with pytest.raises(ConfigError, match="multiple of vLLM's block size"):
        KVTCConnector(
            config, KVConnectorRole.SCHEDULER, make_kv_cache_config(48, 8, KVCacheLayout.LBHNC)
        )
    no_config = make_vllm_config(model_config, store_yaml, 32)
    no_config.kv_transfer_config.kv_connector_extra_config = {}
    with pytest.raises(ConfigError, match="extra_config.config"):
        KVTCConnector(no_config, KVConnectorRole.SCHEDULER, kcc)


# ---- scheduler side, through vLLM's scheduler -----------------------------------------------


class Engine:
    """vLLM's scheduler and our worker-side connector in one process (like vLLM's
    single-GPU executor); the forward writes each scheduled token's KV."""

    BLOCK = 16

    def __init__(self, model_config, store_yaml, batch_tokens: int = 512, num_blocks: int = 64):
        self.config = make_vllm_config(
            model_config, store_yaml, self.BLOCK, batch_tokens, kv_load_failure_policy="recompute"
        )
        self.config.cache_config.num_gpu_blocks = num_blocks
        kcc = make_kv_cache_config(self.BLOCK, num_blocks, KVCacheLayout.LBHNC)
        self.worker, self.kv = make_worker(
            self.config, kcc, CPUAttentionBackend, KVCacheLayout.LBHNC
        )
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=kcc,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=self.BLOCK,
            log_stats=False,
        )
        self.blocks: dict[str, list[int]] = {}

    def add(self, req_id, tokens, max_tokens=20, **kwargs) -> Request:
        req = Request(req_id, list(tokens), SamplingParams(max_tokens=max_tokens), None, **kwargs)
        self.scheduler.add_request(req)
        return req

    def step(self):
        """One engine step; returns (scheduler output, connector metadata, load errors)."""
        so = self.scheduler.schedule()
        meta = so.kv_connector_metadata
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        for new in so.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if cached.new_block_ids[i] is not None:
                self.blocks[rid].extend(cached.new_block_ids[i][0])
        for rid, n in so.num_scheduled_tokens.items():  # the forward
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - n  # the scheduler has advanced it already
            kv = source_kv(req.all_token_ids[: start + n])
            write_tokens(
                self.kv,
                CPUAttentionBackend,
                self.blocks[rid],
                start,
                kv[0][:, :, start:],
                kv[1][:, :, start:],
                self.BLOCK,
            )
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        # the loads and saves run on the worker's threads; a test engine waits for them
        # so that each step reports what vLLM would see by the next one
        assert self.worker.wait_for_transfers(timeout=60)
        _, recving = self.worker.get_finished(so.finished_req_ids)
        errors = self.worker.get_block_ids_with_load_errors()
        ids = list(so.num_scheduled_tokens)
        out = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[7] if self._prefilled(r) else [] for r in ids],
            kv_connector_output=KVConnectorOutput(
                finished_recving=recving, invalid_block_ids=errors
            ),
        )
        self.scheduler.update_from_output(so, out)
        self.recving = recving or set()
        return so, meta, errors

    def _prefilled(self, req_id) -> bool:
        req = self.scheduler.requests[req_id]
        return req.num_computed_tokens >= req.num_prompt_tokens


def test_scheduler_saves_loads_and_recomputes_failed_blocks(model_config, store_yaml):
    engine = Engine(model_config, store_yaml)
    sched, connector = engine.scheduler, engine.scheduler.connector
    assert isinstance(connector, KVTCConnector)
    store = engine.worker._store
    assert connector._store is store  # one store per process, as with vLLM's uniproc executor

    prompt_a = torch.randint(0, 1000, (100,), generator=_G).tolist()
    engine.add("a", prompt_a)
    so, meta, _ = engine.step()
    (plan,) = meta.requests
    assert (plan.req_id, plan.load_end, plan.save_end) == ("a", 0, 96)  # 3 full chunks
    assert plan.token_ids == prompt_a[:96] and plan.block_ids == engine.blocks["a"][:6]
    assert store.lookup(prompt_a) == 96
    assert not so.has_sync_kv_loads

    # b shares a's 96-token prefix: loaded from the store into b's own blocks while b
    # waits (asynchronously: a's step goes on), then scheduled from token 96
    prompt_b = prompt_a[:96] + torch.randint(0, 1000, (20,), generator=_G).tolist()
    engine.add("b", prompt_b, max_tokens=1)
    so, meta, errors = engine.step()
    assert "b" not in so.num_scheduled_tokens and "a" in so.num_scheduled_tokens
    assert not so.has_sync_kv_loads and errors == set() and engine.recving == {"b"}
    (plan,) = meta.requests  # a decodes and has nothing new to save
    assert (plan.req_id, plan.load_start, plan.load_end, plan.save_end) == ("b", 0, 96, 0)
    so, meta, errors = engine.step()
    (new_b,) = so.scheduled_new_reqs
    assert new_b.num_computed_tokens == 96 and so.num_scheduled_tokens["b"] == 20
    assert list(new_b.block_ids[0][:6]) == plan.block_ids  # the blocks it was loaded into
    assert not meta.requests  # b's loaded chunks are stored: nothing to save
    assert not set(engine.blocks["b"]) & set(engine.blocks["a"])
    got = read_tokens(engine.kv, CPUAttentionBackend, engine.blocks["b"], 0, 96, Engine.BLOCK)
    want = round_trip(*source_kv(prompt_a[:96]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    # never the whole prompt: a prompt of exactly 3 cached chunks gets 2 of them
    exact = Request("probe", prompt_a[:96], SamplingParams(max_tokens=1), None)
    assert connector.get_num_new_matched_tokens(exact, 0) == (64, True)
    assert connector.get_num_new_matched_tokens(exact, 64) == (0, False)
    assert connector.get_num_new_matched_tokens(exact, 32) == (32, True)
    # side-effect free: asking changed nothing in the store
    assert store.lookup(prompt_a) == 96 and store.stats.chunks_put == 3

    # c finds chunk 1 corrupt: chunk 0 loads, the blocks of chunks 1-2 are recomputed
    corrupt_chunk(store, prompt_a, 1)
    prompt_c = prompt_a[:96] + torch.randint(0, 1000, (10,), generator=_G).tolist()
    engine.add("c", prompt_c, max_tokens=1)
    so, meta, errors = engine.step()
    (plan,) = [p for p in meta.requests if p.req_id == "c"]
    assert (plan.load_start, plan.load_end) == (0, 96) and engine.recving == {"c"}
    assert errors == set(plan.block_ids[2:6])  # reported with the finished load
    assert sched.requests["c"].num_computed_tokens == 32  # vLLM rolled back to the good prefix
    so, meta, errors = engine.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 32
    assert so.num_scheduled_tokens["c"] == len(prompt_c) - 32
    (plan,) = [p for p in meta.requests if p.req_id == "c"]
    assert plan.save_end == 96 and plan.load_end == 0  # the recomputed chunks are put again
    assert store.lookup(prompt_a) == 96
    got = read_tokens(engine.kv, CPUAttentionBackend, engine.blocks["c"], 0, 32, Engine.BLOCK)
    assert torch.equal(got[0], want[0][:, :, :32])

    # finished requests are forgotten; their blocks are freed at once
    assert connector.request_finished(sched.requests["a"], engine.blocks["a"]) == (False, None)
    assert "a" not in connector._tracked


def test_chunked_prefill_saves_each_chunk_as_it_completes(model_config, store_yaml):
    engine = Engine(model_config, store_yaml, batch_tokens=48)  # 48 tokens per step
    store = engine.worker._store
    prompt = torch.randint(0, 1000, (150,), generator=_G).tolist()
    engine.add("long", prompt)
    saves = []
    for _ in range(4):
        _, meta, _ = engine.step()
        saves.append([(p.save_start, p.save_end) for p in meta.requests if p.save_end])
    # computed after each step: 48, 96, 144, 150 -> full chunks 32, 96, 128, 128; each
    # save gathers only the chunks completed since the last one
    assert saves == [[(0, 32)], [(32, 96)], [(96, 128)], []]
    assert store.lookup(prompt) == 128
    # each chunk was encoded once, with the KV the forward wrote
    assert store.stats.chunks_put == 4
    got = engine.worker._store.get(prompt)
    want = source_kv(prompt[:128])
    assert torch.equal(got[0][:, :, :4].to(DTYPE), want[0][:, :, :4])  # exact sinks


def test_salted_and_lora_requests_are_cached_each_only_for_itself(model_config, store_yaml):
    """Issue 20: a request's cache salt and LoRA adapter (name and id) go into its chunk
    keys' salt: such requests are stored and served, and the same tokens under another
    salt, another adapter or none never share a chunk."""
    from vllm.lora.request import LoRARequest

    engine = Engine(model_config, store_yaml)
    connector, store = engine.scheduler.connector, engine.worker._store
    prompt = torch.randint(0, 1000, (70,), generator=_G).tolist()
    engine.add("plain", prompt)
    engine.step()
    assert store.lookup(prompt) == 64

    def ask(req_id, **kwargs):
        req = Request(req_id, prompt, SamplingParams(max_tokens=1), None, **kwargs)
        return connector.get_num_new_matched_tokens(req, 0), _request_salt(req)

    (matched, salt_b) = ask("probe-b", cache_salt="tenant-b")
    assert matched == (0, False)  # the plain request's chunks are not tenant-b's
    engine.add("salted", prompt, cache_salt="tenant-b")
    _, meta, _ = engine.step()  # stored under tenant-b's salt
    assert [p.salt for p in meta.requests] == [salt_b]
    assert store.lookup(prompt, salt=salt_b) == 64
    assert set(store.keys_for(prompt, salt_b)).isdisjoint(store.keys_for(prompt))
    assert ask("again-b", cache_salt="tenant-b")[0] == (64, True)  # served to tenant-b
    assert ask("probe-c", cache_salt="tenant-c")[0] == (0, False)  # never to tenant-c

    adapter_a = LoRARequest("adapter-a", 1, "/nonexistent/adapter-a")
    adapter_b = LoRARequest("adapter-b", 2, "/nonexistent/adapter-b")
    salt_a = ask("probe-a", lora_request=adapter_a)[1]
    assert salt_a not in ("", salt_b) and salt_a != ask("probe-b2", lora_request=adapter_b)[1]
    keys, values = source_kv(prompt[:64])
    store.put(torch.tensor(prompt[:64]), keys, values, salt=salt_a)  # as a LoRA save does
    assert ask("lora-a", lora_request=adapter_a)[0] == (64, True)
    assert ask("lora-b", lora_request=adapter_b)[0] == (0, False)
    assert set(store.keys_for(prompt, salt_a)).isdisjoint(store.keys_for(prompt, salt_b))


def test_a_preempted_request_resumes_from_the_store(model_config, store_yaml):
    # 10 usable blocks of 16 tokens: two decoding requests outgrow them and vLLM preempts one
    engine = Engine(model_config, store_yaml, num_blocks=11)
    prompt_a = torch.randint(0, 1000, (64,), generator=_G).tolist()
    prompt_b = torch.randint(0, 1000, (70,), generator=_G).tolist()
    engine.add("a", prompt_a, max_tokens=40)
    engine.add("b", prompt_b, max_tokens=40)
    preempted, resumed = False, None
    for _ in range(60):
        so, meta, errors = engine.step()
        preempted |= "b" in so.preempted_req_ids
        plans = [p for p in meta.requests if p.req_id == "b" and p.load_end]
        if preempted and plans:
            assert engine.recving == {"b"}  # loaded while it waited
            so, _, _ = engine.step()
            resumed = so, plans[0], errors
            break
    assert resumed is not None, "b was not preempted and resumed"
    so, plan, errors = resumed
    # b's prompt chunks were saved before the preemption; it reloads 64 tokens into its
    # new blocks and computes only the rest (prompt tail and the tokens it generated)
    assert (plan.load_start, plan.load_end) == (0, 64) and errors == set()
    (again,) = [r for r in so.scheduled_new_reqs if r.req_id == "b"]  # 0.33 resends it whole
    assert again.num_computed_tokens == 64 and so.num_scheduled_tokens["b"] > 70 - 64
    got = read_tokens(engine.kv, CPUAttentionBackend, engine.blocks["b"], 0, 64, Engine.BLOCK)
    want = round_trip(*source_kv(prompt_b[:64]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_step_loads_as_one_batch_and_a_failed_load_is_a_recompute(model_config, store_yaml):
    """Two requests' loads in one step: one batched fetch and one decode into both
    requests' blocks (counted on the real store and codec); a load that raises midway
    (a fault injected: the tier cannot be made to raise for real here) reports every
    block of its requests for recompute, with the requests finished, never a crash."""
    block = 32
    config = make_vllm_config(model_config, store_yaml, block)
    kcc = make_kv_cache_config(block, 24, KVCacheLayout.LBHNC)
    worker, kv = make_worker(config, kcc, CPUAttentionBackend, KVCacheLayout.LBHNC)
    store = worker._store
    prompts = [torch.randint(0, 1000, (2 * CHUNK,), generator=_G).tolist() for _ in range(2)]
    for i, (tokens, blocks) in enumerate(zip(prompts, ([3, 17], [5, 0]))):
        write_tokens(kv, CPUAttentionBackend, blocks, 0, *source_kv(tokens), block)
        worker.bind_connector_metadata(
            KVTCConnectorMetadata([RequestPlan(f"s{i}", tokens, blocks, save_end=2 * CHUNK)])
        )
        worker.wait_for_save()
        worker.clear_connector_metadata()
    finish(worker)
    calls = {"get_batch": 0, "decode_batch": 0}

    def counted(obj, name):
        real = getattr(obj, name)

        def call(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)

        setattr(obj, name, call)

    counted(store, "get_batch")
    counted(store.codec, "decode_batch")
    plans = [RequestPlan("x", prompts[0], [20, 1], load_start=0, load_end=2 * CHUNK),
             RequestPlan("y", prompts[1], [12, 7], load_start=0, load_end=2 * CHUNK)]  # fmt: skip
    worker.bind_connector_metadata(KVTCConnectorMetadata(plans))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    finish(worker, "x", "y")
    assert calls == {"get_batch": 1, "decode_batch": 1}
    assert worker.get_block_ids_with_load_errors() == set()
    for tokens, dst in zip(prompts, ([20, 1], [12, 7])):
        got_k, _ = read_tokens(kv, CPUAttentionBackend, dst, 0, 2 * CHUNK, block)
        assert torch.equal(got_k, round_trip(*source_kv(tokens))[0])

    def broken(*a, **kw):
        raise OSError("tier read failed midway")

    store.get_batch = broken
    worker.bind_connector_metadata(KVTCConnectorMetadata(plans))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()
    finish(worker, "x", "y")
    assert worker.get_block_ids_with_load_errors() == {20, 1, 12, 7}
    del store.get_batch, store.codec.decode_batch
