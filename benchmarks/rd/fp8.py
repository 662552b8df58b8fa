"""FP8 (E4M3) KV: a plain cast, as vLLM's ``--kv-cache-dtype fp8`` stores KV by default.

``fp8`` casts keys and values to ``float8_e4m3fn`` with no scale (vLLM's default scale of
1.0; values beyond ±448 saturate); ``fp8-token`` first divides each (layer, head, token)
vector by ``amax / 448``, stored in float16, the per-token scaling of FP8 KV formats
(Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433). The chunk's body
is stored as raw DEFLATE, so the honest ratio is the one after DEFLATE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVMethod, pack_chunk, tensor_bytes, tensor_from, unpack_chunk

E4M3_MAX = 448.0


@dataclass
class FP8(KVMethod):
    """E4M3 cast of ``(L, H, T, D)`` keys and values, optionally per-token scaled."""

    per_token_scale: bool = False

    def _body_size(self, shape, tail) -> int:
        layers, heads, tokens, dim = shape
        n = layers * heads * tokens
        return 2 * (n * dim + (2 * n if self.per_token_scale else 0))

    def _encode(self, x: torch.Tensor) -> bytes:
        x = x.float()
        scale_b = b""
        if self.per_token_scale:
            scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).to(torch.float16)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            x = x / scale.float()
            scale_b = tensor_bytes(scale)
        return scale_b + tensor_bytes(x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))

    def _decode(self, b: bytes, shape, device) -> torch.Tensor:
        layers, heads, tokens, _ = shape
        scale = None
        if self.per_token_scale:
            cut = layers * heads * tokens * 2
            scale = tensor_from(b[:cut], torch.float16, (layers, heads, tokens, 1), device)
            b = b[cut:]
        x = tensor_from(b, torch.float8_e4m3fn, shape, device).float()
        return x * scale.float() if scale is not None else x

    def encode_chunk(self, keys, values, first_position, exact_tail):
        body = self._encode(keys) + self._encode(values)
        return pack_chunk(tuple(keys.shape), first_position, 0, body)

    def decode_chunk(self, blob, device, dtype):
        shape, _, _, body = unpack_chunk(blob, self._body_size)
        half = len(body) // 2
        return tuple(self._decode(p, shape, device).to(dtype) for p in (body[:half], body[half:]))


def fp8_cast() -> FP8:
    """Plain E4M3 cast (no scale)."""
    return FP8(name="fp8")


def fp8_per_token() -> FP8:
    """E4M3 with a float16 scale per (layer, head, token)."""
    return FP8(name="fp8-token", per_token_scale=True)
