"""The operator's commands (issue 22): inspect, stats, admin evict/verify/warm, health,
against real disk tiers and a loopback S3 server (moto), with the tiny real codec."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvtc_store.backends import DiskBackend, MemoryBackend
from kvtc_store.cli import main
from kvtc_store.codec import KVTCCodec
from kvtc_store.config import build_tiers, load_config
from kvtc_store.keys import key_tenant_tag, tenant_tag
from kvtc_store.store import TieredStore
from tests.s3_server import aws_credentials, bucket, s3_endpoint  # noqa: F401
from tests.tiny_codec import CHUNK, tiny_artifact, tiny_info, tiny_namespace, tiny_sequence

pytestmark = pytest.mark.usefixtures("one_thread")

OLD, NEW = tiny_artifact(bits=4), tiny_artifact(bits=6)


def fill(tiers, tenant: str, artifact, n_chunks: int, seed: int) -> list[str]:
    """Put ``n_chunks`` chunks of one tenant, written by ``artifact``, through a store
    over ``tiers`` (every tier gets them: write-through, flushed); return their keys."""
    tokens, keys, values = tiny_sequence(n_chunks, seed=seed)
    store = TieredStore(tiers, KVTCCodec(artifact), tiny_namespace(tenant), chunk_tokens=CHUNK)
    store.put(tokens, keys, values)
    assert store.flush(timeout=30)
    return store.keys_for(tokens)


@pytest.fixture
def populated(tmp_path: Path, s3_endpoint: str, bucket: str):  # noqa: F811
    """A store config with memory, disk and S3 tiers, holding tenant acme's chunks (old
    artifact, 3), beta's (new artifact, 2) and the shared namespace's (new artifact, 1)."""
    config = tmp_path / "store.yaml"
    s3 = {"kind": "s3", "bucket": bucket, "endpoint_url": s3_endpoint, "region": "us-east-1"}
    config.write_text(
        yaml.safe_dump(
            {
                "tenant": "acme",
                "chunk_tokens": CHUNK,
                "tiers": [
                    {"kind": "memory", "capacity": "1MiB"},
                    {"kind": "disk", "path": "disk", "capacity": "1MiB"},
                    s3,
                ],
            }
        )
    )
    keys = {}
    for tenant, art, n, seed in (("acme", OLD, 3, 1), ("beta", NEW, 2, 2), ("", NEW, 1, 3)):
        tiers = build_tiers(load_config(config))
        keys[tenant] = fill(tiers, tenant, art, n, seed)
        for t in tiers:
            t.close()
    return config, keys


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tenant_keys_carry_their_tag_and_the_shared_namespace_none() -> None:
    tokens, _, _ = tiny_sequence(2)
    from kvtc_store.keys import chunk_keys

    acme = chunk_keys(tokens, tiny_namespace("acme"), CHUNK)
    shared = chunk_keys(tokens, tiny_namespace(""), CHUNK)
    assert [len(k) for k in acme + shared] == [72, 72, 64, 64]
    assert {key_tenant_tag(k) for k in acme} == {tenant_tag("acme")} != {tenant_tag("beta")}
    assert {key_tenant_tag(k) for k in shared} == {""}
    assert acme[0][:64] != shared[0]  # the tag labels; the namespace still separates


# --- inspect ----------------------------------------------------------------------------------


def test_inspect_labels_the_header_and_shows_the_honest_ratio(tmp_path, capsys) -> None:
    _, keys, values = tiny_sequence(1)
    (blob,) = KVTCCodec(OLD).encode_sequence(keys, values, chunk_tokens=CHUNK)
    path = tmp_path / "chunk.kvtc"
    path.write_bytes(blob)
    rc, out, _ = run(capsys, "inspect", str(path))
    assert rc == 0
    for label, value in [
        ("layers", "1"),
        ("kv heads", "1"),
        ("head dim", "16"),
        ("tokens", str(CHUNK)),
        ("first position", "0"),
        ("artifact id", OLD.artifact_id),
        ("honest ratio", f"{4 * 16 * CHUNK / len(blob):.2f}x"),
        ("payload checksum", "ok"),
    ]:
        assert any(
            line.startswith(f"{label}:") and line.split()[-1] == value for line in out.splitlines()
        ), (label, out)
    rc, out, _ = run(capsys, "inspect", str(path), "--json")
    fields = json.loads(out)["fields"]
    assert fields["bf16 bytes"] == 4 * 16 * CHUNK and fields["blob bytes"] == len(blob)
    assert fields["exact tokens"].startswith(f"{CHUNK} of {CHUNK} (4 sink tokens")


def test_inspect_counts_the_exact_tokens_a_chunk_holds(tmp_path, capsys) -> None:
    """Sinks are the sequence's first positions and the exact tail its last tokens, so a
    first chunk holds the sinks, a middle chunk none, the last chunk the tail."""
    _, keys, values = tiny_sequence(12)
    blobs = KVTCCodec(OLD).encode_sequence(keys, values, chunk_tokens=CHUNK)
    got = []
    for i in (0, 1, -1):
        (tmp_path / "c.kvtc").write_bytes(blobs[i])
        rc, out, _ = run(capsys, "inspect", str(tmp_path / "c.kvtc"), "--json")
        assert rc == 0
        got.append(json.loads(out)["fields"]["exact tokens"].split(" (")[0])
    assert got == [f"4 of {CHUNK}", f"0 of {CHUNK}", f"{CHUNK} of {CHUNK}"]


def test_inspect_of_a_damaged_blob_shows_what_can_be_read(tmp_path, capsys) -> None:
    _, keys, values = tiny_sequence(1)
    (blob,) = KVTCCodec(OLD).encode_sequence(keys, values, chunk_tokens=CHUNK)
    path = tmp_path / "chunk.kvtc"
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))  # payload damaged
    rc, out, err = run(capsys, "inspect", str(path))
    assert rc == 1 and "BlobCorruptError" in err and "payload checksum mismatch" in err
    assert "artifact id:" in out and OLD.artifact_id in out and "payload checksum" in out
    damaged = bytearray(blob)
    damaged[30] ^= 0xFF  # inside the header: its checksum fails
    path.write_bytes(bytes(damaged))
    rc, out, err = run(capsys, "inspect", str(path), "--json")
    got = json.loads(out)
    assert rc == 1 and "header checksum mismatch" in got["problems"][0]
    assert got["fields"]["magic"] == "KVTC" and got["fields"]["format version"] == 2
    assert got["fields"]["header length"] > 0


# --- stats ------------------------------------------------------------------------------------


def test_stats_reports_per_tenant_and_artifact_on_disk_and_s3(populated, capsys) -> None:
    config, _ = populated
    rc, out, _ = run(capsys, "stats", "--config", str(config), "--json", "--tenant", "beta")
    assert rc == 0
    tiers = {r["tier"]: r for r in json.loads(out)["tiers"]}
    assert "note" in tiers["memory"]
    for name in ("disk", "s3"):
        r = tiers[name]
        assert r["chunks"] == 6
        assert {k: v["chunks"] for k, v in r["by_tenant"].items()} == {
            "acme": 3,
            "beta": 2,
            "(shared)": 1,
        }
        assert {k: v["chunks"] for k, v in r["by_artifact"].items()} == {
            OLD.artifact_id: 3,
            NEW.artifact_id: 3,
        }
        assert sum(v["bytes"] for v in r["by_tenant"].values()) == r["used_bytes"]
    rc, out, _ = run(capsys, "stats", "--config", str(config))  # beta not named: its tag
    assert f"#{tenant_tag('beta')} 2 chunks" in out and "acme 3 chunks" in out
    assert "counts cover every tenant" in out
    data = yaml.safe_load(config.read_text())
    data["tiers"][2]["bucket"] += "-misspelt"
    config.write_text(yaml.safe_dump(data))
    rc, out, _ = run(capsys, "stats", "--config", str(config))  # the other tiers still report
    lines = out.splitlines()
    assert rc == 1 and "disk" in lines[2] and "6 chunks" in lines[2]
    assert "unreachable: tiers.2.bucket:" in lines[-1] and "misspelt" in lines[-1]


def test_a_disk_folder_that_cannot_be_created_is_unreachable_not_empty(tmp_path, capsys):
    """A file where the tier's parent folder should be: stats, verify and evict report the
    tier unreachable (exit 1), as health does, rather than an empty tier (exit 0)."""
    (tmp_path / "a-file").write_text("in the way")
    config = tmp_path / "store.yaml"
    config.write_text(
        yaml.safe_dump({"tiers": [{"kind": "disk", "path": "a-file/kv", "capacity": "1MiB"}]})
    )
    for argv in (["stats"], ["admin", "verify"], ["admin", "evict", "--all"]):
        rc, out, _ = run(capsys, *argv, "--config", str(config), "--json")
        rows = json.loads(out)
        (row,) = rows["tiers"] if isinstance(rows, dict) else rows
        assert rc == 1 and "cannot be created" in row["error"], (argv, row)


def test_verify_and_evict_go_on_past_a_dead_s3_tier(populated, capsys) -> None:
    """S3 stopped (a closed port): the disk tier is still verified and evicted from, the S3
    tier is reported unreachable, and the exit status is 1, as stats does."""
    from tests.s3_server import closed_port

    config, keys = populated
    data = yaml.safe_load(config.read_text())
    data["tiers"][2].update(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    data["tiers"][2]["deadline"] = 2.0
    config.write_text(yaml.safe_dump(data))
    rc, out, _ = run(capsys, "admin", "verify", "--config", str(config), "--json")
    rows = {r["tier"]: r for r in json.loads(out)}
    assert rc == 1 and rows["disk"]["ok"] == 6 and "error" in rows["s3"]
    argv = ["admin", "evict", "--config", str(config), "--tenant", "acme", "--yes"]
    rc, out, _ = run(capsys, *argv)
    lines = out.splitlines()
    assert rc == 1 and "removed 3 chunks" in lines[0] and "unreachable" in lines[1]
    disk = DiskBackend(config.parent / "disk", 1 << 20)
    try:
        assert disk.exists(keys["acme"]) == [False] * 3 and all(disk.exists(keys["beta"]))
    finally:
        disk.close()


def test_stats_of_a_folder_honours_json_byte_units_and_warns_over_cap(populated, capsys) -> None:
    config, _ = populated
    disk = str(config.parent / "disk")
    rc, out, err = run(capsys, "stats", "--disk", disk, "--capacity", "1KiB", "--json")
    (row,) = json.loads(out)["tiers"]
    assert rc == 0 and row["capacity_bytes"] == 1024 and row["over_cap"] is True
    assert row["use"] == pytest.approx(row["used_bytes"] / 1024)
    assert "warning: tier disk" in err and "over its cap" in err
    rc, out, err = run(capsys, "stats", "--disk", disk, "--capacity", "1GiB")
    assert rc == 0 and err == "" and "of 1.00 GiB" in out  # the units the cap was given in
    with pytest.raises(SystemExit):
        main(["stats", "--disk", disk, "--capacity", "lots"])
    assert "not a byte size" in capsys.readouterr().err
    # a config's tiers carry their own caps: --capacity with --config is refused, not ignored
    rc, out, err = run(capsys, "stats", "--config", str(config), "--capacity", "1KiB")
    assert rc == 2 and out == "" and "--capacity goes with --disk" in err


# --- admin evict ------------------------------------------------------------------------------


def test_evict_is_a_dry_run_until_yes_and_takes_one_tenant(populated, capsys) -> None:
    config, keys = populated
    rc, out, _ = run(capsys, "admin", "evict", "--config", str(config), "--tenant", "acme")
    assert rc == 0 and out.count("would remove (dry run; --yes removes) 3 chunks") == 2
    rc, out, _ = run(capsys, "stats", "--config", str(config), "--json")
    assert [r.get("chunks") for r in json.loads(out)["tiers"]] == [None, 6, 6]
    rc, out, _ = run(capsys, "admin", "clear", "--config", str(config), "--tenant", "acme", "--yes")
    assert rc == 0 and out.count("removed 3 chunks") == 2
    tiers = build_tiers(load_config(config))
    try:
        for t in tiers[1:]:
            assert t.exists(keys["acme"]) == [False] * 3
            assert all(t.exists(keys["beta"] + keys[""]))
    finally:
        for t in tiers:
            t.close()
    # no selector: refused as a usage error (exit 2, like argparse's), never "everything"
    rc, out, err = run(capsys, "admin", "evict", "--config", str(config), "--yes")
    assert rc == 2 and out == "" and "name what to evict" in err


def test_evict_by_artifact_and_age_on_one_tier(populated, capsys) -> None:
    config, _ = populated
    argv = ["admin", "evict", "--config", str(config), "--tier", "s3", "--json"]
    rc, out, _ = run(capsys, *argv, "--artifact", OLD.artifact_id, "--yes")
    (row,) = json.loads(out)
    assert rc == 0 and row["tier"] == "s3" and row["removed"] == 3 and not row["dry_run"]
    rc, out, _ = run(capsys, *argv, "--older-than", "1h", "--yes")
    assert json.loads(out)[0]["removed"] == 0  # written seconds ago
    time.sleep(1.1)
    rc, out, _ = run(capsys, *argv, "--older-than", "1s")
    assert json.loads(out)[0]["chunks"] == 3  # the rest, older than a second now
    rc, out, _ = run(capsys, "stats", "--config", str(config), "--json")
    counts = {r["tier"]: r.get("chunks") for r in json.loads(out)["tiers"]}
    assert counts == {"memory": None, "disk": 6, "s3": 3}  # --tier s3 left the disk alone


# --- admin verify and warm --------------------------------------------------------------------


def test_verify_finds_corrupt_and_misfiled_blobs_and_removes_them(populated, capsys) -> None:
    config, keys = populated
    from tests.s3_server import raw_client

    cfg = load_config(config)
    s3cfg = cfg.tiers[2]
    a, b = keys["beta"]
    path = next((config.parent / "disk").rglob(f"{a}.kvtc"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # corrupt on disk
    client = raw_client(s3cfg.endpoint_url)
    blob_b = client.get_object(Bucket=s3cfg.bucket, Key=f"kvtc/{b[:2]}/{b}.kvtc")["Body"].read()
    c = keys["acme"][0]
    client.put_object(Bucket=s3cfg.bucket, Key=f"kvtc/{c[:2]}/{c}.kvtc", Body=blob_b)  # misfiled
    rc, out, _ = run(capsys, "admin", "verify", "--config", str(config), "--json")
    rows = {r["tier"]: r for r in json.loads(out)}
    assert rc == 1
    assert [x["key"] for x in rows["disk"]["bad"]] == [a] and rows["disk"]["checked"] == 6
    assert "BlobCorruptError" in rows["disk"]["bad"][0]["error"]
    assert [x["key"] for x in rows["s3"]["bad"]] == [c]
    assert "BlobMisfiledError" in rows["s3"]["bad"][0]["error"]
    rc, out, _ = run(capsys, "admin", "verify", "--config", str(config), "--remove")
    assert rc == 0 and out.count("1 removed") == 2
    rc, out, _ = run(capsys, "admin", "verify", "--config", str(config), "--json")
    assert rc == 0 and [r["ok"] for r in json.loads(out)] == [5, 5]


def test_warm_copies_a_key_list_from_s3_into_an_empty_disk(populated, capsys) -> None:
    config, keys = populated
    import shutil

    shutil.rmtree(config.parent / "disk")  # a new replica
    (config.parent / "disk").mkdir()
    listing = config.parent / "keys.txt"
    listing.write_text("\n".join(keys["acme"][:2] + ["ab" * 32]) + "\n")
    argv = ["admin", "warm", "--config", str(config), "--from", "s3", "--to", "disk"]
    rc, out, _ = run(capsys, *argv, "--keys", str(listing), "--dry-run")
    assert rc == 0 and "would copy (dry run) 2 chunks" in out
    rc, out, _ = run(capsys, *argv, "--keys", str(listing), "--json")
    row = json.loads(out)
    assert (row["copied"], row["present"], row["missing"]) == (2, 0, ["ab" * 32])
    rc, out, _ = run(capsys, *argv, "--tenant", "acme", "--json")
    assert (json.loads(out)["copied"], json.loads(out)["present"]) == (1, 2)
    disk = DiskBackend(config.parent / "disk", 1 << 20, read_only=True)
    try:
        assert disk.exists(keys["acme"]) == [True] * 3 and not any(disk.exists(keys["beta"]))
        # what was copied is what a store reads back
        tokens, _, _ = tiny_sequence(3, seed=1)
        store = TieredStore(
            [MemoryBackend(1 << 20), disk], KVTCCodec(OLD), tiny_namespace("acme"),
            chunk_tokens=CHUNK,
        )  # fmt: skip
        assert store.lookup(tokens) == 3 * CHUNK
    finally:
        disk.close()


def test_warm_a_list_of_prompts_by_their_tokens(populated, capsys) -> None:
    config, keys = populated
    from tests.tiny_codec import FINGERPRINT

    disk = config.parent / "disk"
    for f in disk.rglob("*.kvtc"):
        f.unlink()
    tokens, _, _ = tiny_sequence(3, seed=1)  # tenant acme's prompt
    prompts = config.parent / "prompts.jsonl"
    prompts.write_text(
        json.dumps(tokens[: 2 * CHUNK + 5].tolist())  # its first two chunks and a bit
        + "\n"
        + json.dumps({"input_ids": list(range(CHUNK))})  # a prompt nobody stored
        + "\n"
    )
    argv = ["admin", "warm", "--config", str(config), "--from", "s3", "--to", "disk"]
    ns = ["--model-fingerprint", FINGERPRINT, "--kv-layout", "tiny"]
    rc, out, _ = run(capsys, *argv, "--prefixes", str(prompts), *ns, "--json")
    row = json.loads(out)
    assert rc == 0 and row["copied"] == 2 and len(row["missing"]) == 1
    got = sorted(p.stem for p in disk.rglob("*.kvtc"))
    assert got == sorted(keys["acme"][:2])
    rc, _, err = run(capsys, *argv, "--prefixes", str(prompts))
    assert rc == 2 and "needs --config, --model-fingerprint and --kv-layout" in err


# --- health -----------------------------------------------------------------------------------


def test_health_answers_per_tier_and_fails_on_an_unreachable_one(populated, capsys) -> None:
    config, _ = populated
    rc, out, _ = run(capsys, "health", "--config", str(config), "--json")
    got = json.loads(out)
    assert rc == 0 and got["ok"] and [r["reachable"] for r in got["tiers"]] == [True] * 3
    from tests.s3_server import closed_port

    data = yaml.safe_load(config.read_text())
    good_bucket = data["tiers"][2]["bucket"]
    data["tiers"][2]["bucket"] = good_bucket + "-misspelt"
    config.write_text(yaml.safe_dump(data))
    rc, out, _ = run(capsys, "health", "--config", str(config), "--json")
    s3 = json.loads(out)["tiers"][2]
    assert rc == 1 and not s3["reachable"]
    assert s3["detail"].startswith("BucketNotFoundError: tiers.2.bucket: ")
    data["tiers"][2]["bucket"] = good_bucket
    data["tiers"][2]["endpoint_url"] = f"http://127.0.0.1:{closed_port()}"
    data["tiers"][2]["deadline"] = 2.0
    data["tiers"][2]["max_attempts"] = 1
    data["tiers"].insert(0, {"kind": "gpu", "capacity": "1MiB", "optional": True})
    config.write_text(yaml.safe_dump(data))
    t0 = time.monotonic()
    rc, out, _ = run(capsys, "health", "--config", str(config))
    assert rc == 1 and out.startswith("unhealthy") and time.monotonic() - t0 < 10
    lines = out.splitlines()
    (s3_line,) = [line for line in lines if line.split()[0] == "s3"]
    # the refused connection is named, not reported as a silence
    assert "DOWN" in s3_line and "EndpointConnectionError" in s3_line, s3_line
    assert "no answer within" not in s3_line
    assert any(line.split()[0] == "disk" and " ok:" in line for line in lines)


def test_health_fails_where_the_store_would_not_open(tmp_path, capsys) -> None:
    """A disk folder that cannot be created (even by root: a file stands in its parent's
    place) and a codec artifact that is not there are DOWN, as the store's open fails."""
    (tmp_path / "a-file").write_text("not a folder")
    config = tmp_path / "store.yaml"
    tiers = [{"kind": "disk", "path": "a-file/kv", "capacity": "1MiB"}]
    config.write_text(yaml.safe_dump({"tiers": tiers, "codec": {"artifact": "codecs/cr8"}}))
    rc, out, _ = run(capsys, "health", "--config", str(config), "--json")
    got = json.loads(out)
    assert rc == 1 and not got["ok"]
    assert not got["tiers"][0]["reachable"] and "cannot be created" in got["tiers"][0]["detail"]
    assert not got["codec"]["ok"] and got["codec"]["detail"].startswith("ArtifactError")
    tiers[0]["path"] = "new/kv"  # creatable: ok, and the probe leaves nothing behind
    config.write_text(yaml.safe_dump({"tiers": tiers}))
    rc, out, _ = run(capsys, "health", "--config", str(config))
    assert rc == 0 and "created on first open" in out and not (tmp_path / "new").exists()
    assert "codec" in out.splitlines()[-1] and "calibrated on first open" in out


