"""The blob format in one place: header, prefix, checksums, token spans and dtypes.

Both codecs (the CPU reference :class:`~kvtc_store.codec.KVTCCodec` and the batched GPU
codec) read and write blobs through this module and import nothing from each other. A
blob is one compressed chunk, self-describing and versioned.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"KVTC"
    4       2     format version (uint16), currently 2 (1 is still read)
    6       4     header length H (uint32)
    10      8     xxh64 of the header bytes (uint64)
    18      H     header: a msgpack map (never pickle), see :class:`BlobHeader`
    18+H    P     payload: the entropy-coded concatenation of the sections

The header names the coder, the codec artifact and model fingerprint, the KV shape and
dtype, the first absolute position, which tokens are stored exactly, the raw length of
each section and the xxh64 of the payload. See docs/blob-format.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import msgpack
import numpy as np
import torch
import xxhash

from ..errors import (
    BlobCorruptError,
    BlobError,
    BlobFormatError,
    BlobMisfiledError,
    BlobTruncatedError,
    CodecMismatchError,
)
from .artifact import CodecArtifact
from .exact import EXACT_DTYPES
from .rate import STEP_EXP_MAX, STEP_EXP_MIN

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "JOIN_UNLOCKED_MIN",
    "MAGIC",
    "PAYLOAD_CHECKSUM_MISMATCH",
    "READ_VERSIONS",
    "BlobHeader",
    "ChunkBinding",
    "blob_header",
    "blob_size",
    "bound_prefix",
    "check_binding",
    "check_header",
    "chunk_digest",
    "compressed_span",
    "host_blob",
    "is_device_blob",
    "join_bytes",
    "pack_blob",
    "pack_blob_parts",
    "payload_checksum",
    "payload_intact",
    "typical_header_bytes",
    "unpack_blob",
    "unpack_blob_header",
    "verify_payload",
]

MAGIC = b"KVTC"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 2 added step_exp and float8 exact tokens
_PREFIX = struct.Struct("<4sHIQ")
PAYLOAD_CHECKSUM_MISMATCH = "blob payload checksum mismatch"

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The header's ``dtype`` names and the torch dtypes decoders return by default."""


@dataclass
class BlobHeader:
    """Header fields of a blob.

    Attributes:
        artifact_id: content id of the codec artifact that wrote it.
        artifact_version: registry version of that artifact.
        model: model fingerprint (hex).
        shape: ``[layers, kv_heads, head_dim, tokens]``.
        dtype: dtype name of the encoder's input (decode returns it by default).
        first_position: absolute position of the chunk's first token.
        n_sink: tokens at positions below this are stored exactly.
        exact_tail: the chunk's last ``exact_tail`` tokens are stored exactly.
        exact_dtype: encoding of the exactly stored tokens, ``bfloat16`` or
            ``float8_e4m3fn`` (:mod:`~kvtc_store.codec.exact`).
        coder: entropy coder name (``deflate``, ``none``, ...).
        sections: raw byte length of each section, in payload order
            (``scales``, ``codes``, ``exact``).
        payload_len: bytes of the coded payload.
        payload_xxh64: checksum of the coded payload.
        step_exp: the chunk's rate-control step exponent: every coded component's step
            is the calibrated one times ``2 ** (step_exp / 8)``
            (:mod:`~kvtc_store.codec.rate`); 0 in blobs of format version 1.
        key_digest: :func:`chunk_digest` of the chunk key the blob was written for
            (32 hex digits), binding it to its chunk; ``""`` in blobs written before the
            field existed (those are bound by ``first_position`` and token count only,
            see :func:`check_binding`).
    """

    artifact_id: str
    artifact_version: int
    model: str
    shape: list[int]
    dtype: str
    first_position: int
    n_sink: int
    exact_tail: int
    exact_dtype: str
    coder: str
    sections: dict[str, int] = field(default_factory=dict)
    payload_len: int = 0
    payload_xxh64: int = 0
    step_exp: int = 0
    key_digest: str = ""


_FIELD_TYPES = {
    "artifact_id": str,
    "artifact_version": int,
    "model": str,
    "shape": list,
    "dtype": str,
    "first_position": int,
    "n_sink": int,
    "exact_tail": int,
    "exact_dtype": str,
    "coder": str,
    "sections": dict,
    "payload_len": int,
    "payload_xxh64": int,
    "step_exp": int,
    "key_digest": str,
}


