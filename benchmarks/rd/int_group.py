"""Integer quantisation per token and channel group: int8 per token, int4 with group 64.

Both keys and values are quantised per (layer, KV head, token) in groups of ``group``
consecutive channels of the head dimension, asymmetric min/max with a float16 zero point
and step per group (the layout of LMDeploy's and FlexGen's group-wise KV quantisation;
FlexGen: Sheng et al., ICML 2023, arXiv 2303.06865, §5). With SmolLM2's head dim of 64,
"int8 per token" and "int4 group 64" share one group per head and token. No token is
kept exactly. The chunk's body (scales and packed codes of K, then of V) is stored as raw
DEFLATE, so the honest ratio is the one after DEFLATE.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVMethod, pack_chunk, unpack_chunk
from .quantize import dequantize_groups, group_bytes, quantize_groups


@dataclass
class IntGroupQuant(KVMethod):
    """``bits``-bit asymmetric quantisation in groups of ``group`` channels per token.

    ``group`` must divide the head dim ``D``; keys/values ``(L, H, T, D)`` become
    ``L * H * T * D / group`` groups.
    """

    bits: int = 4
    group: int = 64

    def _rows(self, shape) -> int:
        layers, heads, tokens, dim = shape
        if dim % self.group:
            raise ValueError(f"group {self.group} does not divide head dim {dim}")
        return layers * heads * tokens * dim // self.group

    def _body_size(self, shape, tail) -> int:
        return 2 * group_bytes(self._rows(shape), self.group, self.bits)

    def encode_chunk(self, keys, values, first_position, exact_tail):
        rows = self._rows(keys.shape)
        body = b"".join(
            quantize_groups(x.reshape(rows, self.group), self.bits) for x in (keys, values)
        )
        return pack_chunk(tuple(keys.shape), first_position, 0, body)

    def decode_chunk(self, blob, device, dtype):
        shape, _, _, body = unpack_chunk(blob, self._body_size)
        rows = self._rows(shape)
        half = len(body) // 2
        k, v = (
            dequantize_groups(part, rows, self.group, self.bits, device).reshape(shape).to(dtype)
            for part in (body[:half], body[half:])
        )
        return k, v


def int8_per_token() -> IntGroupQuant:
    """int8, one group per (layer, head, token) (SmolLM2's head dim is 64)."""
    return IntGroupQuant(name="int8", bits=8, group=64)


def int4_group64() -> IntGroupQuant:
    """int4 with groups of 64 channels."""
    return IntGroupQuant(name="int4-g64", bits=4, group=64)
