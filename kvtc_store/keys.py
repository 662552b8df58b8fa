"""Chunk keys: a SHA-256 chain over a token sequence, one key per chunk.

DESIGN.md, "Chunk keys"::

    key_0 = ROOT = sha256(b"kvtc-store/v1")
    key_i = sha256(key_{i-1} ‖ namespace ‖ token ids of chunk i as 4-byte LE uint32)

``key_{i-1}`` enters as its 32 raw digest bytes; keys are returned as 64-char
lowercase hex (the form every backend takes). Because each key hashes its
predecessor, a key names the whole prefix up to the end of its chunk, not just
the chunk's own tokens: equal prefixes give equal keys, so processes, replicas
and engines (vLLM and SGLang replicas of one model) share chunks with no
coordination, and one changed token changes its chunk's key and every later
one. The namespace (model fingerprint, KV layout, tenant salt) enters every
link, so different models, layouts or tenants never share a chunk. The codec
version is in the blob, not the key, so a new codec does not empty the cache.

A tenant's keys end in its tag (:func:`tenant_tag`, 8 hex digits) after the 64-digit
link digest, so an operator can count, evict or clear one tenant's chunks in a shared
tier (``kvtc-store stats``, ``kvtc-store admin``) without an index beside the chunks;
the shared namespace (tenant ``""``) has plain 64-digit keys. The tag is a label, not
the isolation: tenants are kept apart by the namespace inside every link.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["ROOT_KEY", "ChunkNamespace", "TokenIds", "chunk_keys", "key_tenant_tag", "tenant_tag"]

ROOT_KEY: bytes = hashlib.sha256(b"kvtc-store/v1").digest()
"""The chain's fixed starting point (32 raw bytes)."""

_NAMESPACE_TAG = b"kvtc-ns/v1"
_MAX_TOKEN_ID = 2**32 - 1

TENANT_TAG_DIGITS = 8
"""Hex digits of a tenant's tag at the end of its chunk keys."""


