"""Entropy coders, by name, in a registry.

``deflate`` is the portable format: a raw DEFLATE stream (RFC 1951, no zlib header), so
``zlib.decompress(data, -15)`` reads it on any host and nvCOMP's RAW Deflate can too.
It is written with python-isal (ISA-L's fast DEFLATE) when installed, else with zlib;
the streams are interchangeable. ``none`` stores bytes as they are. New coders register
themselves with :func:`register_coder` (nvCOMP's ANS is not one: on the rANS streams it
saves nothing, see benchmarks/results/gpu_codec.md).
"""

from __future__ import annotations

import zlib
from typing import Protocol

from ..errors import BlobCorruptError, BlobFormatError

try:  # ISA-L: same format, several times faster than zlib
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    _isal = None


class EntropyCoder(Protocol):
    """Lossless byte coder. ``decode(encode(x), len(x)) == x``."""

    name: str

    def encode(self, data: bytes) -> bytes:
        """Compress ``data``."""

    def decode(self, data: bytes, raw_size: int) -> bytes:
        """Decompress to exactly ``raw_size`` bytes; raise BlobCorruptError otherwise."""


class DeflateCoder:
    """Raw DEFLATE (wbits = -15), python-isal when installed, else zlib."""

    name = "deflate"

    def __init__(self, level: int = 1):
        self.level = level

    def encode(self, data: bytes) -> bytes:
        if _isal is not None:
            # isal levels are 0..3; map zlib-style levels onto them.
            return _isal.compress(data, min(self.level, 3), wbits=-15)
        c = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    def decode(self, data: bytes, raw_size: int) -> bytes:
        try:
            if _isal is not None:
                out = _isal.decompress(data, wbits=-15)
            else:
                out = zlib.decompress(data, -15)
        except Exception as exc:  # isal raises its own error class
            raise BlobCorruptError(f"DEFLATE stream does not inflate: {exc}") from exc
        if len(out) != raw_size:
            raise BlobCorruptError(f"DEFLATE stream inflated to {len(out)} bytes, not {raw_size}")
        return out


class NoCoder:
    """Identity coder (for measuring the ratio before entropy coding)."""

    name = "none"

    def encode(self, data: bytes) -> bytes:
        return bytes(data)

    def decode(self, data: bytes, raw_size: int) -> bytes:
        if len(data) != raw_size:
            raise BlobCorruptError(f"stored section is {len(data)} bytes, not {raw_size}")
        return bytes(data)


_CODERS: dict[str, EntropyCoder] = {}


def register_coder(coder: EntropyCoder) -> None:
    """Make ``coder`` available under ``coder.name`` (for blobs that name it)."""
    _CODERS[coder.name] = coder


def get_coder(name: str) -> EntropyCoder:
    """The coder registered as ``name``.

    Raises:
        BlobFormatError: no such coder here (e.g. a GPU-only coder on a CPU host).
    """
    try:
        return _CODERS[name]
    except KeyError:
        raise BlobFormatError(
            f"entropy coder {name!r} is not available here (have: {sorted(_CODERS)})"
        ) from None


register_coder(DeflateCoder())
register_coder(NoCoder())
