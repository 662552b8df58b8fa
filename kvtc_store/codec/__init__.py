"""KV Cache Transform Coding (Staniszewski & Łańcucki, arXiv 2511.01815, ICLR 2026).

The codec knows tensors and bytes only, never storage. Public API:

- :class:`CalibrationStats`, :func:`fit_artifacts`: calibrate from real KV.
- :class:`CodecArtifact`: the calibrated codec, saved as safetensors + JSON manifest.
- :class:`Codec` (the protocol: ``encode_batch``, ``decode_batch(out=)``), its CPU
  reference :class:`KVTCCodec` and the batched CUDA codec (:mod:`.gpu`);
  :func:`make_codec` picks one; :class:`MixtureCodec` chooses among codecs of several
  calibrations per chunk.
- :class:`ChunkKV`: a batch of chunks in a contiguous cache or an engine's pages.
- :mod:`.format`: the blob header, spans and dtypes.
"""

from .artifact import CodecArtifact, FeatureGroup, PlanRange
from .calibrate import (
    CalibrationStats,
    PCAFit,
    fit_artifacts,
    fit_pca,
    measure_error,
    plan_bits,
)
from .codec import KVTCCodec
from .entropy import get_coder, register_coder
from .factory import make_codec
from .features import default_groups
from .layout import ChunkKV
from .mixture import MixtureCodec
from .position import estimate_first_position
from .protocol import ChunkBatch, Codec, DecodedBatch, DecodedChunk
from .rope import RopeParams, apply_rope, undo_rope

__all__ = [
    "CalibrationStats",
    "ChunkBatch",
    "ChunkKV",
    "Codec",
    "CodecArtifact",
    "DecodedBatch",
    "DecodedChunk",
    "FeatureGroup",
    "KVTCCodec",
    "MixtureCodec",
    "PCAFit",
    "PlanRange",
    "RopeParams",
    "apply_rope",
    "default_groups",
    "estimate_first_position",
    "fit_artifacts",
    "fit_pca",
    "get_coder",
    "make_codec",
    "measure_error",
    "plan_bits",
    "register_coder",
    "undo_rope",
]
