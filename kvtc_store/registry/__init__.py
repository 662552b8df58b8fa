"""Codec versions: a registry of immutable KVTC artifacts on a folder or an S3 prefix,
a ``current`` pointer per (model, profile) moved by compare-and-swap, its append-only
history, and a codec that follows a profile (docs/registry.md).

- :func:`open_registry`, :class:`CodecRegistry`: publish, list, pull, promote, roll back.
- :class:`VersionedCodec`: encode with a profile's current artifact, decode any artifact
  the registry holds (what a store built from ``codec.registry`` uses).
"""

from .registry import CodecRegistry, Move, default_actor, open_registry
from .storage import FolderStorage, S3Storage, Storage
from .versioned import VersionedCodec

__all__ = [
    "CodecRegistry",
    "FolderStorage",
    "Move",
    "S3Storage",
    "Storage",
    "VersionedCodec",
    "default_actor",
    "open_registry",
]
