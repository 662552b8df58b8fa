"""Honest byte accounting: bf16 bytes against every stored byte.

Two ratios per method, as kvtc-store reports them:

- chunk ratio (``honest_ratio``): over the "middle" chunks of each context, those with no
  sink position and no token of the last 128 (:func:`.base.middle_chunks`), the steady
  state of a long stored sequence;
- whole-context ratio (``context_ratio``): over every chunk of the context, exact sinks
  and recent window included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVMethod, Roundtrip, bf16_bytes, middle_chunks, roundtrip_many


@dataclass
class ByteCount:
    """Sums of bf16 and stored bytes over the contexts a method round-tripped."""

    chunk_raw: int = 0
    chunk_stored: int = 0
    ctx_raw: int = 0
    ctx_stored: int = 0

    def add(self, rt: Roundtrip, layers: int, heads: int, dim: int, first_position: int = 0):
        """Count one context's round trip (KV shape ``(layers, heads, T, dim)``)."""
        mid = middle_chunks(rt.chunk_tokens, first_position)
        self.chunk_raw += sum(bf16_bytes(layers, heads, rt.chunk_tokens[i], dim) for i in mid)
        self.chunk_stored += sum(rt.chunk_bytes[i] for i in mid)
        self.ctx_raw += bf16_bytes(layers, heads, sum(rt.chunk_tokens), dim)
        self.ctx_stored += rt.stored_bytes

    def add_count(self, other: ByteCount) -> None:
        """Add another count's sums (a genre's into the pooled count)."""
        self.chunk_raw += other.chunk_raw
        self.chunk_stored += other.chunk_stored
        self.ctx_raw += other.ctx_raw
        self.ctx_stored += other.ctx_stored

    @property
    def chunk_ratio(self) -> float | None:
        """bf16 bytes / stored bytes of the middle chunks (None when there were none)."""
        return self.chunk_raw / self.chunk_stored if self.chunk_stored else None

    @property
    def context_ratio(self) -> float | None:
        """bf16 bytes / stored bytes of whole contexts."""
        return self.ctx_raw / self.ctx_stored if self.ctx_stored else None


def roundtrip_counted(
    method: KVMethod | None,
    kvs: list[tuple[torch.Tensor, torch.Tensor]],
    count: ByteCount,
    workers: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Round-trip contexts ``[(keys, values) (L, H, T, D)]`` (each from position 0), add their
    bytes to ``count`` and return the decoded KV; ``method=None`` returns ``kvs`` as they are
    (the exact reference)."""
    if method is None:
        return kvs
    rts = roundtrip_many(method, kvs, workers)
    layers, heads, _, dim = kvs[0][0].shape
    for rt in rts:
        count.add(rt, layers, heads, dim)
    return [(rt.keys, rt.values) for rt in rts]
