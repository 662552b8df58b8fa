"""Re-encoding stored chunks with a new codec artifact, in place (issue 19).

A chunk's key names its tokens, not the codec that coded them, so a re-encoded blob
keeps its key: :func:`reencode_blob` decodes a blob of the old artifact (checking that it
is bound to its key), encodes the same KV with the new artifact (same first position,
same exact tail, same dtype, the key's digest in the header) and checks that the new
blob decodes, bound to the key, to the same shape; :func:`reencode_keys` then replaces
the stored blob atomically (:meth:`DiskBackend.replace <kvtc_store.backends.DiskBackend.replace>`:
rename; :meth:`S3Backend.replace <kvtc_store.backends.S3Backend.replace>`: one PUT).

Every chunk is at any moment either its old blob or its new one, both decodable while
the registry holds both artifacts, so a job that crashes midway loses nothing, and a
rerun continues: chunks already in the new artifact are counted ``done`` and left alone
(idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .codec import KVTCCodec
from .codec.blob import ChunkBinding, unpack_blob_header
from .errors import KVTCError

log = logging.getLogger(__name__)

STATUSES = ("reencoded", "done", "other", "missing", "error")
"""What happened to a key: re-encoded now; in the new artifact already; written by a
third artifact (left alone); gone before it was read; an error (left alone)."""


@dataclass
class KeyResult:
    """One key's outcome (``status`` one of :data:`STATUSES`); sizes in bytes (0 where
    nothing was read or written), ``error`` the message of an error."""

    tier: str
    key: str
    status: str
    bytes_before: int = 0
    bytes_after: int = 0
    error: str = ""


def reencode_blob(blob: bytes, key: str, old: KVTCCodec, new: KVTCCodec) -> bytes:
    """The blob of chunk ``key`` re-encoded from codec ``old`` to codec ``new``.

    Raises:
        BlobError: ``blob`` is damaged, not ``old``'s, or not bound to ``key``; or the new
            blob does not decode bound to ``key`` (a bug: nothing is replaced).
        ValueError: the artifacts are for models of different KV shapes.
    """
    header, _ = unpack_blob_header(blob)
    tokens = header.shape[3]
    want = ChunkBinding(key, header.first_position, tokens)
    chunks, error = old.decode_prefix([blob], expect=[want])
    if error is not None:
        raise error
    dec = chunks[0]
    out = new.encode(dec.keys, dec.values, header.first_position, header.exact_tail, key)
    back, error = new.decode_prefix([out], dtype=torch.float32, expect=[want])
    if error is not None:
        raise error
    if tuple(back[0].keys.shape) != tuple(dec.keys.shape):
        raise ValueError(f"re-encoded chunk {key} decodes to another shape")
    return out


def reencode_keys(
    backend, tier: str, keys: list[str], old: KVTCCodec, new: KVTCCodec
) -> list[KeyResult]:
    """Re-encode the chunks ``keys`` of one tier (a disk or S3 backend) in place.

    Args:
        backend: a backend with ``get`` and ``replace`` (disk, S3).
        tier: the tier's label, for the results.
        keys: chunk keys of that tier.
        old, new: codecs of the artifact to replace and of its successor.

    Returns:
        One :class:`KeyResult` per key, in order. Errors of one key (a damaged blob, a
        failed write) are results, never exceptions: that chunk keeps its bytes.
    """
    old_id, new_id = old.artifact.artifact_id, new.artifact.artifact_id
    out = []
    for key, blob in zip(keys, backend.get(keys)):
        if blob is None:
            out.append(KeyResult(tier, key, "missing"))
            continue
        try:
            aid = unpack_blob_header(blob)[0].artifact_id
            if aid != old_id:
                status = "done" if aid == new_id else "other"
                out.append(KeyResult(tier, key, status, len(blob), len(blob)))
                continue
            fresh = reencode_blob(blob, key, old, new)
            replaced = backend.replace([(key, fresh)])[0]
        except (KVTCError, ValueError) as exc:
            log.warning("re-encode of %s in tier %s failed: %s", key, tier, exc)
            out.append(
                KeyResult(tier, key, "error", len(blob), error=f"{type(exc).__name__}: {exc}")
            )
            continue
        out.append(
            KeyResult(
                tier,
                key,
                "reencoded" if replaced else "missing",
                len(blob),
                len(fresh) if replaced else 0,
            )
        )
    return out
