"""Quantisers of principal-component coefficients, and bit packing.

Fixed step (quantiser ``rans``): every coded component has a calibrated step; symbols are
``round(c / step)`` clamped to int16, entropy-coded by :mod:`kvtc_store.codec.rans`. No
per-token side information.

Per-token min/max (quantiser ``minmax``, the paper's):

Each kept range of principal components is quantised per token with its own offset (the
range's minimum) and step ``(max - min) / (2**bits - 1)``, both stored as float16 (32
bits per range per token, counted in the bit budget). Codes are packed LSB-first into
bytes: code ``k`` of width ``b`` occupies bits ``k*b .. k*b+b-1`` of the stream.
"""

from __future__ import annotations

import numpy as np
import torch

SCALE_BITS = 32  # float16 offset + float16 step, per kept range and token
SYMBOL_MAX = 32767  # fixed-step symbols are clamped to +-SYMBOL_MAX


def quantize_step(coeffs: torch.Tensor, steps: torch.Tensor, rounding: float = 0.5) -> torch.Tensor:
    """Fixed-step symbols ``sign(y) * floor(|y| + rounding)``, ``y = coeffs / steps``, as
    int32 clamped to ``+-SYMBOL_MAX``. ``rounding`` 0.5 rounds to nearest; below 0.5 the
    zero bin widens (a dead zone: fewer bits for near-zero values, as in H.264's
    quantisers; Sullivan, "Efficient scalar quantization of exponential and Laplacian
    random variables", IEEE Trans. IT 1996).

    Args:
        coeffs: float32 ``(T, n)``.
        steps: float32 ``(n,)``, > 0.
        rounding: in ``(0, 0.5]``.
    """
    y = coeffs / steps
    q = torch.floor(y.abs() + rounding).clamp_(max=SYMBOL_MAX)
    return (q * torch.sign(y)).to(torch.int32)


def dequantize_step(symbols: torch.Tensor, steps: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`quantize_step`: float32 ``(T, n)``, ``(q - sign(q) * bias) * step``
    (a reconstruction ``bias`` > 0 moves non-zero values toward zero, where a Laplacian's
    bin centroid lies)."""
    q = symbols.float()
    if bias:
        q = q - torch.sign(q) * bias
    return q * steps


def quantize_range(coeffs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise one range of coefficients per token.

    Args:
        coeffs: float32, shape ``(T, n)``: the range's PCA coefficients of ``T`` tokens.
        bits: code width, 1..8.

    Returns:
        ``(codes, scales)``: codes uint8 ``(T, n)`` in ``[0, 2**bits)``; scales float16
        ``(T, 2)`` holding (offset, step). Decoding is ``offset + code * step``.
    """
    levels = (1 << bits) - 1
    lo = coeffs.amin(dim=1)
    hi = coeffs.amax(dim=1)
    lo16 = lo.to(torch.float16)
    step16 = ((hi - lo16.float()) / levels).to(torch.float16)
    # A step that rounded down would clip the top code: take the next float16 up (one ulp;
    # for subnormal steps that is more than a 2**-10 relative nudge). A zero step
    # (constant row) is 1.
    up = torch.nextafter(step16, torch.full_like(step16, float("inf")))
    step16 = torch.where(step16.float() * levels < hi - lo16.float(), up, step16)
    step16 = torch.where(step16 > 0, step16, torch.ones_like(step16))
    q = torch.round((coeffs - lo16.float()[:, None]) / step16.float()[:, None])
    codes = q.clamp_(0, levels).to(torch.uint8)
    return codes, torch.stack([lo16, step16], dim=1)


def dequantize_range(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_range`: float32 ``(T, n)`` from codes and scales."""
    s = scales.float()
    return s[:, :1] + codes.float() * s[:, 1:2]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of ``bits`` bits each into a uint8 stream.

    Args:
        codes: uint8, any shape, values < ``2**bits``; read in C order.
        bits: 1..8.

    Returns:
        uint8 ``(ceil(codes.numel() * bits / 8),)`` on the device of ``codes``.
    """
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    if flat.device.type == "cpu":  # numpy's C bit (un)packing: ~20x faster than torch ops
        planes = np.unpackbits(flat.numpy()[:, None], axis=1, bitorder="little")[:, :bits]
        return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    planes = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-planes.numel()) % 8
    if pad:
        planes = torch.cat([planes, planes.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (planes.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(count,)`` codes from a packed stream.

    Raises:
        ValueError: if ``packed`` holds fewer than ``count * bits`` bits.
    """
    need = (count * bits + 7) // 8
    if packed.numel() < need:
        raise ValueError(f"packed stream has {packed.numel()} bytes, {need} needed")
    if bits == 8:
        return packed[:count].clone()
    if packed.device.type == "cpu":
        planes = np.unpackbits(packed[:need].numpy(), bitorder="little")[: count * bits]
        # packbits zero-pads each row of ``bits`` bits to a byte: the code itself
        return torch.from_numpy(
            np.packbits(planes.reshape(count, bits), axis=1, bitorder="little").reshape(count)
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    planes = ((packed[:need, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (planes.view(count, bits) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
