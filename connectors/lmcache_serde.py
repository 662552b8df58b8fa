"""LMCache serde ``kvtc``: LMCache's KV chunks in, kvtc-store blobs out.

LMCache 0.5.6 runs a serde around an L2 adapter of its multiprocess storage manager
(``lmcache server``): the store path serialises each L1 object into a byte buffer before
the adapter stores it, the load path deserialises the buffer the adapter filled back into
an L1 object (``lmcache.v1.distributed.serde``; serdes are found by name in the registry
of ``register_serde_factory``). This module registers the name ``kvtc`` on import; LMCache
imports it when an adapter spec names ``kvtc_store.connectors.lmcache`` (see that module),
so an adapter spec selects it with::

    "serde": {"type": "kvtc", "artifact": "/path/to/codec-artifact"}
    "serde": {"type": "kvtc", "config": "/path/to/store.yaml"}   # its codec.artifact
                                                                  # or codec.registry

optionally with ``"device": "cuda"`` (where the transform runs; default the config's
``codec.device``, else ``cpu``), ``"max_workers"`` (serde threads, default 1),
``"chunk_size"`` and ``"max_position"`` (see Positions below).

Layout: an L1 object of LMCache's KV format ``KV_2LTD`` is one tensor
``(2, L, T, H * D)`` (keys then values; layers; tokens; heads times head dim, head-major),
dtype the engine's (bfloat16, float16). The serializer views it as keys and values
``(L, H, T, D)``, encodes them with :meth:`KVTCCodec.encode` into one blob
(docs/blob-format.md) and writes the blob at the start of the byte buffer; the
deserializer reads the blob's own length from its header (:func:`blob_size`), decodes it
and writes ``(2, L, T, H * D)`` in the destination's dtype.

Positions: LMCache's serde API hands a chunk without its token positions, and the codec
undoes RoPE at each token's absolute position. The serializer therefore reads the chunk's
first position from its keys (:func:`~kvtc_store.codec.estimate_first_position`, among the
multiples of ``chunk_size`` below ``max_position``, kwargs defaulting to LMCache's 256 and
131072) and codes the chunk there; the blob records it, so a wrong guess costs ratio and
quality, never correctness. No token is stored exactly as the end of a sequence's recent
window (``exact_tail`` 0): LMCache does not say which chunk ends a sequence.

A blob that does not decode (damaged, foreign, another artifact) raises a
:class:`~kvtc_store.errors.BlobError`; LMCache's serde processor then fails the whole load
task, and the prefetch reports those chunks missing: never wrong KV.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde import (
    AsyncSerdeProcessor,
    Deserializer,
    SerdeProcessor,
    Serializer,
    get_registered_serde_types,
    register_serde_factory,
)
from lmcache.v1.memory_management import MemoryObj

from ..codec import Codec, CodecArtifact, estimate_first_position, make_codec
from ..codec.blob import blob_size
from ..config import artifact_from_config, codec_from_config, load_config
from ..errors import ChunkLayoutError, ConfigError
from ..model import ModelInfo

__all__ = ["SERDE_NAME", "KVTCDeserializer", "KVTCSerializer", "codec_for_serde", "create_serde"]

log = logging.getLogger(__name__)

SERDE_NAME = "kvtc"
"""The name an LMCache adapter spec gives in ``"serde": {"type": ...}``."""

_KWARGS = frozenset({"artifact", "config", "device", "max_workers", "chunk_size", "max_position"})
_HEADER_MARGIN = 4096
"""Bytes allowed for a blob's prefix and header (~300 B in practice)."""


def _kv_dims(shape: torch.Size, codec: Codec) -> tuple[int, int, int, int]:
    """``(L, T, H, D)`` of a ``KV_2LTD`` shape ``(2, L, T, H * D)`` for the codec's model.

    Raises:
        ChunkLayoutError: the shape is not ``(2, L, T, H * D)`` with the codec's L, H, D.
    """
    layers, heads, dim = codec.artifact.kv_shape
    if len(shape) != 4 or shape[0] != 2 or shape[1] != layers or shape[3] != heads * dim:
        raise ChunkLayoutError(
            f"LMCache chunk of shape {tuple(shape)} is not KV_2LTD (2, L, T, H*D) for the "
            f"codec's model (L, H, D) = {(layers, heads, dim)} "
            f"(artifact {codec.artifact.artifact_id})"
        )
    return layers, int(shape[2]), heads, dim


class KVTCSerializer(Serializer):
    """LMCache ``Serializer``: a ``KV_2LTD`` chunk into one KVTC blob.

    Args:
        codec: the codec for the served model.
        candidates: possible first positions of a chunk, ``(N,)`` int64 (default: 0).
    """

    def __init__(self, codec: Codec, candidates: torch.Tensor | None = None) -> None:
        self.codec = codec
        self.candidates = torch.zeros(1, dtype=torch.int64) if candidates is None else candidates

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> int:
        """Encode ``src`` (``(2, L, T, H * D)``, any float dtype) into ``dst``'s bytes, at
        the first position its keys show.

        Returns:
            The blob's length in bytes (LMCache narrows ``dst`` to it).

        Raises:
            ChunkLayoutError: ``src`` is not the codec model's KV_2LTD shape.
            ValueError: the blob is larger than ``dst`` (more than the estimate).
        """
        kv = src.tensor
        if kv is None:
            raise ChunkLayoutError("LMCache handed the kvtc serde an object without a tensor")
        layers, tokens, heads, dim = _kv_dims(kv.shape, self.codec)
        kv = kv.view(2, layers, tokens, heads, dim).transpose(2, 3)  # (2, L, H, T, D)
        first = estimate_first_position(self.codec.artifact, kv[0], self.candidates)
        blob = self.codec.encode(kv[0], kv[1], first_position=first, exact_tail=0)
        out = dst.raw_tensor
        if out is None or out.numel() * out.element_size() < len(blob):
            room = 0 if out is None else out.numel() * out.element_size()
            raise ValueError(
                f"kvtc blob of {len(blob)} bytes does not fit LMCache's {room}-byte buffer"
            )
        out.view(torch.uint8).view(-1)[: len(blob)].copy_(
            torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        )
        return len(blob)

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        """Upper bound of a blob's size: the chunk in bfloat16 (every token stored
        exactly), 1/64 more for a coder that cannot shrink it, and 4 KiB of header."""
        elements = sum(int(torch.Size(s).numel()) for s in layout_desc.shapes)
        return 2 * elements + 2 * elements // 64 + _HEADER_MARGIN


