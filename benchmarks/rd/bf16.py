"""bfloat16 storage: what the store would hold uncompressed (the honest ratio's unit).

The model computes KV in float32 here; the exact reference is that float32 KV, so this
row shows the quality floor of storing KV at all in 16 bits. Its ratio is DEFLATE's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVMethod, pack_chunk, tensor_bytes, tensor_from, unpack_chunk


@dataclass
class BF16(KVMethod):
    """bfloat16 cast of ``(L, H, T, D)`` keys and values, then raw DEFLATE."""

    name: str = "bf16"
    kind: str = "reference"

    def _body_size(self, shape, tail) -> int:
        layers, heads, tokens, dim = shape
        return 2 * layers * heads * tokens * dim * 2

    def encode_chunk(self, keys, values, first_position, exact_tail):
        body = tensor_bytes(keys.to(torch.bfloat16)) + tensor_bytes(values.to(torch.bfloat16))
        return pack_chunk(tuple(keys.shape), first_position, 0, body)

    def decode_chunk(self, blob, device, dtype):
        shape, _, _, body = unpack_chunk(blob, self._body_size)
        half = len(body) // 2
        return tuple(
            tensor_from(p, torch.bfloat16, shape, device).to(dtype)
            for p in (body[:half], body[half:])
        )
