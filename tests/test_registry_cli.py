"""``kvtc-store codec ...`` against a folder and an S3 registry (moto's real server), and
``kvtc-store stats`` per codec artifact."""

from __future__ import annotations

import json

import pytest
import yaml

from kvtc_store.cli import main
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
    assert tier["by_artifact"] == {
        V1.artifact_id: {"chunks": 3, "bytes": sizes[V1.artifact_id]},
        V2.artifact_id: {"chunks": 2, "bytes": sizes[V2.artifact_id]},
    }
    assert main(["stats", "--disk", str(tmp_path / "disk")]) == 0
    assert f"artifact {V2.artifact_id}: 2 chunks" in capsys.readouterr().out
