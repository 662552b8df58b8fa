"""Sharing across replicas: separate processes, each with its own CPU tier, sharing one
disk directory and one S3 bucket (moto's server on loopback). What one writes, the
others find: lookup sees it and get returns the same tensors.

Real processes (``subprocess``, each a fresh interpreter), each building its store from
a YAML config with ``TieredStore.from_config``, as a deployment would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import botocore.config
import torch

from kvtc_store.backends import MemoryBackend, S3Backend
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import TieredStore
from tests.tiny_codec import CHUNK, FINGERPRINT, tiny_artifact, tiny_codec, tiny_info, tiny_sequence

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
chunk_tokens: {chunk}
tiers:
  - {{kind: memory, capacity: 16MiB}}
  {disk}
  - {{kind: s3, bucket: {bucket}, endpoint_url: '{endpoint}', region: us-east-1}}
codec: {{artifact: {artifact}}}
"""

REPLICA = """
import json, sys, time, torch
from kvtc_store.store import TieredStore
from tests.tiny_codec import tiny_info, tiny_sequence
config, out, own, other = sys.argv[1:]
with TieredStore.from_config(config, tiny_info()) as store:
    tokens, keys, values = tiny_sequence(6, seed=int(own))
    report = {"written": store.put(tokens, keys, values).chunks_written}
    assert store.flush(timeout=60)
    theirs, _, _ = tiny_sequence(6, seed=int(other))
    deadline = time.monotonic() + 90
    disk = store.tiers[1]  # the shared folder: wait until the other's write-down is there
    while not all(disk.exists(store.keys_for(theirs))) and time.monotonic() < deadline:
        time.sleep(0.05)
    report["lookup_other"] = store.lookup(theirs)
    tensors = {own: store.get(tokens), other: store.get(theirs)}
    report["hits"] = store.stats.chunks_hit
torch.save(tensors, out)
print(json.dumps(report))
"""


def test_replicas_share_chunks_through_disk_and_s3(tmp_path: Path, s3_endpoint: str) -> None:
    """Two replica processes run at once over a shared disk directory and bucket, each
    writing its own sequence and reading the other's; then this process, a third
    replica with no disk at all, reads both from S3."""
    bucket = f"kvtc-replicas-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    ).create_bucket(Bucket=bucket)
    tiny_artifact().save(tmp_path / "art")
    config = tmp_path / "store.yaml"
    config.write_text(
        CONFIG.format(
            chunk=CHUNK,
            bucket=bucket,
            endpoint=s3_endpoint,
            artifact=tmp_path / "art",
            disk=f"- {{kind: disk, path: {tmp_path / 'shared-disk'}, capacity: 16MiB}}",
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REPLICA, str(config), str(tmp_path / f"{own}.pt"), own, other],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for own, other in (("1", "2"), ("2", "1"))
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for report in reports:
        assert report["written"] == 6
        assert report["lookup_other"] == 6 * CHUNK
        # its own chunks from its CPU tier, the other's from the shared disk
        assert report["hits"] == {"memory": 6, "disk": 6}

    s3 = S3Backend(bucket, endpoint_url=s3_endpoint, region_name="us-east-1")
    namespace = ChunkNamespace(FINGERPRINT, tiny_info().kv_layout())  # as from_config makes it
    with TieredStore([MemoryBackend(16 << 20), s3], tiny_codec(), namespace, CHUNK) as third:
        got = {name: torch.load(tmp_path / f"{name}.pt") for name in "12"}
        for seed in "12":
            tokens, _, _ = tiny_sequence(6, seed=int(seed))
            assert third.lookup(tokens) == 6 * CHUNK
            k, v = third.get(tokens)
            for replica in got.values():  # the writer's own read and the other's
                assert torch.equal(replica[seed][0], k) and torch.equal(replica[seed][1], v)
        assert third.stats.chunks_hit == {"s3": 12}
