"""Rotary position embedding (RoPE), undone before PCA and redone after decoding.

Keys in a KV cache carry RoPE: each pair of channels is rotated by an angle that grows
with the token's absolute position, which spreads one key direction over many PCA
components. KVTC removes the rotation before calibration and encoding (paper §3.1) and
re-applies it after decoding. The convention is Hugging Face's ``rotate_half`` (Llama,
Qwen, Mistral): channel ``i`` pairs with channel ``i + head_dim/2``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class RopeParams:
    """RoPE settings of a model.

    Attributes:
        head_dim: channels per head (D).
        theta: the base (``rope_theta``), e.g. 1e5 for SmolLM2.
        rope_type: only ``"default"`` (plain RoPE, no scaling) is supported for now.
        partial_rotary_factor: share of the head's channels that are rotated (1.0 = all).
    """

    head_dim: int
    theta: float
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0

    def to_dict(self) -> dict:
        """Plain-dict form, for the artifact manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RopeParams:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, float64, shape ``(rot_dim // 2,)``.

        Raises:
            NotImplementedError: for a scaled RoPE type (llama3, yarn, ...).
        """
        if self.rope_type != "default":
            raise NotImplementedError(f"RoPE type {self.rope_type!r} is not supported yet")
        rot = int(self.head_dim * self.partial_rotary_factor)
        return 1.0 / (self.theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))


def _cos_sin(params: RopeParams, positions: torch.Tensor, device, dtype):
    """cos and sin tables, shape ``(T, rot_dim)``, computed in float64 for exact angles."""
    freqs = positions.to(torch.float64).cpu()[:, None] * params.inv_freq()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate(x: torch.Tensor, positions: torch.Tensor, params: RopeParams, sign: float):
    cos, sin = _cos_sin(params, positions, x.device, x.dtype)
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    out = xr * cos + sign * _rotate_half(xr) * sin
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def apply_rope(x: torch.Tensor, positions: torch.Tensor, params: RopeParams) -> torch.Tensor:
    """Rotate keys to their positions.

    Args:
        x: keys, shape ``(..., T, D)``, float dtype; not modified.
        positions: absolute token positions, shape ``(T,)``, integer.
        params: the model's RoPE settings.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    return _rotate(x, positions, params, +1.0)


def undo_rope(x: torch.Tensor, positions: torch.Tensor, params: RopeParams) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: rotate keys back by their positions' angles.

    Args:
        x: RoPE'd keys as cached, shape ``(..., T, D)``, float dtype.
        positions: absolute token positions, shape ``(T,)``.
        params: the model's RoPE settings.

    Returns:
        The pre-RoPE keys, same shape and dtype.
    """
    return _rotate(x, positions, params, -1.0)