def test_healthz_on_the_metrics_port(tmp_path) -> None:
    tiers = [MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)]
    with TieredStore(tiers, KVTCCodec(OLD), tiny_namespace("acme"), chunk_tokens=CHUNK) as store:
        tokens, keys, values = tiny_sequence(2)
        store.put(tokens, keys, values)
        store.flush(timeout=30)
        port = store.metrics.serve(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            got = json.loads(resp.read())
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"kvtc_encode_chunks" in resp.read()
    assert got["ok"] and [r["circuit"] for r in got["tiers"]] == ["closed", "closed"]
    assert [r["queue_depth"] for r in got["tiers"]] == [None, 0]
    assert got["tiers"][1]["used_bytes"] > 0 and 0 < got["tiers"][1]["use"] < 1


def test_a_taken_metrics_port_is_a_config_error_naming_it(tmp_path) -> None:
    """Two processes on one host with one config: the second store's metrics port is taken
    (here by a real listening socket) and from_config names the field, not a bare OSError."""
    import socket

    from kvtc_store.errors import ConfigError

    OLD.save(tmp_path / "art")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "store.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "chunk_tokens": CHUNK,
                    "tiers": [{"kind": "memory", "capacity": "1MiB"}],
                    "codec": {"artifact": "art"},
                    "metrics": {"port": port},
                }
            )
        )
        with pytest.raises(ConfigError, match=f"metrics.port: cannot serve on 127.0.0.1:{port}"):
            TieredStore.from_config(config, tiny_info())


