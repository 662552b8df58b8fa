"""The tail of a group's decode projection as an fp8 GEMM (issue 21, "Projection").

Decoding a group's features is one GEMM, ``F (N, p) = C[:r]ᵀ (N, r) @ Bᵀ (r, p)``: the
dequantised coefficients of ``N`` tokens times the group's basis. On the all-layer
grouping this GEMM is most of the decode time (``2·r·p`` FLOPs a token), and fp8 tensor
cores run twice the fp16 rate. The head components (large variance, wide symbols) stay
in fp16; the tail, components coded without a shift whose calibrated Laplace scale is at
most :data:`TAIL_MAX_SCALE` steps (``P(|q| > 16) ≈ e^-8`` a symbol), is projected in fp8:

- the coefficient operand is the symbol itself, ``u = c / step = q - sign(q)·bias``,
  rounded to e4m3: every integer ``|q| <= 16`` is an e4m3 value, so with ``bias = 0``
  the operand is exact there; ``bias`` (the reconstruction offset toward zero) and
  larger symbols round to the nearest e4m3 value (at most ``2^-4`` relative; beyond
  448 they saturate);
- the steps are folded into the basis, ``W = diag(step) Bᵀ (r_t, p)``, stored in e4m3
  with one power-of-two scale ``s`` per group (``W / s`` is rounded once, never
  rescaled), so ``u W = c Bᵀ``;
- ``torch._scaled_mm`` multiplies them, accumulating in float32, and writes fp16.

Error bound against the fp16 projection of the same rows (:func:`tail_error_bound`),
per output element, with ``A = Σ_i |u_i| |W_ij|`` and ``U = Σ_i |u_i|``::

    |F_fp8 - F_fp16| <= 0.13 A + 2^-9 s U + 2^-10 (|F_fp8| + |F_fp16|)

(e4m3 rounds within ``2^-4`` relative in its normal range and ``2^-10 s`` absolute below
it, on each operand; the fp16 basis of the reference within ``2^-11``; each result is
rounded once to fp16). It holds for ``|u| <= 448``. Whether the codec keeps the option is
measured (the KL change on the rate-distortion suite, ``benchmarks/rate_distortion.py
--fp8-tail``); it is off by default (:class:`~kvtc_store.codec.gpu.GpuCodec`'s
``fp8_tail``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .rans import CLASS_SCALES

__all__ = ["E4M3", "TAIL_MAX_SCALE", "Fp8Tail", "tail_error_bound", "tail_rows"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TAIL_MAX_SCALE = 2.0
"""Largest calibrated Laplace scale (in steps) of a tail component."""
ALIGN = 16  # _scaled_mm wants the inner dimension a multiple of 16


def tail_rows(rows: int, coded: dict[int, tuple[int, int]], n_classes: int) -> int:
    """First row of a group's fp8 tail: every coded row from it on has shift 0 and a
    class of Laplace scale at most :data:`TAIL_MAX_SCALE`; rows not coded (dropped
    components, zero) qualify too. The tail's length is a multiple of 16; ``rows`` (no
    tail) when fewer than 16 rows qualify.

    Args:
        rows: the group's components ``r``.
        coded: row -> ``(shift, class)`` of its rANS table, for the coded rows.
        n_classes: the artifact's table classes (tables other than the 48 Laplace
            classes of :data:`~kvtc_store.codec.rans.CLASS_SCALES`: no tail).
    """
    if n_classes != len(CLASS_SCALES):
        return rows
    start = rows
    while start > 0:
        shift, cls = coded.get(start - 1, (0, 0))
        if shift != 0 or CLASS_SCALES[cls] > TAIL_MAX_SCALE:
            break
        start -= 1
    start += (rows - start) % ALIGN  # round the tail down to a multiple of 16
    return start if rows - start >= ALIGN else rows


def _pow2_scale(amax: float) -> float:
    """The power of two ``s`` with ``amax / s`` in ``(224, 448]`` (1 for ``amax == 0``)."""
    if amax <= 0.0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax / E4M3_MAX))


@dataclass
class Fp8Tail:
    """A group's tail rows ``[start, start + r_t)`` projected with an fp8 GEMM.

    Attributes:
        start: first tail row, local to the group.
        weight_t: e4m3 ``(p, r_t)`` row-major: ``(W / s)ᵀ``, so ``weight_t.T`` is the
            column-major ``(r_t, p)`` operand ``_scaled_mm`` takes.
        scale: float32 scalar ``s`` (a power of two).
        inv_steps: float32 ``(r_t,)``: ``1 / step`` of each tail row (0 for rows not
            coded).
    """

    start: int
    weight_t: torch.Tensor
    scale: torch.Tensor
    inv_steps: torch.Tensor

    @classmethod
    def build(
        cls, basis: torch.Tensor, steps: torch.Tensor, start: int, device: torch.device
    ) -> Fp8Tail:
        """Fold the steps into the tail of ``basis`` and store it in e4m3.

        Args:
            basis: float32 ``(p, r)``: the group's basis (orthonormal columns).
            steps: float32 ``(r,)``: each row's quantisation step (0: not coded).
            start: first tail row (:func:`tail_rows`).
            device: where the GEMM runs.
        """
        b = basis[:, start:].to(device, torch.float32)
        st = steps[start:].to(device, torch.float32)
        w_t = b * st[None, :]  # (p, r_t): (diag(step) Bᵀ)ᵀ
        s = _pow2_scale(float(w_t.abs().max()))
        inv = torch.where(st > 0, 1.0 / st.clamp_min(1e-30), torch.zeros_like(st))
        return cls(
            start,
            (w_t / s).to(E4M3).contiguous(),
            torch.tensor(s, dtype=torch.float32, device=device),
            inv.contiguous(),
        )

    @property
    def rows(self) -> int:
        return self.weight_t.shape[1]

    def symbols(self, coeffs: torch.Tensor) -> torch.Tensor:
        """e4m3 ``(N, r_t)`` row-major: the tail rows ``coeffs (r_t, N)`` (dequantised,
        any float dtype) in steps, clamped to the e4m3 range."""
        u = torch.empty(coeffs.shape[1], coeffs.shape[0], dtype=torch.float32,
                        device=coeffs.device)  # fmt: skip
        torch.mul(coeffs.T, self.inv_steps[None, :], out=u)  # row-major, in steps
        return u.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)

    def project(self, coeffs: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
        """``out = coeffs.T @ (step-scaled tail basis)ᵀ`` (``+=`` with ``accumulate``)
        through ``torch._scaled_mm``.

        Args:
            coeffs: ``(r_t, N)`` the tail rows of the dequantised coefficients.
            out: fp16 or bf16 ``(N, p)`` (a column slice of the features is fine).
        """
        u = self.symbols(coeffs)
        one = self.scale.new_ones(())
        if not accumulate and out.is_cuda:
            # straight into the (strided) destination where cuBLASLt takes it; the CPU
            # kernel of torch 2.11 wrote a strided ``out`` as if it were contiguous
            # (seen on the lent H100's image), so the CPU always copies
            try:
                torch._scaled_mm(u, self.weight_t.T, one, self.scale, out_dtype=out.dtype,
                                 out=out)  # fmt: skip
                return
            except (RuntimeError, TypeError):
                pass
        prod = torch._scaled_mm(u, self.weight_t.T, one, self.scale, out_dtype=out.dtype)
        out.add_(prod) if accumulate else out.copy_(prod)

    def reference(self, coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """float64 ``(N, p)``: the exact product of the fp8 path's inputs, ``coeffs.T @
        basis[:, start:].T`` (for tests and :func:`tail_error_bound`)."""
        return coeffs.T.double() @ basis[:, self.start :].T.double().to(coeffs.device)


def tail_error_bound(tail: Fp8Tail, coeffs: torch.Tensor, f8: torch.Tensor,
                     f16: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """float64 ``(N, p)``: the module doc's bound on ``|f8 - f16|`` for the tail rows
    ``coeffs (r_t, N)``, given both results."""
    u = (coeffs.T.double() * tail.inv_steps[None, :].double()).abs()
    w = (tail.weight_t.double() * tail.scale.double()).abs()  # |W|ᵀ (p, r_t), e4m3 values
    s = float(tail.scale)
    a = u @ w.T * (1 + 2.0**-4) / (1 - 2.0**-4)  # Σ|u||W| from the stored |W̃|
    return (
        0.13 * a
        + 2.0**-9 * s * u.sum(1, keepdim=True)
        + 2.0**-10 * (f8.double().abs() + f16.double().abs())
    )


def tail_plan(artifact, offsets: list[int]) -> list[int]:
    """Per group, the first row of its fp8 tail (:func:`tail_rows`) for a ``rans``
    artifact, from its plan and rANS tables; ``offsets``: each group's first row in the
    codec's coefficient rows."""
    shift = np.asarray(artifact.rans_shift)
    cls = np.asarray(artifact.rans_cls)
    n_classes = int(artifact.rans_freq.shape[1])
    coded: list[dict[int, tuple[int, int]]] = [{} for _ in range(len(offsets) - 1)]
    j = 0
    for r in artifact.plan:
        for row in range(r.start, r.end):
            coded[r.group][row] = (int(shift[j]), int(cls[j]))
            j += 1
    return [tail_rows(offsets[g + 1] - offsets[g], coded[g], n_classes)
            for g in range(len(offsets) - 1)]  # fmt: skip
