"""The ``kvtc-store`` command: inspect, stats, and its named-error exit path."""

from __future__ import annotations

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
    assert f"artifact_id: {artifact8.artifact_id}" in out
    assert "shape: [30, 3, 64, 256]" in out
    assert "coder: none" in out and "'stream'" in out  # rANS-coded: no DEFLATE pass


def test_inspect_of_a_foreign_file_is_a_named_error(tmp_path, capsys):
    path = tmp_path / "not-a-blob"
    path.write_bytes(b"hello world, not a blob")
    assert main(["inspect", str(path)]) == 2
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
    assert "2 chunks" in out and "0.00 MB" in out
