"""LMCache 0.5.6 end to end with our serde ``kvtc`` and our L2 adapter (connectors/lmcache).

Runs inside ``.venv-lmcache`` (``make test-lmcache``); skipped where lmcache does not import.
LMCache's own multiprocess storage manager is built from the same ``--l2-adapter`` JSON
that ``lmcache server`` takes (LMCache's argument parser, CPU L1 memory), so these tests
drive LMCache's store controller, serde wrapper, async serde processor and prefetch
controller, with our code only where the config names it. A tiny hand-made artifact
(2 layers, 2 KV heads, head dim 16) keeps them to seconds; ``test_smollm2_chunk`` stores a
real SmolLM2 chunk with a calibrated artifact (marked ``model``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lmcache.v1.distributed.storage_manager",
    reason="lmcache 0.5.6 is not installed here; `make test-lmcache` runs this in .venv-lmcache",
)

from lmcache.v1.distributed.api import (
    GroupedObjectKeys,
    MemoryLayoutDesc,
    ObjectKey,
    PrefetchTaskSpec,
)
from lmcache.v1.distributed.config import parse_args
from lmcache.v1.distributed.serde import get_registered_serde_types
from lmcache.v1.distributed.storage_manager import StorageManager

from kvtc_store.backends import DiskBackend
from kvtc_store.codec import (
    CodecArtifact,
    KVTCCodec,
    PlanRange,
    RopeParams,
    default_groups,
    estimate_first_position,
)
from kvtc_store.codec.blob import MAGIC, unpack_blob
from kvtc_store.errors import BlobCorruptError, ChunkLayoutError, ConfigError

LAYERS, HEADS, DIM, TOKENS = 2, 2, 16, 32
SHAPE = torch.Size([2, LAYERS, TOKENS, HEADS * DIM])  # LMCache's KV_2LTD
LAYOUT = MemoryLayoutDesc(shapes=[SHAPE], dtypes=[torch.bfloat16])
DISK_CAP = 64 << 20


def tiny_artifact_dir(folder: Path, bits: int = 4) -> Path:
    """A saved artifact for the test shape: 16 of 64 components per group at ``bits`` bits
    (4; another ``bits`` is another codec version), in ``folder/artifact`` (at 4 bits) or
    ``folder/artifact-<bits>``."""
    groups = default_groups(LAYERS)
    p = LAYERS * HEADS * DIM
    g = torch.Generator().manual_seed(1)
    bases = [torch.linalg.qr(torch.randn(p, p, generator=g))[0][:, :16] for _ in groups]
    art = CodecArtifact(
        model_fingerprint="a" * 64,
        model_name="tiny-lmcache",
        kv_shape=(LAYERS, HEADS, DIM),
        rope=RopeParams(head_dim=DIM, theta=1e4),
        groups=groups,
        means=[torch.zeros(p) for _ in groups],
        bases=bases,
        plan=[PlanRange(i, 0, 16, bits) for i in range(len(groups))],
        target_ratio=8.0,
    )
    return art.save(folder / ("artifact" if bits == 4 else f"artifact-{bits}"))


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    """A store config (memory over disk) and the saved artifact it names."""
    artifact = tiny_artifact_dir(tmp_path)
    config = tmp_path / "store.yaml"
    config.write_text(
        "tiers:\n"
        "  - {kind: memory, capacity: 1MiB}\n"
        f"  - {{kind: disk, path: {tmp_path / 'disk'}, capacity: {DISK_CAP}}}\n"
        f"codec: {{artifact: {artifact}}}\n"
    )
    return {"config": str(config), "artifact": artifact, "disk": tmp_path / "disk"}


def adapter_spec(config: str, serde: dict | None) -> dict:
    """The ``--l2-adapter`` JSON a deployment writes (docs/engines/lmcache.md)."""
    spec = {
        "type": "plugin",
        "module_path": "kvtc_store.connectors.lmcache",
        "class_name": "KVTCStoreL2Adapter",
        "adapter_params": {"config": config},
    }
    if serde is not None:
        spec["serde"] = serde
    return spec


def storage_manager(spec: dict) -> StorageManager:
    """LMCache's storage manager from ``lmcache server``-style arguments (CPU L1)."""
    cfg = parse_args(
        [
            "--l1-size-gb", "1", "--l1-init-size-gb", "1", "--eviction-policy", "LRU",
            "--l2-adapter", json.dumps(spec),
        ]
    )  # fmt: skip
    return StorageManager(cfg)


