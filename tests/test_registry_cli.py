"""``kvtc-store codec ...`` against a folder and an S3 registry (moto's real server), and
``kvtc-store stats`` per codec artifact."""

from __future__ import annotations

import json

import pytest
import yaml

from kvtc_store.cli import main
from kvtc_store.registry import open_registry
from kvtc_store.store import TieredStore
from tests.tiny_codec import CHUNK, FINGERPRINT, tiny_artifact, tiny_info, tiny_sequence

V1, V2 = tiny_artifact(bits=4), tiny_artifact(bits=6)


@pytest.fixture(params=["folder", "s3"])
def where(request, tmp_path) -> list[str]:
    if request.param == "folder":
        return ["--registry", str(tmp_path / "registry")]
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    return ["--registry", f"s3://{bucket}/codecs", "--endpoint-url", endpoint]


def run(capsys, *argv) -> tuple[int, object]:
    rc = main(["codec", *argv])
    out = capsys.readouterr()
    try:
        return rc, json.loads(out.out)
    except ValueError:
        return rc, out.out + out.err


def test_operator_workflow(capsys, tmp_path, where) -> None:
    d1, d2 = V1.save(tmp_path / "v1"), V2.save(tmp_path / "v2")
    rc, out = run(capsys, "publish", str(d1), "--profile", "ratio16", *where, "--json")
    assert rc == 0 and out["created"] and out["move"]["artifact_id"] == V1.artifact_id
    rc, out = run(capsys, "publish", str(d1), *where, "--json")
    assert (rc, out["created"]) == (0, False)
    assert run(capsys, "publish", str(d2), *where, "--json")[1]["created"]
    rc, rows = run(capsys, "list", *where, "--json")
    assert {r["artifact_id"]: r["profiles"] for r in rows} == {
        V1.artifact_id: ["ratio16"],
        V2.artifact_id: [],
    }
    rc, man = run(capsys, "show", V2.artifact_id, *where, "--json")
    assert man["artifact_id"] == V2.artifact_id and man["model_fingerprint"] == FINGERPRINT
    rc, move = run(capsys, "promote", V2.artifact_id, "--profile", "canary", *where, "--json")
    assert move["previous"] is None and move["profile"] == "canary"
    rc, move = run(capsys, "promote", V2.artifact_id, "--profile", "ratio16", *where, "--json")
    assert (move["previous"], move["artifact_id"], move["seq"]) == (
        V1.artifact_id,
        V2.artifact_id,
        2,
    )
    rc, move = run(capsys, "rollback", "--profile", "ratio16", "--reason", "bad", *where, "--json")
    assert (rc, move["artifact_id"], move["action"]) == (0, V1.artifact_id, "rollback")
    rc, hist = run(capsys, "history", "--profile", "ratio16", *where, "--json")
    assert [(m["seq"], m["artifact_id"]) for m in hist] == [
        (1, V1.artifact_id),
        (2, V2.artifact_id),
        (3, V1.artifact_id),
    ]
    dest = tmp_path / "pulled"
    rc, out = run(capsys, "pull", V2.artifact_id, "--dest", str(dest), *where, "--json")
    assert rc == 0 and (dest / "manifest.json").is_file()
    rc, text = run(capsys, "history", *where)
    assert rc == 0 and "rollback" in text and "canary" in text
    # named errors reach the operator as one line and exit code 2
    rc, text = run(capsys, "promote", "0123456789abcdef", "--profile", "p", *where)
    assert rc == 2 and "ArtifactNotFoundError" in text
    reg = open_registry(where[1], endpoint_url=where[3] if len(where) > 2 else None)
    reg.storage.write(f"{FINGERPRINT}/profiles/ratio16/current.json", b"edited by hand")
    rc, rows = run(capsys, "list", *where, "--json")  # a listing goes on
    assert rc == 0 and all(r["profiles"] in ([], ["canary"]) for r in rows)
    rc, text = run(capsys, "promote", V2.artifact_id, "--profile", "ratio16", *where)
    assert rc == 2 and "RegistryPointerError" in text
    rc, move = run(capsys, "promote", V2.artifact_id, "--profile", "ratio16", "--force", *where,
                   "--json")  # fmt: skip
    assert (rc, move["artifact_id"], move["seq"]) == (0, V2.artifact_id, 4)


