"""Rotary position embedding (RoPE), undone before PCA and redone after decoding.

Keys in a KV cache carry RoPE: each pair of channels is rotated by an angle that grows
with the token's absolute position, which spreads one key direction over many PCA
components. KVTC removes the rotation before calibration and encoding (paper §3.1) and
re-applies it after decoding. The convention is Hugging Face's ``rotate_half`` (Llama,
Qwen, Mistral): channel ``i`` pairs with channel ``i + head_dim/2``. Scaled RoPE
(Llama-3's ``llama3``, ``linear``, ``yarn``) changes only the frequencies and, for YaRN,
multiplies cos and sin by an attention factor; both are stored in :class:`RopeParams`, so
decoding needs no model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UnsupportedModelError

SCALED_ROPE_TYPES = ("linear", "llama3", "yarn")
"""Scaled RoPE types the codec undoes exactly: their frequencies depend on the model's
config only, so they are computed once (by transformers' own ``ROPE_INIT_FUNCTIONS``, see
:func:`kvtc_store.model.kv_geometry`) and stored in :attr:`RopeParams.inv_freqs`."""

NO_ROPE = "none"
"""``rope_type`` of a model without rotary embeddings (learned or ALiBi positions): its
cached keys carry no rotation, so nothing is undone."""


@dataclass(frozen=True)
class RopeParams:
    """RoPE settings of a model.

    Attributes:
        head_dim: channels per head (D).
        theta: the base (``rope_theta``), e.g. 1e5 for SmolLM2.
        rope_type: ``"default"`` (plain RoPE), one of :data:`SCALED_ROPE_TYPES`
            (``inv_freqs`` then holds the frequencies), :data:`NO_ROPE`, or another type
            a model declares (kept for identification; :meth:`inv_freq` refuses it).
        partial_rotary_factor: share of the head's channels that are rotated (1.0 = all).
        inv_freqs: for a scaled type, the model's inverse frequencies (radians per
            position), ``rot_dim // 2`` of them, as transformers computes them
            (float32 values); empty otherwise.
        attention_scaling: factor transformers multiplies cos and sin by (YaRN's
            ``mscale``, 1.0 for the others): cached keys are ``attention_scaling`` times
            the rotated ``k_proj`` output.
    """

    head_dim: int
    theta: float
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    inv_freqs: tuple[float, ...] = ()
    attention_scaling: float = 1.0

    def to_dict(self) -> dict:
        """Plain-dict form, for the artifact manifest and the model fingerprint (the
        scaled-RoPE fields only when set, so plain RoPE keeps its earlier form)."""
        d = asdict(self)
        if not self.inv_freqs:
            d.pop("inv_freqs")
        else:
            d["inv_freqs"] = list(self.inv_freqs)
        if self.attention_scaling == 1.0:
            d.pop("attention_scaling")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RopeParams:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["inv_freqs"] = tuple(float(f) for f in d.get("inv_freqs", ()))
        return cls(**d)

    @property
    def rotary_dim(self) -> int:
        """Channels of a head that are rotated (0 for :data:`NO_ROPE`)."""
        if self.rope_type == NO_ROPE:
            return 0
        return int(self.head_dim * self.partial_rotary_factor)

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, float64, shape ``(rotary_dim // 2,)``.

        Raises:
            UnsupportedModelError: a RoPE type whose frequencies are not a function of the
                position alone (``dynamic``, ``longrope``: see
                :func:`kvtc_store.model.check_supported`), or a scaled type without its
                frequencies.
        """
        rot = self.rotary_dim
        if self.rope_type == "default":
            return 1.0 / (self.theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
        if self.rope_type == NO_ROPE:
            return torch.zeros(0, dtype=torch.float64)
        if self.rope_type in SCALED_ROPE_TYPES and len(self.inv_freqs) == rot // 2:
            return torch.tensor(self.inv_freqs, dtype=torch.float64)
        raise UnsupportedModelError(
            f"RoPE type {self.rope_type!r} cannot be undone per position"
            + (
                ""
                if self.rope_type not in SCALED_ROPE_TYPES
                else f" without its {rot // 2} frequencies (build RopeParams with "
                "kvtc_store.model.kv_geometry)"
            )
        )


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
    if not rot:
        return x.clone()
    scale = params.attention_scaling if sign > 0 else 1.0 / params.attention_scaling
    out = xr * cos + sign * _rotate_half(xr) * sin
    if scale != 1.0:
        out = out * scale
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def apply_rope(x: torch.Tensor, positions: torch.Tensor, params: RopeParams) -> torch.Tensor:
    """Rotate keys to their positions (and multiply the rotated channels by
    ``params.attention_scaling``, as transformers does).

    Args:
        x: keys, shape ``(..., T, D)``, float dtype; not modified.
        positions: absolute token positions, shape ``(T,)``, integer.
        params: the model's RoPE settings.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    return _rotate(x, positions, params, +1.0)


def undo_rope(x: torch.Tensor, positions: torch.Tensor, params: RopeParams) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: rotate keys back by their positions' angles (and
    divide the rotated channels by ``params.attention_scaling``).

    Args:
        x: RoPE'd keys as cached, shape ``(..., T, D)``, float dtype.
        positions: absolute token positions, shape ``(T,)``.
        params: the model's RoPE settings.

    Returns:
        The pre-RoPE keys, same shape and dtype.
    """
    return _rotate(x, positions, params, -1.0)
