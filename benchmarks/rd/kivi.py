"""KIVI: keys quantised per channel, values per token, the recent tokens kept exact.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
arXiv 2402.02750, ICML 2024, §3-4: keys have outlier *channels*, so each channel is
quantised over groups of ``group`` consecutive tokens; values are quantised per token in
groups of ``group`` channels; both asymmetric min/max (float16 zero point and step per
group). The most recent ``residual`` tokens stay in full precision (here bfloat16), and
so do tokens that do not fill a whole key group (KIVI's residual holds them until it
does). KIVI-2 is ``bits=2, group=32, residual=128``.

A chunk ``(L, H, T, D)`` stores its first ``n`` tokens quantised, ``n`` the largest
multiple of ``group`` not past the recent window, and tokens ``[n, T)`` in bfloat16; the
body (key scales and codes, value scales and codes, exact keys, exact values) is stored as
raw DEFLATE, so the honest ratio is the one after DEFLATE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVMethod, pack_chunk, tensor_bytes, tensor_from, unpack_chunk
from .quantize import dequantize_groups, group_bytes, quantize_groups


@dataclass
class KIVI(KVMethod):
    """KIVI-``bits`` with groups of ``group`` and ``residual`` exact recent tokens."""

    name: str = "kivi-2"
    bits: int = 2
    group: int = 32
    residual: int = 128

    def window(self) -> int:
        return self.residual

    def _split(self, shape, tail) -> tuple[int, int, int]:
        """``(n quantised tokens, key groups, value groups)`` of a chunk."""
        layers, heads, tokens, dim = shape
        if dim % self.group:
            raise ValueError(f"group {self.group} does not divide head dim {dim}")
        n = (tokens - tail) // self.group * self.group
        return n, layers * heads * dim * n // self.group, layers * heads * n * dim // self.group

    def _body_size(self, shape, tail) -> int:
        layers, heads, tokens, dim = shape
        n, kr, vr = self._split(shape, tail)
        exact = 2 * layers * heads * (tokens - n) * dim * 2
        return (
            group_bytes(kr, self.group, self.bits) + group_bytes(vr, self.group, self.bits) + exact
        )

    def encode_chunk(self, keys, values, first_position, exact_tail):
        layers, heads, _, dim = keys.shape
        n, kr, vr = self._split(keys.shape, exact_tail)
        g = self.group
        # keys per channel: (L, H, n/g, g, D) -> (L, H, n/g, D, g), one row per channel group
        k = keys[:, :, :n].reshape(layers, heads, n // g, g, dim).transpose(3, 4)
        v = values[:, :, :n].reshape(vr, g)  # values per token: groups of g channels
        body = [
            quantize_groups(k.reshape(kr, g), self.bits),
            quantize_groups(v, self.bits),
            tensor_bytes(keys[:, :, n:].to(torch.bfloat16)),
            tensor_bytes(values[:, :, n:].to(torch.bfloat16)),
        ]
        return pack_chunk(tuple(keys.shape), first_position, exact_tail, b"".join(body))

    def decode_chunk(self, blob, device, dtype):
        shape, _, tail, body = unpack_chunk(blob, self._body_size)
        layers, heads, tokens, dim = shape
        n, kr, vr = self._split(shape, tail)
        g = self.group
        kb, vb = group_bytes(kr, g, self.bits), group_bytes(vr, g, self.bits)
        k = dequantize_groups(body[:kb], kr, g, self.bits, device)
        k = k.reshape(layers, heads, n // g, dim, g).transpose(3, 4).reshape(layers, heads, n, dim)
        v = dequantize_groups(body[kb : kb + vb], vr, g, self.bits, device)
        v = v.reshape(layers, heads, n, dim)
        rest = body[kb + vb :]
        half = len(rest) // 2
        exact_shape = (layers, heads, tokens - n, dim)
        ek = tensor_from(rest[:half], torch.bfloat16, exact_shape, device)
        ev = tensor_from(rest[half:], torch.bfloat16, exact_shape, device)
        return (
            torch.cat([k.to(dtype), ek.to(dtype)], dim=2),
            torch.cat([v.to(dtype), ev.to(dtype)], dim=2),
        )
