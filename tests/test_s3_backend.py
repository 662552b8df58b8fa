"""Tests of the S3 tier against a real S3 endpoint on loopback (moto's server, no mocks).

The endpoint comes from ``tests/s3_server.py``: ``KVTC_TEST_S3_ENDPOINT`` when CI
started ``moto_server``, else an in-process ``ThreadedMotoServer``. Every test gets
its own bucket. Failure tests use real dead endpoints: a closed port of 127.0.0.1
(connection refused) and a socket that accepts and never answers (read timeout).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from kvtc_store.backends import S3Backend, TierUsage
from kvtc_store.errors import CapacityError, ConfigError, StoreError
from tests.s3_server import closed_port, raw_client

MB = 1024 * 1024


def k(i: int) -> str:
    """A deterministic valid key for small integer ids."""
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture
def make_s3(s3_endpoint: str, bucket: str) -> Iterator:
    """Factory of S3 tiers on the test's bucket; every one is closed at the end."""
    made: list[S3Backend] = []

    def make(**kwargs) -> S3Backend:
        kwargs.setdefault("endpoint_url", s3_endpoint)
        kwargs.setdefault("region_name", "us-east-1")
        backend = S3Backend(bucket, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def s3(make_s3) -> S3Backend:
    return make_s3()


# --- the protocol ------------------------------------------------------------------------


def test_put_get_exists_delete_batches(s3: S3Backend) -> None:
    items = [(k(i), f"value {i}".encode() * (i + 1)) for i in range(24)]
    s3.put(items[:20] + [(k(20), bytearray(b"ba")), (k(21), memoryview(b"mv"))])
    ask = [k(3), k(99), k(0), k(20), k(21), k(19), k(98)]
    assert s3.exists(ask) == [True, False, True, True, True, True, False]
    got = s3.get(ask)
    assert got == [items[3][1], None, items[0][1], b"ba", b"mv", items[19][1], None]
    assert all(v is None or type(v) is bytes for v in got)

    s3.delete([k(i) for i in range(0, 20, 2)] + [k(99)])  # a missing key is ignored
    assert s3.exists([k(i) for i in range(20)]) == [i % 2 == 1 for i in range(20)]
    assert s3.get([k(0), k(1)]) == [None, items[1][1]]

    u = s3.usage()
    assert isinstance(u, TierUsage)
    stored = [v for i, (_, v) in enumerate(items[:20]) if i % 2 == 1] + [b"ba", b"mv"]
    assert (u.n_items, u.used_bytes) == (len(stored), sum(len(v) for v in stored))
    assert (u.hits, u.misses, u.errors, u.evictions) == (5 + 1, 2 + 1, 0, 0)
    assert u.bytes_read == sum(len(v) for v in got if v) + len(items[1][1])
    assert u.bytes_written == sum(len(v) for _, v in items[:20]) + 4
    assert u.capacity_bytes is None


def test_missing_keys_are_misses_not_errors(s3: S3Backend) -> None:
    assert s3.get([k(1)]) == [None]
    assert s3.get([k(1), k(2), k(3)]) == [None, None, None]
    assert s3.exists([k(1), k(2)]) == [False, False]
    s3.delete([k(1)])
    assert s3.get([]) == [] and s3.exists([]) == []
    s3.put([])
    s3.delete([])
    u = s3.usage()
    assert (u.hits, u.misses, u.errors, u.n_items, u.used_bytes) == (0, 4, 0, 0, 0)


def test_object_layout(s3: S3Backend, s3_endpoint: str, bucket: str) -> None:
    s3.put([(k(1), b"x")])
    listed = raw_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"kvtc/{k(1)[:2]}/{k(1)}.kvtc"]
    assert s3.object_key(k(1)) == listed[0]["Key"]


def test_put_of_existing_key_keeps_the_bytes(s3: S3Backend) -> None:
    s3.put([(k(1), b"same"), (k(1), b"same")])
    s3.put([(k(1), b"same")])
    assert s3.get([k(1)]) == [b"same"]
    assert s3.usage().n_items == 1


