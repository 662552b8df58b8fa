"""Where a chunk sits in its sequence, read from its keys (for callers that do not know).

The codec undoes RoPE at each token's absolute position before the key PCA (paper §3);
coded at the wrong position, keys keep a residual rotation the PCA was not fit for. Some
containers hand the codec a chunk without its position (LMCache's serde API). Pre-RoPE
keys have a large per-channel mean (the artifact's K mean; outlier channels of pre-RoPE
keys, KVQuant, Hooper et al. 2024, §3.2), and RoPE turns that mean by each position's
angles: de-rotating the chunk's mean key at a candidate first position and correlating it
with the artifact's mean peaks at the true position. Measured on SmolLM2
(benchmarks/results/lmcache_serde.md): all 8 chunks of a 2,048-token text found among 512
chunk-aligned candidates below 131,072; chunks at 256-1792 coded at 0 instead had key
error 0.51-0.58 (0.09-0.10 at their position) and ratio 6.2-6.5 (9.8-10.9).

A wrong guess costs compression quality only, never correctness: the blob records the
position it was coded at and decoding re-applies RoPE there.
"""

from __future__ import annotations

import torch

from .artifact import CodecArtifact
from .rope import undo_rope

__all__ = ["estimate_first_position"]


@torch.no_grad()
def estimate_first_position(
    artifact: CodecArtifact, keys: torch.Tensor, candidates: torch.Tensor
) -> int:
    """The candidate first position at which ``keys`` best match the artifact's key mean.

    Args:
        artifact: the codec artifact (its K feature groups' means, its RoPE).
        keys: one chunk's keys with RoPE applied, ``(L, H, T, D)``, any float dtype.
        candidates: possible absolute positions of the chunk's first token, ``(N,)``
            int64, N >= 1 (e.g. multiples of the chunk size).

    Returns:
        One of ``candidates``; ``candidates[0]`` when the artifact does not undo RoPE
        (its coding then does not depend on the position).

    Raises:
        ValueError: ``candidates`` is empty or ``keys`` is not the artifact's shape.
    """
    if candidates.numel() == 0:
        raise ValueError("estimate_first_position needs at least one candidate")
    layers, heads, tokens, dim = keys.shape
    if (layers, heads, dim) != tuple(artifact.kv_shape):
        raise ValueError(
            f"keys of shape {tuple(keys.shape)} are not the artifact's (L, H, D) "
            f"{tuple(artifact.kv_shape)}"
        )
    if not artifact.undo_rope or candidates.numel() == 1:
        return int(candidates[0])
    k_groups = [g for g, grp in enumerate(artifact.groups) if grp.kind == "k"]
    mean = torch.cat([artifact.means[g] for g in k_groups]).float().view(layers, heads, 1, dim)
    # the chunk's mean key, de-rotated as if the chunk started at 0: (L, H, 1, D)
    local = undo_rope(keys.float(), torch.arange(tokens), artifact.rope).mean(2, keepdim=True)
    # de-rotating by (p + t) is de-rotating by t, then by p
    turned = undo_rope(
        local.expand(layers, heads, candidates.numel(), dim), candidates, artifact.rope
    )
    score = (turned * mean).sum(dim=(0, 1, 3))
    return int(candidates[int(score.argmax())])
