"""A real KVTC codec for a tiny model shape (1 layer, 1 KV head, 16 channels), for fast
store tests: hand-made bases (no calibration, no model), the real encoder and decoder.

Store tests that need SmolLM2's real KV are in ``test_store.py`` (marked ``model``);
this shape keeps the data-flow tests (queues, faults, replicas, metrics) to seconds.
"""

from __future__ import annotations

import torch

from kvtc_store.codec import CodecArtifact, KVTCCodec, PlanRange, RopeParams, default_groups
from kvtc_store.keys import ChunkNamespace
from kvtc_store.model import ModelInfo

FINGERPRINT = "f" * 64
CHUNK = 16
"""Tokens per chunk in the fast store tests (the smallest the config allows)."""


def tiny_artifact(fingerprint: str = FINGERPRINT, bits: int = 4) -> CodecArtifact:
    """An artifact for a 1-layer, 1-head, 16-channel model: 4 of 16 components at ``bits``
    bits (another ``bits`` is another artifact id: a second codec version)."""
    groups = default_groups(1)
    return CodecArtifact(
        model_fingerprint=fingerprint,
        model_name="tiny",
        kv_shape=(1, 1, 16),
        rope=RopeParams(head_dim=16, theta=1e4),
        groups=groups,
        means=[torch.zeros(16) for _ in groups],
        bases=[torch.eye(16)[:, :4] for _ in groups],
        plan=[PlanRange(g, 0, 4, bits) for g in range(len(groups))],
        target_ratio=8.0,
    )


def tiny_info(fingerprint: str = FINGERPRINT) -> ModelInfo:
    """The tiny model's identity (what ``TieredStore.from_config`` needs)."""
    return ModelInfo("tiny", fingerprint, (1, 1, 16), RopeParams(head_dim=16, theta=1e4))


def tiny_codec() -> KVTCCodec:
    return KVTCCodec(tiny_artifact())


def tiny_namespace(tenant: str = "t") -> ChunkNamespace:
    return ChunkNamespace(FINGERPRINT, "tiny", tenant)


def tiny_sequence(n_chunks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, keys, values)``: ``n_chunks`` chunks of random token ids and KV
    ``(1, 1, n_chunks * CHUNK, 16)``; different seeds give different tokens."""
    g = torch.Generator().manual_seed(seed)
    n = n_chunks * CHUNK
    tokens = torch.randint(0, 50_000, (n,), generator=g)
    keys = torch.randn(1, 1, n, 16, generator=g)
    values = torch.randn(1, 1, n, 16, generator=g)
    return tokens, keys, values


def tiny_blobs(tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> list[bytes]:
    """The blobs a tiny store (tenant ``t``) writes for this sequence, each bound to its
    chunk key (their sizes are what the tiers hold)."""
    from kvtc_store.keys import chunk_keys

    names = chunk_keys(tokens, tiny_namespace(), CHUNK)
    return tiny_codec().encode_sequence(keys, values, chunk_tokens=CHUNK, chunk_keys=names)
