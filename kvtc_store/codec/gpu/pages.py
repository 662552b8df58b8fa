"""Gather an engine's KV pages into a dense ``(L, H, T, D)`` buffer in one kernel launch.

A serving engine keeps one cache tensor per layer. Copying a request's blocks out of it
with PyTorch takes one ``index_select`` per layer and kind (64 launches for a 32-layer
model), and each launch releases and retakes the GIL. On a save hook that shares the
GIL with an encoding thread, every retake can wait for that thread. One Triton launch per
kind reads every layer through the same addressing as the codec's kernels (layer 0's
origin plus a layer offset table; :class:`~kvtc_store.codec.layout.KindLayout`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_pages"]

_BT = 32  # tokens per program
_HEADS_PER_PROGRAM = 4  # (layer, head) pairs per program


@triton.jit
def _gather_kernel(
    x_ptr,  # layer 0's origin (any dtype)
    tok_ptr,  # int64 (T,): each token's slot, elements from its layer's origin
    lay_ptr,  # int64 (L,): each layer's origin, elements from x_ptr
    sx_h,
    sx_d,
    out_ptr,  # (L, H, T, D) contiguous, x's dtype
    LH,
    H,
    T,
    D,
    heads_per_program,
    DP: tl.constexpr,  # D rounded up to a power of two
    BT: tl.constexpr,
):
    t = (tl.program_id(0) * BT + tl.arange(0, BT)[:, None]).to(tl.int64)
    d = tl.arange(0, DP)[None, :]
    m = (t < T) & (d < D)
    slot = x_ptr + tl.load(tok_ptr + t, mask=t < T, other=0)
    lh0 = tl.program_id(1) * heads_per_program
    for lh in range(lh0, tl.minimum(lh0 + heads_per_program, LH)):
        src = slot + tl.load(lay_ptr + lh // H) + (lh % H) * sx_h + d * sx_d
        x = tl.load(src, mask=m, other=0)
        tl.store(out_ptr + (lh * T + t) * D + d, x, mask=m)  # t: int64


def gather_pages(
    origin: torch.Tensor,
    token_offsets: torch.Tensor,
    layer_offsets: torch.Tensor,
    head_stride: int,
    dim_stride: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Copy ``T`` token slots of every layer and head into ``out``, in one launch.

    ``out[l, h, t, d] = *(origin + layer_offsets[l] + token_offsets[t] + h * head_stride
    + d * dim_stride)`` (element offsets, origin's dtype).

    Args:
        origin: layer 0's page tensor; its data pointer is the origin.
        token_offsets: int64 ``(T,)`` on ``origin``'s device: each token's slot.
        layer_offsets: int64 ``(L,)`` on ``origin``'s device: each layer's origin.
        head_stride, dim_stride: elements between heads, and between dims of a head.
        out: ``(L, H, T, D)`` contiguous, ``origin``'s dtype and device (written).

    Returns:
        ``out``. The launch is queued on the current stream; nothing waits.

    Raises:
        ValueError: ``out`` is not contiguous, or its dtype, device or sizes disagree.
    """
    layers, heads, tokens, dim = out.shape
    if not out.is_contiguous() or out.dtype != origin.dtype or out.device != origin.device:
        raise ValueError(
            f"out must be contiguous {origin.dtype} on {origin.device}, got {out.dtype} on "
            f"{out.device} with strides {out.stride()}"
        )
    if token_offsets.numel() != tokens or layer_offsets.numel() != layers:
        raise ValueError(
            f"out {tuple(out.shape)} against {token_offsets.numel()} token and "
            f"{layer_offsets.numel()} layer offsets"
        )
    if not out.numel():
        return out
    grid = (triton.cdiv(tokens, _BT), triton.cdiv(layers * heads, _HEADS_PER_PROGRAM))
    _gather_kernel[grid](
        origin, token_offsets, layer_offsets, head_stride, dim_stride, out,
        layers * heads, heads, tokens, dim, _HEADS_PER_PROGRAM,
        DP=triton.next_power_of_2(dim), BT=_BT,
    )  # fmt: skip
    return out
