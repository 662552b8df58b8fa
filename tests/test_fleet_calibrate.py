"""Fleet calibration on a real Ray (issue 19): workers give the artifact one process
gives on the same windows, a worker killed mid-job is restarted and its shard retried,
Parquet token ids come in through Ray Data, and `kvtc-store fleet calibrate` publishes
and promotes. The cluster is the head `.ci/run` starts (``KVTC_TEST_RAY_ADDRESS``), else
a local ``ray.init(num_cpus=2)``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvtc_store.calibration import CalibrationSettings, calibrate
from kvtc_store.cli import main
from kvtc_store.codec import CodecArtifact
from kvtc_store.model import load_model
from kvtc_store.registry import open_registry
from tests.tiny_models import VOCAB, byte_tokenizer, qwen2_config, save

ray = pytest.importorskip("ray")
from kvtc_store.ray_jobs.calibrate import (
    KILL_ENV,
    calibrate_fleet,
    read_parquet_ids,
)

SETTINGS = CalibrationSettings(
    windows=5, window_tokens=64, sample_tokens=150, block=8, max_artifact_share=None
)
TOL = 1e-4  # as tests/test_fleet_stats.py


@pytest.fixture(scope="module")
def cluster():
    """A connection to the CI's Ray head, or a local 2-core Ray."""
    address = os.environ.get("KVTC_TEST_RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield address or "local"
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    return save(qwen2_config(), folder, tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    ids = np.random.default_rng(5).integers(0, VOCAB, 1200)
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, ids)
    return path


def _same(a: CodecArtifact, b: CodecArtifact) -> None:
    assert a.plan == b.plan and len(a.plan) > 1
    for x, y in zip(a.bases, b.bases):
        assert x.shape == y.shape
        if x.numel():
            assert float((x - y).norm() / x.norm()) < TOL


def test_workers_killed_mid_job_give_the_single_process_artifact(
    cluster, tiny_model, token_file, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    from kvtc_store.calibration_data import read_token_ids

    model, tok, info = load_model(tiny_model)
    ids = read_token_ids([token_file], tok, VOCAB)
    one = calibrate(model, tok, info, [4.0, 8.0], SETTINGS, token_ids=ids)
    flag = tmp_path / "kill-once"
    flag.write_text("")
    monkeypatch.setenv(KILL_ENV, str(flag))
    arts, report = calibrate_fleet(
        str(tiny_model),
        [4.0, 8.0],
        SETTINGS,
        address=cluster,
        workers=2,
        data=[str(token_file)],
        shard_windows=2,
    )
    assert not flag.exists()  # a worker took the flag and killed itself
    assert report.restarts >= 1
    for a, b in zip(one, arts):
        _same(a, b)
        assert a.calibration["corpus"] == b.calibration["corpus"]
    names = sorted(u for s in report.shards for u in s.units)
    assert names == sorted(
        ["holdout:5", "sensitivity:0", "sensitivity:1"] + [f"kv:{i}" for i in range(5)]
    )
    assert all(s.seconds > 0 and s.stats_bytes > 0 for s in report.shards)
    assert report.total_s >= report.collect_s + report.fit_s
    assert "| shard |" in report.to_markdown()


def test_parquet_token_ids_through_ray_data(cluster, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [list(range(i, i + 7 + i)) for i in range(5)]
    pq.write_table(pa.table({"input_ids": docs[:3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"input_ids": docs[3:]}), tmp_path / "b.parquet")
    got = read_parquet_ids([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    assert got.tolist() == [t for d in docs for t in d]
    from kvtc_store.errors import CalibrationDataError

    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(CalibrationDataError, match="no column"):
        read_parquet_ids([str(tmp_path / "c.parquet")])


def test_cli_publishes_and_promotes(cluster, tiny_model, token_file, tmp_path, capsys) -> None:
    reg_dir, report = tmp_path / "registry", tmp_path / "report.json"
    args = ["fleet", "calibrate", "--model", str(tiny_model), "--address", cluster]
    args += ["--workers", "2", "--data", str(token_file), "--windows", "5"]
    args += ["--window-tokens", "64", "--ratio", "8", "--publish", str(reg_dir)]
    args += ["--profile", "default", "--report", str(report), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "profile default: None ->" in out and "# Fleet calibration" in out
    reg = open_registry(str(reg_dir))
    model = reg.only_model()
    art = CodecArtifact.load(tmp_path / "out" / "cr8")
    assert reg.current(model, "default").artifact_id == art.artifact_id
    import json

    rep = json.loads(report.read_text())
    assert rep["workers"] == 2 and rep["artifacts"][0]["id"] == art.artifact_id
    assert {"collect_s", "merge_s", "fit_s", "total_s", "object_store_bytes"} <= set(rep)
    assert torch.is_tensor(art.bases[0])
