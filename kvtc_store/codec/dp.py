"""Bit allocation by dynamic programming (KVTC paper §3.2).

Principal components are cut into contiguous *ranges*; each range gets one bit width in
``0..max_bits`` (0 drops it). A kept range also pays for its per-token scale and offset.
The dynamic programme picks the partition and widths that minimise the total
reconstruction error under a bit budget per token. It works on tables, so it is exact
for whatever error each (range, width) pair is given; :mod:`kvtc_store.codec.calibrate`
fills the tables from calibration coefficients.

Units: components are counted in *blocks* (the grid ranges may start and end on), costs
in *budget units* (an integer number of bits per token, e.g. 32 bits), errors in any
additive unit (squared error summed over calibration tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError


@dataclass(frozen=True)
class RangeChoice:
    """One range of the optimal plan: blocks ``[start, end)`` coded at ``bits`` bits."""

    start: int
    end: int
    bits: int


def allocate_bits(
    error: np.ndarray,
    cost: np.ndarray,
    budget: int,
    segments: list[tuple[int, int]],
) -> tuple[float, list[RangeChoice]]:
    """Optimal partition of blocks into ranges with one bit width each, under a budget.

    Args:
        error: float array ``(n + 1, n + 1, n_widths)``; ``error[j, i, b]`` is the error of
            coding blocks ``[j, i)`` at width ``b`` (use ``inf`` for forbidden choices).
        cost: int array of the same shape, budget units per token of that choice (>= 0).
        budget: total budget units per token.
        segments: ``[(start, end), ...]`` covering ``0..n`` in order; a range never crosses
            a segment boundary (segments are feature groups with their own bases).

    Returns:
        ``(total_error, ranges)``: the minimum total error and the ranges achieving it,
        ordered by ``start``, covering every block exactly once.

    Raises:
        CalibrationError: if no plan fits the budget (every range at width 0 should always
            fit, so this means the tables are malformed).

    The recurrence: ``best[i][u] = min_{j, b} best[j][u - cost(j, i, b)] + error(j, i, b)``
    over ``j`` in the segment of block ``i - 1``; ``best[i][u]`` is the least error for
    blocks ``[0, i)`` within ``u`` units, monotone in ``u``. O(n² · widths · budget).
    """
    if budget < 0:
        raise CalibrationError(f"negative bit budget ({budget} units)")
    n = error.shape[0] - 1
    seg_start = np.zeros(n + 1, dtype=np.int64)
    covered = 0
    for s, e in segments:
        if s != covered or e <= s:
            raise ValueError(f"segments must tile 0..{n} in order, got {segments}")
        seg_start[s + 1 : e + 1] = s
        covered = e
    if covered != n:
        raise ValueError(f"segments must tile 0..{n}, got {segments}")

    inf = np.inf
    best = np.full((n + 1, budget + 1), inf)
    best[0, :] = 0.0
    arg_j = np.zeros((n + 1, budget + 1), dtype=np.int32)
    arg_b = np.zeros((n + 1, budget + 1), dtype=np.int16)
    usable = np.isfinite(error) & (cost <= budget)  # the choices the loop can take
    for i in range(1, n + 1):
        row = best[i]
        start = int(seg_start[i])
        # only the (j, b) that are usable: tables of single-block ranges (the fixed-step
        # quantiser's, 1,024 blocks for the Llama-3.1-8B shape) are inf off the diagonal
        for j, b in zip(*np.nonzero(usable[start:i, i])):
            j, b = int(j) + start, int(b)
            e, c = error[j, i, b], int(cost[j, i, b])
            cand = best[j][: budget + 1 - c] + e
            tgt = row[c:]
            better = cand < tgt
            if better.any():
                tgt[better] = cand[better]
                arg_j[i, c:][better] = j
                arg_b[i, c:][better] = b
    total = best[n, budget]
    if not np.isfinite(total):
        raise CalibrationError(f"no bit plan fits a budget of {budget} units")
    ranges: list[RangeChoice] = []
    i, u = n, budget
    while i > 0:
        j, b = int(arg_j[i, u]), int(arg_b[i, u])
        ranges.append(RangeChoice(j, i, b))
        u -= int(cost[j, i, b])
        i = j
    ranges.reverse()
    return float(total), ranges
