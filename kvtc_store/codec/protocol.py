"""The codec protocol: what the store and the connectors ask of a codec.

Two implementations stand side by side and import nothing from each other: the CPU
reference :class:`~kvtc_store.codec.KVTCCodec` (torch; runs anywhere) and the batched
CUDA codec :class:`~kvtc_store.codec.gpu.GpuCodec` (Triton kernels). Both write and read
the blobs of :mod:`~kvtc_store.codec.format`; :func:`~kvtc_store.codec.make_codec`
picks one. Everything else (:class:`~kvtc_store.store.TieredStore`, the connectors) is
typed against :class:`Codec`.

The contract, stated once for both:

- **Chunks.** A chunk is ``T`` consecutive tokens of one sequence for all ``L`` layers,
  ``H`` KV heads and head dim ``D``, keys with RoPE applied (as an engine caches them).
  A batch is ``B`` chunks of equal ``T`` held in a :class:`~.layout.ChunkKV` (a
  ``(B, L, H, T, D)`` cache or an engine's pages). ``T`` is any positive count (256 by
  default in the store); the blob records it.
- **Positions.** Each chunk names the absolute position of its token 0
  (``first_positions``): RoPE is undone and redone at each token's position, and tokens
  below the artifact's ``n_sink`` are stored exactly. ``exact_tails[b]`` trailing tokens
  of chunk ``b`` are stored exactly too (the recent window of a stored sequence).
- **Keys.** ``chunk_keys[b]`` (optional) is the store key the blob will live under; its
  digest goes in the header, and a decode given ``expect`` bindings refuses a blob
  filed under another chunk's key.
- **Errors.** Encoding raises ``ValueError`` for chunks whose ``(L, H, D)`` is not the
  artifact's. Decoding never raises for bad bytes: it decodes the prefix of blobs up to
  the first that fails and returns that blob's error, a
  :class:`~kvtc_store.errors.BlobError` subclass (``BlobTruncatedError``,
  ``BlobCorruptError``, ``BlobFormatError``, ``CodecMismatchError`` for another
  artifact or model, ``BlobMisfiledError`` for a blob bound to another chunk). Chunks
  past the prefix are left as they were in the destination (undefined in a new one).
  ``ValueError`` only for a caller's mistake (blobs of different ``T`` in one batch, a
  destination that does not fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import BlobError
from .artifact import CodecArtifact
from .entropy import EntropyCoder, writer_coder
from .exact import DEFLATED, EXACT_DTYPES
from .format import (
    DTYPES,
    BlobHeader,
    ChunkBinding,
    blob_header,
    bound_prefix,
    check_header,
    compressed_span,
    typical_header_bytes,
    unpack_blob,
    unpack_blob_header,
)
from .layout import ChunkKV

__all__ = ["ChunkBatch", "Codec", "CodecBase", "DecodedBatch", "DecodedChunk"]


@dataclass
class ChunkBatch:
    """``B`` chunks to encode (module doc).

    Attributes:
        kv: where the chunks' keys and values are (:class:`~.layout.ChunkKV`).
        first_positions: absolute position of each chunk's token 0 (``B`` ints).
        exact_tails: trailing tokens of each chunk stored exactly (default none).
        chunk_keys: the key each blob will be stored under (default: unbound blobs).
    """

    kv: ChunkKV
    first_positions: Sequence[int]
    exact_tails: Sequence[int] | None = None
    chunk_keys: Sequence[str | None] | None = None

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, first_positions, exact_tails=None,
           chunk_keys=None) -> ChunkBatch:  # fmt: skip
        """A batch of chunks held as ``(B, L, H, T, D)`` tensors."""
        return cls(ChunkKV.dense(keys, values), list(first_positions), exact_tails, chunk_keys)

    def tails(self) -> list[int]:
        """``exact_tails`` as a list (zeros by default)."""
        return [int(e) for e in self.exact_tails or [0] * len(self.first_positions)]

    def names(self) -> list[str | None]:
        """``chunk_keys`` as a list (Nones by default)."""
        return list(self.chunk_keys) if self.chunk_keys is not None else [None] * self.kv.batch


@dataclass
class DecodedBatch:
    """What :meth:`Codec.decode_batch` decoded.

    Attributes:
        out: the destination written (the caller's, or a new dense one).
        first_positions: absolute position of each decoded chunk's token 0.
        count: chunks decoded (the prefix before the first bad blob).
        error: that blob's error, or None.
    """

    out: ChunkKV
    first_positions: list[int]
    count: int
    error: BlobError | None

    @property
    def keys(self) -> torch.Tensor:
        """``(B, L, H, T, D)`` keys of a dense destination (ValueError for pages)."""
        return _dense(self.out.keys)

    @property
    def values(self) -> torch.Tensor:
        """``(B, L, H, T, D)`` values of a dense destination (ValueError for pages)."""
        return _dense(self.out.values)


def _dense(kind) -> torch.Tensor:
    if kind.dense is None:
        raise ValueError("the batch was decoded into pages; read them there")
    return kind.dense


@dataclass
class DecodedChunk:
    """A decoded chunk.

    Attributes:
        keys: ``(L, H, T, D)`` with RoPE applied, as a KV cache holds them.
        values: ``(L, H, T, D)``.
        first_position: absolute position of token 0.
    """

    keys: torch.Tensor
    values: torch.Tensor
    first_position: int


@runtime_checkable
class Codec(Protocol):
    """A KVTC codec of one artifact (module doc for chunks, positions and errors).

    Attributes:
        artifact: the calibrated codec artifact.
        device: where the codec computes (and where new destinations are allocated).
    """

    artifact: CodecArtifact
    device: torch.device

    def encode_batch(self, chunks: ChunkBatch) -> list[bytes]:
        """Compress ``B`` chunks of equal ``T``, read straight from ``chunks.kv``.

        Returns:
            One blob per chunk, in order; any implementation decodes any of them.

        Raises:
            ValueError: ``(L, H, D)`` is not the artifact's.
        """
        ...

    def decode_batch(
        self,
        blobs: Sequence[bytes],
        out: ChunkKV | None = None,
        *,
        dtype: torch.dtype | None = None,
        expect: Sequence[ChunkBinding] | None = None,
    ) -> DecodedBatch:
        """Decompress consecutive chunks of equal ``T`` into ``out``, each token's K and
        V written once at its place, up to the first blob that fails.

        Args:
            blobs: blobs of this artifact (from any implementation).
            out: destination of ``len(blobs)`` chunks or more (a dense cache or pages,
                on the device the implementation writes: the CPU reference any, the GPU
                codec its CUDA device); default a new dense ``(B, L, H, T, D)`` on
                :attr:`device` in ``dtype``.
            dtype: of a new destination (default the first blob's input dtype).
            expect: what each blob was fetched as (key, position, tokens): a blob bound
                to another chunk ends the prefix with ``BlobMisfiledError``.

        Returns:
            :class:`DecodedBatch` (the prefix decoded, and the error that ended it).

        Raises:
            ValueError: blobs of different token counts, or an ``out`` that does not fit.
        """
        ...

    def read_header(self, blob: bytes) -> BlobHeader:
        """Parse and verify a blob and check that this codec's artifact wrote it.

        Raises:
            BlobError subclasses, CodecMismatchError.
        """
        ...


class CodecBase:
    """What both implementations share, written once over the protocol's two methods:
    single chunks (:meth:`encode`, :meth:`decode`), whole sequences
    (:meth:`encode_sequence`, :meth:`decode_prefix`) and header checks. A subclass sets
    ``artifact``, ``device``, ``coder`` and ``exact_dtype`` and implements
    :meth:`encode_batch` and :meth:`decode_batch`."""

    artifact: CodecArtifact
    device: torch.device
    exact_dtype: str
    coder: EntropyCoder
    exact_coder: EntropyCoder

    def _set_payload(self, coder: str | None, exact_dtype: str) -> None:
        """Set ``exact_dtype`` and the payload coders of new blobs: ``coder`` for blobs
        without exact tokens, ``exact_coder`` for blobs with some.

        ``coder=None`` (the default) picks by content: ``rans`` streams are entropy-coded
        already, so ``none``, except blobs that hold exact tokens in an encoding laid out
        for DEFLATE (:data:`~.exact.DEFLATED`, the default ``bfloat16-planes``), which get
        ``deflate64k``: their rANS stream barely changes (stored pieces), their exact
        tokens shrink by about a third. ``minmax`` codes are bit-packed: ``deflate`` for
        every blob. A named coder (:func:`~.entropy.writer_coder`) writes every blob.

        Raises:
            ValueError: an unknown ``exact_dtype``.
            BlobFormatError: an unknown ``coder``.
        """
        if exact_dtype not in EXACT_DTYPES:
            raise ValueError(f"exact_dtype {exact_dtype!r} is not one of {EXACT_DTYPES}")
        self.exact_dtype = exact_dtype
        auto = coder is None
        if auto:
            coder = "none" if self.artifact.quantizer == "rans" else "deflate"
        self.coder = writer_coder(coder)
        deflate_exact = auto and self.coder.name == "none" and exact_dtype in DEFLATED
        self.exact_coder = writer_coder("deflate") if deflate_exact else self.coder

    def payload_coder(self, exact_bytes: int) -> EntropyCoder:
        """The coder of a new blob whose exact section has ``exact_bytes`` raw bytes."""
        return self.exact_coder if exact_bytes else self.coder

    def encode_batch(self, chunks: ChunkBatch) -> list[bytes]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_batch(self, blobs, out=None, *, dtype=None, expect=None) -> DecodedBatch:
        raise NotImplementedError  # pragma: no cover - abstract

    # -- format --------------------------------------------------------------------------

    def compressed_span(self, tokens: int, first_position: int, exact_tail: int):
        """:func:`~.format.compressed_span` of this codec's artifact."""
        return compressed_span(self.artifact, tokens, first_position, exact_tail)

    def blob_header(self, tokens, dtype, first_position, exact_tail, coder, sections,
                    step_exp=0, chunk_key=None) -> BlobHeader:  # fmt: skip
        """:func:`~.format.blob_header` of this codec's artifact and exact dtype."""
        return blob_header(self.artifact, tokens, dtype, first_position, exact_tail, coder,
                           sections, step_exp, chunk_key, self.exact_dtype)  # fmt: skip

    def header_bytes(self) -> int:
        """:func:`~.format.typical_header_bytes` of this codec's artifact (cached)."""
        if getattr(self, "_header_bytes", None) is None:
            self._header_bytes = typical_header_bytes(self.artifact)
        return self._header_bytes

    def check_header(self, header: BlobHeader) -> None:
        """:func:`~.format.check_header` against this codec's artifact.

        Raises:
            CodecMismatchError: another model or another codec artifact.
        """
        check_header(self.artifact, header)

    def read_header(self, blob: bytes) -> BlobHeader:
        """Parse and verify a blob and check that this codec wrote it.

        Raises:
            BlobError subclasses (truncated, corrupt, foreign format) and
            CodecMismatchError (another artifact or model).
        """
        header, _ = unpack_blob(blob)
        self.check_header(header)
        return header

    # -- single chunks and sequences ------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_position: int = 0,
        exact_tail: int = 0,
        chunk_key: str | None = None,
    ) -> bytes:
        """Compress one chunk.

        Args:
            keys, values: ``(L, H, T, D)`` float tensors, RoPE applied to keys (as cached).
            first_position: absolute position of token 0 (for RoPE and sink tokens).
            exact_tail: store this many trailing tokens exactly.
            chunk_key: the key the blob will be stored under (bound into its header).

        Returns:
            The blob.

        Raises:
            ValueError: shapes differ from the artifact's model.
        """
        self._check_shape(keys, values)
        batch = ChunkBatch.of(keys[None], values[None], [first_position], [exact_tail],
                              [chunk_key])  # fmt: skip
        return self.encode_batch(batch)[0]

    def _check_shape(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        layers, heads, _, dim = keys.shape
        if tuple(keys.shape) != tuple(values.shape) or (layers, heads, dim) != tuple(
            self.artifact.kv_shape
        ):
            raise ValueError(
                f"chunk shape {tuple(keys.shape)}/{tuple(values.shape)} does not match the "
                f"codec's (L, H, D) = {tuple(self.artifact.kv_shape)}"
            )

    def encode_sequence(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_position: int = 0,
        chunk_tokens: int = 256,
        window: int | None = None,
        chunk_keys: Sequence[str] | None = None,
    ) -> list[bytes]:
        """Compress a stored sequence as chunks of ``chunk_tokens`` tokens.

        The last ``window`` tokens of the sequence (default: the artifact's window, 128)
        are stored exactly, across as many trailing chunks as they span. The full chunks
        go in one :meth:`encode_batch` (strided views, no copy), a short last one in
        another.

        Args:
            keys, values: ``(L, H, T, D)``; ``T`` need not be a multiple of the chunk size.
            first_position: absolute position of token 0.
            chunk_tokens: tokens per chunk.
            window: trailing tokens of the sequence stored exactly.
            chunk_keys: the key each chunk will be stored under (one per chunk).

        Returns:
            One blob per chunk, in order.

        Raises:
            ValueError: shapes differ from the artifact's model, or ``chunk_keys`` does
                not have one key per chunk.
        """
        self._check_shape(keys, values)
        window = self.artifact.window if window is None else window
        total = keys.shape[2]
        spans = []
        for s in range(0, total, chunk_tokens):
            e = min(s + chunk_tokens, total)
            spans.append((s, e, max(0, min(e - s, window - (total - e)))))
        if chunk_keys is not None and len(chunk_keys) != len(spans):
            raise ValueError(f"{len(chunk_keys)} chunk keys for {len(spans)} chunks")
        names = list(chunk_keys) if chunk_keys is not None else [None] * len(spans)
        full = total // chunk_tokens
        blobs: list[bytes] = []
        if full:

            def as_batch(x: torch.Tensor) -> torch.Tensor:
                x = x[:, :, : full * chunk_tokens]
                return x.unflatten(2, (full, chunk_tokens)).movedim(2, 0)

            blobs += self.encode_batch(
                ChunkBatch.of(as_batch(keys), as_batch(values),
                              [first_position + s for s, _, _ in spans[:full]],
                              [tail for _, _, tail in spans[:full]], names[:full])
            )  # fmt: skip
        for (s, e, tail), name in zip(spans[full:], names[full:]):
            blobs += self.encode_batch(
                ChunkBatch.of(keys[None, :, :, s:e], values[None, :, :, s:e],
                              [first_position + s], [tail], [name])
            )  # fmt: skip
        return blobs

    @torch.no_grad()
    def decode(
        self,
        blob: bytes,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecodedChunk:
        """Decompress one chunk to ``(L, H, T, D)`` keys and values on ``device``
        (default the codec's) in ``dtype`` (default the encoder's input dtype).

        Raises:
            BlobTruncatedError, BlobCorruptError, BlobFormatError: damaged or foreign bytes.
            CodecMismatchError: another artifact or model wrote it.
        """
        chunks, error = self.decode_prefix([blob], device, dtype)
        if error is not None:
            raise error
        return chunks[0]

    @torch.no_grad()
    def decode_prefix(
        self,
        blobs: Sequence[bytes],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        expect: Sequence[ChunkBinding] | None = None,
    ) -> tuple[list[DecodedChunk], BlobError | None]:
        """Decompress consecutive chunks (any token counts) up to the first that fails:
        one :meth:`decode_batch` per run of equal token counts (all but a stored
        sequence's short last chunk).

        Returns:
            ``(chunks, error)``: the chunks before the first blob that does not decode
            (each ``(L, H, T, D)`` on ``device``), and that blob's error or None.
        """
        blobs = list(blobs)
        if expect is not None:
            n, misfiled = bound_prefix(blobs, expect)
            chunks, error = self.decode_prefix(blobs[:n], device, dtype)
            return chunks, error if error is not None or misfiled is None else misfiled
        out_device = torch.device(device) if device is not None else self.device
        chunks: list[DecodedChunk] = []
        i = 0
        while i < len(blobs):
            run = _equal_run(blobs, i)
            if run == 0:  # the header of blob i does not parse: decode_batch names why
                run = 1
            got = self.decode_batch(blobs[i : i + run], dtype=dtype or _dtype_of(blobs[i]))
            for b in range(got.count):
                k, v = got.keys[b], got.values[b]
                chunks.append(DecodedChunk(k.to(out_device), v.to(out_device),
                                           got.first_positions[b]))  # fmt: skip
            if got.error is not None:
                return chunks, got.error
            i += run
        return chunks, None


def _equal_run(blobs: Sequence[bytes], i: int) -> int:
    """How many blobs from ``i`` have the token count of blob ``i`` (headers only; 0 when
    blob ``i``'s header does not parse; a later bad header ends the run before it)."""
    try:
        tokens = unpack_blob_header(blobs[i])[0].shape[3]
    except BlobError:
        return 0
    j = i + 1
    while j < len(blobs):
        try:
            if unpack_blob_header(blobs[j])[0].shape[3] != tokens:
                break
        except BlobError:
            break
        j += 1
    return j - i


def _dtype_of(blob: bytes) -> torch.dtype | None:
    """The input dtype a blob's header names (None when it does not parse)."""
    try:
        return DTYPES.get(unpack_blob_header(blob)[0].dtype, torch.float32)
    except BlobError:
        return None
