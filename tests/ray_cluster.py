"""The Ray the fleet tests run on: the head `.ci/run` starts (``KVTC_TEST_RAY_ADDRESS``,
``ray start --head`` on 127.0.0.1, stopped by PID there), else a local
``ray.init(num_cpus=2)`` with a 200 MB object store. ``tests/conftest.py`` imports the
fixture for every module; ``ray`` is imported only by modules that use it.
"""

from __future__ import annotations

import os

import pytest

ENV_ADDRESS = "KVTC_TEST_RAY_ADDRESS"


@pytest.fixture(scope="module")
def cluster():
    """This process connected to Ray for the module; yields the address the jobs are
    given (``"local"`` when the module started its own: the jobs join it)."""
    import ray

    address = os.environ.get(ENV_ADDRESS)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback head (DESIGN.md)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield address or "local"
    ray.shutdown()
