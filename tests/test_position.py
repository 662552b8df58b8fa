"""Reading a chunk's first position from its keys (kvtc_store.codec.position), for callers
that hand the codec chunks without positions (the LMCache serde). Real SmolLM2 chunks are
checked through LMCache in tests/test_lmcache_connector.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtc_store.codec import (
    CodecArtifact,
    PlanRange,
    RopeParams,
    apply_rope,
    default_groups,
    estimate_first_position,
)

L, H, D, T = 2, 2, 16, 32
CANDIDATES = torch.arange(0, 8192, T)


def artifact(seed: int = 0) -> CodecArtifact:
    """A 2-layer artifact whose pre-RoPE key mean is far from zero, as real keys' are."""
    g = torch.Generator().manual_seed(seed)
    groups = default_groups(L)
    p = L * H * D
    means = [
        torch.randn(p, generator=g) * 3 if grp.kind == "k" else torch.zeros(p) for grp in groups
    ]
    return CodecArtifact(
        model_fingerprint="b" * 64,
        model_name="tiny-position",
        kv_shape=(L, H, D),
        rope=RopeParams(head_dim=D, theta=1e4),
        groups=groups,
        means=means,
        bases=[torch.eye(p)[:, :8] for _ in groups],
        plan=[PlanRange(i, 0, 8, 4) for i in range(len(groups))],
        target_ratio=8.0,
    )


def keys_at(art: CodecArtifact, first: int, seed: int = 1) -> torch.Tensor:
    """Keys ``(L, H, T, D)`` drawn around the artifact's pre-RoPE mean, RoPE'd at
    positions ``first .. first + T - 1``."""
    g = torch.Generator().manual_seed(seed)
    mean = art.means[0].view(L, H, 1, D)
    pre = mean + torch.randn(L, H, T, D, generator=g)
    return apply_rope(pre, torch.arange(first, first + T), art.rope)


@pytest.mark.parametrize("first", [0, 32, 256, 4096, 8160])
def test_finds_the_position_the_keys_were_rotated_at(first: int) -> None:
    art = artifact()
    assert estimate_first_position(art, keys_at(art, first), CANDIDATES) == first
    bf16 = keys_at(art, first).to(torch.bfloat16)  # as an engine caches them
    assert estimate_first_position(art, bf16, CANDIDATES) == first


def test_position_free_artifact_takes_the_first_candidate() -> None:
    art = dataclasses.replace(artifact(), undo_rope=False)
    assert estimate_first_position(art, keys_at(art, 256), CANDIDATES) == 0


def test_bad_input_is_refused() -> None:
    art = artifact()
    with pytest.raises(ValueError, match="candidate"):
        estimate_first_position(art, keys_at(art, 0), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        estimate_first_position(art, torch.zeros(L, H + 1, T, D), CANDIDATES)
