"""Encode and decode KV chunks with a calibrated KVTC artifact (paper §3).

Encode: undo RoPE on keys → per feature group subtract the mean and project on the
principal components → quantise each planned range per token → bit-pack → entropy-code
→ blob. Tokens at absolute positions below ``n_sink`` (attention sinks) and the last
``exact_tail`` tokens of the chunk (the recent window of the stored sequence) skip the
transform and are stored in bfloat16 or float8 (:mod:`~.exact`). With the ``rans``
quantiser every chunk's steps are scaled by one factor chosen so that its blob lands on
the artifact's target ratio (rate control, :mod:`~.rate`). Decode is the reverse, ending
with RoPE redone.

This is the reference path in torch; it runs on CPU and, given ``device="cuda"``, on the
GPU with the same blob format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import (
    ArtifactError,
    BlobCorruptError,
    BlobError,
    BlobMisfiledError,
    CodecMismatchError,
)
from .artifact import CodecArtifact
from .blob import (
    BlobHeader,
    ChunkBinding,
    check_binding,
    chunk_digest,
    pack_blob,
    unpack_blob,
    unpack_blob_header,
)
from .entropy import get_coder, writer_coder
from .exact import EXACT_DTYPES, exact_nbytes, pack_exact, unpack_exact
from .features import from_token_major, group_slices, to_token_major
from .quant import (
    dequantize_range,
    dequantize_step,
    pack_bits,
    quantize_range,
    quantize_step,
    unpack_bits,
)
from .rans import RansTables
from .rate import RateModel, step_multiplier
from .rope import apply_rope, undo_rope

log = logging.getLogger(__name__)

EXACT_DTYPE = torch.bfloat16

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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


def _tobytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _frombytes(b: bytes | memoryview, dtype: torch.dtype, shape, device) -> torch.Tensor:
    if dtype in (torch.bfloat16, torch.float16):
        arr = np.frombuffer(b, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(dtype).reshape(shape).to(device)
    np_dtype = {torch.uint8: np.uint8, torch.float32: np.float32}[dtype]
    return torch.from_numpy(np.frombuffer(b, dtype=np_dtype).copy()).reshape(shape).to(device)


class KVTCCodec:
    """Encoder/decoder for chunks of one model's KV cache.

    Args:
        artifact: the calibrated codec (bases, means, bit plan).
        coder: general-purpose coder applied to new blobs' payload (``"deflate"``, which
            writes ``"deflate64k"``, or ``"none"``; :func:`~.entropy.writer_coder`);
            default ``"none"`` for the ``rans`` quantiser (its stream is entropy-coded
            already), ``"deflate"`` for ``minmax``. Blobs of any registered coder decode.
        device: where to run the transform (``"cpu"`` or ``"cuda"``).
        gpu_kernels: run :meth:`encode_sequence` and :meth:`decode_prefix` through the
            batched Triton codec (:class:`~kvtc_store.codec.gpu.GpuCodec`: one kernel
            launch per stage for all chunks, no Python loop per chunk). Default (None):
            on CUDA when the artifact is ``rans``, its head dim a power of two, and triton
            imports; otherwise the per-chunk torch path.
            Blobs are the same format either way and decode on either.
        exact_dtype: how new blobs store their exact tokens (sinks, recent window):
            ``"bfloat16"`` (default, as cached) or ``"float8_e4m3fn"`` (half the bytes,
            a scale per vector; :mod:`~.exact`). Blobs of either decode.
        rate_control: ``rans`` artifacts only: scale each chunk's steps so that its blob
            lands on the artifact's target ratio (default True; :mod:`~.rate`). False
            codes at the calibrated steps (the ratio then follows the content).

    Raises:
        ArtifactError: malformed rANS tables or groups.
        ValueError: an unknown ``exact_dtype``.

    Blob size: ``bits_per_token / 8`` bytes per compressed token before entropy coding,
    plus ``2 * L * H * D * 2`` bytes per exact token, plus a header of ~300 bytes.
    """

    def __init__(
        self,
        artifact: CodecArtifact,
        coder: str | None = None,
        device: str = "cpu",
        gpu_kernels: bool | None = None,
        exact_dtype: str = "bfloat16",
        rate_control: bool = True,
    ):
        if exact_dtype not in EXACT_DTYPES:
            raise ValueError(f"exact_dtype {exact_dtype!r} is not one of {EXACT_DTYPES}")
        self.exact_dtype = exact_dtype
        self.artifact = artifact
        if coder is None:  # rANS streams are entropy-coded already; bit-packed codes are not
            coder = "none" if artifact.quantizer == "rans" else "deflate"
        self.coder = writer_coder(coder)
        self.device = torch.device(device)
        self._means = [m.to(self.device) for m in artifact.means]
        self._bases = [b.to(self.device) for b in artifact.bases]
        self._scales = [s.to(self.device) for s in artifact.scales]
        layers, heads, dim = artifact.kv_shape
        self._slices = group_slices(artifact.groups, heads, dim)
        self._rans = None
        if artifact.quantizer == "rans":
            try:
                self._rans = RansTables(
                    artifact.rans_freq.numpy(),
                    artifact.rans_shift.numpy(),
                    artifact.rans_cls.numpy(),
                    artifact.rans_interleave,
                )
            except (ValueError, AttributeError) as exc:
                raise ArtifactError(
                    f"artifact {artifact.artifact_id}: bad rANS tables: {exc}"
                ) from exc
            if self._rans.n_components != artifact.coded_components():
                raise ArtifactError(
                    f"artifact {artifact.artifact_id}: rANS tables cover "
                    f"{self._rans.n_components} components, the plan codes "
                    f"{artifact.coded_components()}"
                )
            self._steps = torch.cat(
                [torch.full((r.end - r.start,), float(r.step)) for r in artifact.plan]
                or [torch.zeros(0)]
            ).to(self.device)
        self.rate = None
        if self._rans is not None and rate_control:
            self.rate = RateModel(self._rans, self._steps, artifact.quant_rounding, self.device)
        for kind in ("k", "v"):
            spans = [(sl.start, sl.stop) for kd, sl in self._slices if kd == kind]
            ends = [0] + [e for _, e in spans]
            if [s for s, _ in spans] != ends[:-1] or ends[-1] != layers * heads * dim:
                raise ArtifactError(
                    f"artifact {artifact.artifact_id}: the {kind} groups must cover layers "
                    "0..L in order"
                )
        self._gpu = self._batched_codec(gpu_kernels)

    def _batched_codec(self, wanted: bool | None):
        """The :class:`~kvtc_store.codec.gpu.GpuCodec` this codec hands batches to, or None.

        Raises:
            ValueError: ``wanted`` is True but the artifact (quantiser, head dim) or the
                installation (no triton) cannot use it.
        """
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        art = self.artifact
        dim = art.kv_shape[2]
        why = None
        if art.quantizer != "rans":
            why = f"quantiser {art.quantizer!r} (needs rans)"
        elif dim & (dim - 1):
            why = f"head dim {dim} (needs a power of two)"
        else:
            try:
                from .gpu import GpuCodec
            except ImportError as exc:  # triton missing
                why = f"the GPU codec does not import: {exc}"
        if why is not None:
            if wanted:
                raise ValueError(f"gpu_kernels: cannot batch on {self.device}: {why}")
            log.info("codec on %s without batched kernels: %s", self.device, why)
            return None
        return GpuCodec(
            art,
            self.device,
            coder=self.coder.name,
            exact_dtype=self.exact_dtype,
            rate_control=self.rate is not None,
        )

    # -- helpers ------------------------------------------------------------------------

    def _undo_rope(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return undo_rope(k, pos, self.artifact.rope) if self.artifact.undo_rope else k

    def _apply_rope(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return apply_rope(k, pos, self.artifact.rope) if self.artifact.undo_rope else k

    @property
    def rans_tables(self) -> RansTables | None:
        """The rANS tables of a ``rans`` artifact (None for ``minmax``): what the batched
        GPU codec builds its device tables from."""
        return self._rans

    def compressed_span(self, tokens: int, first_position: int, exact_tail: int):
        """The transform-coded token range ``(a, b)`` of a chunk.

        Args:
            tokens: tokens in the chunk.
            first_position: absolute position of its token 0.
            exact_tail: trailing tokens stored exactly.

        Returns:
            ``(a, b)``: tokens ``[a, b)`` are transform-coded; ``[0, a)`` (sink tokens:
            absolute positions below the artifact's ``n_sink``) and ``[b, tokens)`` (the
            exact tail) are stored exactly. Both exact parts are contiguous.
        """
        a = min(tokens, max(0, self.artifact.n_sink - first_position))
        b = max(a, tokens - max(0, exact_tail))
        return a, b

    def _section_sizes(
        self, n_comp: int, n_exact: int, stream: int = 0, exact_dtype: str = "bfloat16"
    ) -> dict[str, int]:
        layers, heads, dim = self.artifact.kv_shape
        plan = self.artifact.plan
        exact = exact_nbytes(layers, heads, n_exact, dim, exact_dtype)
        if self._rans is not None:
            return {"stream": stream if n_comp else 0, "exact": exact}
        return {
            "scales": n_comp * len(plan) * 4,
            "codes": sum(((r.end - r.start) * n_comp * r.bits + 7) // 8 for r in plan),
            "exact": exact,
        }

    def header_bytes(self) -> int:
        """Bytes of a typical blob prefix and header of this codec's artifact (what rate
        control counts against a chunk's budget; the same whatever the coder, so that
        coders over the payload never change the symbols)."""
        if not hasattr(self, "_header_bytes"):
            h = self.blob_header(256, torch.bfloat16, 1 << 20, 0, "deflate64k",
                                 {"stream": 1 << 24, "exact": 0}, step_exp=-32)  # fmt: skip
            self._header_bytes = len(pack_blob(h, b"")) + 16  # + the payload's length, checksum
        return self._header_bytes

    def choose_step_exps(self, coded: torch.Tensor, rate: RateModel | None = None) -> torch.Tensor:
        """Rate control: each chunk's step exponent (:class:`~.rate.RateModel`).

        Args:
            coded: float32 ``(B, T, n)``: the coded coefficients (plan order) of ``B``
                chunks of ``T`` compressed tokens each.
            rate: the rate model to use (one on ``coded``'s device; default this codec's).

        Returns:
            int64 ``(B,)`` on the CPU; zeros without rate control.
        """
        rate = rate or self.rate
        batch, tokens = coded.shape[:2]
        if rate is None or tokens == 0:
            return torch.zeros(batch, dtype=torch.int64)
        art = self.artifact
        budget = rate.budget_bits(
            tokens, art.features_per_token(), art.target_ratio, self.header_bytes()
        )
        return rate.choose(coded, torch.full((batch,), budget, dtype=torch.float64)).cpu()

    # -- encode ---------------------------------------------------------------------------

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
            keys: ``(L, H, T, D)`` float tensor with RoPE applied (as cached).
            values: ``(L, H, T, D)`` float tensor.
            first_position: absolute position of token 0 (for RoPE and sink tokens).
            exact_tail: store this many trailing tokens exactly (the end of a stored
                sequence's recent window; see :meth:`encode_sequence`).
            chunk_key: the key the blob will be stored under; its digest goes in the
                header (``key_digest``) so a reader can tell a misfiled blob.

        Returns:
            The blob (bytes).

        Raises:
            ValueError: shapes differ from the artifact's model.
        """
        art = self.artifact
        layers, heads, tokens, dim = keys.shape
        if tuple(keys.shape) != tuple(values.shape) or (layers, heads, dim) != tuple(art.kv_shape):
            raise ValueError(
                f"chunk shape {tuple(keys.shape)}/{tuple(values.shape)} does not match the "
                f"codec's (L, H, D) = {tuple(art.kv_shape)}"
            )
        a, b = self.compressed_span(tokens, first_position, exact_tail)

        scale_parts: list[torch.Tensor] = []
        code_parts: list[bytes] = []
        step_exp = 0
        if b > a:
            k = keys[:, :, a:b].to(self.device, torch.float32)
            v = values[:, :, a:b].to(self.device, torch.float32)
            pos = torch.arange(first_position + a, first_position + b)
            feats = {
                "k": to_token_major(self._undo_rope(k, pos)),
                "v": to_token_major(v),
            }
            coeffs = [
                ((feats[kind][:, sl] - self._means[g]) / self._scales[g]) @ self._bases[g]
                for g, (kind, sl) in enumerate(self._slices)
            ]
            if self._rans is not None:
                coded = torch.cat([coeffs[r.group][:, r.start : r.end] for r in art.plan], dim=1)
                step_exp = int(self.choose_step_exps(coded[None])[0])
                if step_exp:
                    coded = coded * (1.0 / step_multiplier(step_exp))
                q = quantize_step(coded, self._steps, art.quant_rounding).T.cpu().numpy()
                code_parts.append(self._rans.encode(q, [b - a])[0])
            else:
                for r in art.plan:
                    codes, scales = quantize_range(coeffs[r.group][:, r.start : r.end], r.bits)
                    scale_parts.append(scales)
                    code_parts.append(_tobytes(pack_bits(codes, r.bits)))
        scales_b = _tobytes(torch.stack(scale_parts, dim=1)) if scale_parts else b""
        codes_b = b"".join(code_parts)
        exact_b = b""
        if a > 0 or b < tokens:
            ek = torch.cat([keys[:, :, :a], keys[:, :, b:]], dim=2)
            ev = torch.cat([values[:, :, :a], values[:, :, b:]], dim=2)
            exact_b = pack_exact(ek, ev, self.exact_dtype).cpu().numpy().tobytes()
        if self._rans is not None:
            sections = {"stream": len(codes_b), "exact": len(exact_b)}
        else:
            sections = {"scales": len(scales_b), "codes": len(codes_b), "exact": len(exact_b)}
        header = self.blob_header(
            tokens,
            keys.dtype,
            first_position,
            exact_tail,
            self.coder.name,
            sections,
            step_exp,
            chunk_key,
        )
        return pack_blob(header, self.coder.encode(scales_b + codes_b + exact_b))

    def blob_header(
        self,
        tokens: int,
        dtype: torch.dtype,
        first_position: int,
        exact_tail: int,
        coder: str,
        sections: dict[str, int],
        step_exp: int = 0,
        chunk_key: str | None = None,
    ) -> BlobHeader:
        """The header of a blob this codec writes for a chunk of ``tokens`` tokens whose
        input had ``dtype``; ``sections`` are the raw section lengths in bytes (the
        payload length and checksum are filled by :func:`pack_blob`); ``step_exp`` the
        chunk's rate-control exponent; ``chunk_key``, the key it is stored under, goes in
        as its digest (none: an unbound blob)."""
        art = self.artifact
        layers, heads, dim = art.kv_shape
        return BlobHeader(
            artifact_id=art.artifact_id,
            artifact_version=art.version,
            model=art.model_fingerprint,
            shape=[layers, heads, dim, int(tokens)],
            dtype=str(dtype).removeprefix("torch."),
            first_position=int(first_position),
            n_sink=art.n_sink,
            exact_tail=int(exact_tail),
            exact_dtype=self.exact_dtype,
            coder=coder,
            sections=sections,
            step_exp=int(step_exp),
            key_digest="" if chunk_key is None else chunk_digest(chunk_key),
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
        are stored exactly, across as many trailing chunks as they span.

        Args:
            keys, values: ``(L, H, T, D)``; ``T`` need not be a multiple of the chunk size
                (the last chunk is then shorter).
            first_position: absolute position of token 0.
            chunk_keys: the key each chunk will be stored under (one per chunk), bound
                into its blob's header (see :meth:`encode`).

        Returns:
            One blob per chunk, in order.

        Raises:
            ValueError: shapes differ from the artifact's model, or ``chunk_keys`` does
                not have one key per chunk.
        """
        window = self.artifact.window if window is None else window
        total = keys.shape[2]
        spans = []
        for s in range(0, total, chunk_tokens):
            e = min(s + chunk_tokens, total)
            spans.append((s, e, max(0, min(e - s, window - (total - e)))))
        if chunk_keys is not None and len(chunk_keys) != len(spans):
            raise ValueError(f"{len(chunk_keys)} chunk keys for {len(spans)} chunks")
        names = list(chunk_keys) if chunk_keys is not None else [None] * len(spans)
        if self._gpu is None or keys.device.type != self.device.type:
            return [
                self.encode(keys[:, :, s:e], values[:, :, s:e], first_position + s, tail, name)
                for (s, e, tail), name in zip(spans, names)
            ]
        # Batched: the full chunks in one call (strided views, no copy), the short last one
        # in another.
        full = total // chunk_tokens
        blobs = []
        if full:

            def as_batch(x: torch.Tensor) -> torch.Tensor:
                return (
                    x[:, :, : full * chunk_tokens].unflatten(2, (full, chunk_tokens)).movedim(2, 0)
                )

            blobs += self._gpu.encode_batch(
                as_batch(keys),
                as_batch(values),
                [first_position + s for s, _, _ in spans[:full]],
                [tail for _, _, tail in spans[:full]],
                chunk_keys=names[:full],
            )
        for (s, e, tail), name in zip(spans[full:], names[full:]):
            blobs += self._gpu.encode_batch(
                keys[None, :, :, s:e],
                values[None, :, :, s:e],
                [first_position + s],
                [tail],
                chunk_keys=[name],
            )
        return blobs

    # -- decode ---------------------------------------------------------------------------

    def read_header(self, blob: bytes) -> BlobHeader:
        """Parse and verify a blob and check that this codec wrote it.

        Raises:
            BlobError subclasses (truncated, corrupt, foreign format) and
            CodecMismatchError (another artifact or model).
        """
        header, _ = unpack_blob(blob)
        self.check_header(header)
        return header

    def check_header(self, header: BlobHeader) -> None:
        """Check that a blob's header was written for this codec.

        Raises:
            CodecMismatchError: another model or another codec artifact.
        """
        art = self.artifact
        if header.model != art.model_fingerprint:
            raise CodecMismatchError(
                f"blob is for model {header.model[:12]}, this codec for "
                f"{art.model_fingerprint[:12]} ({art.model_name})"
            )
        if header.artifact_id != art.artifact_id:
            raise CodecMismatchError(
                f"blob was written by codec artifact {header.artifact_id} "
                f"(version {header.artifact_version}), this codec is {art.artifact_id}"
            )

    def decode_symbols(self, blob: bytes) -> np.ndarray:
        """The quantised symbols of a ``rans`` blob, for analysis (what the rANS stream
        codes; :meth:`decode` turns them into KV).

        Returns:
            ``(coded components, compressed tokens)`` int array: row ``i`` is the
            ``i``-th component of the bit plan (the artifact's ``plan`` ranges in order),
            column ``t`` the ``t``-th compressed token of the chunk (positions past the
            sink tokens and before the exact tail). No columns when nothing is compressed.

        Raises:
            ValueError: the codec's quantiser is not ``rans``.
            BlobError subclasses, CodecMismatchError: as :meth:`decode`.
        """
        if self._rans is None:
            raise ValueError("decode_symbols needs a codec with the rans quantiser")
        header, payload = unpack_blob(blob)
        self.check_header(header)
        p = self._parse(header, payload)
        n_coded = sum(r.end - r.start for r in self.artifact.plan)
        if p.b <= p.a:
            return np.zeros((n_coded, 0), dtype=np.int32)
        return self._rans.decode([p.stream], [p.b - p.a])

    @torch.no_grad()
    def decode(
        self,
        blob: bytes,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecodedChunk:
        """Decompress one chunk.

        Args:
            blob: bytes from :meth:`encode`.
            device: where the output lives (default: the codec's device).
            dtype: output dtype (default: the dtype the encoder was given).

        Returns:
            :class:`DecodedChunk` with keys and values ``(L, H, T, D)``.

        Raises:
            BlobTruncatedError, BlobCorruptError, BlobFormatError: damaged or foreign bytes.
            CodecMismatchError: the blob was written by another artifact or for another model.
        """
        chunks, error = self.decode_prefix([blob], device, dtype)
        if error is not None:
            raise error
        return chunks[0]

    @torch.no_grad()
    def decode_prefix(
        self,
        blobs: list[bytes],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        expect: Sequence[ChunkBinding] | None = None,
    ) -> tuple[list[DecodedChunk], BlobError | None]:
        """Decompress consecutive chunks in one batch, up to the first that fails.

        The projection back from principal components runs as one GEMM per feature group
        over all chunks' tokens (about 1.5x faster on CPU than chunk by chunk).

        Args:
            blobs: blobs of consecutive chunks (any positions; each names its own).
            device, dtype: as for :meth:`decode`.
            expect: what each blob was fetched as (key, first position, tokens; one per
                blob): a blob whose header names another chunk ends the prefix with
                :class:`BlobMisfiledError` (see :func:`~.blob.check_binding`).

        Returns:
            ``(chunks, error)``: the decoded chunks before the first blob that does not
            decode, and that blob's error (a :class:`BlobError` subclass, including
            :class:`CodecMismatchError` and :class:`BlobMisfiledError`) or None when all
            decoded.
        """
        if expect is not None:
            n, misfiled = _bound_prefix(blobs, expect)
            chunks, error = self.decode_prefix(blobs[:n], device, dtype)
            return chunks, error if error is not None or misfiled is None else misfiled
        if self._gpu is not None:
            return self._decode_prefix_batched(blobs, device, dtype)
        parsed: list[_Parsed] = []
        error: BlobError | None = None
        for blob in blobs:
            try:
                header, payload = unpack_blob(blob)
                self.check_header(header)
                parsed.append(self._parse(header, payload))
            except BlobError as exc:
                error = exc
                break
            except Exception as exc:  # noqa: BLE001 - a checksummed header that lies
                error = BlobCorruptError(f"blob does not decode: {exc}")
                break
        if self._rans is not None and parsed:
            parsed, rans_error = self._decode_streams(parsed)
            error = rans_error or error
        return self._reconstruct(parsed, device, dtype), error

    def _decode_prefix_batched(
        self, blobs: list[bytes], device, dtype
    ) -> tuple[list[DecodedChunk], BlobError | None]:
        """:meth:`decode_prefix` through the batched GPU codec: one batch per run of
        blobs with equal token counts (all of them, in a stored sequence, but the last)."""
        out_device = torch.device(device) if device is not None else self.device
        chunks: list[DecodedChunk] = []
        i = 0
        while i < len(blobs):
            # headers only: the batched decoder checks the rest (checksums in parallel)
            # and reports the first bad blob's error as decode_prefix does
            try:
                tokens = unpack_blob_header(blobs[i])[0].shape[3]
            except BlobError as exc:
                return chunks, exc
            j = i + 1
            while j < len(blobs):
                try:
                    if unpack_blob_header(blobs[j])[0].shape[3] != tokens:
                        break
                except BlobError:
                    break  # the batch stops before it; the next round reports its error
                j += 1
            batch = self._gpu.decode_batch(blobs[i:j], dtype=dtype)
            for b in range(batch.count):
                chunks.append(
                    DecodedChunk(
                        batch.keys[b].to(out_device),
                        batch.values[b].to(out_device),
                        batch.first_positions[b],
                    )
                )
            if batch.error is not None:
                return chunks, batch.error
            i = j
        return chunks, None

    def _decode_streams(self, parsed: list[_Parsed]) -> tuple[list[_Parsed], BlobError | None]:
        """rANS-decode every parsed blob's stream in one vectorised pass and fill its
        coefficients; on a bad stream, the prefix before it and that stream's error."""
        try:
            self._fill_coeffs(parsed)
            return parsed, None
        except BlobError:
            pass
        for i, p in enumerate(parsed):  # find the first bad one
            try:
                self._fill_coeffs([p])
            except BlobError as exc:
                return parsed[:i], exc
        return parsed, None  # pragma: no cover - the batch failed, every blob alone passed

    def _fill_coeffs(self, parsed: list[_Parsed]) -> None:
        todo = [p for p in parsed if p.b > p.a]
        if not todo:
            return
        counts = [p.b - p.a for p in todo]
        q = self._rans.decode([p.stream for p in todo], counts)
        coded = dequantize_step(
            torch.from_numpy(q.T.copy()).to(self.device), self._steps, self.artifact.quant_bias
        )
        for p, part in zip(todo, coded.split(counts)):
            if p.header.step_exp:
                part = part * step_multiplier(p.header.step_exp)
            off = 0
            for r in self.artifact.plan:
                n = r.end - r.start
                p.coeffs[r.group][:, r.start : r.end] = part[:, off : off + n]
                off += n

    def _parse(self, header: BlobHeader, payload) -> _Parsed:
        """Entropy-decode and dequantise one blob: coefficients and exact tokens."""
        art = self.artifact
        layers, heads, dim, tokens = header.shape
        if (layers, heads, dim) != tuple(art.kv_shape):
            raise BlobCorruptError(f"blob shape {header.shape} does not match the codec")
        a, b = self.compressed_span(tokens, header.first_position, header.exact_tail)
        n_comp, n_exact = b - a, tokens - (b - a)
        want = self._section_sizes(
            n_comp, n_exact, header.sections.get("stream", 0), header.exact_dtype
        )
        if header.step_exp and self._rans is None:
            raise BlobCorruptError("blob names a step exponent, its artifact's quantiser none")
        if n_comp == 0 and self._rans is None:
            want["scales"] = want["codes"] = 0
        if header.sections != want:
            raise BlobCorruptError(f"blob sections {header.sections} do not match {want}")
        raw = get_coder(header.coder).decode(bytes(payload), sum(want.values()))
        coeffs = [torch.zeros(n_comp, basis.shape[1], device=self.device) for basis in self._bases]
        if self._rans is not None:
            o_exact = want["stream"]
            exact_k, exact_v = self._exact(raw[o_exact:], header, layers, heads, n_exact, dim)
            return _Parsed(header, a, b, coeffs, exact_k, exact_v, bytes(raw[:o_exact]))
        o_codes = want["scales"]
        o_exact = o_codes + want["codes"]
        if n_comp:
            scales = _frombytes(
                raw[:o_codes], torch.float16, (n_comp, len(art.plan), 2), self.device
            )
            off = o_codes
            for i, r in enumerate(art.plan):
                n = (r.end - r.start) * n_comp
                nbytes = (n * r.bits + 7) // 8
                packed = _frombytes(raw[off : off + nbytes], torch.uint8, (nbytes,), self.device)
                codes = unpack_bits(packed, r.bits, n).view(n_comp, r.end - r.start)
                coeffs[r.group][:, r.start : r.end] = dequantize_range(codes, scales[:, i])
                off += nbytes
        exact_k, exact_v = self._exact(raw[o_exact:], header, layers, heads, n_exact, dim)
        return _Parsed(header, a, b, coeffs, exact_k, exact_v)

    @staticmethod
    def _exact(raw, header: BlobHeader, layers: int, heads: int, n_exact: int, dim: int):
        """The exactly stored tokens' keys and values ``(L, H, n_exact, D)`` (bf16 or
        float32, on the CPU), or Nones."""
        if not n_exact:
            return None, None
        nbytes = exact_nbytes(layers, heads, n_exact, dim, header.exact_dtype)
        section = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, count=nbytes).copy())
        return unpack_exact(section, layers, heads, n_exact, dim, header.exact_dtype)

    def _reconstruct(self, parsed: list[_Parsed], device, dtype) -> list[DecodedChunk]:
        """Project every parsed chunk's coefficients back at once, redo RoPE, assemble."""
        if not parsed:
            return []
        art = self.artifact
        layers, heads, dim = art.kv_shape
        out_device = torch.device(device) if device is not None else self.device
        counts = [p.b - p.a for p in parsed]
        feats = {}
        for kind in ("k", "v"):
            parts = [
                torch.addcmul(
                    self._means[g],
                    torch.cat([p.coeffs[g] for p in parsed]) @ self._bases[g].T,
                    self._scales[g],
                )
                for g, (kd, _) in enumerate(self._slices)
                if kd == kind
            ]  # groups of one kind tile its features in order (checked in __init__)
            feats[kind] = torch.cat(parts, dim=1).split(counts)
        out = []
        for i, p in enumerate(parsed):
            h = p.header
            tokens = h.shape[3]
            out_dtype = dtype or _DTYPES.get(h.dtype, torch.float32)
            keys = torch.empty(layers, heads, tokens, dim, dtype=out_dtype, device=out_device)
            values = torch.empty_like(keys)
            if p.b > p.a:
                pos = torch.arange(h.first_position + p.a, h.first_position + p.b)
                k = self._apply_rope(from_token_major(feats["k"][i], layers, heads, dim), pos)
                keys[:, :, p.a : p.b] = k.to(out_device, out_dtype)
                values[:, :, p.a : p.b] = from_token_major(feats["v"][i], layers, heads, dim).to(
                    out_device, out_dtype
                )
            if p.exact_k is not None:
                ek, ev = p.exact_k.to(out_device, out_dtype), p.exact_v.to(out_device, out_dtype)
                keys[:, :, : p.a], values[:, :, : p.a] = ek[:, :, : p.a], ev[:, :, : p.a]
                keys[:, :, p.b :], values[:, :, p.b :] = ek[:, :, p.a :], ev[:, :, p.a :]
            out.append(DecodedChunk(keys, values, h.first_position))
        return out


@dataclass
class _Parsed:
    """One blob after entropy decoding and dequantisation, before the projection."""

    header: BlobHeader
    a: int
    b: int
    coeffs: list[torch.Tensor]
    exact_k: torch.Tensor | None
    exact_v: torch.Tensor | None
    stream: bytes = b""  # rANS stream, decoded in a batch (quantiser "rans")


def _bound_prefix(
    blobs: Sequence[bytes], expect: Sequence[ChunkBinding]
) -> tuple[int, BlobMisfiledError | None]:
    """How many leading ``blobs`` are bound to the chunks ``expect`` names, and the
    error of the first that is not. Only headers are read (msgpack, checksummed); a blob
    whose header does not parse ends the scan without an error here: decoding reports
    it, in the order the decoder checks."""
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
