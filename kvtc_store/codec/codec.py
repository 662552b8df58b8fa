"""Encode and decode KV chunks with a calibrated KVTC artifact (paper §3).

Encode: undo RoPE on keys → per feature group subtract the mean and project on the
principal components → quantise each planned range per token → bit-pack → entropy-code
→ blob. Tokens at absolute positions below ``n_sink`` (attention sinks) and the last
``exact_tail`` tokens of the chunk (the recent window of the stored sequence) skip the
transform and are stored losslessly in bfloat16 byte planes (by default; the blob is then
DEFLATEd), in bfloat16 as cached, or in float8 (:mod:`~.exact`). With the ``rans``
quantiser every chunk's steps are scaled by one factor chosen so that its blob lands on
the artifact's target ratio (rate control, :mod:`~.rate`). Decode is the reverse, ending
with RoPE redone.

This is the reference implementation of the codec protocol (:mod:`~.protocol`) in torch,
one chunk at a time; it runs on the CPU (or, given ``device="cuda"``, in torch on the
GPU). The batched CUDA codec (:mod:`~.gpu`) writes and reads the same blobs
(:mod:`~.format`); neither imports the other, and :func:`~.factory.make_codec` picks one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ArtifactError, BlobCorruptError, BlobError
from .artifact import CodecArtifact
from .entropy import get_coder
from .exact import DEFAULT_EXACT_DTYPE, exact_nbytes, pack_exact, unpack_exact
from .features import from_token_major, group_slices, to_token_major
from .format import DTYPES, BlobHeader, bound_prefix, pack_blob, unpack_blob
from .layout import ChunkKV
from .protocol import ChunkBatch, CodecBase, DecodedBatch, DecodedChunk
from .quant import (
    dequantize_range,
    dequantize_step,
    pack_bits,
    quantize_range,
    quantize_step,
    unpack_bits,
)
from .rans import RansTables, tables_of
from .rate import RateModel, choose_step_exps, step_multiplier
from .rope import apply_rope, undo_rope

log = logging.getLogger(__name__)

EXACT_DTYPE = torch.bfloat16

__all__ = ["DecodedChunk", "KVTCCodec"]


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


class KVTCCodec(CodecBase):
    """The reference encoder/decoder for chunks of one model's KV cache (the
    :class:`~.protocol.Codec` protocol, one chunk at a time in torch).

    Args:
        artifact: the calibrated codec (bases, means, bit plan).
        coder: general-purpose coder applied to new blobs' payload (``"deflate"``, which
            writes ``"deflate64k"``, or ``"none"``; :func:`~.entropy.writer_coder`);
            default (None): for the ``rans`` quantiser ``"none"`` (its stream is
            entropy-coded already), but ``"deflate64k"`` for blobs that hold exact tokens
            in ``bfloat16-planes``; ``"deflate"`` for ``minmax``
            (:meth:`~.protocol.CodecBase._set_payload`). Blobs of any registered coder
            decode.
        device: where to run the transform (``"cpu"``, or ``"cuda"`` for torch on the GPU;
            the batched CUDA codec is :class:`~kvtc_store.codec.gpu.GpuCodec`, and
            :func:`~kvtc_store.codec.make_codec` picks it where it runs).
        exact_dtype: how new blobs store their exact tokens (sinks, recent window):
            ``"bfloat16-planes"`` (default: the cached bfloat16 values bit for bit, in
            byte planes that DEFLATE shrinks by about 1.4x), ``"bfloat16"`` (as cached)
            or ``"float8_e4m3fn"`` (half the bytes, a scale per vector, lossy;
            :mod:`~.exact`). Blobs of any of them decode.
        rate_control: ``rans`` artifacts only: scale each chunk's steps so that its blob
            lands on the artifact's target ratio (default True; :mod:`~.rate`). False
            codes at the calibrated steps (the ratio then follows the content).

    Raises:
        ArtifactError: malformed rANS tables or groups.
        ValueError: an unknown ``exact_dtype``.

    Blob size: ``bits_per_token / 8`` bytes per compressed token before entropy coding,
    plus ``2 * L * H * D * 2`` bytes per exact token before the payload coder (about
    ``2 * L * H * D * 2 / 1.43`` after ``deflate64k`` with ``bfloat16-planes``), plus a
    header of ~300 bytes.
    """

    def __init__(
        self,
        artifact: CodecArtifact,
        coder: str | None = None,
        device: str | torch.device = "cpu",
        exact_dtype: str = DEFAULT_EXACT_DTYPE,
        rate_control: bool = True,
    ):
        self.artifact = artifact
        self._set_payload(coder, exact_dtype)
        self.device = torch.device(device)
        self._means = [m.to(self.device) for m in artifact.means]
        self._bases = [b.to(self.device) for b in artifact.bases]
        self._scales = [s.to(self.device) for s in artifact.scales]
        layers, heads, dim = artifact.kv_shape
        self._slices = group_slices(artifact.groups, heads, dim)
        self._rans = None
        if artifact.quantizer == "rans":
            self._rans = tables_of(artifact)
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

    # -- helpers ------------------------------------------------------------------------

    def _undo_rope(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return undo_rope(k, pos, self.artifact.rope) if self.artifact.undo_rope else k

    def _apply_rope(self, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return apply_rope(k, pos, self.artifact.rope) if self.artifact.undo_rope else k

    @property
    def rans_tables(self) -> RansTables | None:
        """The rANS tables of a ``rans`` artifact (None for ``minmax``)."""
        return self._rans

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

    def choose_step_exps(self, coded: torch.Tensor, rate: RateModel | None = None) -> torch.Tensor:
        """Rate control: each chunk's step exponent (:class:`~.rate.RateModel`).

        Args:
            coded: float32 ``(B, T, n)``: the coded coefficients (plan order) of ``B``
                chunks of ``T`` compressed tokens each.
            rate: the rate model to use (one on ``coded``'s device; default this codec's).

        Returns:
            int64 ``(B,)`` on the CPU; zeros without rate control.
        """
        return choose_step_exps(rate or self.rate, coded, self.artifact, self.header_bytes())

    # -- encode ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, chunks: ChunkBatch) -> list[bytes]:
        """Compress a batch of chunks one by one (the protocol's
        :meth:`~.protocol.Codec.encode_batch`; shapes, positions and errors there). Each
        chunk is read from ``chunks.kv`` where it is (a view of a dense batch, or the
        tokens gathered from pages)."""
        kv = chunks.kv
        if (kv.layers, kv.heads, kv.dim) != tuple(self.artifact.kv_shape):
            raise ValueError(
                f"chunks of (L, H, D) = {(kv.layers, kv.heads, kv.dim)} do not match the "
                f"codec's {tuple(self.artifact.kv_shape)}"
            )
        tails, names = chunks.tails(), chunks.names()
        every = torch.arange(kv.tokens)
        blobs = []
        for b in range(kv.batch):
            if kv.is_dense:
                keys, values = kv.keys.dense[b], kv.values.dense[b]
            else:
                keys, values = (x[0] for x in kv.read([b], every))
            blobs.append(
                self._encode_one(keys, values, int(chunks.first_positions[b]), tails[b], names[b])
            )
        return blobs

    def _encode_one(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_position: int,
        exact_tail: int,
        chunk_key: str | None,
    ) -> bytes:
        """One chunk's blob: ``(L, H, T, D)`` keys (RoPE applied) and values."""
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
        coder = self.payload_coder(len(exact_b))
        header = self.blob_header(
            tokens,
            keys.dtype,
            first_position,
            exact_tail,
            coder.name,
            sections,
            step_exp,
            chunk_key,
        )
        return pack_blob(header, coder.encode(scales_b + codes_b + exact_b))

    # -- decode ---------------------------------------------------------------------------

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
    def decode_batch(
        self,
        blobs,
        out: ChunkKV | None = None,
        *,
        dtype: torch.dtype | None = None,
        expect=None,
    ) -> DecodedBatch:
        """Decompress chunks of equal token count into ``out`` (the protocol's
        :meth:`~.protocol.Codec.decode_batch`; the prefix rule and errors there): the
        rANS streams of all blobs in one vectorised pass, the projection back from
        principal components as one GEMM per feature group over all chunks' tokens
        (about 1.5x faster on CPU than chunk by chunk), then each chunk's tokens written
        once into ``out`` (a dense cache or pages, on any device)."""
        blobs = list(blobs)
        misfiled = None
        if expect is not None:
            n, misfiled = bound_prefix(blobs, expect)
            blobs = blobs[:n]
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
        if error is None:
            error = misfiled
        tokens = parsed[0].header.shape[3] if parsed else 0
        if any(p.header.shape[3] != tokens for p in parsed):
            raise ValueError("decode_batch needs chunks of equal token count")
        layers, heads, dim = self.artifact.kv_shape
        if out is None:
            if dtype is None:
                dtype = DTYPES.get(parsed[0].header.dtype, torch.float32) if parsed else None
            shape = (len(blobs), layers, heads, tokens, dim)
            dtype = dtype or torch.bfloat16
            out = ChunkKV.dense(
                torch.empty(shape, dtype=dtype, device=self.device),
                torch.empty(shape, dtype=dtype, device=self.device),
            )
        elif parsed:
            out.check(layers, heads, dim, len(parsed), tokens)
        self._reconstruct(parsed, out)
        return DecodedBatch(out, [p.header.first_position for p in parsed], len(parsed), error)

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

    def _reconstruct(self, parsed: list[_Parsed], out: ChunkKV) -> None:
        """Project every parsed chunk's coefficients back at once, redo RoPE, and write
        each chunk's coded and exact tokens into ``out`` (chunk ``i`` of ``parsed`` into
        chunk ``i`` of ``out``)."""
        if not parsed:
            return
        layers, heads, dim = self.artifact.kv_shape
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
        for i, p in enumerate(parsed):
            h = p.header
            tokens = h.shape[3]
            if p.b > p.a:
                pos = torch.arange(h.first_position + p.a, h.first_position + p.b)
                k = self._apply_rope(from_token_major(feats["k"][i], layers, heads, dim), pos)
                v = from_token_major(feats["v"][i], layers, heads, dim)
                out.write([i], torch.arange(p.a, p.b), k[None], v[None])
            if p.exact_k is not None:
                where = torch.cat([torch.arange(0, p.a), torch.arange(p.b, tokens)])
                out.write([i], where, p.exact_k[None], p.exact_v[None])


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
