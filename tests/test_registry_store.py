"""A store that follows a registry profile (``codec.registry`` in its YAML): it encodes
with the current artifact, decodes every version in its tiers, sees a promotion made by
another process, keeps serving when the registry is down, and counts blobs of unknown
artifacts as misses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kvtc_store.codec import KVTCCodec
from kvtc_store.codec.blob import unpack_blob
from kvtc_store.config import load_config
from kvtc_store.errors import ConfigError, RegistryError
from kvtc_store.registry import VersionedCodec, open_registry
from kvtc_store.store import TieredStore
from tests.tiny_codec import CHUNK, FINGERPRINT, tiny_artifact, tiny_info, tiny_sequence

FP = FINGERPRINT
REPO = Path(__file__).resolve().parents[1]
V1, V2, V3 = (tiny_artifact(bits=b) for b in (4, 6, 5))


def write_config(tmp_path: Path, registry, **codec) -> Path:
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"kind": "memory", "capacity": "1MiB"},
            {"kind": "disk", "path": str(tmp_path / "disk"), "capacity": "4MiB"},
        ],
        "codec": {
            "registry": registry,
            "profile": "ratio16",
            "refresh_seconds": 0,
            "cache_dir": str(tmp_path / "cache"),
            **codec,
        },
    }
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def folder_registry(tmp_path):
    reg = open_registry(tmp_path / "registry", create=True)
    for art in (V1, V2):
        reg.publish(art)
    reg.promote(FP, V1.artifact_id, "ratio16")
    return reg


def own_round_trip(art, keys, values):
    """KV after the artifact's own codec encodes and decodes the sequence (no store)."""
    codec = KVTCCodec(art)
    chunks, err = codec.decode_prefix(codec.encode_sequence(keys, values, chunk_tokens=CHUNK))
    assert err is None
    return torch.cat([c.keys for c in chunks], 2), torch.cat([c.values for c in chunks], 2)


def stored_artifacts(store, tokens) -> list[str]:
    blobs = store.tiers[-1].get(store.keys_for(tokens))
    return [unpack_blob(b)[0].artifact_id for b in blobs]


def test_two_versions_in_the_tiers_decode_with_their_own_codecs(tmp_path, folder_registry):
    config = write_config(tmp_path, str(tmp_path / "registry"))
    # longer than the 128-token exact window, so that most tokens are transform-coded
    tok_a, k_a, v_a = tiny_sequence(10, seed=1)
    tok_b, k_b, v_b = tiny_sequence(9, seed=2)
    with TieredStore.from_config(config, tiny_info()) as store:
        assert isinstance(store.codec, VersionedCodec)
        assert store.codec.current_id == V1.artifact_id
        store.put(tok_a, k_a, v_a)
        folder_registry.promote(FP, V2.artifact_id, "ratio16", reason="v2 is better")
        assert store.codec.refresh() == V2.artifact_id  # on demand, no restart
        again = store.put(tok_a, k_a, v_a)
        assert (again.chunks_written, again.chunks_present) == (0, 10)  # nothing re-encoded
        store.put(tok_b, k_b, v_b)
        store.flush()
        assert stored_artifacts(store, tok_a) == [V1.artifact_id] * 10
        assert stored_artifacts(store, tok_b) == [V2.artifact_id] * 9

        for tokens, keys, values, art in ((tok_a, k_a, v_a, V1), (tok_b, k_b, v_b, V2)):
            got = store.get(tokens)
            want = own_round_trip(art, keys, values)
            assert got is not None
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        other = own_round_trip(V2, k_a, v_a)
        assert not torch.equal(store.get(tok_a)[0], other[0])  # the versions really differ

        st = store.stats
        assert st.chunks_missed == 0 and sum(st.chunks_hit.values()) == 10 + 9 + 10
        assert store.codec.hits == {V1.artifact_id: 20, V2.artifact_id: 9}
        text = store.metrics.text()
        assert (
            f'kvtc_codec_current_info{{artifact_id="{V2.artifact_id}",profile="ratio16"}} 1.0'
            in text
        )
        assert f'kvtc_codec_artifact_hits_total{{artifact_id="{V1.artifact_id}"}} 20.0' in text
        assert "kvtc_codec_unknown_artifact_misses_total 0.0" in text