def tenant_tag(tenant: str) -> str:
    """The tag that ends every chunk key of ``tenant``: BLAKE2b of its UTF-8 bytes,
    4 bytes, as 8 lowercase hex digits; ``""`` for the shared namespace (tenant ``""``).

    Raises:
        TypeError: ``tenant`` is not a ``str``.
    """
    if not isinstance(tenant, str):
        raise TypeError(f"tenant must be a str, got {type(tenant).__name__}")
    if not tenant:
        return ""
    return hashlib.blake2b(tenant.encode("utf-8"), digest_size=TENANT_TAG_DIGITS // 2).hexdigest()


def key_tenant_tag(key: str) -> str:
    """The tenant tag a chunk key ends with (:func:`tenant_tag`), ``""`` for a key of the
    shared namespace (64 hex digits) or a key the store did not make (another length)."""
    return key[64:] if len(key) == 64 + TENANT_TAG_DIGITS else ""


TokenIds = Union[Sequence[int], np.ndarray, "torch.Tensor"]
"""Token ids: a sequence of ints, a 1-D integer numpy array or a 1-D integer tensor."""


@dataclass(frozen=True)
class ChunkNamespace:
    """What, besides the tokens, decides whether two chunks are interchangeable.

    Attributes:
        model_fingerprint: Identifies the model weights (e.g. a hash of the
            checkpoint); chunks of different models never collide.
        kv_layout: The KV layout of the writer, e.g. ``"tp0of2/bf16"`` (TP
            rank and size, dtype); layouts never share chunks.
        tenant: Tenant salt; ``""`` is the shared namespace. Different tenants
            never see each other's chunks.
        salt: Per-request isolation within the tenant (a serving engine's cache salt,
            a LoRA adapter's identity): requests of different salts never share a
            chunk. ``""`` (none) leaves the key encoding as it was before the field.

    Raises:
        TypeError: a field is not a ``str``.
    """

    model_fingerprint: str
    kv_layout: str
    tenant: str = ""
    salt: str = ""

    def __post_init__(self) -> None:
        for field in ("model_fingerprint", "kv_layout", "tenant", "salt"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"ChunkNamespace.{field} must be a str, got {type(value).__name__}")

    def to_bytes(self) -> bytes:
        """Encode the namespace stably and unambiguously.

        ``b"kvtc-ns/v1"`` then each field as a 4-byte little-endian length and
        its UTF-8 bytes, in field order. Length prefixes make the encoding
        self-delimiting: ``("ab", "c")`` and ``("a", "bc")`` differ, and the
        token bytes that follow in the chain cannot be confused with a field.
        A non-empty ``salt`` follows as ``b"salt"`` and a fourth such field (so every
        key without one is what it was; a salted link hashes more bytes, so it never
        equals an unsalted one).
        """
        parts = [_NAMESPACE_TAG]
        fields = [(b"", self.model_fingerprint), (b"", self.kv_layout), (b"", self.tenant)]
        for tag, value in fields + ([(b"salt", self.salt)] if self.salt else []):
            raw = value.encode("utf-8")
            parts += [tag, struct.pack("<I", len(raw)), raw]
        return b"".join(parts)


def _token_bytes(token_ids: TokenIds) -> bytes:
    """Token ids as one little-endian uint32 byte string (vectorised, no Python loop).

    Raises:
        ValueError: not 1-D, not integers, or an id outside ``[0, 2**32)``.
    """
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # torch.Tensor
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > _MAX_TOKEN_ID:
        raise ValueError(f"token ids must be in [0, 2**32), got min {lo}, max {hi}")
    return arr.astype("<u4", copy=False).tobytes()


def chunk_keys(
    token_ids: TokenIds,
    namespace: ChunkNamespace,
    chunk_tokens: int = 256,
    include_partial: bool = False,
) -> list[str]:
    """Return the hex key of each chunk of ``token_ids``, in order.

    Chunk ``i`` covers tokens ``[i*chunk_tokens, (i+1)*chunk_tokens)``. Its key
    is ``sha256(key_{i-1} ‖ namespace.to_bytes() ‖ tokens as <u4)`` with
    ``key_{-1} = ROOT_KEY`` (see the module docstring). Properties the store
    relies on: the keys of a prefix are a prefix of the keys; equal inputs give
    equal keys in any process; a different namespace gives disjoint keys.

    Args:
        token_ids: 1-D token ids (list of ints, numpy integer array, or integer
            ``torch.Tensor`` on any device), each in ``[0, 2**32)``.
        namespace: Model, KV layout and tenant the chunks belong to.
        chunk_tokens: Tokens per chunk (default 256, LMCache's default).
        include_partial: Also key the trailing chunk of fewer than
            ``chunk_tokens`` tokens, if any. Its key differs from the key the
            full chunk will have once the sequence grows.

    Returns:
        One 64-character lowercase hex digest per chunk (``len // chunk_tokens``
        of them, plus one if ``include_partial`` and a remainder exists), followed by
        the namespace's :func:`tenant_tag` (8 more hex digits) for a non-empty tenant.

    Raises:
        ValueError: bad token ids (not 1-D integers in ``[0, 2**32)``), or
            ``chunk_tokens`` not a positive int.
        TypeError: ``namespace`` is not a :class:`ChunkNamespace`.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if not isinstance(namespace, ChunkNamespace):
        raise TypeError(f"namespace must be a ChunkNamespace, got {type(namespace).__name__}")
    data = memoryview(_token_bytes(token_ids))
    ns = namespace.to_bytes()
    n_tokens = len(data) // 4
    n_chunks = n_tokens // chunk_tokens
    if include_partial and n_tokens % chunk_tokens:
        n_chunks += 1
    step = 4 * chunk_tokens
    prev = ROOT_KEY
    tag = tenant_tag(namespace.tenant)
    keys: list[str] = []
    for i in range(n_chunks):
        h = hashlib.sha256(prev)
        h.update(ns)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        keys.append(h.hexdigest() + tag)
    return keys
