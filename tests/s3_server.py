"""A real S3 endpoint on loopback for the S3 tier's tests (moto's server, no mocks).

Import the fixtures into a test module::

    from tests.s3_server import aws_credentials, s3_endpoint  # noqa: F401

- ``KVTC_TEST_S3_ENDPOINT`` set (CI starts ``moto_server -H 127.0.0.1 -p PORT``
  and stops it by PID): that endpoint is used as it is.
- Otherwise ``moto.server.ThreadedMotoServer`` is started in this process on a
  free port of 127.0.0.1 and stopped at the end of the session.

Either way the session runs with dummy credentials in the environment and no
AWS config files, so boto3's usual chain resolves without touching the host's
own AWS setup.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

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


def closed_port() -> int:
    """A port of 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Dummy AWS credentials and region in the environment for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _DUMMY_ENV.items():
            mp.setenv(name, value)
        yield


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
