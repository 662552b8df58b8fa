"""From KV tensors to per-group feature matrices and back.

A chunk's keys and values are ``(L, H, T, D)`` tensors. For the codec each token is a
feature vector: all layers, KV heads and channels of K (RoPE undone), and likewise of V.
A :class:`~kvtc_store.codec.artifact.FeatureGroup` takes the features of a run of layers
(layer-major), so a group is a contiguous slice of the token's K or V vector.
"""

from __future__ import annotations

import torch

from .artifact import FeatureGroup


def default_groups(layers: int, layers_per_group: int | None = None) -> list[FeatureGroup]:
    """Feature groups: all layers of K, then of V (the paper's default), or runs of
    ``layers_per_group`` layers of each (``1`` = per-layer PCA)."""
    step = layers if layers_per_group is None else layers_per_group
    if step < 1:
        raise ValueError("layers_per_group must be >= 1")
    out = []
    for kind in ("k", "v"):
        out += [FeatureGroup(kind, s, min(s + step, layers)) for s in range(0, layers, step)]
    return out


def to_token_major(x: torch.Tensor) -> torch.Tensor:
    """``(L, H, T, D)`` -> ``(T, L*H*D)`` (layer-major features), float32."""
    layers, heads, tokens, dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(tokens, layers * heads * dim).float()


def from_token_major(f: torch.Tensor, layers: int, heads: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`to_token_major`: ``(T, L*H*D)`` -> ``(L, H, T, D)``."""
    return f.reshape(f.shape[0], layers, heads, dim).permute(1, 2, 0, 3)


def group_slices(groups: list[FeatureGroup], heads: int, dim: int) -> list[tuple[str, slice]]:
    """For each group, which token-major vector (``"k"``/``"v"``) and which slice of it."""
    per_layer = heads * dim
    return [(g.kind, slice(g.layer_start * per_layer, g.layer_end * per_layer)) for g in groups]
