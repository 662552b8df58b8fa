"""Step allocation for the fixed-step quantiser (``rans``): which components to code, and
at which quantisation step, under a bit budget.

The KVTC dynamic programme (paper §3.2, :mod:`~kvtc_store.codec.dp`) with other tables:
each block of ``block`` components either is dropped (error: its energy) or is coded at
one step ``Δ`` of a geometric grid relative to the coefficients' RMS (error: measured ``Σ (c - Δ·round(c/Δ))²``; cost: the
bits rANS spends on those symbols under the tables they would get, see
:func:`~kvtc_store.codec.rans.symbol_bits`). Both are measured on the calibration sample.
With entropy coding there is no per-range side information, so blocks are independent
and the DP is exact over per-block choices. The budget is ``16 * p / CR`` bits per token
less the coder's fixed overhead (lane states, header).

Rate–distortion theory says all coded components should share one step (reverse
water-filling); the DP finds that where it holds and deviates where the measured tables
say otherwise (coarse steps, clamping, table mismatch).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CalibrationError
from .artifact import PlanRange
from .dp import allocate_bits
from .quant import SYMBOL_MAX
from .rans import CLASS_SCALES, ESC, INTERLEAVE, PREC, STATE_BITS, K, assign_classes, laplace_tables

STEP_GRID = 2.0 ** (np.arange(-18, 10) / 3)  # 1/64 .. 8, times the coefficients' RMS
TABLE_TOKENS = 1024  # sample tokens the tables are measured on (cost is linear in it)
HEADER_BITS_PER_TOKEN = 12  # ~350-byte header over a 256-token chunk
COST_UNIT = 4  # bits per DP budget unit
ALLOCATIONS = ("dp", "uniform")


class StepTables:
    """Per-block error and bit cost of every step on the grid, for a fit's sample.

    Args:
        coeffs: per group, the sample's scaled coefficients ``(N, r_g)`` float32 (the
            first ``TABLE_TOKENS`` rows are used), on any device: the tables are
            measured there (on a GPU in seconds for the Llama-3.1-8B shape's 65,536
            components, where 16 CPU cores take about a minute) and kept on the host.
        block: components per block.
        rounding, bias: the quantiser's dead zone and reconstruction offset (see
            :func:`~kvtc_store.codec.quant.quantize_step`).

    Attributes:
        blocks: ``[(group, start, end)]``.
        err: float64 ``(n_blocks, 1 + n_steps)``: summed squared error over the sample
            (column 0: dropped).
        bits: float64 same shape: total bits over the sample.
        tokens: rows used (at most ``TABLE_TOKENS``).
        steps: float64 ``(n_steps,)``: the step grid, ``STEP_GRID`` times the RMS of all
            coefficients (one grid for every group, so equal steps mean equal slopes).
    """

    def __init__(
        self, coeffs: list[torch.Tensor], block: int = 64, rounding: float = 0.5, bias: float = 0.0
    ):
        coeffs = [c[:TABLE_TOKENS] for c in coeffs]
        self.rounding, self.bias = rounding, bias  # the sample is in random order already
        self.tables = laplace_tables()
        dev = coeffs[0].device
        self._log2f = torch.from_numpy(np.log2(self.tables.reshape(-1).astype(np.float32))).to(dev)
        self.block = block
        self.tokens = coeffs[0].shape[0]
        self.blocks = [
            (g, s, min(s + block, c.shape[1]))
            for g, c in enumerate(coeffs)
            for s in range(0, c.shape[1], block)
        ]
        energy = sum(float((c.double() ** 2).sum()) for c in coeffs)
        rms = (energy / (self.tokens * sum(c.shape[1] for c in coeffs))) ** 0.5
        self.steps = STEP_GRID * (rms if rms > 0 else 1.0)
        n_b, n_s = len(self.blocks), len(self.steps)
        self.err = np.zeros((n_b, 1 + n_s))
        self.bits = np.zeros((n_b, 1 + n_s))
        self.mean_abs = [np.zeros((c.shape[1], n_s)) for c in coeffs]
        row = 0
        for g, c in enumerate(coeffs):
            nb = -(-c.shape[1] // block)
            col_err = torch.zeros(c.shape[1], 1 + n_s, dtype=torch.float64, device=dev)
            col_bits = torch.zeros(c.shape[1], 1 + n_s, dtype=torch.float64, device=dev)
            # column slabs keep the temporaries small (and the allocator out of the profile)
            for a in range(0, c.shape[1], 4 * block):
                x = c[:, a : a + 4 * block].float()
                col_err[a : a + x.shape[1], 0] = (x.double() ** 2).sum(0)
                for k, step in enumerate(self.steps):
                    y = x / float(step)
                    q = torch.floor(y.abs() + rounding).clamp_(max=SYMBOL_MAX) * torch.sign(y)
                    rec = q - torch.sign(q) * bias if bias else q
                    e = ((y - rec) ** 2).sum(0, dtype=torch.float64) * float(step) ** 2
                    mean_abs = y.abs().mean(0).double().cpu().numpy()
                    self.mean_abs[g][a : a + x.shape[1], k] = mean_abs
                    col_err[a : a + x.shape[1], k + 1] = e
                    col_bits[a : a + x.shape[1], k + 1] = self._column_bits(
                        q.to(torch.int32), mean_abs
                    )
            for k in range(1 + n_s):
                self.err[row : row + nb, k] = self._per_block(col_err[:, k])
                self.bits[row : row + nb, k] = self._per_block(col_bits[:, k])
            row += nb

    def _per_block(self, per_col: torch.Tensor) -> np.ndarray:
        v = per_col.double().cpu().numpy() if isinstance(per_col, torch.Tensor) else per_col
        pad = -len(v) % self.block
        return np.pad(v, (0, pad)).reshape(-1, self.block).sum(1)

    def _column_bits(self, q: torch.Tensor, mean_abs: np.ndarray) -> torch.Tensor:
        shift, cls = assign_classes(mean_abs)
        shift_t = torch.from_numpy(shift).to(q.device, torch.int32)
        table = torch.from_numpy((shift > 0) * len(CLASS_SCALES) + cls).to(q.device, torch.int32)
        h = q >> shift_t
        esc = (h < -K) | (h > K)
        idx = torch.where(esc, ESC, h + K) + table * (2 * K + 2)
        bits = self._log2f[idx.long()].sum(0, dtype=torch.float64)
        n = q.shape[0]
        return n * PREC - bits + n * shift_t.double() + 16.0 * esc.sum(0)

    def components(self, group: int, start: int, end: int, step_index: int):
        """Shift and class of components ``[start, end)`` of ``group`` coded at step
        ``steps[step_index]`` (int64 arrays)."""
        return assign_classes(self.mean_abs[group][start:end, step_index])


def plan_steps(
    tables: StepTables,
    target_ratio: float,
    features: int,
    allocation: str = "dp",
    component_params: list[float] | None = None,
    max_basis_params: float | None = None,
) -> tuple[list[PlanRange], np.ndarray, np.ndarray, dict]:
    """Steps for one target ratio.

    Args:
        tables: from :class:`StepTables` on the calibration sample.
        target_ratio: compression ratio against 16-bit KV of a fully compressed chunk.
        features: ``p``, features per token (keys and values).
        allocation: ``"dp"`` (per-block optimum) or ``"uniform"`` (the ablation: one step
            for every coded block, the top blocks of each group by energy).
        component_params, max_basis_params: the artifact's size cap. Each kept principal
            component of group ``g`` stores ``component_params[g]`` parameters (its basis
            column, with the column's int8 scales); the kept components may store at most
            ``max_basis_params`` in all (None: no cap). Only blocks above one energy
            threshold, common to all groups (the highest-variance blocks that fit), may
            be coded; the allocation runs over those (:func:`eligible_blocks`).

    Returns:
        ``(plan, shift, cls, info)``: the coded ranges (adjacent blocks with the same
        step merged), each coded component's rANS shift and class in plan order, and
        ``estimated_bits_per_token``, ``predicted_mse``, ``budget_bits_per_token``,
        ``rans_interleave`` (lanes per token, :func:`interleave_for`), and
        ``eligible_blocks`` (blocks the cap left codable).

    Raises:
        CalibrationError: the budget does not cover the coder's fixed overhead, an
            unknown allocation, or an artifact cap that holds no block of components.
    """
    if allocation not in ALLOCATIONS:
        raise CalibrationError(f"unknown allocation {allocation!r} (have {ALLOCATIONS})")
    interleave = interleave_for(16 * features / target_ratio)
    overhead = STATE_BITS * interleave + HEADER_BITS_PER_TOKEN
    budget_bits = 16 * features / target_ratio - overhead
    if budget_bits <= 0:
        raise CalibrationError(
            f"ratio {target_ratio} leaves no bits after the coder's {overhead} bits/token"
        )
    n = tables.tokens
    per_token = tables.bits / n
    allowed = eligible_blocks(tables, component_params, max_basis_params)
    per_token[~allowed, 1:] = np.inf  # a block beyond the cap can only be dropped
    if allocation == "dp":
        choice = _dp_choice(tables, per_token, budget_bits)
    else:
        choice = _uniform_choice(tables, per_token, budget_bits)
    plan: list[PlanRange] = []
    shifts, classes = [], []
    for (g, a, b), k in zip(tables.blocks, choice):
        if k == 0:
            continue
        step = float(tables.steps[k - 1])
        sh, cl = tables.components(g, a, b, k - 1)
        shifts.append(sh)
        classes.append(cl)
        last = plan[-1] if plan else None
        if last and last.group == g and last.end == a and last.step == step:
            plan[-1] = PlanRange(g, last.start, b, 0, step)
        else:
            plan.append(PlanRange(g, a, b, 0, step))
    idx = np.arange(len(choice))
    info = {
        "budget_bits_per_token": round(budget_bits, 1),
        "estimated_bits_per_token": float(per_token[idx, choice].sum() + overhead),
        "predicted_mse": float(tables.err[idx, choice].sum() / n),
        "allocation": allocation,
        "rans_interleave": interleave,
        "eligible_blocks": int(allowed.sum()),
    }
    shift = np.concatenate(shifts) if shifts else np.zeros(0, np.int64)
    cls = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    return plan, shift, cls, info


def eligible_blocks(
    tables: StepTables,
    component_params: list[float] | None,
    max_basis_params: float | None,
) -> np.ndarray:
    """Which blocks may be coded under an artifact size cap: bool ``(n_blocks,)``.

    Blocks are taken in order of their energy on the calibration sample (the error of
    dropping them, in the allocation's weighted units, so keys and values compete on
    one scale) while their components' parameters fit ``max_basis_params``; each
    group's eligible blocks are then a prefix (its components are in decreasing
    variance, and a stored basis keeps the first ``rank`` columns). With no cap every
    block is eligible.

    Raises:
        CalibrationError: the cap does not hold even one block.
    """
    n_b = len(tables.blocks)
    if max_basis_params is None or component_params is None:
        return np.ones(n_b, dtype=bool)
    cost = np.array([(e - a) * component_params[g] for g, a, e in tables.blocks], dtype=float)
    allowed = np.zeros(n_b, dtype=bool)
    spent = 0.0
    for i in np.argsort(-tables.err[:, 0], kind="stable"):
        if spent + cost[i] > max_basis_params:
            break
        allowed[i] = True
        spent += cost[i]
    if not allowed.any():
        raise CalibrationError(
            f"an artifact cap of {max_basis_params:,.0f} parameters holds no block of components"
        )
    for g in {g for g, _, _ in tables.blocks}:  # a prefix per group
        rows = [i for i, (gg, _, _) in enumerate(tables.blocks) if gg == g]
        first_out = next((j for j, i in enumerate(rows) if not allowed[i]), len(rows))
        allowed[rows[first_out:]] = False
    return allowed


def interleave_for(budget_bits: float) -> int:
    """rANS lanes per token for a budget: up to ``INTERLEAVE`` (faster coding), while the
    lanes' states stay within 2% of the budget (one lane for small models/high ratios)."""
    return int(max(1, min(INTERLEAVE, budget_bits // (50 * STATE_BITS))))


def _dp_choice(tables: StepTables, per_token: np.ndarray, budget_bits: float) -> np.ndarray:
    """Per-block option (0 = drop, k = steps[k-1]) minimising error within budget."""
    n_b, n_opt = per_token.shape
    err = np.full((n_b + 1, n_b + 1, n_opt), np.inf)
    cost = np.zeros((n_b + 1, n_b + 1, n_opt), dtype=np.int64)
    for i in range(n_b):
        barred = ~np.isfinite(per_token[i])  # options the artifact cap rules out
        err[i, i + 1] = np.where(barred, np.inf, tables.err[i])
        cost[i, i + 1] = np.ceil(np.where(barred, 0, per_token[i]) / COST_UNIT).astype(np.int64)
    budget = int(budget_bits // COST_UNIT)
    _, ranges = allocate_bits(err, cost, budget, [(0, n_b)])
    choice = np.zeros(n_b, dtype=np.int64)
    for r in ranges:
        choice[r.start : r.end] = r.bits
    return choice


def _uniform_choice(tables: StepTables, per_token: np.ndarray, budget_bits: float) -> np.ndarray:
    """One step for all coded blocks; code the highest-energy blocks that fit."""
    order = np.argsort(-tables.err[:, 0], kind="stable")
    best, best_err = np.zeros(len(order), dtype=np.int64), tables.err[:, 0].sum()
    for k in range(1, per_token.shape[1]):
        spent = np.cumsum(per_token[order, k])
        m = int(np.searchsorted(spent, budget_bits, side="right"))
        if m == 0:
            continue
        choice = np.zeros(len(order), dtype=np.int64)
        choice[order[:m]] = k
        e = tables.err[np.arange(len(order)), choice].sum()
        if e < best_err:
            best, best_err = choice, e
    return best
