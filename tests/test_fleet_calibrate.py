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
from kvtc_store.errors import FleetError
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
    st = report.fit_stages  # the fit's stages, on the driver's device
    assert st["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert st["eigh_s"] > 0 and st["step_tables_s"] > 0 and set(st["ratios"]) == {"4", "8"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a cluster without GPUs")
def test_gpus_per_worker_beyond_the_cluster_is_refused(cluster, tiny_model) -> None:
    with pytest.raises(FleetError, match="GPU"):
        calibrate_fleet(str(tiny_model), [8.0], SETTINGS, address=cluster, gpus_per_worker=0.5)


def test_gpu_share_never_asks_for_more_gpus_than_the_cluster_has() -> None:
    """Two workers on a one-GPU machine share it by default (each asking for 1 GPU, the
    second actor would wait forever and the job with it); shares pack whole per GPU (three
    actors at 2/3 on two GPUs leave one waiting); an explicit ask that does not fit is
    refused with the share that does."""
    from kvtc_store.ray_jobs.calibrate import gpu_share

    assert gpu_share(0, 2, None) == 0.0  # CPU actors
    assert gpu_share(1, 1, None) == 1.0
    assert gpu_share(1, 2, None) == 0.5
    assert gpu_share(8, 4, None) == 1.0
    assert gpu_share(2, 3, None) == 0.5  # not 2/3: a third actor would fit no GPU
    assert gpu_share(4, 9, None) == pytest.approx(1 / 3)
    assert gpu_share(1, 2, 0.5) == 0.5
    assert gpu_share(4, 2, 2.0) == 2.0
    with pytest.raises(FleetError, match=r"x 2 worker\(s\).*--gpus-per-worker 0.5"):
        gpu_share(1, 2, 1.0)
    with pytest.raises(FleetError, match=r"hold 2 such actors.*--gpus-per-worker 0.5"):
        gpu_share(2, 3, 2 / 3)  # 2 GPUs x 2 GPU-thirds, yet only one 2/3 fits a GPU
    with pytest.raises(FleetError, match="hold 1 such"):
        gpu_share(3, 2, 2.0)
    with pytest.raises(FleetError, match="no GPU"):
        gpu_share(0, 1, 0.5)


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


def _fleet_cli(model, data, gate, reg, windows: int, *extra, workers: int = 1) -> list[str]:
    address = os.environ.get("KVTC_TEST_RAY_ADDRESS", "local")  # joins this process's Ray
    args = ["fleet", "calibrate", "--model", str(model), "--address", address]
    args += ["--workers", str(workers)]
    args += ["--data", str(data), "--windows", str(windows), "--window-tokens", "256"]
    args += ["--ratio", "8", "--publish", str(reg), "--profile", "default"]
    return args + ["--gate-data", str(gate), *extra]


def test_cli_gates_publishes_and_promotes(cluster, tiny_model, tmp_path, capsys) -> None:
    """First publish passes (no current artifact); a candidate calibrated on one window
    (KL +78% on the gate windows at the same honest ratio, measured) is refused with its
    report stored beside it, nothing published or promoted; --force publishes it."""
    import json

    token_file, gate = tmp_path / "ids.npy", tmp_path / "gate.npy"
    np.save(token_file, np.random.default_rng(5).integers(0, VOCAB, 3000))
    np.save(gate, np.random.default_rng(9).integers(0, VOCAB, 1100))
    reg_dir, report = tmp_path / "registry", tmp_path / "report.json"
    small = ["--report", str(report), "--out", str(tmp_path / "out")]
    assert main(_fleet_cli(tiny_model, token_file, gate, reg_dir, 5, *small, workers=2)) == 0
    out = capsys.readouterr().out
    assert "gate (default): first" in out and "# Fleet calibration" in out
    reg = open_registry(str(reg_dir))
    model = reg.only_model()
    first = CodecArtifact.load(tmp_path / "out" / "cr8")
    assert reg.current(model, "default").artifact_id == first.artifact_id
    rep = json.loads(report.read_text())
    assert rep["workers"] == 2 and rep["artifacts"][0]["id"] == first.artifact_id
    assert {"collect_s", "merge_s", "fit_s", "gate_s", "total_s", "object_store_bytes"} <= set(rep)
    assert rep["gate"]["windows"] == 5  # the held-out window and 4 of the gate data
    assert any(n.endswith(".md") for n in reg.reports(model, first.artifact_id))

    assert main(_fleet_cli(tiny_model, token_file, gate, reg_dir, 1, "--report", str(report))) == 2
    captured = capsys.readouterr()
    assert "GateRefusedError" in captured.err and ": refused" in captured.out
    rep = json.loads(report.read_text())
    cand = rep["gate"]["candidate"]["artifact_id"]
    assert rep["gate"]["verdict"] == "refused" and cand not in reg.artifact_ids(model)
    assert reg.current(model, "default").artifact_id == first.artifact_id
    stored = reg.reports(model, cand)
    assert {n.rsplit(".", 1)[1] for n in stored} == {"json", "md"}
    gate_json = json.loads(next(v for n, v in stored.items() if n.endswith(".json")))
    assert gate_json["candidate"]["kl"] > 1.1 * gate_json["current"]["kl"]

    assert main(_fleet_cli(tiny_model, token_file, gate, reg_dir, 1, "--force")) == 0
    assert "gate (default): forced" in capsys.readouterr().out
    assert reg.current(model, "default").artifact_id == cand