def test_delete_goes_in_batches_of_1000(s3: S3Backend) -> None:
    calls: list[int] = []
    s3._client.meta.events.register("before-call.s3.DeleteObjects", lambda **_: calls.append(1))
    s3.put([(k(i), b"v") for i in range(3)])
    s3.delete([k(i) for i in range(2500)])
    assert len(calls) == 3
    assert s3.exists([k(0), k(1), k(2)]) == [False, False, False]
    assert s3.usage().n_items == 0


def test_prefix_isolation(make_s3, s3_endpoint: str, bucket: str) -> None:
    a = make_s3(prefix="a/")
    ab = make_s3(prefix="ab")  # normalised to "ab/": never overlaps "a/"
    assert ab.prefix == "ab/"
    a.put([(k(1), b"in a"), (k(2), b"in a too")])
    ab.put([(k(2), b"in ab"), (k(3), b"only ab")])
    assert a.exists([k(1), k(2), k(3)]) == [True, True, False]
    assert ab.exists([k(1), k(2), k(3)]) == [False, True, True]
    assert a.get([k(2), k(3)]) == [b"in a too", None]
    assert ab.get([k(2), k(1)]) == [b"in ab", None]
    # a foreign object under the prefix is neither a chunk nor counted
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key="a/README", Body=b"not a chunk")
    assert (a.usage().n_items, a.usage().used_bytes) == (2, len(b"in a") + len(b"in a too"))
    assert (ab.usage().n_items, ab.usage().used_bytes) == (2, len(b"in ab") + len(b"only ab"))
    a.delete([k(2)])
    assert a.exists([k(2)]) == [False] and ab.exists([k(2)]) == [True]


def test_large_blob_goes_multipart_and_round_trips(
    s3: S3Backend,
    s3_endpoint: str,
    bucket: str,
) -> None:
    value = os.urandom(12 * MB)
    key = hashlib.sha256(value).hexdigest()
    s3.put([(key, value), (k(1), b"small")])
    head = raw_client(s3_endpoint).head_object(Bucket=bucket, Key=s3.object_key(key))
    assert head["ContentLength"] == 12 * MB
    assert head["ETag"].strip('"').endswith("-2")  # two parts of 8 MiB and 4 MiB
    got = s3.get([key, k(1)])
    assert got[0] == value and got[1] == b"small"
    assert s3.usage().used_bytes == 12 * MB + 5


def test_two_replicas_share_objects(make_s3) -> None:
    replica_a = make_s3()
    replica_b = make_s3(max_concurrency=2)
    replica_a.put([(k(i), f"chunk {i}".encode()) for i in range(5)])
    assert replica_b.get([k(i) for i in range(5)]) == [f"chunk {i}".encode() for i in range(5)]
    replica_b.put([(k(9), b"from b")])
    assert replica_a.get([k(9)]) == [b"from b"]
    replica_b.delete([k(0)])
    assert replica_a.exists([k(0), k(1)]) == [False, True]
    assert replica_a.usage().n_items == replica_b.usage().n_items == 5


# --- capacity ----------------------------------------------------------------------------


def test_capacity_enforced(make_s3) -> None:
    s3 = make_s3(capacity_bytes=1000)
    s3.put([(k(1), b"a" * 600)])
    with pytest.raises(CapacityError, match="exceed"):
        s3.put([(k(2), b"b" * 300), (k(3), b"c" * 300)])  # 1,200 B: nothing stored
    assert s3.exists([k(2), k(3)]) == [False, False]
    with pytest.raises(CapacityError, match="larger than"):
        s3.put([(k(4), b"d" * 1001)])
    s3.put([(k(1), b"a" * 600), (k(2), b"b" * 400)])  # k(1) stored: skipped, not recounted
    u = s3.usage()
    assert (u.used_bytes, u.n_items, u.capacity_bytes) == (1000, 2, 1000)
    assert u.bytes_written == 1000
    with pytest.raises(CapacityError):
        s3.put([(k(5), b"e")])
    s3.delete([k(2)])
    s3.put([(k(5), b"e")])
    assert s3.usage().used_bytes == 601


