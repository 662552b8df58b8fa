"""The exactly stored tokens of a blob (sink tokens and a sequence's recent window).

Three encodings, named by the blob header's ``exact_dtype``:

- ``bfloat16-planes`` (the default): the same bfloat16 values as ``bfloat16``, bit for
  bit, permuted so that a general-purpose coder shrinks them: the values in channel-major
  order ``(2, L, H, D, n)`` (kind 0 keys, 1 values; one channel's ``n`` tokens side by
  side), and their bytes in two planes, first every value's high byte (sign and the top
  7 exponent bits), then every low byte (the last exponent bit and 7 mantissa bits).
  ``2 * L * H * n * D * 2`` bytes, like ``bfloat16``; the codecs write blobs that hold
  such a section with the ``deflate64k`` coder (:data:`DEFLATED`), which shrinks it.
  Measured on SmolLM2-135M's real KV (the last 128 of 1,024 tokens of Python's reference
  docs, 2,949,120 bytes; ``deflate64k`` at ISA-L level 1, as the codecs write): raw
  bfloat16 1.274x, planes in token-major order ``(2, L, H, n, D)`` 1.404x, planes in
  channel-major order 1.433x (zlib level 9 over the whole section: 1.258x, 1.429x,
  1.465x); the 4 sink tokens alone 1.233x, 1.300x, 1.305x. The high plane carries about
  3 bits a value (2.5x) and the low plane is incompressible. Byte planes are the usual
  way to feed floating-point arrays to a general-purpose coder (the byte-shuffle filters
  of Blosc and HDF5).
- ``bfloat16``: keys ``(L, H, n, D)`` then values, little-endian bfloat16, as cached
  (RoPE applied to keys). ``2 * L * H * n * D * 2`` bytes.
- ``float8_e4m3fn``: a near-lossless code at half the bytes. Each ``D``-vector (one
  kind, layer, head and token) is divided by its own scale ``max|x| / 448`` (448 is
  e4m3's largest finite value; a zero vector has scale 1) and rounded to OCP FP8 E4M3;
  the scales are float16. Layout: scales ``(2, L, H, n)`` float16, then values
  ``(2, L, H, n, D)`` e4m3 bytes; kind 0 keys, 1 values. ``2 * L * H * n * (D + 2)``
  bytes. Per-vector scaling follows the fine-grained FP8 KV quantisation of serving
  engines (vLLM's ``fp8`` KV cache; DeepSeek-V3 report, §3.3 "fine-grained
  quantization").

The helpers work on CPU and CUDA tensors with torch operations only (the GPU decoder
unpacks the section in device memory).
"""

from __future__ import annotations

import torch

EXACT_DTYPES = ("bfloat16-planes", "bfloat16", "float8_e4m3fn")
DEFAULT_EXACT_DTYPE = "bfloat16-planes"
DEFLATED = frozenset({"bfloat16-planes"})
"""Exact encodings laid out for a general-purpose coder: with the codecs' default coder,
a blob that holds exact tokens in one of these is written with ``deflate64k``."""
_FP8_MAX = 448.0


def exact_nbytes(layers: int, heads: int, tokens: int, dim: int, exact_dtype: str) -> int:
    """Bytes of the exact section for ``tokens`` exactly stored tokens.

    Raises:
        ValueError: an unknown ``exact_dtype``.
    """
    if exact_dtype in ("bfloat16", "bfloat16-planes"):
        return 2 * layers * heads * tokens * dim * 2
    if exact_dtype == "float8_e4m3fn":
        return 2 * layers * heads * tokens * (dim + 2)
    raise ValueError(f"unknown exact dtype {exact_dtype!r} (known: {', '.join(EXACT_DTYPES)})")


def pack_exact(keys: torch.Tensor, values: torch.Tensor, exact_dtype: str) -> torch.Tensor:
    """Encode exactly stored tokens.

    Args:
        keys, values: ``(L, H, n, D)`` float tensors (RoPE applied to keys), any device.
        exact_dtype: one of :data:`EXACT_DTYPES`.

    Returns:
        uint8 ``(exact_nbytes(...),)`` on the inputs' device.

    Raises:
        ValueError: an unknown ``exact_dtype``.
    """
    kv = torch.stack([keys, values])
    if exact_dtype == "bfloat16":
        return kv.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1)
    if exact_dtype == "bfloat16-planes":
        # (2, L, H, D, n) bf16 -> its bytes, (low, high) per value -> (high plane, low plane)
        pairs = kv.to(torch.bfloat16).transpose(-1, -2).contiguous().view(torch.uint8)
        return pairs.reshape(-1, 2).T.flip(0).reshape(-1)
    if exact_dtype == "float8_e4m3fn":
        x = kv.float()
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax)).to(torch.float16)
        q = (x / scale.float()).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        return torch.cat(
            [
                scale.contiguous().view(torch.uint8).reshape(-1),
                q.contiguous().view(torch.uint8).reshape(-1),
            ]
        )
    raise ValueError(f"unknown exact dtype {exact_dtype!r} (known: {', '.join(EXACT_DTYPES)})")


def unpack_exact(
    raw: torch.Tensor, layers: int, heads: int, tokens: int, dim: int, exact_dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the exact section.

    Args:
        raw: uint8 ``(exact_nbytes(...),)``, any device.
        exact_dtype: as the blob header names it.

    Returns:
        ``(keys, values)``: ``(L, H, n, D)`` bfloat16 (``bfloat16`` sections: views of
        ``raw``; ``bfloat16-planes``: views of one new tensor, the values ``pack_exact``
        was given, bit for bit) or float32 (``float8_e4m3fn``), on ``raw``'s device.

    Raises:
        ValueError: an unknown ``exact_dtype`` or a section of the wrong size.
    """
    want = exact_nbytes(layers, heads, tokens, dim, exact_dtype)
    if raw.numel() != want:
        raise ValueError(f"exact section of {raw.numel()} bytes, {want} expected")
    if exact_dtype == "bfloat16-planes":
        pairs = raw.view(2, -1).flip(0).T.contiguous()  # (values, 2): low byte, high byte
        kv = pairs.view(torch.bfloat16).view(2, layers, heads, dim, tokens)
        kv = kv.transpose(-1, -2)
        return kv[0], kv[1]
    if raw.data_ptr() % 4:  # a section at an odd offset of its payload: 16-bit views need 2
        raw = raw.clone()
    if exact_dtype == "bfloat16":
        kv = raw.view(torch.bfloat16).view(2, layers, heads, tokens, dim)
        return kv[0], kv[1]
    n_scale = 2 * layers * heads * tokens * 2
    scale = raw[:n_scale].view(torch.float16).view(2, layers, heads, tokens, 1).float()
    q = raw[n_scale:].view(torch.float8_e4m3fn).view(2, layers, heads, tokens, dim)
    kv = q.float() * scale
    return kv[0], kv[1]
