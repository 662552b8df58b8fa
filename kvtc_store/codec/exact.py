"""The exactly stored tokens of a blob (sink tokens and a sequence's recent window).

Two encodings, named by the blob header's ``exact_dtype``:

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

Both helpers work on CPU and CUDA tensors (the GPU decoder unpacks the section in device
memory).
"""

from __future__ import annotations

import torch

EXACT_DTYPES = ("bfloat16", "float8_e4m3fn")
_FP8_MAX = 448.0


def exact_nbytes(layers: int, heads: int, tokens: int, dim: int, exact_dtype: str) -> int:
    """Bytes of the exact section for ``tokens`` exactly stored tokens.

    Raises:
        ValueError: an unknown ``exact_dtype``.
    """
    if exact_dtype == "bfloat16":
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
        ``(keys, values)``: ``(L, H, n, D)`` bfloat16 (``bfloat16`` sections, views of
        ``raw``) or float32 (``float8_e4m3fn``), on ``raw``'s device.

    Raises:
        ValueError: an unknown ``exact_dtype`` or a section of the wrong size.
    """
    want = exact_nbytes(layers, heads, tokens, dim, exact_dtype)
    if raw.numel() != want:
        raise ValueError(f"exact section of {raw.numel()} bytes, {want} expected")
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