def object_keys(n: int, salt: str = "") -> list[ObjectKey]:
    return [
        ObjectKey(chunk_hash=bytes([i + 1]) * 32, model_name="tiny", kv_rank=0, cache_salt=salt)
        for i in range(n)
    ]


def chunks(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(torch.bfloat16) for _ in range(n)]


def wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def our_adapter(sm: StorageManager):
    """Our adapter inside LMCache, listed first (behind LMCache's serde wrapper when a
    serde is set)."""
    _, adapter = sm.l2_adapters()[0]
    return getattr(adapter, "inner_adapter", adapter)


def store(sm: StorageManager, keys: list[ObjectKey], kvs: list[torch.Tensor]) -> None:
    """Write chunks into LMCache's L1; wait until its store controller put them in L2."""
    layout = MemoryLayoutDesc(shapes=[kvs[0].shape], dtypes=[kvs[0].dtype])
    reserved = sm.reserve_write(keys, layout)
    for k, kv in zip(keys, kvs, strict=True):
        reserved[k].tensor.copy_(kv)
    sm.finish_write(keys)
    adapter = our_adapter(sm)
    assert wait(
        lambda: adapter.stack.exists([adapter._hex([k])[0] for k in keys]) == [True] * len(keys)
    )
    assert wait(lambda: sm.report_status()["store_controller"]["in_flight_task_count"] == 0)


def prefetch(
    sm: StorageManager, keys: list[ObjectKey], layout: MemoryLayoutDesc = LAYOUT
) -> list[torch.Tensor] | None:
    """LMCache's prefetch (L2 load, deserialize into L1); the chunks if all hit."""
    spec = PrefetchTaskSpec([GroupedObjectKeys(keys=keys, object_group_id=0, layout_desc=layout)])
    handle = sm.submit_prefetch_task(spec)
    assert sm.wait_prefetch_status(handle, 20.0), "LMCache's prefetch did not finish"
    n = sm.query_prefetch_status(handle).hit_cells[0].count_leading_ones()
    if n < len(keys):
        return None
    with sm.read_prefetched_results(keys) as objs:
        out = [o.tensor.clone() for o in objs]
    sm.finish_read_prefetched(keys)
    return out