def _check_types(header: BlobHeader) -> None:
    """Raise BlobCorruptError unless every header field has its type (a foreign or buggy
    writer can produce a header whose checksum is right and whose content is not)."""
    for name, typ in _FIELD_TYPES.items():
        value = getattr(header, name)
        if type(value) is typ:  # the common case, msgpack's own types: no isinstance walk
            continue
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise BlobCorruptError(f"blob header field {name!r} has type {type(value).__name__}")
    if len(header.shape) != 4 or not all(isinstance(x, int) and x >= 0 for x in header.shape):
        raise BlobCorruptError(f"blob header shape {header.shape!r} is malformed")
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in header.sections.items()):
        raise BlobCorruptError("blob header sections are malformed")
    if not STEP_EXP_MIN <= header.step_exp <= STEP_EXP_MAX:
        raise BlobCorruptError(f"blob header step_exp {header.step_exp} is out of range")
    if header.exact_dtype not in EXACT_DTYPES:
        raise BlobCorruptError(f"blob header exact_dtype {header.exact_dtype!r} is unknown")


def chunk_digest(key: str) -> str:
    """The digest of a chunk key a blob header carries (``key_digest``): BLAKE2b of the
    key's UTF-8 bytes, 16 bytes, as 32 hex digits. Keys are content addresses already;
    the digest only has to tell one key from another, not resist a forger who can write
    the store's folder (such a writer can write any bytes)."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ChunkBinding:
    """What a reader expects of the blob it fetched for a chunk.

    Attributes:
        key: the chunk key the blob was fetched under.
        first_position: absolute position of the chunk's token 0.
        tokens: tokens in the chunk.
    """

    key: str
    first_position: int
    tokens: int


def check_binding(header: BlobHeader, want: ChunkBinding) -> None:
    """Check that a blob's header was written for the chunk ``want`` names.

    The first position and token count are always compared; the key digest when the blob
    has one (a blob written before ``key_digest`` existed is accepted on position and
    length alone, as a re-encode job rewrites it with the digest).

    Raises:
        BlobMisfiledError: the blob belongs to another chunk (copied or misfiled under
            this key), or to another position or length.
    """
    if header.first_position != want.first_position or header.shape[3] != want.tokens:
        raise BlobMisfiledError(
            f"blob under key {want.key[:12]} holds tokens at {header.first_position} "
            f"(+{header.shape[3]}), expected {want.first_position} (+{want.tokens})"
        )
    if header.key_digest and header.key_digest != chunk_digest(want.key):
        raise BlobMisfiledError(
            f"blob under key {want.key[:12]} was written for another chunk "
            f"(key digest {header.key_digest[:12]})"
        )


def pack_blob(header: BlobHeader, payload: bytes) -> bytes:
    """Serialise a blob; fills ``payload_len`` and ``payload_xxh64`` from ``payload``."""
    return pack_blob_parts(header, [payload])


def payload_checksum(parts: Sequence[bytes | memoryview]) -> int:
    """xxh64 of the concatenation of ``parts`` (bytes-like), without joining them; the
    hash releases the GIL, so callers may run it on threads."""
    h = xxhash.xxh64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def pack_blob_parts(
    header: BlobHeader, parts: Sequence[bytes | memoryview], checksum: int | None = None
) -> bytes:
    """:func:`pack_blob` of the payload that is the concatenation of ``parts``, built with
    one copy of each part.

    Args:
        header: filled in place (``payload_len``, ``payload_xxh64``).
        parts: bytes-like pieces of the payload, in order.
        checksum: :func:`payload_checksum` of ``parts`` if already computed.

    Returns:
        The blob's bytes.
    """
    header.payload_len = sum(memoryview(p).nbytes for p in parts)
    header.payload_xxh64 = payload_checksum(parts) if checksum is None else checksum
    hb = msgpack.packb(asdict(header), use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb), xxhash.xxh64_intdigest(hb))
    return join_bytes([prefix, hb, *parts])


JOIN_UNLOCKED_MIN = 1 << 20  # joins of at least this many bytes copy without the GIL


def _uninitialised_bytes():
    """CPython's ``PyBytes_FromStringAndSize(NULL, n)`` (a new ``bytes`` of ``n`` bytes,
    contents undefined) through a private ctypes prototype (the shared
    ``ctypes.pythonapi`` attribute's ``restype`` is left to whoever else uses it), or
    None where there is no such C API."""
    try:
        proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)
        return proto(("PyBytes_FromStringAndSize", ctypes.pythonapi))
    except (AttributeError, TypeError):
        return None


_new_bytes = _uninitialised_bytes()


def join_bytes(parts: Sequence[bytes | memoryview]) -> bytes:
    """``b"".join(parts)`` whose copies run without the GIL, so that several threads
    build large ``bytes`` at once (the batched GPU encoder builds its blobs so).

    What a new blob of a few MB costs is the first touch of its memory (page faults);
    ``b"".join`` releases the GIL only when every part is a ``bytes``, and with a
    memoryview among them (a view of a download buffer) it copies, page faults and all,
    holding it. Here the new object comes uninitialised from CPython's C API
    (``PyBytes_FromStringAndSize(NULL, n)``, meant for callers that fill the object
    before anyone else sees it, as this function does) and each part is copied into it
    with ``ctypes.memmove``, a foreign call that releases the GIL. As with any copy made
    without the GIL, a mutable part (a bytearray, a writable array) must not be written
    by another thread meanwhile.

    Args:
        parts: C-contiguous bytes-like objects (``bytes``, ``memoryview``, numpy arrays).

    Returns:
        A new ``bytes`` of the parts' concatenation (``b"".join`` itself below
        :data:`JOIN_UNLOCKED_MIN` bytes, or where that C API is missing).

    Raises:
        BufferError: a part that is not C-contiguous.

    Source: Python/C API reference, "Bytes Objects" (``PyBytes_FromStringAndSize``);
    ``ctypes`` documentation (foreign functions release the GIL while they run).
    """
    views = [memoryview(p) for p in parts]
    if not all(v.c_contiguous for v in views):
        raise BufferError("join_bytes: a part is not C-contiguous")
    total = sum(v.nbytes for v in views)
    if _new_bytes is None or total < JOIN_UNLOCKED_MIN:
        return b"".join(views)
    out = _new_bytes(None, total)
    at = np.frombuffer(out, dtype=np.uint8).ctypes.data
    for v in views:
        if v.nbytes:
            ctypes.memmove(at, np.frombuffer(v, dtype=np.uint8).ctypes.data, v.nbytes)
            at += v.nbytes
    return out


def _read_header(mv: memoryview) -> tuple[BlobHeader, int]:
    """Parse and verify the prefix and header at the start of ``mv``; return the header
    and the payload's offset. Raises as :func:`unpack_blob` does for those parts."""
    if len(mv) < len(MAGIC) or bytes(mv[:4]) != MAGIC:
        if MAGIC.startswith(bytes(mv[:4])) and len(mv) < 4:
            raise BlobTruncatedError(f"blob of {len(mv)} bytes ends inside the magic")
        raise BlobFormatError("not a kvtc blob (bad magic)")
    if len(mv) < _PREFIX.size:
        raise BlobTruncatedError(f"blob of {len(mv)} bytes ends inside the prefix")
    _, version, hlen, hsum = _PREFIX.unpack_from(mv, 0)
    if version not in READ_VERSIONS:
        raise BlobFormatError(
            f"blob format version {version} is not supported (reads {READ_VERSIONS})"
        )
    end = _PREFIX.size + hlen
    if len(mv) < end:
        raise BlobTruncatedError(f"blob of {len(mv)} bytes ends inside its {hlen}-byte header")
    hb = mv[_PREFIX.size : end]
    if xxhash.xxh64_intdigest(hb) != hsum:
        raise BlobCorruptError("blob header checksum mismatch")
    try:
        header = BlobHeader(**msgpack.unpackb(hb, raw=False))
    except Exception as exc:
        raise BlobCorruptError(f"blob header does not parse: {exc}") from exc
    _check_types(header)
    if header.payload_len < 0:
        raise BlobCorruptError(f"blob header payload_len {header.payload_len} is negative")
    return header, end