def test_a_blob_of_an_artifact_the_registry_lacks_is_a_counted_miss(tmp_path, folder_registry):
    config = write_config(tmp_path, str(tmp_path / "registry"))
    tokens, keys, values = tiny_sequence(3, seed=3)
    with TieredStore.from_config(config, tiny_info()) as store:
        store.put(tokens, keys, values)
        # chunk 1 rewritten by a codec the registry never saw (same key: no version in it)
        ckey = store.keys_for(tokens)[1]
        foreign = KVTCCodec(V3).encode(
            keys[:, :, CHUNK : 2 * CHUNK], values[:, :, CHUNK : 2 * CHUNK], CHUNK
        )
        store.flush()
        for tier in store.tiers:
            tier.delete([ckey])
            tier.put([(ckey, foreign)])
        got = store.get(tokens)
        assert got is not None and got[0].shape[2] == CHUNK  # the prefix before it
        assert store.stats.chunks_missed >= 1 and store.stats.corrupt_dropped == 0
        assert store.codec.unknown_misses == 1
        assert store.tiers[0].get([ckey]) == [foreign]  # kept, not deleted
        assert "kvtc_codec_unknown_artifact_misses_total 1.0" in store.metrics.text()
        # it blocks nothing: lookup stops before it, and the next put writes it again
        assert store.lookup(tokens) == CHUNK
        assert store.put(tokens, keys, values).chunks_written == 2
        assert store.lookup(tokens) == 3 * CHUNK
        got = store.get(tokens)
        assert got is not None and got[0].shape[2] == 3 * CHUNK