def test_stats_reports_chunks_and_bytes_per_artifact(capsys, tmp_path) -> None:
    reg = ["--registry", str(tmp_path / "registry")]
    run(capsys, "publish", str(V1.save(tmp_path / "v1")), "--profile", "p", *reg)
    run(capsys, "publish", str(V2.save(tmp_path / "v2")), *reg)
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [{"kind": "disk", "path": str(tmp_path / "disk"), "capacity": "4MiB"}],
        "codec": {"registry": reg[1], "profile": "p", "refresh_seconds": 0,
                  "cache_dir": str(tmp_path / "cache")},
    }  # fmt: skip
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump(cfg))
    sizes = {}
    with TieredStore.from_config(config, tiny_info()) as store:
        tokens, keys, values = tiny_sequence(3, seed=1)
        sizes[V1.artifact_id] = store.put(tokens, keys, values).blob_bytes
        run(capsys, "promote", V2.artifact_id, "--profile", "p", *reg)
        store.codec.refresh()
        tokens, keys, values = tiny_sequence(2, seed=2)
        sizes[V2.artifact_id] = store.put(tokens, keys, values).blob_bytes
    assert main(["stats", "--config", str(config), "--json"]) == 0
    (tier,) = json.loads(capsys.readouterr().out)["tiers"]
    rows = tier["by_artifact"]
    assert {a: r["chunks"] for a, r in rows.items()} == {V1.artifact_id: 3, V2.artifact_id: 2}
    # a disk tier's bytes are the file system's allocated bytes (what its cap counts):
    # at least the blobs' own, and together what the folder's blob files take
    assert all(rows[a]["bytes"] >= sizes[a] for a in sizes)
    files = (tmp_path / "disk").rglob("*.kvtc")
    assert sum(r["bytes"] for r in rows.values()) == sum(f.stat().st_blocks * 512 for f in files)
    assert main(["stats", "--disk", str(tmp_path / "disk")]) == 0
    assert f"{V2.artifact_id} 2 chunks" in capsys.readouterr().out


def test_stats_per_artifact_on_an_s3_tier(capsys, tmp_path, s3_endpoint, bucket) -> None:
    reg = ["--registry", str(tmp_path / "registry")]
    run(capsys, "publish", str(V1.save(tmp_path / "v1")), "--profile", "p", *reg)
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"kind": "memory", "capacity": "1MiB"},
            {"kind": "s3", "bucket": bucket, "endpoint_url": s3_endpoint},
        ],
        "codec": {"registry": reg[1], "profile": "p", "refresh_seconds": 0,
                  "cache_dir": str(tmp_path / "cache")},
    }  # fmt: skip
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with TieredStore.from_config(config, tiny_info()) as store:
        tokens, keys, values = tiny_sequence(4, seed=3)
        nbytes = store.put(tokens, keys, values).blob_bytes
    assert main(["stats", "--config", str(config), "--json"]) == 0
    s3 = json.loads(capsys.readouterr().out)["tiers"][1]
    assert s3["by_artifact"] == {V1.artifact_id: {"chunks": 4, "bytes": nbytes}}


@pytest.mark.model
def test_calibrate_publishes_what_it_calibrates(smollm2, test_settings, capsys, tmp_path):
    """`kvtc-store calibrate --publish REGISTRY --profile P`: the artifact it calibrated is
    in the registry, checks out, and P points at it."""
    registry = tmp_path / "registry"
    windows = ["--windows", str(test_settings.windows), "--corpus", test_settings.corpus]
    args = ["calibrate", "--ratio", "8", *windows, "--publish", str(registry), "--profile", "r8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    reg = open_registry(registry)
    (model,) = reg.models()
    assert model == smollm2[2].fingerprint
    move = reg.current(model, "r8")
    assert move is not None and f"published {move.artifact_id}" in out
    art = reg.verify(model, move.artifact_id)
    assert art.target_ratio == 8 and move.reason == "calibrated"
    assert main(args) == 0  # again: cached, already published, promoted once more
    assert "(already there)" in capsys.readouterr().out