def blob_size(buffer: bytes | bytearray | memoryview) -> int:
    """Length in bytes of the blob at the start of ``buffer`` (which may hold more).

    For containers that hand a blob back in a fixed-size buffer (LMCache's serde buffers):
    the prefix and header are read and their checksum verified; the payload is not
    checked here (:func:`unpack_blob` does that on ``buffer[:blob_size(buffer)]``).

    Raises:
        BlobFormatError: not a kvtc blob, or an unknown format version.
        BlobTruncatedError: the buffer ends inside the prefix or the header.
        BlobCorruptError: the header's checksum or content is wrong.
    """
    header, end = _read_header(memoryview(buffer))
    return end + header.payload_len


def unpack_blob(blob: bytes) -> tuple[BlobHeader, memoryview]:
    """Parse and verify a blob.

    Returns:
        ``(header, payload)``, the payload still entropy-coded, checksum verified.

    Raises:
        BlobFormatError: not a kvtc blob, or an unknown format version.
        BlobTruncatedError: fewer bytes than the prefix, header or payload need.
        BlobCorruptError: a checksum mismatch, a malformed header, or trailing bytes.
    """
    header, payload = unpack_blob_header(host_blob(blob))
    verify_payload(header, payload)
    return header, payload


def unpack_blob_header(blob: bytes) -> tuple[BlobHeader, memoryview]:
    """:func:`unpack_blob` without the payload checksum, which the caller verifies with
    :func:`verify_payload` or :func:`payload_intact` (a batched decoder hashes payloads in
    parallel, while the device works). Everything else is checked, in the same order.

    Returns:
        ``(header, payload)``: the payload (a view of ``blob``; of a device blob,
        :func:`is_device_blob`, a uint8 device tensor) not yet verified.

    Raises:
        As :func:`unpack_blob`, except the payload checksum.
    """
    if is_device_blob(blob):
        header, end = _device_header(blob)
        return header, blob.data[end:]
    mv = memoryview(blob)
    header, end = _read_header(mv)
    _check_length(header, len(mv) - end)
    return header, mv[end:]


