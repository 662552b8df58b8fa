"""The Ray the fleet tests run on: the head `.ci/run` starts (``KVTC_TEST_RAY_ADDRESS``,
``ray start --head`` on 127.0.0.1, stopped by PID there), else a local
``ray.init(num_cpus=2)`` with a 200 MB object store. ``tests/conftest.py`` imports the
fixture for every module; ``ray`` is imported only by modules that use it. Also the
store the re-encode and GC tests run over (:func:`registry_store_config`).
"""

from __future__ import annotations

import os

import pytest
import yaml

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


def registry_store_config(tmp_path, s3_endpoint: str, bucket: str, artifacts) -> tuple:
    """A folder registry holding ``artifacts`` (the first current in profile
    ``default``) and a store config over it with a disk tier (4 MiB) and an S3 tier
    (prefix ``kv/``): ``(registry, path of store.yaml as str)``."""
    from kvtc_store.registry import open_registry
    from tests.tiny_codec import CHUNK, FINGERPRINT

    reg = open_registry(tmp_path / "registry", create=True)
    for art in artifacts:
        reg.publish(art)
    reg.promote(FINGERPRINT, artifacts[0].artifact_id, "default")
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"kind": "disk", "path": str(tmp_path / "disk"), "capacity": "4MiB"},
            {"kind": "s3", "bucket": bucket, "endpoint_url": s3_endpoint, "prefix": "kv/"},
        ],
        "codec": {
            "registry": str(tmp_path / "registry"),
            "refresh_seconds": 0,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return reg, str(path)
