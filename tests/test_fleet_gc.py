"""The GC job (issue 19) on a disk tier and an S3 tier (moto) of a store that follows a
registry profile: a dry run deletes nothing; --apply drops chunks past the disk tier's
TTL and chunks of an artifact no pointer names, then that artifact and one nothing
used; the current artifact and the rollback target stay, and the registry refuses to
delete a pinned artifact."""

from __future__ import annotations

import json
import os
import time

import pytest

from kvtc_store.cli import main
from kvtc_store.config import load_config
from kvtc_store.errors import ArtifactInUseError
from kvtc_store.store import TieredStore
from tests.ray_cluster import registry_store_config
from tests.tiny_codec import FINGERPRINT, tiny_artifact, tiny_info, tiny_sequence

pytest.importorskip("ray")
from kvtc_store.ray_jobs.reencode import tier_keys

V1, V2, V3, V4 = (tiny_artifact(bits=b) for b in (3, 4, 5, 6))
SEQ_A, SEQ_B = tiny_sequence(9, seed=1), tiny_sequence(9, seed=2)


def _store(tmp_path, s3_endpoint, bucket):
    reg, path = registry_store_config(tmp_path, s3_endpoint, bucket, (V1, V2, V3, V4))
    with TieredStore.from_config(path, tiny_info()) as store:
        store.put(*SEQ_A)  # V1's chunks
        reg.promote(FINGERPRINT, V2.artifact_id, "default")
        reg.promote(FINGERPRINT, V3.artifact_id, "default")  # current V3, rollback to V2
        store.codec.refresh()
        store.put(*SEQ_B)  # V3's chunks
        store.flush()
        keys_b = store.keys_for(SEQ_B[0])
    return reg, path, keys_b


def _counts(config) -> list[int]:
    return [len(tier_keys(t)) for t in load_config(config).tiers]


def test_gc_dry_run_then_apply(cluster, tmp_path, s3_endpoint, bucket, capsys) -> None:
    reg, config, keys_b = _store(tmp_path, s3_endpoint, bucket)
    old = time.time() - 10 * 86400  # three of V3's disk chunks unread for 10 days
    for key in keys_b[:3]:
        os.utime(tmp_path / "disk" / key[:2] / f"{key}.kvtc", (old, old))
    assert _counts(config) == [18, 18]
    report = tmp_path / "gc.json"
    args = ["fleet", "gc", "--tiers", config, "--ttl", "disk=7d", "--address", cluster]
    assert main([*args, "--report", str(report)]) == 0
    plan = json.loads(report.read_text())
    assert not plan["applied"] and _counts(config) == [18, 18]  # a dry run
    disk, s3 = (plan["tiers"][f"{config}#{label}"] for label in ("disk", "s3"))
    assert (disk["ttl"], disk["unreachable"], disk["kept"]) == (3, 9, 6)
    assert (s3["ttl"], s3["unreachable"], s3["kept"]) == (0, 9, 9)  # no TTL on S3
    assert plan["drop_artifacts"] == sorted([V1.artifact_id, V4.artifact_id])
    assert plan["kept_artifacts"] == {V2.artifact_id: "pinned", V3.artifact_id: "pinned"}
    assert "dry run" in capsys.readouterr().out

    assert main([*args, "--apply", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["applied"] and _counts(config) == [6, 9]
    assert set(reg.artifact_ids(FINGERPRINT)) == {V2.artifact_id, V3.artifact_id}
    with TieredStore.from_config(config, tiny_info()) as store:
        assert store.get(SEQ_B[0]) is not None  # V3's chunks: all on S3 still
        assert store.get(SEQ_A[0]) is None
    with pytest.raises(ArtifactInUseError):
        reg.delete_artifact(FINGERPRINT, V2.artifact_id)