def _check_length(header: BlobHeader, payload_bytes: int) -> None:
    if payload_bytes < header.payload_len:
        raise BlobTruncatedError(
            f"payload is {payload_bytes} bytes, header says {header.payload_len}"
        )
    if payload_bytes > header.payload_len:
        raise BlobCorruptError(f"{payload_bytes - header.payload_len} trailing bytes after payload")


# -- blobs held in device memory ------------------------------------------------------------


def is_device_blob(blob) -> bool:
    """Whether ``blob`` is a blob in device memory: an object with ``data`` (a 1-D uint8
    tensor, the whole blob) and ``head`` (bytes: a host copy of its first bytes, at least
    the prefix and header when they fit), as a GPU tier hands them out
    (:class:`kvtc_store.backends.DeviceBlob`). Such a blob reaches the GPU codec with no
    host round trip; every other reader gets its bytes (:func:`host_blob`)."""
    return isinstance(getattr(blob, "data", None), torch.Tensor) and hasattr(blob, "head")


def host_blob(blob):
    """``blob`` as bytes-like host memory (a device blob is copied to the host)."""
    if is_device_blob(blob):
        return memoryview(blob.data.cpu().numpy())
    return blob


def _device_header(blob) -> tuple[BlobHeader, int]:
    """Header and payload offset of a device blob, read from its host ``head`` (the
    whole blob copied to the host only where the head is too short for the header)."""
    total = int(blob.data.numel())
    try:
        header, end = _read_header(memoryview(blob.head))
    except BlobTruncatedError:
        if len(blob.head) >= total:
            raise
        header, end = _read_header(memoryview(host_blob(blob)))
    _check_length(header, total - end)
    return header, end


def payload_intact(header: BlobHeader, payload) -> bool:
    """Whether ``payload`` (bytes-like) has the header's xxh64. Releases the GIL while it
    hashes (python-xxhash), so several threads hash at once."""
    return xxhash.xxh64_intdigest(payload) == header.payload_xxh64


def verify_payload(header: BlobHeader, payload) -> None:
    """Raise :class:`BlobCorruptError` unless :func:`payload_intact`."""
    if not payload_intact(header, payload):
        raise BlobCorruptError(PAYLOAD_CHECKSUM_MISMATCH)


# -- what a codec writes into and checks against a header ---------------------------------


