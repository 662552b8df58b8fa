"""The interleaved rANS coder of fixed-step symbols (kvtc_store.codec.rans): exact round
trips for any int16 symbols, batching that changes no byte, sizes that match the
calibration estimate, and damaged streams that raise BlobCorruptError only."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvtc_store.codec.rans import (
    N_SYM,
    M,
    RansTables,
    assign_classes,
    laplace_tables,
    symbol_bits,
)
from kvtc_store.errors import BlobCorruptError

TABLES = laplace_tables()


def _coder(q: np.ndarray, interleave: int = 4) -> RansTables:
    shift, cls = assign_classes(np.abs(q).mean(1))
    return RansTables(TABLES, shift, cls, interleave)


def _laplace(n_comp: int, tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = np.geomspace(0.03, 500, n_comp)[:, None]
    return np.clip(np.round(rng.laplace(0, b, (n_comp, tokens))), -32767, 32767).astype(np.int32)


def test_tables_are_valid_distributions() -> None:
    assert TABLES.shape == (2, TABLES.shape[1], N_SYM)
    assert (TABLES >= 1).all() and (TABLES.sum(-1) == M).all()
    # narrow classes put most mass on 0, wide ones spread it
    assert TABLES[0, 0].argmax() == N_SYM // 2 - 1 and TABLES[0, 0].max() > 0.9 * M
    assert TABLES[0, -1].max() < 0.2 * M


@pytest.mark.parametrize("interleave", [1, 3, 4])
def test_round_trip_wide_and_narrow_components(interleave) -> None:
    q = _laplace(37, 50)
    q[3, 7], q[5, 0], q[36, 49] = 32767, -32767, 1000  # escapes and shifted extremes
    coder = _coder(q, interleave)
    (stream,) = coder.encode(q, [50])
    assert np.array_equal(coder.decode([stream], [50]), q)


@settings(max_examples=60, deadline=None)
@given(
    q=arrays(
        np.int32,
        st.tuples(st.integers(1, 9), st.integers(1, 12)),
        elements=st.integers(-32767, 32767),
    ),
    interleave=st.integers(1, 4),
)
def test_round_trip_any_int16_symbols(q, interleave) -> None:
    coder = _coder(q, interleave)
    (stream,) = coder.encode(q, [q.shape[1]])
    assert np.array_equal(coder.decode([stream], [q.shape[1]]), q)


def test_batched_encode_and_decode_match_chunk_by_chunk() -> None:
    counts = [30, 1, 64, 17]
    q = _laplace(21, sum(counts), seed=3)
    coder = _coder(q)
    batched = coder.encode(q, counts)
    edges = np.cumsum([0, *counts])
    alone = [coder.encode(q[:, a:b], [b - a])[0] for a, b in itertools.pairwise(edges)]
    assert batched == alone  # each chunk's stream stands alone
    assert np.array_equal(coder.decode(batched, counts), q)
    assert np.array_equal(coder.decode(batched[2:3], counts[2:3]), q[:, edges[2] : edges[3]])


def test_size_matches_the_calibration_estimate() -> None:
    q = _laplace(200, 256, seed=5)
    shift, cls = assign_classes(np.abs(q).mean(1))
    coder = RansTables(TABLES, shift, cls, 4)
    (stream,) = coder.encode(q, [256])
    estimate = symbol_bits(q.T, shift, cls, TABLES).sum() / 8
    states = 4 * 256 * 4  # the lanes' final states (they also hold the last ~16-32 bits)
    assert estimate <= len(stream) <= 1.02 * estimate + states
    # and far below 16 bits per symbol for these distributions
    assert len(stream) < 0.5 * q.size * 2


def test_damaged_streams_raise_blob_corrupt_error() -> None:
    q = _laplace(12, 20, seed=7)
    coder = _coder(q)
    (stream,) = coder.encode(q, [20])
    raised = 0
    for i in range(len(stream)):
        bad = bytearray(stream)
        bad[i] ^= 0x5A
        try:
            coder.decode([bytes(bad)], [20])
        except BlobCorruptError:
            raised += 1
    assert raised >= 0.9 * len(stream)  # the blob's xxh64 catches the rest
    for cut in (0, 3, len(stream) - 2, len(stream) - 1):
        with pytest.raises(BlobCorruptError):
            coder.decode([stream[:cut]], [20])
    with pytest.raises(BlobCorruptError):
        coder.decode([stream + b"\0\0"], [20])


def test_malformed_tables_are_rejected() -> None:
    shift, cls = assign_classes(np.ones(4))
    with pytest.raises(ValueError):
        RansTables(TABLES[:, :, :-1], shift, cls)
    bad = TABLES.copy()
    bad[0, 0, 0] += 1
    with pytest.raises(ValueError):
        RansTables(bad, shift, cls)
    with pytest.raises(ValueError):
        RansTables(TABLES, shift, cls + TABLES.shape[1])
    with pytest.raises(ValueError):
        RansTables(TABLES, shift[:2], cls)


def test_no_coded_tokens_decode_to_nothing_and_stray_bytes_are_corrupt() -> None:
    """Found by benchmarks/reliability.py's fuzzer: a chunk of 0 coded tokens with stream
    bytes raised numpy's ValueError instead of a named error."""
    coder = _coder(_laplace(12, 40))
    assert coder.decode([b""], [0]).shape == (12, 0)
    with pytest.raises(BlobCorruptError):
        coder.decode([b"\x00" * 16], [0])