# --- the smaller fixes ------------------------------------------------------------------------


def test_an_optional_gpu_tier_is_not_told_to_be_marked_optional(tmp_path, caplog) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the GPU tier opens")
    from kvtc_store.errors import ConfigError

    gpu = {"kind": "gpu", "capacity": "1MiB"}
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump({"tiers": [gpu, {"kind": "memory", "capacity": "1MiB"}]}))
    with pytest.raises(ConfigError, match="optional: true"):
        build_tiers(load_config(config))
    config.write_text(
        yaml.safe_dump({"tiers": [{**gpu, "optional": True}, {"kind": "memory", "capacity": 1000}]})
    )
    with caplog.at_level("WARNING"):
        (memory,) = build_tiers(load_config(config))
    memory.close()
    assert "left out" in caplog.text and "optional" not in caplog.text.split("left out", 1)[1]


def test_demo_shows_the_answers_as_decoded() -> None:
    from kvtc_store.demo import DemoReport, format_report

    figures = dict.fromkeys(
        [
            "target_ratio",
            "doc_tokens",
            "prompt2_tokens",
            "reused_tokens",
            "chunks_stored",
            "blob_bytes",
            "bf16_bytes",
            "middle_chunk_ratio",
            "disk_bytes",
            "ttft_recompute_s",
            "ttft_reuse_s",
            "ppl_change_pct",
            "kl",
            "top1_agreement",
            "greedy_match_tokens",
            "greedy_tokens",
            "calibration_seconds",
        ],
        1,
    )
    report = DemoReport(**figures, answer_reuse=" Yes.\n", answer_exact="Yes.")
    out = format_report(report)
    assert "answer with reuse : ' Yes.\\n'" in out and "answer recomputed : 'Yes.'" in out


