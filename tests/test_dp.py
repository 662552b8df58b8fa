"""The bit-allocation dynamic programme (DESIGN.md, "The codec": "Prove the DP optimal
against brute force on small cases")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.codec.calibrate import _error_tables
from kvtc_store.codec.dp import RangeChoice, allocate_bits
from kvtc_store.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread")


# --- brute force ---------------------------------------------------------------------------


def _compositions(start: int, end: int):
    """Every partition of blocks [start, end) into contiguous ranges."""
    inner = list(range(start + 1, end))
    for k in range(len(inner) + 1):
        for cuts in itertools.combinations(inner, k):
            bounds = [start, *cuts, end]
            yield [(bounds[t], bounds[t + 1]) for t in range(len(bounds) - 1)]


def _brute_force(error, cost, budget, segments) -> float:
    """Least total error over every segment-respecting partition and width assignment."""
    n_widths = error.shape[2]
    best = math.inf
    for parts in itertools.product(*[list(_compositions(s, e)) for s, e in segments]):
        ranges = [r for part in parts for r in part]
        for widths in itertools.product(range(n_widths), repeat=len(ranges)):
            c = sum(int(cost[j, i, b]) for (j, i), b in zip(ranges, widths))
            if c > budget:
                continue
            e = 0.0
            for (j, i), b in zip(ranges, widths):
                e += float(error[j, i, b])
            best = min(best, e)
    return best


def _check_plan(error, cost, budget, segments, total, ranges) -> None:
    """The returned ranges tile all blocks, respect segments, fit, and sum to ``total``."""
    n = error.shape[0] - 1
    assert all(isinstance(r, RangeChoice) for r in ranges)
    pos = 0
    for r in ranges:
        assert r.start == pos and r.end > r.start, ranges
        assert 0 <= r.bits < error.shape[2]
        assert any(s <= r.start and r.end <= e for s, e in segments), (r, segments)
        pos = r.end
    assert pos == n
    assert sum(int(cost[r.start, r.end, r.bits]) for r in ranges) <= budget
    summed = sum(float(error[r.start, r.end, r.bits]) for r in ranges)
    assert math.isfinite(total)
    assert summed == pytest.approx(total, rel=1e-9, abs=1e-12)


# --- random instances ---------------------------------------------------------------------


def _instance(seed: int, n: int, n_widths: int, split: int | None, forbid: bool):
    """Error decreasing in width, costs built like calibrate's: ceil((len*b + scale)/unit).

    Every table entry is finite and cheap, also ranges that cross a segment boundary, so
    a DP that ignored segments would find a better (invalid) plan.
    """
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 5, size=n)
    start = np.concatenate([[0], np.cumsum(lens)])
    unit = int(rng.choice([1, 2, 4, 8]))
    scale_bits = int(rng.choice([0, 4, 8, 32]))
    error = np.zeros((n + 1, n + 1, n_widths))
    cost = np.zeros((n + 1, n + 1, n_widths), dtype=np.int64)
    for j in range(n + 1):
        for i in range(n + 1):
            count = max(int(start[i] - start[j]), 1)
            e = rng.uniform(0.1, 10.0) * count
            for b in range(n_widths):
                error[j, i, b] = e
                e *= rng.uniform(0.05, 0.9)
                if b:
                    cost[j, i, b] = -(-(count * b + scale_bits) // unit)
            if forbid and n_widths > 2 and rng.random() < 0.3:
                error[j, i, rng.integers(1, n_widths)] = np.inf  # a forbidden width
    segments = [(0, n)] if split is None else [(0, split), (split, n)]
    most = sum(int(cost[k, k + 1, n_widths - 1]) for k in range(n))
    budget = int(rng.integers(0, most + 2))
    return error, cost, budget, segments


@st.composite
def _instances(draw):
    n = draw(st.integers(1, 5))
    n_widths = draw(st.integers(2, 5))
    split = draw(st.none() | st.integers(1, max(n - 1, 1))) if n > 1 else None
    return _instance(draw(st.integers(0, 2**32 - 1)), n, n_widths, split, draw(st.booleans()))


@settings(max_examples=120, deadline=None)
@given(_instances())
def test_allocate_bits_is_optimal_against_brute_force(inst) -> None:
    error, cost, budget, segments = inst
    total, ranges = allocate_bits(error, cost, budget, segments)
    _check_plan(error, cost, budget, segments, total, ranges)
    assert total == pytest.approx(_brute_force(error, cost, budget, segments), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.sampled_from([(5,), (10,), (4, 6), (6, 3), (2, 2, 4)]),
    block=st.sampled_from([2, 3]),
    frac=st.floats(0.0, 1.0),
)
def test_allocate_bits_is_optimal_on_calibration_tables(seed, sizes, block, frac) -> None:
    """The tables calibrate builds from coefficients (widths 0..3), one segment per group."""
    gen = torch.Generator().manual_seed(seed % 2**31)
    coeffs = [torch.randn(16, p, generator=gen) * torch.linspace(3.0, 0.2, p) for p in sizes]
    unit = math.gcd(block, 32)
    err, cost, segs, blocks = _error_tables(coeffs, block, max_bits=3, unit=unit)
    n = len(blocks)
    assert n <= 5
    most = int(cost[0, n, 3]) if len(segs) == 1 else sum(int(cost[s, e, 3]) for s, e in segs)
    budget = int(frac * most)
    total, ranges = allocate_bits(err, cost, budget, segs)
    _check_plan(err, cost, budget, segs, total, ranges)
    assert total == pytest.approx(_brute_force(err, cost, budget, segs), rel=1e-9)


# --- small cases by hand ------------------------------------------------------------------


def test_allocate_bits_known_answer() -> None:
    """Two blocks, widths 0..2: the budget buys one block at width 2 or both at width 1."""
    inf = np.inf
    error = np.full((3, 3, 3), inf)
    cost = np.zeros((3, 3, 3), dtype=np.int64)
    error[0, 1] = [10.0, 4.0, 1.0]
    error[1, 2] = [6.0, 2.0, 0.5]
    error[0, 2] = [16.0, 7.0, 3.0]
    for j, i in [(0, 1), (1, 2)]:
        cost[j, i] = [0, 2, 4]
    cost[0, 2] = [0, 3, 5]
    assert allocate_bits(error, cost, 0, [(0, 2)]) == (16.0, [RangeChoice(0, 2, 0)])
    # 3 units: the merged range at width 1 (7.0) beats one block at width 1 (4 + 6 or 10 + 2).
    assert allocate_bits(error, cost, 3, [(0, 2)]) == (7.0, [RangeChoice(0, 2, 1)])
    # 4 units: both blocks at width 1 (4 + 2) beat the merged range (7), block 0 at width 2
    # (1 + 6) and block 1 at width 2 (10 + 0.5).
    both = [RangeChoice(0, 1, 1), RangeChoice(1, 2, 1)]
    assert allocate_bits(error, cost, 4, [(0, 2)]) == (6.0, both)
    # With a segment boundary at 1 the merged range is not allowed: 4 + 6 is the best.
    total, ranges = allocate_bits(error, cost, 3, [(0, 1), (1, 2)])
    assert (total, ranges) == (10.0, [RangeChoice(0, 1, 1), RangeChoice(1, 2, 0)])


def test_allocate_bits_never_crosses_a_segment_even_when_cheaper() -> None:
    n = 4
    error = np.full((n + 1, n + 1, 2), 100.0)
    cost = np.zeros((n + 1, n + 1, 2), dtype=np.int64)
    error[:, :, 1] = 50.0
    cost[:, :, 1] = 1
    error[1, 3] = [0.0, 0.0]  # a free range across the boundary at 2
    total, ranges = allocate_bits(error, cost, 10, [(0, 2), (2, 4)])
    assert all(not (r.start < 2 < r.end) for r in ranges)
    assert total > 0.0


def test_allocate_bits_budget_monotone() -> None:
    error, cost, _, segments = _instance(7, 5, 5, 2, False)
    totals = [allocate_bits(error, cost, b, segments)[0] for b in range(40)]
    assert all(a >= b for a, b in itertools.pairwise(totals))
    assert totals[-1] < totals[0]


def test_allocate_bits_no_blocks() -> None:
    assert allocate_bits(np.zeros((1, 1, 3)), np.zeros((1, 1, 3), np.int64), 5, []) == (0.0, [])


# --- errors --------------------------------------------------------------------------------


def test_infeasible_budget_raises_calibration_error() -> None:
    error, cost, _, segments = _instance(3, 4, 4, None, False)
    error[:, :, 0] = np.inf  # dropping is forbidden: every plan costs something
    cheapest = min(int(cost[0, 4, b]) for b in range(1, 4))
    with pytest.raises(CalibrationError):
        allocate_bits(error, cost, cheapest - 1, segments)
    allocate_bits(error, cost, cheapest, segments)  # and just enough budget works


def test_all_widths_forbidden_raises_calibration_error() -> None:
    error = np.full((3, 3, 4), np.inf)
    with pytest.raises(CalibrationError):
        allocate_bits(error, np.zeros((3, 3, 4), np.int64), 100, [(0, 2)])


def test_negative_budget_raises_calibration_error() -> None:
    """A negative budget fits no plan: the documented CalibrationError, not an IndexError."""
    error, cost, _, segments = _instance(3, 3, 3, None, False)
    with pytest.raises(CalibrationError):
        allocate_bits(error, cost, -1, segments)


@pytest.mark.parametrize(
    "segments",
    [
        [(0, 2), (3, 5)],  # gap
        [(0, 3), (2, 5)],  # overlap
        [(0, 3)],  # does not reach n
        [(0, 6)],  # beyond n
        [(0, 0), (0, 5)],  # empty segment
        [(2, 5), (0, 2)],  # out of order
        [(1, 5)],  # does not start at 0
        [],  # nothing
    ],
)
def test_malformed_segments_raise_value_error(segments) -> None:
    error, cost, budget, _ = _instance(1, 5, 3, None, False)
    with pytest.raises(ValueError):
        allocate_bits(error, cost, budget, segments)
