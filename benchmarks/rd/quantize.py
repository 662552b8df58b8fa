"""Asymmetric min/max integer quantisation of groups, shared by the integer baselines.

Each row of a ``(N, G)`` matrix is one quantisation group: its minimum is the zero point
and ``(max - min) / (2**bits - 1)`` the step, both float16 (kvtc-store's per-token range
quantiser, :func:`kvtc_store.codec.quant.quantize_range`, does exactly this per row).
Codes are packed LSB-first (:func:`kvtc_store.codec.quant.pack_bits`), so a group of
``G`` values costs ``G * bits`` bits plus 32 bits of scales.
"""

from __future__ import annotations

import torch

from kvtc_store.codec.quant import dequantize_range, pack_bits, quantize_range, unpack_bits

from .base import tensor_bytes, tensor_from

SCALE_BYTES = 4  # float16 zero point + float16 step, per group


def group_bytes(rows: int, group: int, bits: int) -> int:
    """Bytes of :func:`quantize_groups`'s output for ``rows`` groups of ``group`` values."""
    return rows * SCALE_BYTES + (rows * group * bits + 7) // 8


def quantize_groups(x: torch.Tensor, bits: int) -> bytes:
    """Quantise each row of ``x`` (float ``(N, G)``) to ``bits`` bits (1..8).

    Returns:
        ``scales ‖ codes``: float16 ``(N, 2)`` (zero point, step), then the packed codes;
        :func:`group_bytes` long.
    """
    codes, scales = quantize_range(x.float(), bits)
    return tensor_bytes(scales) + tensor_bytes(pack_bits(codes, bits))


def dequantize_groups(
    b: bytes, rows: int, group: int, bits: int, device: torch.device
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: float32 ``(rows, group)`` on ``device``."""
    cut = rows * SCALE_BYTES
    scales = tensor_from(b[:cut], torch.float16, (rows, 2), device)
    packed = tensor_from(b[cut:], torch.uint8, (len(b) - cut,), device)
    codes = unpack_bits(packed, bits, rows * group).view(rows, group)
    return dequantize_range(codes, scales)