def test_demo_too_long_a_document_is_one_line_naming_the_limit(capsys) -> None:
    assert main(["demo", "--doc-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8000" in err and "--doc-tokens" in err


def test_no_example_path_lands_inside_the_repository() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples" / "store.yaml", env={})
    for t in cfg.tiers:
        if t.kind == "disk":
            assert not Path(os.path.abspath(t.path)).is_relative_to(root)


def test_errors_name_their_class_and_come_as_json_with_json(tmp_path, capsys) -> None:
    rc, out, err = run(capsys, "inspect", str(tmp_path / "absent.kvtc"), "--json")
    assert rc == 2 and err.startswith("kvtc-store: FileNotFoundError: cannot read")
    assert json.loads(out)["error"]["type"] == "FileNotFoundError"
    bad = tmp_path / "store.yaml"
    bad.write_text("tiers: [{kind: disk}]\n")  # a disk tier without its path
    for argv in (["stats", "--config", str(bad)], ["admin", "verify", "--config", str(bad)]):
        rc, out, err = run(capsys, *argv, "--json")
        assert rc == 2 and err.startswith("kvtc-store: ConfigError: ") and "tiers.0.path" in err
        assert json.loads(out)["error"]["type"].endswith("ConfigError")
        rc, out, _ = run(capsys, *argv)  # without --json: stderr only
        assert rc == 2 and out == ""


def test_health_of_a_silent_s3_ends_by_its_deadline(tmp_path, capsys, aws_credentials) -> None:  # noqa: F811
    """A silent endpoint (accepts, never answers: real sockets): health says so and returns
    within the tier's deadline plus slack, not after read_timeout x max_attempts (30 s)."""
    from tests.s3_server import SilentServer

    with SilentServer() as silent:
        config = tmp_path / "store.yaml"
        s3 = {"kind": "s3", "bucket": "b", "endpoint_url": silent.url, "deadline": 2.0}
        config.write_text(yaml.safe_dump({"tiers": [s3]}))
        t0 = time.monotonic()
        rc, out, _ = run(capsys, "health", "--config", str(config))
        took = time.monotonic() - t0
    assert rc == 1 and "no answer within 2 s" in out and took < 6, (took, out)
