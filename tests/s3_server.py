"""A real S3 endpoint on loopback for the S3 tier's tests (moto's server, no mocks).

Import the fixtures into a test module::

    from tests.s3_server import aws_credentials, bucket, s3_endpoint  # noqa: F401

- ``KVTC_TEST_S3_ENDPOINT`` set (CI starts ``moto_server -H 127.0.0.1 -p PORT``
  and stops it by PID): that endpoint is used as it is.
- Otherwise ``moto.server.ThreadedMotoServer`` is started in this process on a
  free port of 127.0.0.1 and stopped at the end of the session.

:class:`SlowProxy` sits in front of the endpoint to make it slow or stall it.

Either way the session runs with dummy credentials in the environment and no
AWS config files, so boto3's usual chain resolves without touching the host's
own AWS setup.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from typing_extensions import Self

ENV_ENDPOINT = "KVTC_TEST_S3_ENDPOINT"

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def wait_until_serving(endpoint: str, timeout: float = 15.0) -> None:
    """Block until ``endpoint`` answers HTTP (any status), or fail the test session."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(endpoint, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError as e:
            last = e
            time.sleep(0.1)
    pytest.fail(f"S3 endpoint {endpoint} not serving after {timeout:.0f} s: {last}")


def raw_client(endpoint: str):
    """A plain boto3 client of the endpoint, to look at objects behind a backend."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def closed_port() -> int:
    """A port of 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_fds() -> int:
    """How many file descriptors this process has open (Linux ``/proc/self/fd``)."""
    return len(os.listdir("/proc/self/fd"))


def sockets_to(port: int) -> int:
    """How many of this process's open descriptors are TCP sockets connected to ``port``
    on loopback (the client side of connections to it; Linux ``/proc``)."""
    inodes = set()
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(name) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") in {f"socket:[{i}]" for i in inodes}
        except OSError:
            pass
    return n


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Dummy AWS credentials and region in the environment for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _DUMMY_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket for one test."""
    name = f"kvtc-test-{uuid.uuid4().hex[:16]}"
    raw_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_endpoint(aws_credentials: None) -> Iterator[str]:
    """URL of a live S3-compatible endpoint on loopback (``http://127.0.0.1:PORT``)."""
    external = os.environ.get(ENV_ENDPOINT)
    if external:
        if urlsplit(external).scheme not in ("http", "https"):
            pytest.fail(f"{ENV_ENDPOINT}={external!r} is not an http(s) URL")
        wait_until_serving(external)
        yield external
        return
    with own_moto_server() as endpoint:
        yield endpoint


@contextmanager
def own_moto_server() -> Iterator[str]:
    """A ``ThreadedMotoServer`` on a free port of 127.0.0.1 for the ``with`` block (its
    endpoint URL); stopped at the end, so a test can take an endpoint down for real."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        wait_until_serving(endpoint)
        yield endpoint
    finally:
        server.stop()


class SlowProxy:
    """A TCP proxy on 127.0.0.1 in front of a real endpoint, to make it slow or stall it.

    Real sockets and the real server behind them (no mocks): requests pass through
    unchanged, but while the proxy is *held* nothing a client sends is forwarded (the
    server never sees it, so the client waits as on a stalled endpoint), and ``delay``
    seconds pass before each piece of a response is passed back (a slow endpoint).

    Use as a context manager; ``url`` is the proxy's endpoint. Every loop is bounded by
    the sockets' lifetime: :meth:`close` shuts them all.
    """

    def __init__(self, upstream: str, delay: float = 0.0, port: int = 0) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.delay = delay
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))  # port 0: a free one
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def hold(self) -> None:
        """Stop forwarding what clients send (requests stall) until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        """Forward again, the held requests first."""
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with self._lock:
            socks, self._sockets = self._sockets, []
        for s in [self._listener, *socks]:
            try:
                s.close()
            except OSError:
                pass
        for th in self._threads:
            th.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)  # blocking: a stalled exchange stalls, never times out
            server.settimeout(None)
            pair = [client, server, 2]  # the two sockets and the pumps still running
            with self._lock:
                self._sockets += [client, server]
                self._threads = [th for th in self._threads if th.is_alive()]
            for src, dst, gated in ((client, server, True), (server, client, False)):
                th = threading.Thread(target=self._pump, args=(src, dst, gated, pair), daemon=True)
                self._threads.append(th)
                th.start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool, pair: list) -> None:
        """Copy ``src`` to ``dst`` until either end closes; then shut both, and the
        pair's last pump closes them (a connection's descriptors last as long as it)."""
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if gated:
                    self._open.wait()
                elif self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                pair[2] -= 1
                last = pair[2] == 0
                if last:
                    self._sockets = [s for s in self._sockets if s not in pair[:2]]
            if last:
                for s in pair[:2]:
                    s.close()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: an S3
    endpoint gone silent (a hung load balancer, a stopped process whose socket is still
    open). Real sockets, no mocks. ``connections`` counts what it accepted; ``url`` is
    its endpoint. Use as a context manager."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._held: list[socket.socket] = []
        self._open = True
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while self._open:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # the timeout (checks _open again) or closed
                continue
            self.connections += 1
            self._held.append(conn)  # kept open, never read, never answered

    def close(self) -> None:
        self._open = False
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
