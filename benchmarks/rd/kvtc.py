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
:class:`~kvtc_store.calibration.CalibrationSettings` (see :mod:`.methods`); ``kvtc-nocoder``
is :class:`KVTCFixedWidth` (the same symbols without rANS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvtc_store.codec import KVTCCodec, MixtureCodec
from kvtc_store.codec.blob import unpack_blob_header

from .base import KVMethod, Roundtrip


@dataclass
class KVTC(KVMethod):
    """A :class:`~kvtc_store.codec.KVTCCodec` round trip of ``(L, H, T, D)`` KV."""

    codec: KVTCCodec | None = field(default=None, repr=False)
    kind: str = "ours"
    parallel: bool = False
    exact_window: int | None = None  # tokens kept exact at the end (None: the artifact's)

    def window(self) -> int:
        return self.codec.artifact.window if self.exact_window is None else self.exact_window

    @torch.no_grad()
    def roundtrip(self, keys, values, first_position=0) -> Roundtrip:
        return self._roundtrip_with(self.codec, keys, values, first_position)

    def _roundtrip_with(self, codec, keys, values, first_position) -> Roundtrip:
        """Store and read back the sequence as the store does, with ``codec``."""
        blobs = codec.encode_sequence(
            keys, values, first_position, chunk_tokens=self.chunk_tokens, window=self.window()
        )
        chunks, error = codec.decode_prefix(blobs, device=keys.device, dtype=keys.dtype)
        if error is not None:
            raise error
        return Roundtrip(
            torch.cat([c.keys for c in chunks], dim=2),
            torch.cat([c.values for c in chunks], dim=2),
            [self.stored_bytes(b) for b in blobs],
            [c.keys.shape[2] for c in chunks],
        )

    def stored_bytes(self, blob: bytes) -> int:
        """Bytes one chunk takes: the whole blob."""
        return len(blob)

    def facts(self) -> dict:
        """Artifact facts for the row: id, bits per token, parameters stored (every tensor
        element, :meth:`~kvtc_store.codec.CodecArtifact.stored_params`)."""
        art = self.codec.artifact
        return {
            "artifact_id": art.artifact_id,
            "bits_per_token": art.plan_bits_per_token(),
            "artifact_params": art.stored_params(),
            "exact_dtype": self.codec.exact_dtype,
            "exact_window": self.window(),
            "rate_control": self.codec.rate is not None,
            "corpus": art.calibration.get("corpus"),
            "calibration_windows": (art.calibration.get("settings") or {}).get("windows"),
        }


def fixed_width_bytes(symbols: np.ndarray) -> int:
    """Bytes of ``(components, tokens)`` integer symbols bit-packed without an entropy
    coder: per component its minimum (int16, 2 bytes), its width (1 byte) and
    ``ceil(tokens * width / 8)`` bytes of ``symbol - minimum`` in ``width`` bits, the
    width being what the component's range in this chunk needs (0 when constant)."""
    if symbols.shape[1] == 0:
        return 0
    span = symbols.max(axis=1).astype(np.int64) - symbols.min(axis=1) + 1
    width = np.ceil(np.log2(span)).astype(np.int64)
    return int((3 + (symbols.shape[1] * width + 7) // 8).sum())


@dataclass
class KVTCFixedWidth(KVTC):
    """Ablation "without entropy coding" of the ``rans`` quantiser: the same symbols
    (so the same decoded KV and quality as :class:`KVTC` with this artifact), counted as
    if bit-packed at fixed width per component and chunk (:func:`fixed_width_bytes`)
    instead of rANS-coded; every other blob byte (header, checksum, exact tokens) as
    stored. The header's section sizes would differ by a few bytes; not counted."""

    kind: str = "ablation"

    def stored_bytes(self, blob: bytes) -> int:
        header, _ = unpack_blob_header(blob)
        stream = header.sections.get("stream", 0)
        return len(blob) - stream + fixed_width_bytes(self.codec.decode_symbols(blob))


@dataclass
class KVTCMixture(KVTC):
    """Per-chunk choice among several calibrations of one target ratio, through the
    store's :class:`~kvtc_store.codec.MixtureCodec`: every chunk is encoded by each codec
    and stored as the blob whose decode is nearest the chunk (the sum over K and V of the
    squared error over the chunk's energy), then the stored blobs are decoded as the store
    decodes them (each by the artifact its header names). ``codec`` is the first (the
    default calibration); ``others`` the specialists; ``chosen`` the chunks each codec
    was chosen for since the last reset."""

    others: list = field(default_factory=list, repr=False)
    mixture: MixtureCodec | None = field(default=None, repr=False)
    _since: list = field(default_factory=list, init=False, repr=False)

    def _mixture(self) -> MixtureCodec:
        codecs = [self.codec, *self.others]
        if self.mixture is None or self.mixture.members != codecs:
            self.mixture = MixtureCodec(codecs)
        return self.mixture

    @property
    def chosen(self) -> list[int]:
        """Chunks encoded with each codec (``codec`` first), over the round trips since
        the last reset."""
        now = self._mixture().chosen
        return [n - s for n, s in zip(now, self._since or [0] * len(now))]

    @chosen.setter
    def chosen(self, value: list) -> None:
        """``chosen = []`` resets the tally (the benchmark does, per genre)."""
        if list(value):
            raise ValueError("chosen can only be reset (set to [])")
        self._since = self._mixture().chosen

    @torch.no_grad()
    def roundtrip(self, keys, values, first_position=0) -> Roundtrip:
        return self._roundtrip_with(self._mixture(), keys, values, first_position)

    def facts(self) -> dict:
        facts = super().facts()
        facts["mixture_artifacts"] = [c.artifact.artifact_id for c in [self.codec, *self.others]]
        facts["mixture_corpora"] = [
            c.artifact.calibration.get("corpus") for c in [self.codec, *self.others]
        ]
        facts["mixture_chunks_chosen"] = list(self.chosen)
        return facts
