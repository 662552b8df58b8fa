"""The ``kvtc-store`` command: inspect, stats, and its named-error exit path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvtc_store.cli import main
from kvtc_store.codec import KVTCCodec

pytestmark = pytest.mark.model


def test_inspect_prints_the_header(artifact8, doc_kv, tmp_path, capsys):
    _, keys, values = doc_kv
    blob = KVTCCodec(artifact8).encode(keys[:, :, 256:512], values[:, :, 256:512], 256)
    path = tmp_path / "chunk.kvtc"
    path.write_bytes(blob)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["artifact id"] == artifact8.artifact_id
    assert [fields[k] for k in ("layers", "kv heads", "head dim", "tokens")] == [
        "30", "3", "64", "256",
    ]  # fmt: skip
    assert fields["first position"] == "256" and fields["dtype"] == "float32"
    assert fields["coder"] == "none" and "'stream'" in fields["sections (raw bytes)"]
    assert fields["honest ratio"] == f"{30 * 3 * 64 * 256 * 4 / len(blob):.2f}x"


def test_inspect_of_a_foreign_file_is_a_named_error(tmp_path, capsys):
    path = tmp_path / "not-a-blob"
    path.write_bytes(b"hello world, not a blob")
    assert main(["inspect", str(path)]) == 1  # a problem found, as admin verify says
    assert "BlobFormatError" in capsys.readouterr().err


def test_stats_counts_chunks_of_a_disk_tier(tmp_path):
    from kvtc_store.backends import DiskBackend

    DiskBackend(tmp_path, 1 << 20).put([("ab" * 32, b"x" * 1000), ("cd" * 32, b"y" * 500)])
    out = subprocess.run(
        [sys.executable, "-m", "kvtc_store.cli", "stats", "--disk", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    allocated = sum(p.stat().st_blocks * 512 for p in tmp_path.rglob("*.kvtc"))
    assert f"2 chunks, {allocated / 1024:.2f} KiB\n" in out  # allocated: the cap's measure


def test_stats_of_a_config_reads_its_disk_and_s3_tiers(tmp_path, s3_endpoint):
    import json
    import uuid

    from kvtc_store.backends import DiskBackend, S3Backend
    from tests.s3_server import closed_port

    bucket = f"kvtc-stats-{uuid.uuid4().hex[:12]}"
    s3 = S3Backend(bucket, endpoint_url=s3_endpoint, region_name="us-east-1", create_bucket=True)
    s3.put([(f"{i:02x}" * 32, b"s" * 1000) for i in range(3)])
    DiskBackend(tmp_path / "disk", 1 << 20).put([("ab" * 32, b"x" * 2000), ("cd" * 32, b"y")])
    config = tmp_path / "store.yaml"
    config.write_text(
        "tenant: acme\n"
        "tiers:\n"
        "  - {kind: memory, capacity: 1MiB}\n"
        "  - {kind: disk, path: disk, capacity: 1MB}\n"
        f"  - {{kind: s3, bucket: {bucket}, endpoint_url: '{s3_endpoint}', region: us-east-1}}\n"
    )

    def stats(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvtc_store.cli", "stats", "--config", str(config), *extra],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )

    out = stats()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "its own tenant: acme" in lines[0] and "counts cover every tenant" in lines[0]
    assert "held by each serving process" in lines[1]
    allocated = sum(p.stat().st_blocks * 512 for p in (tmp_path / "disk").rglob("*.kvtc"))
    share = f"{allocated / 1024:.2f} KiB of 976.56 KiB ({100 * allocated / 1e6:.1f}%)"
    assert f"2 chunks, {share}" in lines[2] and str(tmp_path / "disk") in lines[2]
    assert f"s3://{bucket}/kvtc/: 3 chunks, 2.93 KiB" in lines[5]
    report = json.loads(stats("--json").stdout)
    assert [(t["tier"], t.get("chunks"), t.get("used_bytes")) for t in report["tiers"]] == [
        ("memory", None, None),
        ("disk", 2, allocated),
        ("s3", 3, 3000),
    ]
    dead = f"http://127.0.0.1:{closed_port()}"
    out = stats(
        env={"KVTC_STORE_TIERS__2__ENDPOINT_URL": dead, "KVTC_STORE_TIERS__2__MAX_ATTEMPTS": "1"}
    )
    assert out.returncode == 1
    assert "unreachable: s3 tier: inventory: listing" in out.stdout.splitlines()[-1]


def test_calibrate_takes_the_corpus_and_the_artifact_cap(smollm2, test_settings, capsys):
    """`kvtc-store calibrate`: the cap applies by default from target 16 up (its share
    names the artifact's folder), `--max-artifact-share none` turns it off, a share
    outside (0, 1] is refused while parsing (exit 2)."""
    windows = ["--windows", str(test_settings.windows), "--corpus", test_settings.corpus]
    assert main(["calibrate", "--ratio", "8", "16", *windows]) == 0
    out = capsys.readouterr().out
    assert "int8-cr8 " in out and "int8-p0.15-cr16 " in out
    args = ["calibrate", "--ratio", "16", "--max-artifact-share", "none", *windows]
    assert main(args) == 0
    assert "int8-cr16 " in capsys.readouterr().out
    for bad in ("0", "1.5", "lots"):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--max-artifact-share", bad])
        assert exc.value.code == 2
    assert "not a share in (0, 1]" in capsys.readouterr().err
