"""KV Cache Transform Coding (Staniszewski & Łańcucki, arXiv 2511.01815, ICLR 2026).

The codec knows tensors and bytes only, never storage. Public API:

- :class:`CalibrationStats`, :func:`fit_artifacts`: calibrate from real KV.
- :class:`CodecArtifact`: the calibrated codec, saved as safetensors + JSON manifest.
- :class:`KVTCCodec`: encode/decode chunks to/from blobs.
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
from .codec import DecodedChunk, KVTCCodec
from .entropy import get_coder, register_coder
from .features import default_groups
from .position import estimate_first_position
from .rope import RopeParams, apply_rope, undo_rope

__all__ = [
    "CalibrationStats",
    "CodecArtifact",
    "DecodedChunk",
    "FeatureGroup",
    "KVTCCodec",
    "PCAFit",
    "PlanRange",
    "RopeParams",
    "apply_rope",
    "default_groups",
    "estimate_first_position",
    "fit_artifacts",
    "fit_pca",
    "get_coder",
    "measure_error",
    "plan_bits",
    "register_coder",
    "undo_rope",
]
