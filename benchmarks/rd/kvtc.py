"""Ours: KV Cache Transform Coding through kvtc-store's own codec.

Staniszewski & Łańcucki, "KV Cache Transform Coding for Compact Storage in LLM
Inference", arXiv 2511.01815 (ICLR 2026): RoPE undone on keys, PCA per feature group,
dynamic-programming allocation; kvtc-store's default quantiser codes calibrated steps
with rANS (the paper's min/max + DEFLATE is the ``kvtc-minmax`` ablation). The context is stored exactly as the store
stores a sequence (:meth:`kvtc_store.codec.KVTCCodec.encode_sequence`: 256-token chunks,
positions below 4 and the sequence's last 128 tokens exact in bfloat16) and decoded in
one batch (:meth:`~kvtc_store.codec.KVTCCodec.decode_prefix`). Every blob byte counts:
msgpack header, checksum, scales, exact tokens.

Ablations reuse this class with artifacts calibrated under other
:class:`~kvtc_store.calibration.CalibrationSettings` (see :mod:`.methods`), or with the
``none`` entropy coder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtc_store.codec import KVTCCodec

from .base import KVMethod, Roundtrip


@dataclass
class KVTC(KVMethod):
    """A :class:`~kvtc_store.codec.KVTCCodec` round trip of ``(L, H, T, D)`` KV."""

    codec: KVTCCodec | None = field(default=None, repr=False)
    kind: str = "ours"
    parallel: bool = False

    def window(self) -> int:
        return self.codec.artifact.window

    @torch.no_grad()
    def roundtrip(self, keys, values, first_position=0) -> Roundtrip:
        blobs = self.codec.encode_sequence(
            keys, values, first_position, chunk_tokens=self.chunk_tokens
        )
        chunks, error = self.codec.decode_prefix(blobs, device=keys.device, dtype=keys.dtype)
        if error is not None:
            raise error
        return Roundtrip(
            torch.cat([c.keys for c in chunks], dim=2),
            torch.cat([c.values for c in chunks], dim=2),
            [len(b) for b in blobs],
            [c.keys.shape[2] for c in chunks],
        )

    def facts(self) -> dict:
        """Artifact facts for the row: id, bits per token, parameters stored (every tensor
        element, :meth:`~kvtc_store.codec.CodecArtifact.stored_params`)."""
        art = self.codec.artifact
        return {
            "artifact_id": art.artifact_id,
            "bits_per_token": art.plan_bits_per_token(),
            "artifact_params": art.stored_params(),
        }
