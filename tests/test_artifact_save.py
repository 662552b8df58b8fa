"""An artifact folder's files follow the umask, as any file the process writes.

safetensors writes owner-only files (0600); an artifact written by ``kvtc-store
calibrate --out`` under one user must stay readable by a server running under another
when the umask allows it.
"""

from __future__ import annotations

import os
import stat

import pytest

from kvtc_store.codec.artifact import CodecArtifact
from tests.tiny_codec import tiny_artifact


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_artifact_files_take_the_umask(tmp_path, umask: int) -> None:
    art = tiny_artifact(bits=4)
    old = os.umask(umask)
    try:
        folder = art.save(tmp_path / "art")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"manifest.json": 0o666 & ~umask, "tensors.safetensors": 0o666 & ~umask}
    assert CodecArtifact.load(folder).artifact_id == art.artifact_id
