"""Per-chunk rate control of the fixed-step (``rans``) quantiser.

Calibration fixes one quantisation step per coded principal component, so the bits a
chunk costs follow its content: on text whose coefficients are larger than the
calibration text's the honest ratio falls below the target (10-18% on unseen English
before this module), on easier text it lands above. Rate control scales every step of a
chunk by one multiplier ``m = 2 ** (e / STEP_EXP_DENOM)`` chosen per chunk, the smallest
(finest) for which the chunk's estimated size fits the target, and records the integer
``e`` in the blob header (``step_exp``; absent in older blobs, meaning 0). Scaling every
step together keeps the calibrated allocation's shape, which reverse water-filling says
should share one slope (Cover & Thomas, *Elements of Information Theory*, §10.3.3); only
its level moves.

The size estimate is the ideal code length of the symbols under the artifact's own rANS
tables (:func:`~kvtc_store.codec.rans.symbol_bits`, vectorised here in torch so the
same search runs on the CPU and on the GPU), plus the lanes' final states and the blob
header. The search is a bisection over ``e`` in ``[STEP_EXP_MIN, STEP_EXP_MAX]``,
vectorised over the chunks of a batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .quant import SYMBOL_MAX
from .rans import ESC, N_SYM, PREC, STATE_BITS, K, RansTables

STEP_EXP_DENOM = 8  # multiplier 2**(e/8): about 0.125 bit per significant component a notch
STEP_EXP_MIN = -32  # finest: steps / 16
STEP_EXP_MAX = 64  # coarsest: steps * 256
STATE_INFO_BITS = 8  # of a lane's 32-bit final state, bits that carry symbols (measured)


def step_multiplier(exp: int | torch.Tensor):
    """``2 ** (exp / STEP_EXP_DENOM)``: the factor a chunk's steps are scaled by."""
    if isinstance(exp, torch.Tensor):
        return torch.exp2(exp.double() / STEP_EXP_DENOM)
    return 2.0 ** (int(exp) / STEP_EXP_DENOM)


class RateModel:
    """Estimated coded size of chunks' symbols, and the step exponent that meets a budget.

    Args:
        tables: the artifact's rANS tables (per-component shift and class, in plan order).
        steps: float32 ``(n,)``: each coded component's calibrated step, plan order.
        rounding: the quantiser's rounding (:func:`~kvtc_store.codec.quant.quantize_step`).
        device: where the estimate runs (the coefficients' device).
    """

    def __init__(
        self, tables: RansTables, steps: torch.Tensor, rounding: float, device: torch.device
    ):
        n_cls = tables.freq.shape[1]
        log2f = np.log2(tables.freq.reshape(-1).astype(np.float64))
        self.device = torch.device(device)
        self._cost = torch.from_numpy(PREC - log2f).float().to(self.device)  # bits per slot
        shift = torch.from_numpy(tables.shift).to(self.device)
        table = (tables.shift > 0) * n_cls + tables.cls
        self._shift = shift.to(torch.int32)
        self._row = torch.from_numpy(table * N_SYM).to(self.device)
        self._shift_bits = float(tables.shift.sum())
        self._steps = steps.to(self.device, torch.float32)
        self._rounding = float(rounding)
        self.interleave = tables.interleave

    def symbol_bits(self, coded: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
        """Ideal code length of the symbols of each chunk.

        Args:
            coded: float32 ``(B, T, n)``: each chunk's coded coefficients (plan order).
            exps: int64 ``(B,)``: each chunk's step exponent.

        Returns:
            float64 ``(B,)``: bits over the chunk's ``T`` tokens (symbols and their raw
            low bits and escapes; not the lanes' final states).
        """
        m = step_multiplier(exps.to(coded.device)).float()
        y = coded / (self._steps * m[:, None, None])
        q = torch.floor(y.abs() + self._rounding).clamp_(max=SYMBOL_MAX)
        q = (q * torch.sign(y)).to(torch.int32)
        h = q >> self._shift
        esc = (h < -K) | (h > K)
        idx = torch.where(esc, ESC, h + K).long() + self._row
        bits = self._cost[idx].sum(dim=(1, 2), dtype=torch.float64)
        tokens = coded.shape[1]
        return bits + tokens * self._shift_bits + 16.0 * esc.sum(dim=(1, 2)).double()

    def choose(self, coded: torch.Tensor, budget_bits: torch.Tensor) -> torch.Tensor:
        """The finest step exponent per chunk whose symbols fit its budget.

        Args:
            coded: float32 ``(B, T, n)`` coded coefficients, plan order.
            budget_bits: float64 ``(B,)``: bits the chunk's symbols may take over its
                ``T`` tokens (:meth:`budget_bits`, scaled to ``T`` for a sample).

        Returns:
            int64 ``(B,)`` in ``[STEP_EXP_MIN, STEP_EXP_MAX]``; ``STEP_EXP_MAX`` where even
            the coarsest steps exceed the budget.
        """
        batch = coded.shape[0]
        lo = torch.full((batch,), STEP_EXP_MIN, dtype=torch.int64, device=coded.device)
        hi = torch.full((batch,), STEP_EXP_MAX, dtype=torch.int64, device=coded.device)
        budget = budget_bits.to(coded.device, torch.float64)
        for _ in range(math.ceil(math.log2(STEP_EXP_MAX - STEP_EXP_MIN + 1))):
            mid = torch.div(lo + hi, 2, rounding_mode="floor")
            fits = self.symbol_bits(coded, mid) <= budget
            hi = torch.where(fits, mid, hi)
            lo = torch.where(fits, lo, mid + 1)
        return hi

    def budget_bits(self, tokens: int, features: int, target_ratio: float, header: int) -> float:
        """Bits the symbols of ``tokens`` compressed tokens may take so that the blob's
        compressed part, header included, is ``tokens * features * 16 / target_ratio``
        bits: less the header (``header`` bytes) and the lanes' final states. A lane's
        state starts at ``2**16`` and ends in ``[2**16, 2**32)``, so its 32 stored bits
        hold on average :data:`STATE_INFO_BITS` of the symbols' information (measured on
        the test codecs: the ideal code length overstated the words by 8.1 bits a lane)."""
        whole = tokens * features * 16.0 / target_ratio
        per_lane = STATE_BITS - STATE_INFO_BITS
        return whole - 8.0 * header - tokens * self.interleave * per_lane


def choose_step_exps(
    rate: RateModel | None, coded: torch.Tensor, artifact, header_bytes: int
) -> torch.Tensor:
    """Rate control: each chunk's step exponent under ``artifact``'s target ratio.

    Args:
        rate: the rate model (None: no rate control).
        coded: float32 ``(B, T, n)``: the coded coefficients (plan order) of ``B`` chunks
            of ``T`` compressed tokens each.
        artifact: the codec artifact (:class:`~.artifact.CodecArtifact`).
        header_bytes: a blob's header bytes (:func:`~.format.typical_header_bytes`).

    Returns:
        int64 ``(B,)`` on the CPU; zeros without rate control or tokens.
    """
    batch, tokens = coded.shape[:2]
    if rate is None or tokens == 0:
        return torch.zeros(batch, dtype=torch.int64)
    budget = rate.budget_bits(
        tokens, artifact.features_per_token(), artifact.target_ratio, header_bytes
    )
    return rate.choose(coded, torch.full((batch,), budget, dtype=torch.float64)).cpu()