class KVTCDeserializer(Deserializer):
    """LMCache ``Deserializer``: a KVTC blob back into a ``KV_2LTD`` chunk.

    Args:
        codec: the codec for the served model (the one that wrote the blobs).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> None:
        """Decode the blob at the start of ``src``'s bytes into ``dst``
        (``(2, L, T, H * D)``, its own dtype).

        Raises:
            BlobError subclasses: the bytes are no blob, damaged, or another artifact's.
            ChunkLayoutError: the blob's chunk does not have ``dst``'s shape.
        """
        data = src.byte_array
        chunk = bytes(data[: blob_size(data)])
        out = dst.tensor
        if out is None:
            raise ChunkLayoutError("LMCache handed the kvtc serde a buffer without a tensor")
        layers, tokens, heads, dim = _kv_dims(out.shape, self.codec)
        header = self.codec.read_header(chunk)
        if header.shape != [layers, heads, dim, tokens]:
            raise ChunkLayoutError(
                f"blob holds a chunk of (L, H, D, T) = {tuple(header.shape)}, LMCache's "
                f"buffer has room for {(layers, heads, dim, tokens)}"
            )
        decoded = self.codec.decode(chunk, device=out.device, dtype=out.dtype)
        kv = torch.stack([decoded.keys, decoded.values])  # (2, L, H, T, D)
        out.copy_(kv.transpose(2, 3).reshape(out.shape))


def codec_for_serde(kwargs: dict[str, object]) -> Codec:
    """The codec an LMCache serde spec names.

    Args:
        kwargs: the spec without ``type``: ``artifact`` (a codec artifact folder) or
            ``config`` (a store YAML whose ``codec.artifact`` is used, or whose
            ``codec.registry`` profile: a :class:`~kvtc_store.registry.VersionedCodec`
            that encodes with the current artifact and decodes every version), optional
            ``device``; the other keys are read by :func:`create_serde`.

    Raises:
        ConfigError: neither or both of ``artifact`` and ``config``, an unknown key, or a
            config without ``codec.artifact``.
        ArtifactError: the artifact is missing or malformed.
    """
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise ConfigError(
            f"LMCache serde {SERDE_NAME!r}: unknown key(s) {unknown}; known: {sorted(_KWARGS)}"
        )
    artifact, config = kwargs.get("artifact"), kwargs.get("config")
    if (artifact is None) == (config is None):
        raise ConfigError(
            f"LMCache serde {SERDE_NAME!r}: give exactly one of 'artifact' (a codec "
            "artifact folder) or 'config' (a kvtc-store YAML naming codec.artifact)"
        )
    if config is not None:
        cfg = load_config(str(config))
        if cfg.codec.artifact is None and cfg.codec.registry is None:
            raise ConfigError(
                f"{config}: codec.artifact: the LMCache serde needs a saved codec artifact "
                "or a codec.registry"
            )
        device = str(kwargs.get("device", cfg.codec.device))
        if cfg.codec.registry is not None:  # every version the registry holds decodes
            art = artifact_from_config(cfg.codec)
            info = ModelInfo(art.model_name, art.model_fingerprint, art.kv_shape, art.rope)
            return codec_from_config(cfg.codec.model_copy(update={"device": device}), info)
        return make_codec(CodecArtifact.load(cfg.codec.artifact), cfg.codec.coder, device)
    path = Path(os.path.expanduser(str(artifact)))
    return make_codec(CodecArtifact.load(path), device=str(kwargs.get("device", "cpu")))


def _int_kwarg(kwargs: dict[str, object], name: str, default: int) -> int:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"LMCache serde {SERDE_NAME!r}: {name} must be an int >= 1")
    return value


def create_serde(kwargs: dict[str, object]) -> SerdeProcessor:
    """LMCache serde factory for ``kvtc`` (``register_serde_factory``'s signature).

    Raises:
        As :func:`codec_for_serde`; ``ConfigError`` for a ``max_workers``, ``chunk_size``
        or ``max_position`` that is not an int >= 1.
    """
    codec = codec_for_serde(kwargs)
    workers = _int_kwarg(kwargs, "max_workers", 1)
    chunk = _int_kwarg(kwargs, "chunk_size", 256)
    horizon = _int_kwarg(kwargs, "max_position", 131072)
    candidates = torch.arange(0, max(horizon, chunk), chunk, dtype=torch.int64)
    log.info(
        "LMCache serde %s: artifact %s (%s), %s, %d candidate chunk positions",
        SERDE_NAME,
        codec.artifact.artifact_id,
        codec.artifact.model_name,
        codec.device,
        len(candidates),
    )
    serializer = KVTCSerializer(codec, candidates)
    return AsyncSerdeProcessor(serializer, KVTCDeserializer(codec), max_workers=workers)


if SERDE_NAME not in get_registered_serde_types():  # a second import must not raise
    register_serde_factory(SERDE_NAME, create_serde)