def test_a_replica_sees_a_promotion_made_by_another_process(tmp_path, folder_registry):
    config = write_config(tmp_path, str(tmp_path / "registry"), refresh_seconds=0.2)
    tokens, keys, values = tiny_sequence(2, seed=4)
    with TieredStore.from_config(config, tiny_info()) as store:
        assert store.codec.current_id == V1.artifact_id
        cli = [sys.executable, "-m", "kvtc_store.cli", "codec"]
        reg = ["--registry", str(tmp_path / "registry"), "--json"]
        proc = subprocess.run(
            [
                *cli,
                "promote",
                V2.artifact_id,
                "--profile",
                "ratio16",
                "--reason",
                "canary ok",
                *reg,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        move = json.loads(proc.stdout)
        assert (move["previous"], move["artifact_id"]) == (V1.artifact_id, V2.artifact_id)
        deadline = time.monotonic() + 20
        while store.codec.current_id != V2.artifact_id and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.codec.current_id == V2.artifact_id
        store.put(tokens, keys, values)
        store.flush()
        assert stored_artifacts(store, tokens) == [V2.artifact_id] * 2


def test_an_unreachable_registry_keeps_the_store_serving(tmp_path, aws_credentials):
    from tests.s3_server import own_moto_server, raw_client

    with own_moto_server() as endpoint:
        raw_client(endpoint).create_bucket(Bucket="codecs")
        reg = open_registry("s3://codecs/fleet", endpoint_url=endpoint)
        for art in (V1, V2):
            reg.publish(art)
        reg.promote(FP, V1.artifact_id, "ratio16")
        registry = {"url": "s3://codecs/fleet", "endpoint_url": endpoint, "connect_timeout": 0.5,
                    "read_timeout": 1.0, "max_attempts": 1}  # fmt: skip
        config = write_config(tmp_path, registry)
        tok_a, k_a, v_a = tiny_sequence(10, seed=5)
        tok_b, k_b, v_b = tiny_sequence(10, seed=6)
        store = TieredStore.from_config(config, tiny_info())
        store.put(tok_a, k_a, v_a)
        reg.promote(FP, V2.artifact_id, "ratio16")
        assert store.codec.refresh() == V2.artifact_id
    with store:
        t0 = time.monotonic()
        assert store.codec.refresh() == V2.artifact_id  # down: keeps what it has
        assert time.monotonic() - t0 < 10
        assert store.codec.refresh_failures == 1
        store.put(tok_b, k_b, v_b)
        for tokens, keys, values, art in ((tok_a, k_a, v_a, V1), (tok_b, k_b, v_b, V2)):
            got = store.get(tokens)
            assert torch.equal(got[0], own_round_trip(art, keys, values)[0])
        assert "kvtc_codec_refresh_failures_total 1.0" in store.metrics.text()
    # a restart while the registry is down: the last pointer and artifact from the cache
    with TieredStore.from_config(config, tiny_info()) as again:
        assert again.codec.current_id == V2.artifact_id
        assert torch.equal(again.get(tok_b)[0], own_round_trip(V2, k_b, v_b)[0])


def test_a_profile_without_current_is_refused(tmp_path):
    reg = open_registry(tmp_path / "registry", create=True)
    reg.publish(V1)
    with pytest.raises(RegistryError, match="no current artifact"):
        TieredStore.from_config(write_config(tmp_path, str(tmp_path / "registry")), tiny_info())


def test_registry_config_keys_and_overrides(tmp_path):
    path = write_config(tmp_path, "registry")  # relative: to the file's folder
    cfg = load_config(path, env={})
    assert cfg.codec.registry.url == str(tmp_path / "registry")
    assert (cfg.codec.profile, cfg.codec.refresh_seconds, cfg.codec.cache_artifacts) == (
        "ratio16",
        0.0,
        4,
    )
    env = {
        "KVTC_STORE_CODEC__REGISTRY": "s3://b/p",
        "KVTC_STORE_CODEC__PROFILE": "canary",
        "KVTC_STORE_CODEC__REFRESH_SECONDS": "5",
    }
    cfg = load_config(path, env=env)
    assert (cfg.codec.registry.url, cfg.codec.profile, cfg.codec.refresh_seconds) == (
        "s3://b/p",
        "canary",
        5.0,
    )
    path.write_text(path.read_text().replace("registry: ", "registry:\n    url: ", 1))
    cfg = load_config(path, env={"KVTC_STORE_CODEC__REGISTRY__ENDPOINT_URL": "http://h:1"})
    assert cfg.codec.registry.endpoint_url == "http://h:1"
    with pytest.raises(ConfigError, match="either artifact or registry"):
        load_config(path, env={"KVTC_STORE_CODEC__ARTIFACT": str(tmp_path)})
    with pytest.raises(ConfigError, match=re.escape("codec.profile")):
        load_config(path, env={"KVTC_STORE_CODEC__PROFILE": "../x"})


def test_a_batch_of_two_versions_decodes_into_one_destination(tmp_path, folder_registry):
    """``VersionedCodec.decode_batch`` (what ``get_batch`` and ``get(out=)`` call): blobs
    of two artifacts in one batch, each run decoded by its own codec into its chunks of
    the caller's destination, equal to each version's own round trip."""
    from kvtc_store.codec import ChunkKV
    from kvtc_store.store import Load

    config = write_config(tmp_path, str(tmp_path / "registry"))
    tok_a, k_a, v_a = tiny_sequence(3, seed=1)
    tok_b, k_b, v_b = tiny_sequence(3, seed=2)
    with TieredStore.from_config(config, tiny_info()) as store:
        store.put(tok_a, k_a, v_a)
        folder_registry.promote(FP, V2.artifact_id, "ratio16")
        assert store.codec.refresh() == V2.artifact_id
        store.put(tok_b, k_b, v_b)
        shape = (6, *k_a.shape[:2], CHUNK, k_a.shape[3])
        out = ChunkKV.dense(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
        got = store.get_batch([Load(tok_a, at=0), Load(tok_b, at=3)], out)
        assert got == [3 * CHUNK, 3 * CHUNK]
        for at, (keys, values, art) in ((0, (k_a, v_a, V1)), (3, (k_b, v_b, V2))):
            want_k, _ = own_round_trip(art, keys, values)
            got_k = out.keys.dense[at : at + 3].movedim(0, 2).flatten(2, 3)
            assert torch.equal(got_k, want_k.to(got_k.dtype))
        assert store.codec.hits == {V1.artifact_id: 3, V2.artifact_id: 3}