def compressed_span(
    artifact: CodecArtifact, tokens: int, first_position: int, exact_tail: int
) -> tuple[int, int]:
    """The transform-coded token range ``(a, b)`` of a chunk.

    Args:
        artifact: the codec artifact (its ``n_sink``).
        tokens: tokens in the chunk.
        first_position: absolute position of its token 0.
        exact_tail: trailing tokens stored exactly.

    Returns:
        ``(a, b)``: tokens ``[a, b)`` are transform-coded; ``[0, a)`` (sink tokens:
        absolute positions below the artifact's ``n_sink``) and ``[b, tokens)`` (the
        exact tail) are stored exactly. Both exact parts are contiguous.
    """
    a = min(tokens, max(0, artifact.n_sink - first_position))
    b = max(a, tokens - max(0, exact_tail))
    return a, b


def blob_header(
    artifact: CodecArtifact,
    tokens: int,
    dtype: torch.dtype,
    first_position: int,
    exact_tail: int,
    coder: str,
    sections: dict[str, int],
    step_exp: int = 0,
    chunk_key: str | None = None,
    exact_dtype: str = "bfloat16",
) -> BlobHeader:
    """The header of a blob ``artifact`` writes for a chunk of ``tokens`` tokens whose input
    had ``dtype``; ``sections`` are the raw section lengths in bytes (the payload length
    and checksum are filled by :func:`pack_blob`); ``step_exp`` the chunk's rate-control
    exponent; ``chunk_key``, the key it is stored under, goes in as its digest (none: an
    unbound blob); ``exact_dtype`` the exact tokens' encoding."""
    layers, heads, dim = artifact.kv_shape
    return BlobHeader(
        artifact_id=artifact.artifact_id,
        artifact_version=artifact.version,
        model=artifact.model_fingerprint,
        shape=[layers, heads, dim, int(tokens)],
        dtype=str(dtype).removeprefix("torch."),
        first_position=int(first_position),
        n_sink=artifact.n_sink,
        exact_tail=int(exact_tail),
        exact_dtype=exact_dtype,
        coder=coder,
        sections=sections,
        step_exp=int(step_exp),
        key_digest="" if chunk_key is None else chunk_digest(chunk_key),
    )


def typical_header_bytes(artifact: CodecArtifact) -> int:
    """Bytes of a typical blob prefix and header of ``artifact`` (what rate control counts
    against a chunk's budget; the same whatever the coder, so that coders over the
    payload never change the symbols)."""
    h = blob_header(artifact, 256, torch.bfloat16, 1 << 20, 0, "deflate64k",
                    {"stream": 1 << 24, "exact": 0}, step_exp=-32)  # fmt: skip
    return len(pack_blob(h, b"")) + 16  # + the payload's length, checksum


def check_header(artifact: CodecArtifact, header: BlobHeader) -> None:
    """Check that a blob's header was written by ``artifact`` (for its model).

    Raises:
        CodecMismatchError: another model or another codec artifact.
    """
    if header.model != artifact.model_fingerprint:
        raise CodecMismatchError(
            f"blob is for model {header.model[:12]}, this codec for "
            f"{artifact.model_fingerprint[:12]} ({artifact.model_name})"
        )
    if header.artifact_id != artifact.artifact_id:
        raise CodecMismatchError(
            f"blob was written by codec artifact {header.artifact_id} "
            f"(version {header.artifact_version}), this codec is {artifact.artifact_id}"
        )


def bound_prefix(
    blobs: Sequence[bytes], expect: Sequence[ChunkBinding]
) -> tuple[int, BlobMisfiledError | None]:
    """How many leading ``blobs`` are bound to the chunks ``expect`` names, and the
    error of the first that is not. Only headers are read (msgpack, checksummed); a blob
    whose header does not parse ends the scan without an error here: decoding reports
    it, in the order the decoder checks.

    Raises:
        ValueError: not one binding per blob.
    """
    if len(expect) != len(blobs):
        raise ValueError(f"{len(expect)} chunk bindings for {len(blobs)} blobs")
    for i, (blob, want) in enumerate(zip(blobs, expect)):
        try:
            header, _ = unpack_blob_header(blob)
        except BlobError:
            return i + 1, None
        try:
            check_binding(header, want)
        except BlobMisfiledError as exc:
            return i, exc
    return len(blobs), None