def test_capacity_counts_other_replicas(make_s3) -> None:
    capped = make_s3(capacity_bytes=100)
    make_s3().put([(k(1), b"x" * 90)])  # an uncapped replica filled the prefix
    with pytest.raises(CapacityError):
        capped.put([(k(2), b"y" * 20)])


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a", "ABCD", "../etc", "zz", "a" * 130, 12, None, b"ab"])
def test_malformed_keys_raise_value_error(s3: S3Backend, bad: object) -> None:
    for call in (s3.get, s3.exists, s3.delete):
        with pytest.raises(ValueError):
            call([k(1), bad])
    with pytest.raises(ValueError):
        s3.put([(k(1), b"ok"), (bad, b"v")])
    assert s3.exists([k(1)]) == [False]  # the batch stored nothing


def test_bad_batches_raise_type_error(s3: S3Backend) -> None:
    with pytest.raises(TypeError):
        s3.get(k(1))
    with pytest.raises(TypeError):
        s3.put([(k(1), "not bytes")])
    with pytest.raises(TypeError):
        s3.put([k(1)])


def test_bad_config_raises(s3_endpoint: str) -> None:
    for kwargs in (
        {"bucket": ""},
        {"bucket": "b", "max_concurrency": 0},
        {"bucket": "b", "capacity_bytes": -1},
        {"bucket": "b", "connect_timeout": 0},
        {"bucket": "b", "max_attempts": 0},
        {"bucket": "b", "prefix": None},
    ):
        with pytest.raises(ConfigError):
            S3Backend(endpoint_url=s3_endpoint, **kwargs)


def test_create_bucket(s3_endpoint: str) -> None:
    name = f"kvtc-new-{uuid.uuid4().hex[:12]}"
    for _ in range(2):  # the second time it exists already
        s3 = S3Backend(name, endpoint_url=s3_endpoint, region_name="us-east-1", create_bucket=True)
        s3.put([(k(1), b"v")])
        assert s3.get([k(1)]) == [b"v"]
        s3.close()


# --- failures ----------------------------------------------------------------------------


def test_dead_endpoint_raises_store_error_quickly(aws_credentials: None) -> None:
    # default timeouts and retries: a refused connection fails fast, retries included
    s3 = S3Backend(
        "kvtc-dead", endpoint_url=f"http://127.0.0.1:{closed_port()}", region_name="us-east-1"
    )
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=rf"kvtc-dead/kvtc/{k(1)[:2]}/{k(1)}\.kvtc"):
        s3.get([k(1)])
    with pytest.raises(StoreError, match="kvtc-dead"):
        s3.exists([k(1), k(2)])
    with pytest.raises(StoreError, match="kvtc-dead"):
        s3.put([(k(1), b"v")])
    with pytest.raises(StoreError, match="kvtc-dead"):
        s3.delete([k(1)])
    assert time.monotonic() - t0 < 10.0
    u = s3.usage()  # the listing fails too, but the counters stay readable
    assert u.errors == 1 + 2 + 1 + 1 + 1
    assert (u.hits, u.misses, u.bytes_read, u.used_bytes, u.n_items) == (0, 0, 0, 0, 0)
    s3.close()


def test_unanswered_request_times_out(aws_credentials: None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connections; nobody ever answers
        s3 = S3Backend(
            "kvtc-silent",
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            region_name="us-east-1",
            connect_timeout=0.5,
            read_timeout=0.5,
            max_attempts=1,
        )
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="kvtc-silent"):
            s3.get([k(1)])
        assert time.monotonic() - t0 < 5.0  # one attempt of 0.5 s
        assert s3.usage().errors == 2  # the get, then the listing of usage itself
        s3.close()


def test_package_imports_without_boto3() -> None:
    code = (
        "import sys; sys.modules['boto3'] = None\n"
        "import kvtc_store.backends as b\n"
        "assert b.MemoryBackend and b.DiskBackend\n"
        "try:\n"
        "    b.S3Backend\n"
        "except ImportError as e:\n"
        "    assert 'kvtc-store[s3]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('S3Backend imported without boto3')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
