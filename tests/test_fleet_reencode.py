"""The re-encode job (issue 19) on a populated disk tier and S3 tier (moto): a worker
killed halfway through a batch is restarted, the batch retried and resumed (chunks done
before the crash are counted done), every chunk ends in the new artifact under its own
key and decodes, nothing is lost; a rerun (`kvtc-store fleet reencode`) changes nothing
(idempotent)."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest
import torch

from kvtc_store.cli import main
from kvtc_store.codec.blob import unpack_blob
from kvtc_store.config import load_config
from kvtc_store.store import TieredStore
from tests.ray_cluster import registry_store_config
from tests.test_registry_store import own_round_trip
from tests.tiny_codec import FINGERPRINT, tiny_artifact, tiny_info, tiny_sequence

ray = pytest.importorskip("ray")
from kvtc_store.ray_jobs.calibrate import KILL_ENV
from kvtc_store.ray_jobs.reencode import _open_tier, reencode_fleet, tier_keys

V1, V2 = tiny_artifact(bits=4), tiny_artifact(bits=6)
SEQS = [tiny_sequence(9, seed=s) for s in (1, 2)]


def _config(tmp_path, s3_endpoint, bucket) -> str:
    reg, path = registry_store_config(tmp_path, s3_endpoint, bucket, (V1, V2))
    with TieredStore.from_config(path, tiny_info()) as store:
        for tokens, keys, values in SEQS:
            store.put(tokens, keys, values)
        store.flush()
    reg.promote(FINGERPRINT, V2.artifact_id, "default", reason="v2")
    return path


def _stored(config) -> dict[str, dict[str, str]]:
    """Per tier: key -> artifact id of its blob."""
    out = {}
    for tier in load_config(config).tiers:
        backend = _open_tier(tier)
        keys = tier_keys(tier)
        out[tier.label] = {
            k: unpack_blob(b)[0].artifact_id for k, b in zip(keys, backend.get(keys))
        }
        backend.close()
    return out


def test_reencode_survives_a_killed_worker_and_is_idempotent(
    cluster, tmp_path, s3_endpoint, bucket, monkeypatch, capsys
) -> None:
    config = _config(tmp_path, s3_endpoint, bucket)
    pulled = os.path.join(tempfile.gettempdir(), "kvtc-reencode-*")  # the actors' artifact copies
    left = set(glob.glob(pulled))
    before = _stored(config)
    assert all(set(t.values()) == {V1.artifact_id} for t in before.values())
    assert [len(t) for t in before.values()] == [18, 18]
    flag = tmp_path / "kill-once"
    flag.write_text("")
    monkeypatch.setenv(KILL_ENV, str(flag))
    report = reencode_fleet(config, V1.artifact_id, "current", address=cluster, batch_size=8)
    assert not flag.exists()  # the worker died halfway through a batch
    after = _stored(config)
    assert {t: set(k) for t, k in after.items()} == {t: set(k) for t, k in before.items()}
    assert all(set(t.values()) == {V2.artifact_id} for t in after.values())
    rows = report.tiers.values()
    assert all(r["reencoded"] + r["done"] == r["chunks"] == 18 for r in rows)
    assert sum(r["done"] for r in rows) >= 1  # re-encoded before the crash, then skipped
    assert all(r["bytes_after"] > 0 for r in rows) and not report.errors
    # a fresh store reads every chunk: V1's reconstruction coded again by V2
    with TieredStore.from_config(config, tiny_info()) as store:
        for tokens, keys, values in SEQS:
            got = store.get(tokens)
            want = own_round_trip(V2, *own_round_trip(V1, keys, values))
            assert got is not None and torch.allclose(got[0], want[0], atol=1e-5)
    monkeypatch.delenv(KILL_ENV)
    out = tmp_path / "again.json"
    args = ["fleet", "reencode", "--from", V1.artifact_id, "--to", V2.artifact_id]
    assert main([*args, "--tiers", config, "--address", cluster, "--report", str(out)]) == 0
    again = json.loads(out.read_text())
    assert all(r["done"] == 18 and r["reencoded"] == 0 for r in again["tiers"].values())
    assert "| reencoded |" in capsys.readouterr().out and os.path.exists(config)
    assert set(glob.glob(pulled)) <= left  # none left behind, the killed worker's included
