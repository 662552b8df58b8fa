"""The codec registry on a folder and on S3 (moto's real server on loopback): publish,
promote, roll back, history; compare-and-swap between real processes; and every fault the
issue lists (unreachable, corrupt, truncated, foreign model, missing id, garbage pointer,
kill -9 during publish)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtc_store.errors import (
    ArtifactChecksumError,
    ArtifactModelMismatchError,
    ArtifactNotFoundError,
    RegistryConflictError,
    RegistryError,
    RegistryPointerError,
    RegistryUnavailableError,
)
from kvtc_store.registry import CodecRegistry, open_registry
from tests.s3_server import closed_port, raw_client
from tests.tiny_codec import FINGERPRINT, tiny_artifact

FP = FINGERPRINT
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["folder", "s3"])
def url(request, tmp_path) -> str:
    """A fresh registry: a folder, or a prefix in a fresh bucket of the moto server."""
    if request.param == "folder":
        request.getfixturevalue("monkeypatch").delenv("KVTC_TEST_REGISTRY_ENDPOINT", False)
        return str(tmp_path / "registry")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    # for _open, here and in the child processes (they inherit the environment)
    request.getfixturevalue("monkeypatch").setenv("KVTC_TEST_REGISTRY_ENDPOINT", endpoint)
    return f"s3://{bucket}/codecs"


def _open(url: str) -> CodecRegistry:
    return open_registry(
        url, endpoint_url=os.environ.get("KVTC_TEST_REGISTRY_ENDPOINT"), create=True
    )


@pytest.fixture
def reg(url: str) -> CodecRegistry:
    return _open(url)


def test_publish_is_content_addressed_and_idempotent(reg: CodecRegistry, tmp_path) -> None:
    a, b = tiny_artifact(bits=4), tiny_artifact(bits=6)
    assert a.artifact_id != b.artifact_id
    assert reg.publish(a) == (a.artifact_id, True)
    assert reg.publish(a.save(tmp_path / "a")) == (a.artifact_id, False)  # a folder, again
    assert reg.publish(b) == (b.artifact_id, True)
    assert reg.models() == [FP]
    assert reg.artifact_ids(FP) == sorted([a.artifact_id, b.artifact_id])
    man = reg.manifest(FP, b.artifact_id)
    assert man["plan"][0]["bits"] == 6 and len(man["files"]["tensors.safetensors"]["sha256"]) == 64
    pulled = reg.pull(FP, b.artifact_id, tmp_path / "pulled")
    assert pulled.artifact_id == b.artifact_id
    assert (tmp_path / "pulled" / "tensors.safetensors").is_file()
    assert reg.find_model(a.artifact_id) == FP


def test_promote_rollback_and_history(reg: CodecRegistry) -> None:
    ids = [tiny_artifact(bits=b).artifact_id for b in (3, 4, 5)]
    for b in (3, 4, 5):
        reg.publish(tiny_artifact(bits=b))
    assert reg.current(FP, "ratio16") is None
    for i in ids:
        reg.promote(FP, i, "ratio16", by="tester", reason=f"to {i}")
    reg.promote(FP, ids[0], "canary")
    assert reg.current(FP, "ratio16").artifact_id == ids[2]
    assert reg.current(FP, "canary").artifact_id == ids[0]  # profiles are independent

    assert reg.rollback(FP, "ratio16", reason="bad").artifact_id == ids[1]
    assert reg.rollback(FP, "ratio16").artifact_id == ids[0]  # rollbacks stack
    with pytest.raises(RegistryError, match="no earlier artifact"):
        reg.rollback(FP, "ratio16")
    reg.promote(FP, ids[2], "ratio16")
    assert reg.rollback(FP, "ratio16").artifact_id == ids[0]

    hist = reg.history(FP, "ratio16")
    assert [m.seq for m in hist] == list(range(1, 8))
    assert [(m.action, m.artifact_id) for m in hist] == [
        ("promote", ids[0]),
        ("promote", ids[1]),
        ("promote", ids[2]),
        ("rollback", ids[1]),
        ("rollback", ids[0]),
        ("promote", ids[2]),
        ("rollback", ids[0]),
    ]
    for prev, m in itertools.pairwise(hist):
        assert m.previous == prev.artifact_id  # nothing lost in between
    assert hist[0].by == "tester" and hist[0].reason == f"to {ids[0]}"
    assert {m.profile for m in reg.history(FP)} == {"ratio16", "canary"}


def test_history_is_complete_in_order(reg: CodecRegistry) -> None:
    a, b = tiny_artifact(bits=3), tiny_artifact(bits=4)
    reg.publish(a)
    reg.publish(b)
    reg.promote(FP, a.artifact_id, "p")
    reg.promote(FP, b.artifact_id, "p")
    reg.rollback(FP, "p")
    hist = reg.history(FP, "p")
    assert [(m.seq, m.action, m.previous, m.artifact_id) for m in hist] == [
        (1, "promote", None, a.artifact_id),
        (2, "promote", a.artifact_id, b.artifact_id),
        (3, "rollback", b.artifact_id, a.artifact_id),
    ]


def test_a_stale_writer_gets_a_conflict_and_nothing_changes(reg: CodecRegistry) -> None:
    a, b = tiny_artifact(bits=3), tiny_artifact(bits=4)
    reg.publish(a)
    reg.publish(b)
    reg.promote(FP, a.artifact_id, "p")
    stale = reg.current(FP, "p")
    reg.promote(FP, b.artifact_id, "p")
    key = f"{FP}/profiles/p/current.json"
    with pytest.raises(RegistryConflictError):
        reg.storage.replace(key, stale.record(), stale.etag)
    assert reg.current(FP, "p").artifact_id == b.artifact_id
    with pytest.raises(RegistryConflictError):  # a canary's guard: only from what I saw
        reg.promote(FP, a.artifact_id, "p", expect=a.artifact_id)
    assert reg.current(FP, "p").artifact_id == b.artifact_id
    assert reg.storage.create(key, b"x") is False  # create-if-absent refuses too


def test_moto_server_enforces_conditional_writes(s3_endpoint: str, bucket: str) -> None:
    """The protocol rests on these two answers; check them on the real server."""
    c = raw_client(s3_endpoint)
    c.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(c.exceptions.ClientError) as e:
        c.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    etag = c.head_object(Bucket=bucket, Key="k")["ETag"]
    c.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=etag)
    with pytest.raises(c.exceptions.ClientError) as e:
        c.put_object(Bucket=bucket, Key="k", Body=b"4", IfMatch=etag)  # stale now
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"3"


# --- faults ---------------------------------------------------------------------------------


def _tensors_key(aid: str) -> str:
    return f"{FP}/artifacts/{aid}/tensors.safetensors"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_corrupt_or_truncated_artifact_is_refused_by_checksum(reg, damage, tmp_path) -> None:
    a, b = tiny_artifact(bits=3), tiny_artifact(bits=4)
    reg.publish(a)
    reg.publish(b)
    reg.promote(FP, a.artifact_id, "p")
    key = _tensors_key(b.artifact_id)
    data = reg.storage.read(key)[0]
    if damage == "flip":
        bad = data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:]
        reg.storage.write(key, bad)
    elif damage == "truncate":
        reg.storage.write(key, data[: len(data) // 2])
    elif isinstance(reg.storage.url, str) and reg.storage.url.startswith("s3://"):
        raw_client(os.environ["KVTC_TEST_REGISTRY_ENDPOINT"]).delete_object(
            Bucket=reg.storage.bucket, Key=reg.storage.prefix + key
        )
    else:
        (Path(reg.storage.url) / key).unlink()
    with pytest.raises(ArtifactChecksumError):
        reg.pull(FP, b.artifact_id, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ArtifactChecksumError):
        reg.promote(FP, b.artifact_id, "p")
    assert reg.current(FP, "p").artifact_id == a.artifact_id  # unchanged


def test_an_artifact_of_another_model_is_refused(reg: CodecRegistry, tmp_path) -> None:
    other = tiny_artifact(fingerprint="e" * 64)
    reg.publish(other)
    oid = other.artifact_id
    # copied by hand under this model's folder
    for name in ("tensors.safetensors", "manifest.json"):
        data = reg.storage.read(f"{'e' * 64}/artifacts/{oid}/{name}")[0]
        reg.storage.write(f"{FP}/artifacts/{oid}/{name}", data)
    with pytest.raises(ArtifactModelMismatchError):
        reg.pull(FP, oid, tmp_path / "x")
    with pytest.raises(ArtifactModelMismatchError):
        reg.promote(FP, oid, "p")
    assert reg.current(FP, "p") is None


def test_promote_to_a_missing_id_is_refused(reg: CodecRegistry) -> None:
    a = tiny_artifact()
    reg.publish(a)
    reg.promote(FP, a.artifact_id, "p")
    with pytest.raises(ArtifactNotFoundError):
        reg.promote(FP, "0123456789abcdef", "p")
    with pytest.raises(ArtifactNotFoundError):
        reg.promote("e" * 64, a.artifact_id, "p")  # another model has no such artifact
    assert reg.current(FP, "p").artifact_id == a.artifact_id
    assert len(reg.history(FP, "p")) == 1


@pytest.mark.parametrize("garbage", [b"{not json", b'{"format": 1, "seq": "x"}', b"[]", b""])
def test_a_pointer_edited_into_garbage_is_a_named_error(reg: CodecRegistry, garbage) -> None:
    a, b = tiny_artifact(bits=3), tiny_artifact(bits=4)
    reg.publish(a)
    reg.publish(b)
    reg.promote(FP, a.artifact_id, "p")
    reg.storage.write(f"{FP}/profiles/p/current.json", garbage)
    with pytest.raises(RegistryPointerError):
        reg.current(FP, "p")
    with pytest.raises(RegistryPointerError):
        reg.promote(FP, b.artifact_id, "p")
    with pytest.raises(RegistryPointerError):
        reg.rollback(FP, "p")
    m = reg.promote(FP, b.artifact_id, "p", force=True, reason="repair")
    assert (m.seq, m.previous) == (2, None)
    assert [x.artifact_id for x in reg.history(FP, "p")] == [a.artifact_id, b.artifact_id]


def test_an_unreachable_registry_is_a_named_error(tmp_path, aws_credentials) -> None:
    down = open_registry(
        "s3://nobucket/codecs",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        connect_timeout=0.5,
        max_attempts=1,
    )
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError):
        down.current(FP, "p")
    with pytest.raises(RegistryUnavailableError):
        down.publish(tiny_artifact())
    assert time.monotonic() - t0 < 10  # deadlines hold
    gone = open_registry(tmp_path / "unmounted")  # a folder that is not there
    with pytest.raises(RegistryUnavailableError):
        gone.current(FP, "p")
    with pytest.raises(RegistryUnavailableError):
        gone.artifact_ids(FP)


# --- real processes -------------------------------------------------------------------------


def _publish_and_promote(url: str, bits: list[int], moves: int, barrier, out) -> None:
    """Child process: publish the artifacts (all children at once), then ``moves``
    promotions alternating over them (all children at once), retrying conflicts."""
    reg = _open(url)
    arts = [tiny_artifact(bits=b) for b in bits]
    barrier.wait(120)
    created = {a.artifact_id: reg.publish(a)[1] for a in arts}
    barrier.wait(120)
    done = conflicts = 0
    while done < moves:
        try:
            reg.promote(FP, arts[done % len(arts)].artifact_id, "race", by=f"pid{os.getpid()}")
            done += 1
        except RegistryConflictError:
            conflicts += 1
    out.put((created, done, conflicts))


def test_processes_publishing_and_promoting_at_once_lose_nothing(reg, url) -> None:
    """Three processes publish the same artifacts at once (each is created by exactly one,
    a no-op for the others), then promote at once; no move is lost."""
    bits = [3, 4, 5]
    ctx = multiprocessing.get_context("spawn")
    n, moves = 3, 6
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(
            target=_publish_and_promote, args=(url, bits[i:] + bits[:i], moves, barrier, out)
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [tiny_artifact(bits=b).artifact_id for b in bits]
    for aid in ids:
        assert sum(created[aid] for created, _, _ in results) == 1
        reg.verify(FP, aid)  # complete and intact
    assert reg.artifact_ids(FP) == sorted(ids)
    hist = reg.history(FP, "race")
    assert len(hist) == n * moves == sum(d for _, d, _ in results)
    assert [m.seq for m in hist] == list(range(1, n * moves + 1))
    for prev, m in itertools.pairwise(hist):
        assert m.previous == prev.artifact_id  # every move saw the one before it
    assert reg.current(FP, "race").artifact_id == hist[-1].artifact_id


_KILLED_PUBLISHER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from kvtc_store.registry import open_registry
from tests.tiny_codec import tiny_artifact
reg = open_registry({url!r}, endpoint_url={endpoint!r}, create=True)
real_create = reg.storage.create
def create(key, data):
    print("TENSORS-WRITTEN", flush=True)
    time.sleep(60)
    return real_create(key, data)
reg.storage.create = create
reg.publish(tiny_artifact(bits=5))
"""


def test_kill_9_during_publish_leaves_nothing_visible(reg: CodecRegistry, url: str) -> None:
    code = _KILLED_PUBLISHER.format(
        repo=str(REPO), url=url, endpoint=os.environ.get("KVTC_TEST_REGISTRY_ENDPOINT")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "TENSORS-WRITTEN", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    art = tiny_artifact(bits=5)
    aid = art.artifact_id
    assert reg.storage.read(_tensors_key(aid)) is not None  # the child got that far
    assert reg.artifact_ids(FP) == []  # ... and nothing is visible
    with pytest.raises(ArtifactNotFoundError):
        reg.promote(FP, aid, "p")
    assert reg.publish(art) == (aid, True)  # a later publish completes it
    assert reg.promote(FP, aid, "p").artifact_id == aid


def test_s3_urls_are_checked() -> None:
    with pytest.raises(RegistryError, match="no bucket"):
        open_registry("s3:///x")
    with pytest.raises(RegistryError, match="not a valid name"):
        CodecRegistry(open_registry("/tmp/x").storage).current(FP, "../etc")