def codec_round_trip(artifact: Path, kv: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """What our codec alone makes of a KV_2LTD chunk, coded where the serde codes it (the
    first position its keys show, among multiples of 256 below 131072)."""
    codec = KVTCCodec(CodecArtifact.load(artifact))
    layers, tokens = kv.shape[1:3]
    heads, dim = codec.artifact.kv_shape[1:]
    k, v = kv.view(2, layers, tokens, heads, dim).transpose(2, 3)
    first = estimate_first_position(codec.artifact, k, torch.arange(0, 131072, 256))
    blob = codec.encode(k, v, first_position=first, exact_tail=0)
    dec = codec.decode(blob, dtype=kv.dtype)
    out = torch.stack([dec.keys, dec.values]).transpose(2, 3).reshape(kv.shape)
    return out, blob


# --- tests ------------------------------------------------------------------------------------


def test_importing_the_plugin_registers_the_serde() -> None:
    import kvtc_store.connectors.lmcache  # noqa: F401

    assert "kvtc" in get_registered_serde_types()
    import importlib

    importlib.reload(importlib.import_module("kvtc_store.connectors.lmcache_serde"))  # no raise


def test_store_then_retrieve_through_lmcache(setup: dict) -> None:
    """Serde + adapter: chunks come back as our codec's round trip, in LMCache's exact
    shape and dtype; the disk tier holds our blobs, smaller than the raw chunks."""
    spec = adapter_spec(setup["config"], {"type": "kvtc", "config": setup["config"]})
    sm = storage_manager(spec)
    keys, kvs = object_keys(3), chunks(3)
    try:
        store(sm, keys, kvs)
        sm.clear(force=True)  # L1 empty: the next read must come from our tiers
        got = prefetch(sm, keys)
        assert got is not None, "LMCache did not load the chunks back from the kvtc tiers"
        for kv, out in zip(kvs, got, strict=True):
            expect, _ = codec_round_trip(setup["artifact"], kv)
            assert out.shape == SHAPE and out.dtype == torch.bfloat16
            assert torch.equal(out, expect)
            assert not torch.equal(out, kv)  # lossy: it really went through the codec
        hexkeys = our_adapter(sm)._hex(keys)
    finally:
        sm.close()  # drains our write-down queues
    disk = DiskBackend(setup["disk"], DISK_CAP)
    for kv, blob in zip(kvs, disk.get(hexkeys), strict=True):
        assert blob is not None and blob[:4] == MAGIC
        header, _ = unpack_blob(blob)
        assert header.shape == [LAYERS, HEADS, DIM, TOKENS] and header.dtype == "bfloat16"
        assert blob == codec_round_trip(setup["artifact"], kv)[1]  # exactly our encoder's
        assert len(blob) < kv.numel() * 2 / 2  # at least 2x smaller than the bf16 chunk
    assert sorted(p.name for p in setup["disk"].rglob("*.kvtc")) == sorted(
        f"{h}.kvtc" for h in hexkeys
    )


def test_two_codec_versions_in_one_shared_tier_are_both_read(tmp_path: Path) -> None:
    """Through the registry config (``codec.registry``, serde ``config``): chunks stored
    while version 1 is current, then (a restarted server) after version 2 was promoted,
    share the disk tier; the second server reads both, each as its own version's round
    trip."""
    from kvtc_store.registry import open_registry

    dirs = [tiny_artifact_dir(tmp_path, bits) for bits in (4, 6)]
    registry = open_registry(tmp_path / "registry", create=True)
    ids = [registry.publish(d)[0] for d in dirs]
    registry.promote("a" * 64, ids[0], "default")
    config = tmp_path / "store.yaml"
    config.write_text(
        "tiers:\n"
        "  - {kind: memory, capacity: 1MiB}\n"
        f"  - {{kind: disk, path: {tmp_path / 'disk'}, capacity: {DISK_CAP}}}\n"
        f"codec: {{registry: {tmp_path / 'registry'}, profile: default, refresh_seconds: 0, "
        f"cache_dir: {tmp_path / 'cache'}}}\n"
    )
    spec = adapter_spec(str(config), {"type": "kvtc", "config": str(config)})
    keys, kvs = object_keys(4), chunks(4)
    sm = storage_manager(spec)
    try:
        store(sm, keys[:2], kvs[:2])  # version 1
    finally:
        sm.close()
    registry.promote("a" * 64, ids[1], "default")
    sm = storage_manager(spec)
    try:
        store(sm, keys[2:], kvs[2:])  # version 2
        sm.clear(force=True)
        got = prefetch(sm, keys)
        assert got is not None, "LMCache did not load both versions back"
        hexkeys = our_adapter(sm)._hex(keys)
    finally:
        sm.close()
    disk = DiskBackend(tmp_path / "disk", DISK_CAP)
    written = [unpack_blob(b)[0].artifact_id for b in disk.get(hexkeys)]
    assert written == [ids[0], ids[0], ids[1], ids[1]]
    for kv, out, d in zip(kvs, got, [dirs[0]] * 2 + [dirs[1]] * 2, strict=True):
        assert torch.equal(out, codec_round_trip(d, kv)[0])
    assert not torch.equal(
        codec_round_trip(dirs[0], kvs[0])[0], codec_round_trip(dirs[1], kvs[0])[0]
    )


def test_chunks_outlive_the_lmcache_process_on_disk(setup: dict) -> None:
    """A second storage manager (a restarted server: empty L1 and memory tier) finds the
    chunks in the disk tier."""
    serde = {"type": "kvtc", "artifact": str(setup["artifact"])}
    keys, kvs = object_keys(2), chunks(2, seed=3)
    sm = storage_manager(adapter_spec(setup["config"], serde))
    try:
        store(sm, keys, kvs)
    finally:
        sm.close()
    sm = storage_manager(adapter_spec(setup["config"], serde))
    try:
        got = prefetch(sm, keys)
        assert got is not None
        for kv, out in zip(kvs, got, strict=True):
            assert torch.equal(out, codec_round_trip(setup["artifact"], kv)[0])
        assert our_adapter(sm).stack.tiers[0].usage().n_items == 2  # promoted to memory
    finally:
        sm.close()


def test_corrupt_blob_is_a_miss_not_wrong_data(setup: dict) -> None:
    serde = {"type": "kvtc", "config": setup["config"]}
    keys, kvs = object_keys(2), chunks(2, seed=5)
    sm = storage_manager(adapter_spec(setup["config"], serde))
    try:
        store(sm, keys, kvs)
        hexkeys = our_adapter(sm)._hex(keys)
    finally:
        sm.close()
    path = next(setup["disk"].rglob(f"{hexkeys[1]}.kvtc"))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # one bit in the payload
    path.write_bytes(bytes(data))
    codec = KVTCCodec(CodecArtifact.load(setup["artifact"]))
    with pytest.raises(BlobCorruptError):
        codec.decode(bytes(data))
    sm = storage_manager(adapter_spec(setup["config"], serde))  # fresh: memory tier empty
    try:
        assert prefetch(sm, keys[1:]) is None  # the damaged chunk: a miss
        good = prefetch(sm, keys[:1])  # the intact one still loads, exactly
        assert good is not None
        assert torch.equal(good[0], codec_round_trip(setup["artifact"], kvs[0])[0])
    finally:
        sm.close()


def test_serde_with_lmcaches_own_fs_adapter(setup: dict, tmp_path: Path) -> None:
    """The serde alone, around LMCache's built-in filesystem adapter (listed after ours,
    which imports the module that registers it): LMCache's files are our blobs. Reading
    them back is that adapter's job, and 0.5.6's refuses objects shorter than the serde's
    size estimate ("Incomplete read"): every chunk is then a miss, never wrong KV; our
    adapter, which keeps each blob's own length, is the one to use."""
    fs_dir = tmp_path / "lmcache-fs"
    fs_dir.mkdir()
    fs = {"type": "fs", "base_path": str(fs_dir), "serde": {"type": "kvtc", **_art(setup)}}
    ours = adapter_spec(setup["config"], None)
    keys, kvs = object_keys(2), chunks(2, seed=11)
    cfg = parse_args(
        [
            "--l1-size-gb", "1", "--l1-init-size-gb", "1", "--eviction-policy", "LRU",
            "--l2-adapter", json.dumps(ours), "--l2-adapter", json.dumps(fs),
        ]
    )  # fmt: skip
    sm = StorageManager(cfg)
    try:
        store(sm, keys, kvs)
        assert wait(lambda: len(list(fs_dir.rglob("*.data"))) == 2)
    finally:
        sm.close()
    for kv, f in zip(kvs, sorted(fs_dir.rglob("*.data")), strict=True):
        assert f.read_bytes() == codec_round_trip(setup["artifact"], kv)[1]
    sm = storage_manager(fs)  # LMCache's fs adapter alone; the serde is registered already
    try:
        assert prefetch(sm, keys) is None
    finally:
        sm.close()


def _art(setup: dict) -> dict:
    return {"artifact": str(setup["artifact"])}


def test_adapter_without_serde_stores_raw_kv_exactly(setup: dict) -> None:
    sm = storage_manager(adapter_spec(setup["config"], None))
    keys, kvs = object_keys(2, salt="tenant-a"), chunks(2, seed=7)
    try:
        store(sm, keys, kvs)
        sm.clear(force=True)
        got = prefetch(sm, keys)
        assert got is not None
        for kv, out in zip(kvs, got, strict=True):
            assert torch.equal(out, kv)
        # another cache salt (LMCache's tenant) does not see these chunks
        assert prefetch(sm, object_keys(2, salt="tenant-b")) is None
    finally:
        sm.close()


def test_s3_tier_through_lmcache(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    """Our S3 tier (moto's server on loopback) as LMCache's L2, KVTC blobs in the bucket."""
    from tests.s3_server import raw_client

    artifact = tiny_artifact_dir(tmp_path)
    config = tmp_path / "s3.yaml"
    config.write_text(
        "tiers:\n"
        "  - {kind: memory, capacity: 1MiB}\n"
        f"  - {{kind: s3, bucket: {bucket}, endpoint_url: '{s3_endpoint}', region: us-east-1}}\n"
    )
    serde = {"type": "kvtc", "artifact": str(artifact)}
    keys, kvs = object_keys(2), chunks(2, seed=9)
    sm = storage_manager(adapter_spec(str(config), serde))
    try:
        store(sm, keys, kvs)
    finally:
        sm.close()
    objects = raw_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert len(objects) == 2
    body = raw_client(s3_endpoint).get_object(Bucket=bucket, Key=objects[0]["Key"])["Body"]
    assert body.read()[:4] == MAGIC
    sm = storage_manager(adapter_spec(str(config), serde))  # memory tier empty: from S3
    try:
        got = prefetch(sm, keys)
        assert got is not None
        for kv, out in zip(kvs, got, strict=True):
            assert torch.equal(out, codec_round_trip(artifact, kv)[0])
    finally:
        sm.close()


def test_serde_refuses_another_models_chunks(setup: dict) -> None:
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    from kvtc_store.connectors.lmcache_serde import KVTCSerializer, codec_for_serde

    codec = codec_for_serde({"artifact": str(setup["artifact"])})
    kv = torch.zeros(2, LAYERS + 1, TOKENS, HEADS * DIM, dtype=torch.bfloat16)
    meta = MemoryObjMetadata(kv.shape, kv.dtype, -1, kv.numel() * 2, -1, fmt=MemoryFormat.KV_2LTD)
    src = TensorMemoryObj(kv, meta, None)
    with pytest.raises(ChunkLayoutError, match="KV_2LTD"):
        KVTCSerializer(codec).serialize(src, src, object_keys(1)[0])


def test_serde_config_errors_name_the_problem(setup: dict) -> None:
    from kvtc_store.connectors.lmcache_serde import create_serde

    with pytest.raises(ConfigError, match="exactly one"):
        create_serde({})
    with pytest.raises(ConfigError, match="unknown key"):
        create_serde({"artifact": str(setup["artifact"]), "ratio": 8})
    bare = Path(setup["config"]).with_name("bare.yaml")
    bare.write_text("tiers:\n  - {kind: memory, capacity: 1MiB}\n")
    with pytest.raises(ConfigError, match="codec.artifact"):
        create_serde({"config": str(bare)})


@pytest.mark.model
def test_smollm2_chunks_through_lmcache(tmp_path: Path, test_settings) -> None:
    """Real SmolLM2 KV (two 256-token chunks of Python's own docs, positions 0 and 256)
    with a calibrated artifact: LMCache gets our codec's round trip back, each blob is
    coded at its chunk's true position (read from the keys), at a ratio above 8.

    The model and the artifact are the ones the default suite leaves in the cache
    (``make test`` runs before ``make test-lmcache`` in CI): the converted SmolLM2 and
    the ratio-16 codec of the suite's calibration settings (``tests/test_cli.py``
    calibrates it); this environment has no corpus to calibrate one itself."""
    import dataclasses
    import glob
    import pydoc_data.topics

    from kvtc_store.calibration import artifact_dir
    from kvtc_store.model import cache_home, load_model

    models = sorted(glob.glob(str(cache_home() / "models" / "SmolLM2-135M-Instruct-*")))
    models = [m for m in models if "." not in Path(m).name]  # not a conversion in progress
    if not models:
        pytest.skip("no converted SmolLM2 cached (`make test` writes it; CI runs it first)")
    model, tok, info = load_model(models[-1])
    # the converted copy's folder is "<model name>-<stamp>"; calibration files the codec
    # under the model's name (what load_model() of the package gives), so name it so
    info = dataclasses.replace(info, name=Path(models[-1]).name.rsplit("-", 1)[0])
    # asked of the library, never spelt here (a spelt folder name went stale once)
    artifact = artifact_dir(info, test_settings, 16.0)
    if not (artifact / "manifest.json").is_file():
        pytest.skip(f"no ratio-16 artifact at {artifact} (`make test` writes it; CI runs it first)")
    text = "".join(pydoc_data.topics.topics.values())[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    k = torch.stack([layer.keys[0] for layer in cache.layers])  # (L, H, 512, D)
    v = torch.stack([layer.values[0] for layer in cache.layers])
    layers, heads, _, dim = k.shape
    kv = torch.stack([k, v]).transpose(2, 3).reshape(2, layers, 512, heads * dim)
    kvs = [kv[:, :, s : s + 256].to(torch.bfloat16).contiguous() for s in (0, 256)]
    layout = MemoryLayoutDesc(shapes=[kvs[0].shape], dtypes=[torch.bfloat16])
    config = tmp_path / "store.yaml"
    config.write_text(f"tiers:\n  - {{kind: disk, path: {tmp_path / 'disk'}, capacity: 1GiB}}\n")
    serde = {"type": "kvtc", "artifact": str(artifact)}
    keys = [ObjectKey(bytes([i + 1]) * 32, "SmolLM2-135M-Instruct", 0) for i in range(2)]
    sm = storage_manager(adapter_spec(str(config), serde))
    try:
        store(sm, keys, kvs)
        sm.clear(force=True)
        got = prefetch(sm, keys, layout)
        assert got is not None
        blobs = our_adapter(sm).stack.get(our_adapter(sm)._hex(keys)).blobs
    finally:
        sm.close()
    codec = KVTCCodec(CodecArtifact.load(artifact))
    for first, chunk, out, blob in zip((0, 256), kvs, got, blobs, strict=True):
        expect, own_blob = codec_round_trip(artifact, chunk)
        assert blob == own_blob and codec.read_header(blob).first_position == first
        assert out.dtype == torch.bfloat16 and torch.equal(out, expect)
        assert chunk.numel() * 2 / len(blob) > 8  # honest ratio: bf16 bytes / blob bytes
        keys_err = (out[0].float() - chunk[0].float()).norm() / chunk[0].float().norm()
        assert keys_err < 0.2  # 0.10 measured; coded at position 0, chunk 1 had 0.50
