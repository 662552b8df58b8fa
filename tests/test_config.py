"""Tests of the typed store configuration (kvtc_store.config): YAML, env overrides, tiers.

All CPU, no model: the codec test uses a tiny hand-made artifact.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from kvtc_store.backends import DiskBackend, MemoryBackend
from kvtc_store.config import (
    CodecConfig,
    DiskTierConfig,
    GPUTierConfig,
    MemoryTierConfig,
    S3TierConfig,
    StoreConfig,
    build_tiers,
    codec_from_config,
    load_config,
    parse_byte_size,
)
from kvtc_store.errors import ArtifactError, ArtifactModelMismatchError, ConfigError
from tests.tiny_codec import tiny_artifact as make_tiny_artifact
from tests.tiny_codec import tiny_info

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "store.yaml"
MiB, GiB = 2**20, 2**30
KEY = "ab" * 32

MINIMAL = """
tiers:
  - kind: memory
    capacity: 64MiB
  - kind: disk
    path: cache
    capacity: 1GiB
"""


def write(tmp_path: Path, text: str, name: str = "store.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path, env: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


# --- the example and valid files -----------------------------------------------------------


def test_example_loads_with_the_right_types() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert isinstance(cfg, StoreConfig)
    gpu, mem, disk = cfg.tiers
    assert isinstance(gpu, GPUTierConfig) and gpu.optional and gpu.capacity == 2 * GiB
    assert isinstance(mem, MemoryTierConfig) and mem.capacity == 256 * MiB
    assert isinstance(disk, DiskTierConfig) and disk.capacity == 8 * GiB
    assert type(disk.capacity) is int
    # outside the repository (a store run from the example leaves nothing in the clone)
    assert disk.path == Path("~/.cache/kvtc-store/example-disk-tier").expanduser()
    assert not disk.path.resolve().is_relative_to(EXAMPLE.parent.parent.resolve())
    assert (mem.eviction, mem.label, disk.label) == ("lru", "memory", "disk")
    assert (cfg.chunk_tokens, cfg.tenant, cfg.write_mode) == (256, "", "write-through")
    assert (cfg.write_queue_chunks, cfg.prefetch_buffer, cfg.metrics.port) == (256, 256 * MiB, None)
    assert cfg.codec == CodecConfig(target_ratio=16, calibration_windows=48)
    assert cfg.codec.rate_control is True and cfg.codec.exact_dtype == "bfloat16-planes"
    assert cfg.codec.artifact is None and type(cfg.codec.target_ratio) is float


def test_example_s3_block_uncommented_is_valid(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^  # (- |  )", r"  \1", EXAMPLE.read_text())
    cfg = load_config(write(tmp_path, text), env={})
    s3 = cfg.tiers[3]
    assert isinstance(s3, S3TierConfig)
    assert (s3.bucket, s3.prefix, s3.region) == ("kvtc-chunks", "kvtc/", "us-east-1")
    assert s3.endpoint_url == "http://127.0.0.1:9000" and s3.capacity == 100 * GiB


def test_defaults_and_artifact_path(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "codec:\n  artifact: arts/cr16\n"), env={})
    assert cfg.codec.artifact == tmp_path / "arts" / "cr16"
    assert cfg.codec.coder is None and cfg.codec.quantizer == "rans" and cfg.codec.device == "cpu"
    s3 = StoreConfig(tiers=[{"kind": "s3", "bucket": "b"}]).tiers[0]
    assert (s3.prefix, s3.endpoint_url, s3.region, s3.capacity) == ("kvtc/", None, None, None)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("256MiB", 256 * MiB),
        ("8GB", 8 * 10**9),
        ("1.5GiB", 3 * GiB // 2),
        ("2 kib", 2048),
        ("10b", 10),
        ("1TiB", 2**40),
        (".5KB", 500),
        (1e9, 10**9),
        (1.5, 1),
        ("0.5KiB", 512),
    ],
)
def test_byte_sizes_parse(text, size) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize(
    "bad",
    [-1, -2.0, "-5MiB", "lots", "12 parsecs", "1e3", "MiB", "", True, None, float("nan")],
)
def test_bad_byte_sizes_are_refused(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_byte_size(bad)


# --- errors name their field and the file --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        (MINIMAL + "chunk_tokenz: 512\n", "chunk_tokenz", "did you mean 'chunk_tokens'"),
        (MINIMAL.replace("capacity: 64MiB", "capasity: 64MiB"), "tiers.0.capasity", "unknown"),
        (MINIMAL.replace("1GiB", "lots"), "tiers.1.capacity", "not a byte size"),
        (MINIMAL.replace("1GiB", "-1GiB"), "tiers.1.capacity", "negative"),
        (MINIMAL.replace("1GiB", "0"), "tiers.1.capacity", "more than 0"),
        ("tiers: []\n", "tiers", "at least 1"),
        ("tenant: a\n", "tiers", "required"),
        (MINIMAL + "chunk_tokens: 100\n", "chunk_tokens", "multiple of 16"),
        (MINIMAL + "chunk_tokens: 0\n", "chunk_tokens", "greater than 0"),
        (MINIMAL + "chunk_tokens: true\n", "chunk_tokens", "valid integer"),
        (MINIMAL.replace("kind: disk", "kind: ssd"), "tiers.1.kind", "memory, disk, s3"),
        (MINIMAL.replace("  - kind: disk\n", "  - \n"), "tiers.1.kind", "memory, disk, s3"),
        ("tiers:\n  - kind: s3\n    prefix: x/\n", "tiers.0.bucket", "required"),
        (MINIMAL + "write_mode: write-around\n", "write_mode", "write-through"),
        (MINIMAL + "codec:\n  target_ration: 8\n", "codec.target_ration", "unknown"),
        (MINIMAL + "codec:\n  target_ratio: 1\n", "codec.target_ratio", "greater than 1"),
        (MINIMAL + "codec:\n  artifact: a\n  target_ratio: 8\n", "codec", "not both"),
        (MINIMAL + "codec:\n  coder: zstd\n", "codec.coder", "deflate"),
        (MINIMAL + "codec:\n  max_artifact_share: 0\n", "codec.max_artifact_share", "greater"),
        (MINIMAL + "codec:\n  max_artifact_share: 1.5\n", "codec.max_artifact_share", "less"),
        (MINIMAL + "codec:\n  calibration_corpus: wiki\n", "codec.calibration_corpus", "numpy"),
        (
            MINIMAL + "codec:\n  artifact: a\n  calibration_corpus: shakespeare\n",
            "codec",
            "not both",
        ),
        (MINIMAL.replace("1GiB\n", "1GiB\n  - {kind: memory, capacity: 1}\n"), "tiers", "distinct"),
        ("tiers: [{kind: s3, bucket: a}, {kind: s3, bucket: b, name: s3}]", "tiers", "distinct"),
        (MINIMAL + "tenant: 0123\n", "tenant", "valid string"),
        (MINIMAL + "    eviction: s3fifo\n", "tiers.1.eviction", "'lru'"),
        ("tiers: [{kind: s3, bucket: a, eviction: s3fifo}]", "tiers.0.eviction", "'lru'"),
        (MINIMAL.replace("64MiB", "64MiB\n    eviction: arc"), "tiers.0.eviction", "s3fifo"),
    ],
)
def test_each_error_names_its_field_and_the_file(tmp_path: Path, text, where, what) -> None:
    path = write(tmp_path, text)
    msg = config_error(path)
    line = next((ln for ln in msg.splitlines() if ln.startswith(f"{path}: {where}: ")), "")
    assert what in line, msg


def test_every_error_is_reported(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, MINIMAL.replace("1GiB", "x") + "chunk_tokens: 7\n"))
    assert "tiers.1.capacity" in msg and "chunk_tokens" in msg and len(msg.splitlines()) == 2


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "tiers:\n  - kind: memory\n    capacity: [64MiB\n")
    msg = config_error(path)
    assert str(path) in msg and "YAML syntax error at line" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert config_error(path) == f"{path}: config file not found"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in config_error(write(tmp_path, "- kind: memory\n"))
    assert "tiers: Field required" in config_error(write(tmp_path, ""))


# --- environment overrides -------------------------------------------------------------------


def test_env_overrides_scalar_nested_and_list_index(tmp_path: Path) -> None:
    env = {
        "KVTC_STORE_CHUNK_TOKENS": "512",
        "KVTC_STORE_TENANT": "acme",
        "KVTC_STORE_CODEC__TARGET_RATIO": "8",
        "KVTC_STORE_CODEC__LAYERS_PER_GROUP": "2",
        "KVTC_STORE_TIERS__1__CAPACITY": "2GiB",
        "KVTC_STORE_TIERS__0__NAME": "hot",
        "KVTC_STORE_HOME": "/somewhere",  # the cache home, not a field: skipped
        "OTHER_VAR": "x",
    }
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.chunk_tokens == 512 and cfg.tenant == "acme"
    assert cfg.codec.target_ratio == 8.0 and cfg.codec.layers_per_group == 2
    assert cfg.tiers[1].capacity == 2 * GiB and cfg.tiers[0].capacity == 64 * MiB
    assert cfg.tiers[0].label == "hot"


def test_write_down_prefetch_metrics_and_gpu_fields(tmp_path: Path) -> None:
    text = (
        "tiers:\n  - {kind: gpu, capacity: 1GiB, device: 'cuda:1', optional: true}\n"
        + (MINIMAL.split("tiers:\n", 1)[1])
    )
    cfg = load_config(write(tmp_path, text), env={})
    gpu = cfg.tiers[0]
    assert (gpu.kind, gpu.device, gpu.optional, gpu.eviction) == ("gpu", "cuda:1", True, "lru")
    assert (cfg.write_queue_chunks, cfg.prefetch_buffer) == (256, 256 * MiB)
    assert cfg.prefetch_threads == 4
    assert (cfg.metrics.port, cfg.metrics.addr) == (None, "127.0.0.1")
    env = {
        "KVTC_STORE_WRITE_MODE": "write-back",
        "KVTC_STORE_WRITE_QUEUE_CHUNKS": "1024",
        "KVTC_STORE_PREFETCH_BUFFER": "0",
        "KVTC_STORE_PREFETCH_THREADS": "8",
        "KVTC_STORE_METRICS__PORT": "9400",
        "KVTC_STORE_METRICS__ADDR": "0.0.0.0",
        "KVTC_STORE_TIERS__0__DEVICE": "cuda",
        "KVTC_STORE_TIERS__0__EVICTION": "s3fifo",
    }
    cfg = load_config(write(tmp_path, text), env=env)
    assert (cfg.write_mode, cfg.write_queue_chunks, cfg.prefetch_buffer) == ("write-back", 1024, 0)
    assert cfg.prefetch_threads == 8
    assert (cfg.metrics.port, cfg.metrics.addr) == (9400, "0.0.0.0")
    assert (cfg.tiers[0].device, cfg.tiers[0].eviction) == ("cuda", "s3fifo")
    for var, value, where in (
        ("KVTC_STORE_WRITE_QUEUE_CHUNKS", "0", "write_queue_chunks"),
        ("KVTC_STORE_METRICS__PORT", "70000", "metrics.port"),
        ("KVTC_STORE_METRICS__PROT", "1", "metrics.prot"),
        ("KVTC_STORE_TIERS__0__DEVICE", "cpu", "tiers.0.device"),
    ):
        assert f"{where} (env {var})" in config_error(write(tmp_path, text), {var: value})


def test_overrides_come_from_os_environ_by_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVTC_STORE_TENANT", "from-env")
    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path))
    assert load_config(write(tmp_path, MINIMAL)).tenant == "from-env"


def test_env_text_fields_are_taken_verbatim(tmp_path: Path) -> None:
    text = MINIMAL + "  - kind: s3\n    bucket: b\n    endpoint_url: http://127.0.0.1:9000\n"
    env = {
        "KVTC_STORE_TENANT": "0123",  # a YAML int (octal): must stay the text
        "KVTC_STORE_TIERS__2__BUCKET": "no",  # a YAML bool
        "KVTC_STORE_TIERS__2__ENDPOINT_URL": "null",  # nullable: null means None
        "KVTC_STORE_TIERS__1__PATH": "rel/dir",  # relative to the working directory
        "KVTC_STORE_CODEC__DEVICE": "cuda:0",
    }
    cfg = load_config(write(tmp_path, text), env=env)
    assert cfg.tenant == "0123" and cfg.tiers[2].bucket == "no"
    assert cfg.tiers[2].endpoint_url is None
    assert cfg.tiers[1].path == Path("rel/dir") and cfg.codec.device == "cuda:0"


def test_env_can_add_a_missing_section(tmp_path: Path) -> None:
    env = {"KVTC_STORE_CODEC__ARTIFACT": "/arts/cr8"}
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.codec.artifact == Path("/arts/cr8")


@pytest.mark.parametrize(
    ("var", "value", "where", "what"),
    [
        ("KVTC_STORE_CHUNK_TOKENS", "abc", "chunk_tokens", "valid integer"),
        ("KVTC_STORE_CHUNK_TOKENS", "100", "chunk_tokens", "multiple of 16"),
        ("KVTC_STORE_TIERS__1__CAPACITY", "lots", "tiers.1.capacity", "not a byte size"),
        ("KVTC_STORE_TIERS__0__KIND", "ssd", "tiers.0.kind", "memory, disk, s3"),
        ("KVTC_STORE_TIERS__7__CAPACITY", "1GiB", "tiers.7.capacity", "no list item 7"),
        ("KVTC_STORE_CHUNK_TOKEN", "512", "chunk_token", "did you mean 'chunk_tokens'"),
        ("KVTC_STORE_CODEC__TARGET_RATIO", "[8,", "codec.target_ratio", "not a YAML scalar"),
        ("KVTC_STORE_TENANT__X", "a", "tenant.x", "not a mapping"),
        ("KVTC_STORE_TIERS__NAME", "a", "tiers.name", "not a mapping"),
    ],
)
def test_bad_env_values_name_the_variable(tmp_path: Path, var, value, where, what) -> None:
    path = write(tmp_path, MINIMAL)
    msg = config_error(path, env={var: value})
    assert msg.startswith(f"{path}: {where} (env {var}): "), msg
    assert what in msg


# --- building tiers --------------------------------------------------------------------------


def test_build_tiers_gives_working_memory_and_disk_tiers(tmp_path: Path) -> None:
    env = {"KVTC_STORE_TIERS__2__PATH": str(tmp_path / "disk")}
    tiers = [t for t in build_tiers(load_config(EXAMPLE, env=env)) if t.name != "gpu"]
    mem, disk = tiers  # the optional GPU tier is left out where CUDA is missing
    assert isinstance(mem, MemoryBackend) and isinstance(disk, DiskBackend)
    assert (mem.name, disk.name) == ("memory", "disk")
    assert mem.usage().capacity_bytes == 256 * MiB and disk.usage().capacity_bytes == 8 * GiB
    for tier in tiers:
        tier.put([(KEY, b"blob")])
        assert tier.get([KEY, "cd" * 32]) == [b"blob", None]
    assert (tmp_path / "disk" / KEY[:2] / f"{KEY}.kvtc").read_bytes() == b"blob"


def test_memory_tier_takes_s3fifo_eviction(tmp_path: Path) -> None:
    text = MINIMAL.replace("64MiB", "64MiB\n    eviction: s3fifo")
    cfg = load_config(write(tmp_path, text), env={})
    assert [t.eviction for t in cfg.tiers] == ["s3fifo", "lru"]
    mem = build_tiers(cfg)[0]
    assert isinstance(mem, MemoryBackend) and mem.policy == "s3fifo"
    env = {"KVTC_STORE_TIERS__0__EVICTION": "lru"}
    assert build_tiers(load_config(write(tmp_path, text), env=env))[0].policy == "lru"
    env = {"KVTC_STORE_TIERS__1__EVICTION": "s3fifo"}
    assert "tiers.1.eviction (env KVTC_STORE_TIERS__1__EVICTION)" in config_error(
        write(tmp_path, MINIMAL), env
    )


def test_memory_tier_pinned_needs_cuda(tmp_path: Path) -> None:
    """``pinned`` is a strict bool; without CUDA, building a pinned memory tier is a
    ConfigError naming the field (with CUDA the tier is tested in test_gpu_rans.py)."""
    text = MINIMAL.replace("64MiB", "64MiB\n    pinned: true")
    cfg = load_config(write(tmp_path, text), env={})
    assert [getattr(t, "pinned", None) for t in cfg.tiers] == [True, None]
    assert load_config(EXAMPLE, env={}).tiers[1].pinned is False
    assert "tiers.0.pinned" in config_error(write(tmp_path, MINIMAL.replace(
        "64MiB", "64MiB\n    pinned: yes-please")))  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("CUDA here: a pinned tier builds")
    with pytest.raises(ConfigError, match=r"tiers\.0\.pinned: pinned host memory needs CUDA"):
        build_tiers(cfg)
    with pytest.raises(ConfigError, match="needs CUDA"):
        MemoryBackend(1 << 20, pinned=True)


def test_build_tiers_uses_tier_names(tmp_path: Path) -> None:
    text = (
        "tiers:\n"
        f"  - {{kind: disk, name: nvme, path: {tmp_path / 'a'}, capacity: 1MiB}}\n"
        f"  - {{kind: disk, name: nfs, path: {tmp_path / 'b'}, capacity: 1MiB}}\n"
    )
    assert [t.name for t in build_tiers(load_config(write(tmp_path, text), env={}))] == [
        "nvme",
        "nfs",
    ]


def test_build_tiers_passes_s3_settings(tmp_path: Path, monkeypatch) -> None:
    made = []

    class FakeS3:
        name = "s3"

        def __init__(self, bucket, **kwargs):
            made.append((bucket, kwargs))

    fake = types.ModuleType("kvtc_store.backends.s3")
    fake.S3Backend = FakeS3
    monkeypatch.setitem(sys.modules, "kvtc_store.backends.s3", fake)
    cfg = StoreConfig(
        tiers=[
            {
                "kind": "s3",
                "bucket": "bk",
                "endpoint_url": "http://127.0.0.1:9000",
                "region": "eu-west-1",
                "capacity": "1GiB",
                "max_concurrency": 16,
                "read_timeout": 1.5,
                "check_bucket": False,
                "abort_uploads_after": None,
            },
        ]
    )
    (s3,) = build_tiers(cfg)
    assert isinstance(s3, FakeS3) and s3.name == "s3"
    assert made == [
        (
            "bk",
            {
                "prefix": "kvtc/",
                "endpoint_url": "http://127.0.0.1:9000",
                "region_name": "eu-west-1",
                "capacity_bytes": GiB,
                "max_concurrency": 16,
                "connect_timeout": 2.0,
                "read_timeout": 1.5,
                "max_attempts": 3,
            },
        )
    ]


def test_build_tiers_makes_a_real_s3_backend(tmp_path: Path) -> None:
    """An endpoint that does not listen when the tier opens (its bucket check) is logged,
    not an error: the tier opens, and its calls fail, counted, until it answers."""
    pytest.importorskip("boto3")
    from kvtc_store.backends.s3 import S3Backend

    text = (
        "tiers:\n"
        "  - {kind: memory, capacity: 1MiB}\n"
        "  - {kind: s3, name: shared, bucket: b, prefix: p, region: us-east-1,\n"
        "     endpoint_url: 'http://127.0.0.1:9'}\n"
    )
    mem, s3 = build_tiers(load_config(write(tmp_path, text), env={}))
    assert isinstance(mem, MemoryBackend)
    assert isinstance(s3, S3Backend) and s3.name == "shared"
    assert (s3.bucket, s3.prefix, s3.capacity_bytes) == ("b", "p/", None)


def test_s3_tier_without_boto3_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    class NoBoto(types.ModuleType):
        def __getattr__(self, name):
            raise ModuleNotFoundError("No module named 'boto3'", name="boto3")

    monkeypatch.setitem(sys.modules, "kvtc_store.backends.s3", NoBoto("kvtc_store.backends.s3"))
    closed = []
    monkeypatch.setattr(MemoryBackend, "close", lambda self: closed.append(self))
    cfg = StoreConfig(tiers=[{"kind": "memory", "capacity": 1024}, {"kind": "s3", "bucket": "b"}])
    with pytest.raises(ConfigError, match=r"tiers\.1: an s3 tier needs boto3"):
        build_tiers(cfg)
    assert len(closed) == 1  # the memory tier built before it is closed again


def test_disk_path_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = StoreConfig(tiers=[{"kind": "disk", "path": tmp_path / "file", "capacity": 1024}])
    with pytest.raises(ConfigError, match=r"^tiers\.0\.path: "):
        build_tiers(cfg)


# --- the codec -------------------------------------------------------------------------------


@pytest.fixture
def tiny_artifact():
    """A hand-made artifact for a 1-layer, 1-head, 16-channel model (no calibration)."""
    return make_tiny_artifact()


def test_codec_from_artifact(tmp_path: Path, tiny_artifact) -> None:
    import torch

    tiny_artifact.save(tmp_path / "art")
    path = write(tmp_path, MINIMAL + "codec:\n  artifact: art\n  coder: none\n")
    cfg = load_config(path, env={})
    codec = codec_from_config(cfg, tiny_info())
    assert codec.artifact.artifact_id == tiny_artifact.artifact_id
    k, v = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    assert codec.decode(codec.encode(k, v, first_position=16)).keys.shape == (1, 1, 16, 16)
    with pytest.raises(ArtifactModelMismatchError):
        codec_from_config(cfg, tiny_info("0" * 64))
    with pytest.raises(ArtifactError):
        codec_from_config(CodecConfig(artifact=tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^codec\.device: "):
        codec_from_config(CodecConfig(artifact=tmp_path / "art", device="gpu"))


def test_store_codec_device_overrides_the_config(tmp_path: Path, tiny_artifact) -> None:
    """A serving engine runs the codec where its KV lives, whatever codec.device says."""
    from kvtc_store.store import TieredStore

    tiny_artifact.save(tmp_path / "art")
    path = write(tmp_path, MINIMAL + "codec:\n  artifact: art\n  device: cpu\n")
    with TieredStore.from_config(path, tiny_info()) as store:
        assert store.codec.device.type == "cpu"
    with TieredStore.from_config(path, tiny_info(), codec_device="meta") as store:
        assert store.codec.device.type == "meta"
    with pytest.raises(ConfigError, match=r"^codec\.device: "):
        TieredStore.from_config(path, tiny_info(), codec_device="gpu")


def test_codec_calibrated_on_demand_comes_from_the_cache(
    tmp_path: Path, monkeypatch, tiny_artifact
) -> None:
    from kvtc_store.calibration import CalibrationSettings, artifact_dir

    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    cfg = CodecConfig(target_ratio=8, calibration_windows=2)
    with pytest.raises(ConfigError, match="pass model_info"):
        codec_from_config(cfg)
    with pytest.raises(ConfigError, match="none is cached"):
        codec_from_config(cfg, tiny_info())
    tiny_artifact.save(artifact_dir(tiny_info(), CalibrationSettings(windows=2), 8.0))
    codec = codec_from_config(cfg, tiny_info())
    assert codec.artifact.artifact_id == tiny_artifact.artifact_id


def test_codec_calibration_corpus_and_artifact_cap_name_the_cached_artifact(
    tmp_path: Path, monkeypatch, tiny_artifact
) -> None:
    """``calibration_corpus`` and ``max_artifact_share`` pick the cached artifact: the cap
    applies from target ratio 16 up (its share is in the folder's name), and another
    corpus is another calibration (another settings folder)."""
    from kvtc_store.calibration import CalibrationSettings, artifact_dir

    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    info = tiny_info()
    default = CalibrationSettings(windows=2)
    assert default.corpus == "broad" and default.max_artifact_share == 0.15
    assert artifact_dir(info, default, 8.0).name == "rans-b0.1-int8-cr8"
    assert artifact_dir(info, default, 16.0).name == "rans-b0.1-int8-p0.15-cr16"
    uncapped = CalibrationSettings(windows=2, max_artifact_share=None)
    assert artifact_dir(info, uncapped, 16.0).name == "rans-b0.1-int8-cr16"
    plays = CalibrationSettings(windows=2, corpus="shakespeare")
    assert artifact_dir(info, plays, 16.0).parent != artifact_dir(info, default, 16.0).parent

    tiny_artifact.save(artifact_dir(info, plays, 16.0))
    cfg = CodecConfig(target_ratio=16, calibration_windows=2, calibration_corpus="shakespeare")
    assert codec_from_config(cfg, info).artifact.artifact_id == tiny_artifact.artifact_id
    with pytest.raises(ConfigError, match="none is cached"):  # the default corpus
        codec_from_config(CodecConfig(target_ratio=16, calibration_windows=2), info)
    with pytest.raises(ConfigError, match="none is cached"):  # the same corpus, no cap
        codec_from_config(
            CodecConfig(
                target_ratio=16,
                calibration_windows=2,
                calibration_corpus="shakespeare",
                max_artifact_share=None,
            ),
            info,
        )


def test_a_misspelt_required_key_is_told_once(tmp_path: Path) -> None:
    """``capasity`` for ``capacity``: the unknown key with its suggestion, not also
    ``capacity: Field required``; a key missing with no misspelling is still told."""
    msg = config_error(write(tmp_path, MINIMAL.replace("capacity: 64MiB", "capasity: 64MiB")))
    assert msg.count("\n") == 0 and "did you mean 'capacity'" in msg, msg
    msg = config_error(write(tmp_path, MINIMAL.replace("capacity: 64MiB", "eviction: lru")))
    assert "tiers.0.capacity: Field required" in msg, msg
