"""Encode and decode a batch of KV chunks end to end on CUDA (quantiser ``rans``).

One implementation of the codec protocol (:mod:`kvtc_store.codec.protocol`), beside the
CPU reference :class:`~kvtc_store.codec.KVTCCodec`; neither imports the other. The same
blobs (:mod:`kvtc_store.codec.format`, ``docs/blob-format.md``): a blob written here
decodes on a CPU-only host and the reverse. The rANS streams are
byte-identical to the CPU's for the same symbols; the symbols themselves can differ from
the CPU's where the float transform rounds differently (fp16 GEMM operands against
float32 on the CPU), so the values agree within float tolerance, not bit for bit.

Data flow, all chunks of a batch at once (``N = B * T`` tokens; ``p`` features of K or V;
``R`` principal components over all groups). Features are token-major (a token's ``p``
features side by side, as in the chunk's own layout), so the elementwise kernels read and
write whole rows of a head; coefficients are component-major, as the rANS coder walks
them; every GEMM operand is a plain or transposed matrix with unit stride (cuBLAS takes
either without a copy):

Chunks are read from and written to a :class:`~kvtc_store.codec.layout.ChunkKV`: a
``(B, L, H, T, D)`` cache of any strides, or an engine's pages (vLLM's per-layer block
views, SGLang's page pools), through a table of each token's slot and each layer's origin,
so the kernels gather from and write into the pages themselves (no split, cat or scatter).

encode: K and V →[:func:`_prep_kernel`: undo RoPE on K, subtract the
mean, divide by the scale]→ ``Xᵀ (N, p)`` fp16 →[cuBLAS per group: ``basisᵀ @ X``]→
``C (R, N)`` float32 →[rANS encoder, quantising on the fly]→ streams, back to back on the
device →[one copy into a reused pinned buffer]→ blobs (each checksummed and built with
one copy of its parts by a host thread, without the GIL).

decode: blobs →[headers parsed; payloads copied by host threads into a reused pinned
buffer, sent to the device in one pass; checksums verified by those threads meanwhile;
``deflate64k`` (and older ``deflate``) payloads verified first, then inflated on the
device by one nvCOMP call, every 64 KiB piece of every blob a stream of its own]→
streams →[rANS decoder, dequantising on the fly]→
``C (R, N)`` fp16 →[cuBLAS per group: ``Cᵀ @ basisᵀ``]→ ``Fᵀ (N, p)`` fp16 (for large
batches of few chunks, the decoder runs in ranges of steps and each range's rows are
projected on a side stream while the next range decodes: ``decode_ranges_min_tokens``) →
[:func:`_finish_kernel`: times the scale, plus the mean, redo RoPE on K, write into the
caller's destination, each token's slot from its table] → exact tokens copied in.

The general-purpose coder over a blob's payload (the header's ``coder``; by default
``none``, and ``deflate64k`` for blobs that hold exact tokens in ``bfloat16-planes``, whose
byte planes DEFLATE shrinks): ``none`` goes to the device as it is; ``deflate64k`` (RAW DEFLATE in independent 64 KiB pieces,
:mod:`kvtc_store.codec.entropy`; what a request for ``deflate`` writes) is deflated and
inflated by nvCOMP on the device where ``nvidia-nvcomp-cu13`` is installed
(:mod:`.nvcomp_coder`), all pieces of a batch in one call (a GPU tier's device blobs
from their device copy: only the piece table comes to the host), else by ISA-L or zlib on
the host; older single-stream ``deflate`` payloads are inflated there too, one stream each.
The streams are the same format either way.

Sources: KVTC (Staniszewski & Łańcucki, arXiv 2511.01815, §3); RoPE in Hugging Face's
``rotate_half`` convention (:mod:`kvtc_store.codec.rope`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import ArtifactError, BlobCorruptError, BlobError, NvcompUnavailableError
from ..artifact import CodecArtifact
from ..entropy import (
    PIECE_SIZE,
    get_coder,
    pack_pieces,
    piece_raw_sizes,
    read_piece_table,
    stored_parts,
    stored_size,
    table_size,
)
from ..exact import DEFAULT_EXACT_DTYPE, DEFLATED, exact_nbytes, pack_exact, unpack_exact
from ..features import group_slices
from ..format import (
    DTYPES,
    PAYLOAD_CHECKSUM_MISMATCH,
    BlobHeader,
    bound_prefix,
    pack_blob,
    pack_blob_parts,
    payload_intact,
    unpack_blob_header,
    verify_payload,
)
from ..fp8_tail import Fp8Tail, tail_plan
from ..layout import ChunkKV, KindLayout
from ..protocol import ChunkBatch, CodecBase, DecodedBatch
from ..rans import tables_of
from ..rate import RateModel, choose_step_exps, step_multiplier
from .nvcomp_coder import NvcompCoder, aligned
from .rans_triton import DeviceTables, RansDecode, encode_gpu_device
from .staging import HostDownload, HostStaging, host_pool

log = logging.getLogger(__name__)

_POOL_BLOBS_MIN = 4 << 20  # payload bytes of a batch above which blobs are built on threads
DECODE_PARTS = 4  # step ranges of the rANS decoder when it leaves multiprocessors idle


# -- kernels ------------------------------------------------------------------------------


@triton.jit
def _prep_kernel(
    x_ptr,  # layer 0's origin of keys or values (any float dtype), see KindLayout
    tok_ptr,  # int64 (B * T,): each token's slot, elements from its layer's origin
    lay_ptr,  # int64 (L,): each layer's origin, elements from x_ptr
    sx_h,
    sx_d,
    cos_ptr,  # float32 (B * T, HALF)
    sin_ptr,
    mean_ptr,  # float32 (p,)
    scale_ptr,  # float32 (p,)
    out_ptr,  # (N, p) token-major, row stride n_feat
    n_feat,
    L,
    H,
    T,
    heads_per_program,
    D: tl.constexpr,
    HALF: tl.constexpr,
    ROT: tl.constexpr,
    ROPE: tl.constexpr,
    BT: tl.constexpr,
):
    """``BT`` tokens of one chunk, for ``heads_per_program`` (layer, head) pairs in turn:
    ``(undo_rope(x) - mean) / scale``. The tokens' cos and sin are loaded once."""
    n_blocks = tl.cdiv(T, BT)
    b = tl.program_id(0) // n_blocks
    t = (tl.program_id(0) % n_blocks) * BT + tl.arange(0, BT)[:, None]
    d = tl.arange(0, D)[None, :]
    m = t < T
    n = b.to(tl.int64) * T + t
    if ROPE:
        rot = d < ROT
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        cs = tl.load(cos_ptr + n * HALF + d % HALF, mask=m & rot, other=1.0)
        sn = tl.load(sin_ptr + n * HALF + d % HALF, mask=m & rot, other=0.0)
        sn = tl.where(d < HALF, sn, -sn)  # x * cos - rotate_half(x) * sin
    chunk = x_ptr + tl.load(tok_ptr + n, mask=m, other=0)
    lh0 = tl.program_id(1) * heads_per_program
    for lh in range(lh0, tl.minimum(lh0 + heads_per_program, L * H)):
        base = chunk + tl.load(lay_ptr + lh // H) + (lh % H) * sx_h
        x = tl.load(base + d * sx_d, mask=m, other=0.0).to(tl.float32)
        if ROPE:
            xp = tl.load(base + partner * sx_d, mask=m & rot, other=0.0).to(tl.float32)
            x = tl.where(rot, x * cs + xp * sn, x)
        f = lh * D + d
        y = tl.math.div_rn(x - tl.load(mean_ptr + f), tl.load(scale_ptr + f))
        tl.store(out_ptr + n * n_feat + f, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _finish_kernel(
    f_ptr,  # (N, p) token-major, row stride n_feat
    n_feat,
    mean_ptr,
    scale_ptr,
    cos_ptr,
    sin_ptr,
    span_ptr,  # int32 (B, 2): each chunk's transform-coded tokens [a, b)
    mult_ptr,  # float32 (B,): each chunk's rate-control step multiplier
    out_ptr,  # layer 0's origin of the destination, see KindLayout
    tok_ptr,  # int64 (B * T,): each token's slot, elements from its layer's origin
    lay_ptr,  # int64 (L,): each layer's origin, elements from out_ptr
    so_h,
    so_d,
    L,
    H,
    T,
    heads_per_program,
    D: tl.constexpr,
    HALF: tl.constexpr,
    ROT: tl.constexpr,
    ROPE: tl.constexpr,
    BT: tl.constexpr,
):
    """``BT`` tokens of one chunk, for ``heads_per_program`` (layer, head) pairs in turn:
    ``apply_rope(mean + f * mult * scale)``, written for the chunk's coded tokens only
    (``mult``: the chunk's rate-control step multiplier). The tokens' cos and sin are
    loaded once."""
    n_blocks = tl.cdiv(T, BT)
    b = tl.program_id(0) // n_blocks
    t = (tl.program_id(0) % n_blocks) * BT + tl.arange(0, BT)[:, None]
    d = tl.arange(0, D)[None, :]
    lo = tl.load(span_ptr + 2 * b)
    hi = tl.load(span_ptr + 2 * b + 1)
    mult = tl.load(mult_ptr + b)
    m = (t >= lo) & (t < hi)
    n = b.to(tl.int64) * T + t
    if ROPE:
        rot = d < ROT
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        cs = tl.load(cos_ptr + n * HALF + d % HALF, mask=m & rot, other=1.0)
        sn = tl.load(sin_ptr + n * HALF + d % HALF, mask=m & rot, other=0.0)
        sn = tl.where(d < HALF, -sn, sn)  # v * cos + rotate_half(v) * sin
    row = f_ptr + n * n_feat
    chunk = out_ptr + tl.load(tok_ptr + n, mask=m, other=0) + d * so_d
    lh0 = tl.program_id(1) * heads_per_program
    for lh in range(lh0, tl.minimum(lh0 + heads_per_program, L * H)):
        f = lh * D + d
        v = tl.load(row + f, mask=m, other=0.0).to(tl.float32) * mult
        v = tl.load(mean_ptr + f) + v * tl.load(scale_ptr + f)
        if ROPE:
            pf = lh * D + partner
            vp = tl.load(row + pf, mask=m & rot, other=0.0).to(tl.float32) * mult
            vp = tl.load(mean_ptr + pf) + vp * tl.load(scale_ptr + pf)
            v = tl.where(rot, v * cs + vp * sn, v)
        ptr = chunk + tl.load(lay_ptr + lh // H) + (lh % H) * so_h
        tl.store(ptr, v.to(out_ptr.dtype.element_ty), mask=m)


# -- host ---------------------------------------------------------------------------------


def _on_own_device(method):
    """Run a :class:`GpuCodec` method with the codec's CUDA device current (Triton
    launches on the current device's stream, which the side stream's waits refer to)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if not self._cuda:
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)

    return run


_MIXED_GEMM = [True]  # torch.mm(..., out_dtype=) works here (checked at first use)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate=False) -> None:
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``) through cuBLAS; fp16/bf16
    operands accumulate in float32 and, when ``out`` is float32, are written in float32
    (``torch.mm(..., out_dtype=)``; where that is missing, the GEMM runs in float32).
    With ``accumulate`` into an fp16 ``out`` (a group's projection split over decoder
    ranges) the partial sum is rounded to fp16 in between: values within fp16 rounding
    (2**-11 relative) of one GEMM's."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.device.type == "cuda" and _MIXED_GEMM[0]:
        try:
            prod = torch.mm(a, b, out_dtype=out.dtype)
            out.add_(prod) if accumulate else out.copy_(prod)
            return
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            log.warning("no mixed-dtype GEMM (%s): projections in float32", exc)
            _MIXED_GEMM[0] = False
    if accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


class GpuCodec(CodecBase):
    """Batched encode/decode of 256-token-style chunks on CUDA with a ``rans`` artifact.

    Args:
        artifact: a calibrated codec with quantiser ``rans``.
        device: a CUDA device.
        gemm_dtype: operand dtype of the projections (float16: exact for float16-stored
            bases, within float16 rounding (2**-11 relative) for int8-stored ones; float32
            for the slow reference).
        coder: general-purpose coder over new blobs' payload: None (default) as the CPU
            codec picks it (``"none"``, the rANS stream being entropy-coded already, but
            ``"deflate64k"`` for blobs that hold exact tokens in ``bfloat16-planes``:
            :meth:`~kvtc_store.codec.protocol.CodecBase._set_payload`), or a name for
            every blob (``"none"``; ``"deflate"``, which writes ``"deflate64k"``).
            Decoding reads whatever the blob names.
        nvcomp: DEFLATE payloads on the device with nvCOMP, both ways (new blobs of coder
            ``deflate64k``; blobs that name ``deflate64k`` or ``deflate``): None (default)
            where nvCOMP is importable and the device is CUDA, False never (ISA-L or zlib
            on the host), True always.
        exact_dtype, rate_control: as for :class:`~kvtc_store.codec.KVTCCodec` (the
            exact tokens' encoding in new blobs; per-chunk step scaling to the target
            ratio, estimated on the device over every coded token, as on the CPU). With
            the default coder on a CUDA device without nvCOMP, ``bfloat16-planes`` is
            written as ``bfloat16`` (a log line says so): the planes shrink only
            through DEFLATE, which would then run on the host, and a GPU tier's hits on
            those blobs would pass through host memory.
        fp8_tail: project each group's tail components (coded without a shift, small
            symbols) with an fp8 GEMM, the head in ``gemm_dtype``
            (:mod:`kvtc_store.codec.fp8_tail`: the error bound against the fp16
            projection; decoding then runs in one launch). Off by default: kept only
            where the rate-distortion suite's KL allows it.
        tail_rows: with ``fp8_tail``, per group, its tail's first row instead of the one
            the rANS tables give (:func:`~kvtc_store.codec.fp8_tail.tail_plan`): for
            timing on synthetic artifacts, whose flat spectra have no tail; the error
            bound holds for any rows whose symbols stay within 448.

    Attributes:
        transfers: bytes the decoder moved so far: ``h2d_bytes`` (everything sent from
            the host: blobs and offset tables), ``h2d_blob_bytes`` (blob payloads among
            them), ``d2d_blob_bytes`` (payloads of device blobs copied on the device).
        tail_rows: per group, the first row of its fp8 tail (the group's width: none).
        takes_device_blobs: True: blobs in device memory (a GPU tier's
            :class:`~kvtc_store.backends.DeviceBlob`) decode with no host round trip.
        decode_ranges_min_tokens: batches of at least this many tokens whose chunks
            leave half the multiprocessors or more idle in the rANS decoder (one program
            a chunk) are decoded in up to :data:`DECODE_PARTS` ranges of steps, each
            range's projections on a side stream behind it (on the H200, the TTFT's
            decode of 32 chunks of the Llama-3.1-8B shape, upload included: 17.6 ms
            against 21.5 in one launch); smaller batches gain nothing from it (default
            4096 tokens). An artifact whose plan does not list each group's components
            in order decodes in one launch (:func:`_step_parts`).

    Raises:
        ArtifactError: not a ``rans`` artifact, or tables that do not match its plan.
        ValueError: ``tail_rows`` that do not leave a multiple of 16 rows per group.
        NotImplementedError: a head dimension that is not a power of two.
        NvcompUnavailableError: ``nvcomp=True`` without nvCOMP or CUDA.
    """

    decode_ranges_min_tokens = 4096
    takes_device_blobs = True

    def __init__(
        self,
        artifact: CodecArtifact,
        device: str | torch.device = "cuda",
        gemm_dtype: torch.dtype = torch.float16,
        coder: str | None = None,
        nvcomp: bool | None = None,
        exact_dtype: str = DEFAULT_EXACT_DTYPE,
        rate_control: bool = True,
        fp8_tail: bool = False,
        tail_rows: list[int] | None = None,
    ):
        if artifact.quantizer != "rans":
            raise ArtifactError(f"GpuCodec needs a rans artifact, not {artifact.quantizer!r}")
        self.artifact = artifact
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" names the current device: tensors there report cuda:N, and a
            # device blob or page that is already here must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.gemm_dtype = gemm_dtype
        self._deflater = _device_deflater(self.device, nvcomp)  # None: on the host
        if (
            coder is None
            and exact_dtype in DEFLATED
            and self.device.type == "cuda"
            and self._deflater is None
        ):
            # planes pay off only through DEFLATE, which without nvCOMP runs on the host:
            # a GPU tier's hits on those blobs would go through host memory
            log.info(
                "GpuCodec on %s without nvCOMP: new blobs keep their exact tokens as "
                "bfloat16, not %s, so GPU-tier hits never pass through the host",
                self.device,
                exact_dtype,
            )
            exact_dtype = "bfloat16"
        self._set_payload(coder, exact_dtype)
        rans_tables = tables_of(artifact)
        self._sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 4
        )  # sizes the elementwise kernels' grids; decides when the decoder runs in ranges
        self._staging = HostStaging(self.device)  # grow-only pinned buffer for decode
        self.transfers = {"h2d_bytes": 0, "h2d_blob_bytes": 0, "d2d_blob_bytes": 0}
        self._download = HostDownload(self.device)  # and one for the encoder's streams
        _, heads, dim = artifact.kv_shape
        if dim & (dim - 1):
            raise NotImplementedError(f"head dim {dim} is not a power of two")
        self.tables = DeviceTables.from_rans(rans_tables, self.device)
        dev = self.device
        self._slices = group_slices(artifact.groups, heads, dim)
        self._means = {k: self._kind_vector(artifact.means, k) for k in "kv"}
        self._scales = {k: self._kind_vector(artifact.scales, k) for k in "kv"}
        widths = [b.shape[1] for b in artifact.bases]
        self._offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()
        self.n_rows = self._offsets[-1]  # R
        self._bases = [b.to(dev, gemm_dtype) for b in artifact.bases]
        colmap, steps = [], []
        for r in artifact.plan:
            colmap += range(self._offsets[r.group] + r.start, self._offsets[r.group] + r.end)
            steps += [float(r.step)] * (r.end - r.start)
        self._colmap = torch.tensor(colmap, dtype=torch.int64, device=dev)
        self._steps = torch.tensor(steps, dtype=torch.float32, device=dev)
        uncoded = sorted(set(range(self.n_rows)) - set(colmap))
        self._uncoded = torch.tensor(uncoded, dtype=torch.int64, device=dev)
        self._rounding = float(getattr(artifact, "quant_rounding", 0.5))
        self._bias = float(getattr(artifact, "quant_bias", 0.0))
        self._rate = (
            RateModel(rans_tables, self._steps, self._rounding, dev) if rate_control else None
        )
        rope = artifact.rope
        self._rot = rope.rotary_dim if artifact.undo_rope else 0
        self._inv_freq = rope.inv_freq().to(dev) if self._rot else None
        self._attn_scale = float(rope.attention_scaling)
        self._cuda = self.device.type == "cuda"
        n_steps = self.tables.n_steps
        self._whole = [(0, n_steps, [(g, 0, w, False) for g, w in enumerate(widths)])]
        self._parts = _step_parts(colmap, self._offsets, self.tables.interleave, n_steps,
                                  DECODE_PARTS) or self._whole  # fmt: skip
        self.fp8_tail = fp8_tail
        self._tails: list[Fp8Tail | None] = [None] * len(widths)
        self.tail_rows = list(widths)
        if fp8_tail:
            self.tail_rows = list(tail_rows or tail_plan(artifact, self._offsets))
            if len(self.tail_rows) != len(widths) or any(
                not 0 <= t <= w or (w - t) % 16 for t, w in zip(self.tail_rows, widths)
            ):
                raise ValueError(
                    f"tail_rows {self.tail_rows}: per group, w - 16k for widths {widths}"
                )
            row_steps = torch.zeros(self.n_rows, dtype=torch.float32)
            row_steps[torch.tensor(colmap, dtype=torch.int64)] = torch.tensor(steps)
            for g, (basis, start) in enumerate(zip(artifact.bases, self.tail_rows)):
                if start < widths[g]:
                    sl = row_steps[self._offsets[g] : self._offsets[g + 1]]
                    self._tails[g] = Fp8Tail.build(basis, sl, start, dev)
            self._parts = self._whole  # the tail's GEMM takes whole groups

    @staticmethod
    @contextlib.contextmanager
    def _behind(side: torch.cuda.Stream | None):
        """Work queued inside runs on ``side`` after what the current stream has queued
        so far (the current stream itself where ``side`` is None)."""
        if side is None:
            yield
            return
        side.wait_stream(torch.cuda.current_stream(side.device))
        with torch.cuda.stream(side):
            yield

    def _kind_vector(self, per_group: list[torch.Tensor], kind: str) -> torch.Tensor:
        """Per-group vectors of one kind joined in feature order (groups tile it)."""
        parts = [v for v, (kd, _) in zip(per_group, self._slices) if kd == kind]
        return torch.cat(parts).to(self.device, torch.float32).contiguous()

    def _cos_sin(self, first: torch.Tensor, tokens: int, undo: bool):
        """float32 ``(B * T, rot / 2)`` cos and sin of every token's angles (computed in
        float64, as :mod:`~kvtc_store.codec.rope` does), times the RoPE's attention
        scaling (YaRN's mscale) to redo it, divided by it to undo it (``undo``); ``first``:
        each chunk's first position, ``(B,)`` on the device."""
        if not self._rot:
            z = torch.zeros(1, device=self.device)
            return z, z
        pos = (first.double()[:, None] + torch.arange(tokens, device=self.device)).reshape(-1)
        ang = pos[:, None] * self._inv_freq[None, :]
        s = 1.0 / self._attn_scale if undo else self._attn_scale
        return (ang.cos() * s).float().contiguous(), (ang.sin() * s).float().contiguous()

    @staticmethod
    def _stage(timer, name: str):
        return timer(name) if timer is not None else contextlib.nullcontext()

    def _launch_elementwise(self, kernel, batch: int, tokens: int, *args, rope: bool):
        """Launch :func:`_prep_kernel` or :func:`_finish_kernel`: one program per block of
        tokens of a chunk and share of its (layer, head) pairs, the pairs split only as
        far as it takes to give the device about eight programs per multiprocessor."""
        layers, heads, dim = self.artifact.kv_shape
        bt = max(16, min(64, 4096 // dim))
        rot = self._rot if rope else 0
        blocks = batch * triton.cdiv(tokens, bt)
        pairs = layers * heads
        per = triton.cdiv(pairs, max(1, min(pairs, triton.cdiv(8 * self._sms, blocks))))
        grid = (blocks, triton.cdiv(pairs, per))
        kernel[grid](
            *args, layers, heads, tokens, per,
            D=dim, HALF=max(rot // 2, 1), ROT=rot, ROPE=rot > 0, BT=bt, num_warps=8,
        )  # fmt: skip

    # -- encode ---------------------------------------------------------------------------

    @torch.no_grad()
    @_on_own_device
    def encode_batch(
        self,
        chunks: ChunkBatch | torch.Tensor,
        values: torch.Tensor | None = None,
        first_positions: list[int] | None = None,
        exact_tails: list[int] | None = None,
        timer=None,
        chunk_keys: list[str | None] | None = None,
    ) -> list[bytes]:
        """Compress ``B`` chunks of ``T`` tokens (the protocol's
        :meth:`~kvtc_store.codec.protocol.Codec.encode_batch`; shapes, positions and errors
        there), read by the prep kernel straight from where they are: a dense batch or an
        engine's pages on this codec's device. Chunks elsewhere (host memory) are moved
        here in one copy first.

        Args:
            chunks: a :class:`~kvtc_store.codec.protocol.ChunkBatch`; or, the older form,
                ``(B, L, H, T, D)`` keys, with ``values``, ``first_positions``,
                ``exact_tails`` and ``chunk_keys`` beside it.
            timer: optional ``timer(stage) -> context manager`` (benchmarks).

        Returns:
            One blob per chunk, readable by either implementation on any host.

        Raises:
            ValueError: shapes differ from the artifact's model.
        """
        if isinstance(chunks, torch.Tensor):
            if values is None or first_positions is None:
                raise ValueError("encode_batch(keys, values, first_positions, ...) needs all three")
            chunks = ChunkBatch.of(chunks, values, first_positions, exact_tails, chunk_keys)
        art = self.artifact
        kv = self._on_device(chunks.kv)
        batch, layers, heads, tokens, dim = kv.batch, kv.layers, kv.heads, kv.tokens, kv.dim
        if (layers, heads, dim) != tuple(art.kv_shape):
            raise ValueError(
                f"chunks of (L, H, D) = {(layers, heads, dim)} do not match {tuple(art.kv_shape)}"
            )
        first_positions = [int(f) for f in chunks.first_positions]
        tails = chunks.tails()
        spans = [self.compressed_span(tokens, f, e) for f, e in zip(first_positions, tails)]
        n = batch * tokens
        with self._stage(timer, "rope_mean"):
            first = torch.tensor(first_positions, dtype=torch.int64, device=self.device)
            cos, sin = self._cos_sin(first, tokens, undo=True)
            feats = {}
            p = layers * heads * dim
            for kind, src in (("k", kv.keys), ("v", kv.values)):
                out = torch.empty(n, p, dtype=self.gemm_dtype, device=self.device)
                self._launch_elementwise(
                    _prep_kernel, batch, tokens, *_address(src), cos, sin,
                    self._means[kind], self._scales[kind], out, p, rope=kind == "k",
                )  # fmt: skip
                feats[kind] = out
        with self._stage(timer, "projection"):
            coeffs = torch.empty(self.n_rows, n, dtype=torch.float32, device=self.device)
            for g, (kind, sl) in enumerate(self._slices):
                o0, o1 = self._offsets[g], self._offsets[g + 1]
                _mm_into(coeffs[o0:o1], self._bases[g].T, feats[kind][:, sl].T)
            del feats
        with self._stage(timer, "rate_control"):
            exps = self._step_exps(coeffs, spans, tokens)
        with self._stage(timer, "quantise_rans"):
            coded = [(b, a, e) for b, (a, e) in enumerate(spans) if e > a]
            streams = encode_gpu_device(
                coeffs, self._colmap, self.tables,
                [e - a for _, a, e in coded], [b * tokens + a for b, a, _ in coded],
                steps=self._steps, rounding=self._rounding,
            )  # fmt: skip
            where = {b: j for j, (b, _, _) in enumerate(coded)}
            del coeffs
        with contextlib.ExitStack() as lent:  # the pinned buffer, until the blobs are built
            with self._stage(timer, "download"):
                mv = memoryview(lent.enter_context(self._download.download(streams.data)))
                parts = []
                for b, (a, e) in enumerate(spans):
                    exact = b""
                    if a > 0 or e < tokens:
                        ek, ev = (x[0].contiguous() for x in kv.read([b], _outside(a, e, tokens)))
                        exact = pack_exact(ek, ev, self.exact_dtype).cpu().numpy().tobytes()
                    o, n = (0, 0) if b not in where else streams.span(where[b])
                    parts.append((mv[o : o + n], exact))
            with self._stage(timer, "blobs"):
                names = chunks.names()
                blobs = self._blobs(tokens, kv.dtype, first_positions, tails, parts, exps, names)
        return blobs

    def _on_device(self, kv: ChunkKV) -> ChunkKV:
        """``kv`` if it is on this codec's device, else its chunks gathered and moved
        here in one copy (a dense batch)."""
        if kv.device == self.device:
            return kv
        every = torch.arange(kv.tokens)
        keys, values = (x.to(self.device) for x in kv.read(range(kv.batch), every))
        return ChunkKV.dense(keys, values)

    def _step_exps(self, coeffs: torch.Tensor, spans, tokens: int) -> list[int]:
        """Rate control: each chunk's step exponent, chosen on its coded tokens (chunks of
        one coded span together, a few at a time), and ``coeffs`` ``(R, B * T)`` divided
        by each chunk's multiplier in place, so that the encoder's calibrated steps
        quantise at the chosen ones (the same float32 product as the CPU codec's)."""
        exps = [0] * len(spans)
        if self._rate is None:
            return exps
        by_span: dict[tuple[int, int], list[int]] = {}
        for b, (a, e) in enumerate(spans):
            if e > a:
                by_span.setdefault((a, e), []).append(b)
        per = max(1, (256 << 20) // max(1, 4 * tokens * self._colmap.numel()))
        for (a, e), chunks in by_span.items():
            for i in range(0, len(chunks), per):
                idx = chunks[i : i + per]
                cols = torch.tensor(
                    [b * tokens + t for b in idx for t in range(a, e)], device=coeffs.device
                )
                coded = coeffs[:, cols][self._colmap].T.reshape(len(idx), e - a, -1)
                exps_b = choose_step_exps(self._rate, coded, self.artifact, self.header_bytes())
                for b, x in zip(idx, exps_b.tolist()):
                    exps[b] = int(x)
        for b, x in enumerate(exps):
            if x:
                coeffs[:, b * tokens : (b + 1) * tokens] *= 1.0 / step_multiplier(x)
        return exps

    def _blobs(self, tokens, dtype, first_positions, tails, parts, exps, names) -> list[bytes]:
        """One blob per chunk from its ``(stream, exact)`` byte parts, each checksummed
        and built by a host thread (:func:`~kvtc_store.codec.blob.pack_blob_parts`: xxh64
        and the copies release the GIL); payloads of a general-purpose coder (each blob's
        :meth:`~kvtc_store.codec.protocol.CodecBase.payload_coder`) coded first, all of
        one coder together."""
        coders = [self.payload_coder(len(ex)) for _, ex in parts]
        headers = [
            self.blob_header(
                tokens, dtype, f, e, c.name, {"stream": len(st), "exact": len(ex)}, x, k
            )
            for f, e, (st, ex), x, k, c in zip(first_positions, tails, parts, exps, names, coders)
        ]
        blobs: list[bytes | None] = [None] * len(parts)
        for coder in {c.name: c for c in coders if c.name != "none"}.values():
            idx = [i for i, c in enumerate(coders) if c.name == coder.name]
            payloads = self._entropy_code(coder, [bytes(parts[i][0]) + parts[i][1] for i in idx])
            for i, p in zip(idx, payloads):
                blobs[i] = pack_blob(headers[i], p)
        raw = [i for i, c in enumerate(coders) if c.name == "none"]
        pieces = [[p for p in parts[i] if len(p)] for i in raw]
        heads = [headers[i] for i in raw]
        if sum(len(p) for pair in pieces for p in pair) >= _POOL_BLOBS_MIN:
            packed = list(host_pool().map(pack_blob_parts, heads, pieces))
        else:
            packed = [pack_blob_parts(h, p) for h, p in zip(heads, pieces)]
        for i, b in zip(raw, packed):
            blobs[i] = b
        return blobs

    def _entropy_code(self, coder, payloads: list[bytes]) -> list[bytes]:
        """``coder`` (an :class:`~kvtc_store.codec.entropy.EntropyCoder`) over each
        payload: RAW Deflate of every 64 KiB piece of the batch in one nvCOMP call on the
        device where it has nvCOMP (the payloads go there and back: the rANS streams come
        off the device as bytes), else on the host chunk by chunk, as the CPU codec does."""
        if coder.name == "none":
            return payloads
        if self._deflater is not None and coder.name in ("deflate64k", "deflate"):
            try:
                if coder.name == "deflate":  # one stream a payload (older blobs)
                    return self._deflater.compress_host(payloads)
                return self._deflate_pieces(payloads)
            except Exception as exc:  # noqa: BLE001 - the host writes the same format
                log.warning("nvCOMP Deflate failed (%s): deflating on the host", exc)
        return [coder.encode(p) for p in payloads]

    def _deflate_pieces(self, payloads: list[bytes]) -> list[bytes]:
        """``deflate64k`` payloads: all pieces of all payloads deflated in one nvCOMP call
        (each payload copied to the device at an aligned offset, so its pieces are too).
        A piece that nvCOMP does not shrink below its stored size is written as stored
        blocks instead (:func:`~kvtc_store.codec.entropy.stored_parts`), as zlib and
        ISA-L do: nvCOMP codes every block with Huffman tables, and on the rANS streams,
        entropy-coded already, that saves nothing and makes inflating several times slower
        (benchmarks/results/gpu_codec.md)."""
        dev, starts = self._deflater.to_device_packed(payloads)
        raws = [piece_raw_sizes(len(p)) for p in payloads]
        offsets = [s + PIECE_SIZE * np.arange(len(r)) for s, r in zip(starts, raws)]
        out, out_offsets, comp = self._deflater.compress_spans(
            dev, np.concatenate([np.zeros(0, np.int64), *offsets]),
            np.concatenate([np.zeros(0, np.int64), *raws]),
        )  # fmt: skip
        host = out.cpu().numpy()
        coded, j = [], 0
        for payload, r in zip(payloads, raws):
            raw = memoryview(payload).cast("B")
            pieces = []
            for k, n in enumerate(r.tolist()):
                o, c = out_offsets[j + k], comp[j + k]
                if c < stored_size(n):
                    pieces.append(host[o : o + c])
                else:
                    pieces.append(stored_parts(raw[k * PIECE_SIZE : k * PIECE_SIZE + n]))
            coded.append(pack_pieces(pieces))
            j += len(r)
        return coded

    # -- decode ---------------------------------------------------------------------------

    @torch.no_grad()
    def decode_batch(
        self,
        blobs: list[bytes],
        out: ChunkKV | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        dtype: torch.dtype | None = None,
        expect=None,
        timer=None,
    ) -> DecodedBatch:
        """Decompress consecutive chunks of equal token count in one batch straight into
        ``out``, up to the first that fails (the protocol's
        :meth:`~kvtc_store.codec.protocol.Codec.decode_batch`; the prefix rule and errors
        there).

        Host side, in order: each blob's header is parsed and checked (O(blobs) Python);
        the payloads and a small table of per-chunk offsets are copied by several threads
        into this codec's pinned staging buffer (:class:`~.staging.HostStaging`, kept
        between calls) and sent to the device in one pass of a few slices; the device
        work is queued; the payload checksums (xxh64) are verified by the host threads
        while the device decodes; the call returns once both are done. A blob whose
        checksum fails ends the prefix there, exactly as if it had been checked first.
        Payloads coded ``deflate64k`` (or ``deflate``) are inflated on the device by one
        nvCOMP call when this codec has nvCOMP, every piece of every blob a stream of that
        call, from the staging upload into its place (their checksums verified first,
        before the upload: nvCOMP does not validate what it inflates), else on the host
        while parsing. Should nvCOMP fail, they are inflated on the host and uploaded
        again, so the prefix and its error are the CPU decoder's. Calls on one codec from
        several threads take turns for the staging buffer.

        Args:
            blobs: blobs written by this artifact (on any host).
            out: the destination: a :class:`~kvtc_store.codec.layout.ChunkKV` (a dense
                cache or an engine's pages; the older ``(keys, values)`` pair of
                ``(B, L, H, T, D)`` tensors is taken too). On this codec's device, the
                finishing kernel writes each token's K and V once, at its place; on
                another device (host pages), the batch is decoded into a device buffer
                and copied there once. Default: a new dense batch on this device.
            dtype: of a new destination (default: the first blob's input dtype).
            expect: chunk bindings (the protocol).
            timer: optional ``timer(stage) -> context manager`` (benchmarks); stages
                ``parse``, ``upload``, ``inflate`` (nvCOMP), ``rans_dequantise``,
                ``projection``, ``rope_write``, ``exact``, ``verify`` (what the
                checksums still take once the device work is done, and the status read).

        Returns:
            :class:`~kvtc_store.codec.protocol.DecodedBatch`.

        Raises:
            ValueError: blobs of different token counts, or ``out`` that does not fit.
        """
        if isinstance(out, tuple):
            out = ChunkKV.dense(*out)
        blobs = list(blobs)
        misfiled = None
        if expect is not None:
            n_bound, misfiled = bound_prefix(blobs, expect)
            blobs = blobs[:n_bound]
        if out is not None and out.device != self.device and blobs:
            got = self.decode_batch(blobs, dtype=out.dtype, timer=timer)
            out.write(range(got.count), torch.arange(out.tokens),
                      got.keys[: got.count], got.values[: got.count])  # fmt: skip
            got.out = out
        else:
            got = self._decode_here(blobs, out, dtype, timer)
        if got.error is None:
            got.error = misfiled
        return got

    @_on_own_device
    def _decode_here(self, blobs, out: ChunkKV | None, dtype, timer) -> DecodedBatch:
        """:meth:`decode_batch` into a destination on this device (or a new one)."""
        art = self.artifact
        layers, heads, dim = art.kv_shape
        with self._stage(timer, "parse"):
            parsed, error = self._verify_packed(*self._parse_all(blobs))
        batch = len(blobs)
        tokens = parsed[0].header.shape[3] if parsed else 0
        if any(p.header.shape[3] != tokens for p in parsed):
            raise ValueError("decode_batch needs chunks of equal token count")
        if dtype is None:
            dtype = DTYPES.get(parsed[0].header.dtype, torch.float32) if parsed else torch.bfloat16
        if out is None:
            shape = (batch, layers, heads, tokens, dim)
            out = ChunkKV.dense(
                torch.empty(shape, dtype=dtype, device=self.device),
                torch.empty(shape, dtype=dtype, device=self.device),
            )
        elif parsed:
            out.check(layers, heads, dim, batch, tokens)
        if not parsed:
            return DecodedBatch(out, [], 0, error)
        n = batch * tokens
        with self._stage(timer, "upload"):
            dev, layout = self._upload(parsed, batch)
            checks = [
                (i, host_pool().submit(payload_intact, p.header, p.payload))
                for i, p in enumerate(parsed)
                if p.payload is not None
            ]  # the checksums run on the host threads while the device decodes
        if layout.inflate is not None:
            with self._stage(timer, "inflate"):
                if not self._inflate(dev, layout.inflate):
                    parsed, error = self._inflate_on_host(parsed, error)
                    if not parsed:
                        return DecodedBatch(out, [], 0, error)
                    dev, layout = self._upload(parsed, batch)
        coded = layout.coded
        meta = dev[: layout.meta_bytes].view(torch.int64)
        nc = len(coded)
        base, end, lanes, col0 = (meta[j * nc : (j + 1) * nc] for j in range(4))
        spans = meta[4 * nc : 4 * nc + 2 * batch]
        first = meta[4 * nc + 2 * batch : 4 * nc + 3 * batch]
        words = dev.view(torch.int16)
        with self._stage(timer, "rans_dequantise"):
            coeffs = torch.empty(self.n_rows, n, dtype=self.gemm_dtype, device=self.device)
            if self._uncoded.numel():
                coeffs.index_fill_(0, self._uncoded, 0)
            rans = RansDecode(
                words, base, end, lanes, col0, layout.max_lanes, self.tables, coeffs,
                colmap=self._colmap, steps=self._steps, bias=self._bias,
            )  # fmt: skip
        p = layers * heads * dim
        feats = {
            kind: torch.empty(n, p, dtype=self.gemm_dtype, device=self.device) for kind in "kv"
        }
        # the decoder in ranges of steps; each range's projections queued behind it on a
        # side stream, so they run on the multiprocessors the next range leaves idle
        ranged = len(coded) * 2 <= self._sms and n >= self.decode_ranges_min_tokens
        parts = self._parts if ranged else self._whole
        side = torch.cuda.Stream(self.device) if self._cuda and len(parts) > 1 else None
        try:
            for step0, step1, jobs in parts:
                with self._stage(timer, "rans_dequantise"):
                    rans.launch(step0, step1)
                with self._stage(timer, "projection"), self._behind(side):
                    for g, a, b, accumulate in jobs:
                        kind, sl = self._slices[g]
                        self._project(g, a, b, coeffs, feats[kind][:, sl], accumulate)
        finally:  # coeffs and feats go back to the allocator only after the side's GEMMs
            if side is not None:
                torch.cuda.current_stream(self.device).wait_stream(side)
        status = rans.status
        del coeffs
        with self._stage(timer, "rope_write"):
            cos, sin = self._cos_sin(first, tokens, undo=False)
            mults = [step_multiplier(q.header.step_exp) for q in parsed]
            mult = torch.tensor(mults + [1.0] * (batch - len(parsed)), dtype=torch.float32)
            mult = mult.to(self.device, non_blocking=True)
            for kind, dst in (("k", out.keys), ("v", out.values)):
                self._launch_elementwise(
                    _finish_kernel, batch, tokens, feats[kind], p,
                    self._means[kind], self._scales[kind], cos, sin, spans, mult,
                    *_address(dst), rope=kind == "k",
                )  # fmt: skip
        with self._stage(timer, "exact"):
            for i, p in enumerate(parsed):
                n_exact = tokens - (p.b - p.a)
                if not n_exact:
                    continue
                o = layout.exact_at[i]
                ek, ev = unpack_exact(
                    dev[o : o + p.exact_len], layers, heads, n_exact, dim, p.header.exact_dtype
                )
                out.write([i], _outside(p.a, p.b, tokens), ek[None], ev[None])
        with self._stage(timer, "verify"):
            count = len(parsed)
            for i, check in checks:  # in blob order: the first bad one ends the prefix
                if i < count and not check.result():
                    count, error = i, BlobCorruptError(PAYLOAD_CHECKSUM_MISMATCH)
            bad = np.flatnonzero(status.cpu().numpy() != 0)
            if bad.size and coded[int(bad[0])] < count:
                count = coded[int(bad[0])]
                error = BlobCorruptError(
                    "rANS stream does not decode to its initial state (data altered)"
                )
        firsts = [int(p.header.first_position) for p in parsed[:count]]
        return DecodedBatch(out, firsts, count, error)

    def _project(self, g: int, a: int, b: int, coeffs: torch.Tensor, out: torch.Tensor,
                 accumulate: bool) -> None:  # fmt: skip
        """``out (N, p_g) (+)= rows [a, b) of group g`` ᵀ ``@`` its basis rows ᵀ: the fp8
        tail first (where the group has one; whole groups only), then the head in
        ``gemm_dtype``, accumulating into the tail's result inside its GEMM."""
        off, tail = self._offsets[g], self._tails[g]
        head_end = b
        if tail is not None:
            assert (a, b) == (0, self._offsets[g + 1] - off), "fp8 tail: whole groups"
            tail.project(coeffs[off + tail.start : off + b], out, accumulate)
            head_end, accumulate = tail.start, True
        if head_end > a:
            rows = coeffs[off + a : off + head_end]
            _mm_into(out, rows.T, self._bases[g][:, a:head_end].T, accumulate)

    def _upload(self, parsed: list[_Blob], batch: int):
        """Put every parsed blob's sections on the device in one buffer: an int64 table
        (each coded chunk's stream base, end, lanes and first column; each chunk's coded
        token span and first position), then each blob's ``stream ‖ exact`` bytes, then
        the payloads still to inflate (``_Blob.packed``, each at an aligned offset, so
        that its pieces are too), whose ``stream ‖ exact`` places are left for
        :meth:`_inflate` to fill: ``_Layout.inflate`` lists every piece's offset and
        size, and where it inflates to (piece ``k`` of a payload at ``k`` pieces' raw
        size past the blob's ``stream ‖ exact`` place) and to how many bytes."""
        tokens = parsed[0].header.shape[3]
        g = self.tables.interleave
        coded = [i for i, p in enumerate(parsed) if p.b > p.a]
        nc = len(coded)
        meta = np.zeros(4 * nc + 3 * batch, dtype=np.int64)
        meta_bytes = meta.nbytes
        offset = aligned(meta_bytes)  # 16 bytes: int16 and bf16 views, nvCOMP's buffers
        parts: list[tuple[int, object]] = [(0, meta)]
        exact_at = []
        stream_at = []
        for p in parsed:
            if p.raw is not None:
                parts.append((offset, p.raw))
            stream_at.append(offset)
            exact_at.append(offset + p.stream_len)
            offset = aligned(offset + p.stream_len + p.exact_len)
        jobs: list[list[np.ndarray]] = [[], [], [], []]
        for i, p in enumerate(parsed):
            if p.packed is not None:
                parts.append((offset, p.packed))
                starts, sizes, raw_at, raw_sizes = p.pieces
                for table, part in zip(jobs, (offset + starts, sizes, stream_at[i] + raw_at,
                                              raw_sizes)):  # fmt: skip
                    table.append(part)
                offset = aligned(offset + len(p.packed))
        inflate = tuple(np.concatenate(t) for t in jobs) if jobs[0] else None
        for j, i in enumerate(coded):
            p = parsed[i]
            meta[j] = stream_at[i] // 2
            meta[nc + j] = (stream_at[i] + p.stream_len) // 2
            meta[2 * nc + j] = (p.b - p.a) * g
            meta[3 * nc + j] = i * tokens + p.a
        for i, p in enumerate(parsed):
            meta[4 * nc + 2 * i : 4 * nc + 2 * i + 2] = (p.a, p.b)
            meta[4 * nc + 2 * batch + i] = p.header.first_position
        # chunks past the parsed ones: an empty span (nothing written), position 0
        dev = self._send(parts, max(offset, 8))
        max_lanes = int(meta[2 * nc : 3 * nc].max()) if nc else 0
        return dev, _Layout(meta_bytes, exact_at, max_lanes, coded, inflate)

    def _send(self, parts: list[tuple[int, object]], nbytes: int) -> torch.Tensor:
        """The device buffer of :meth:`_upload`: host parts through the pinned staging
        buffer (counted in :attr:`transfers` ``h2d_bytes``, the blobs' share in
        ``h2d_blob_bytes``), parts already on this device (a GPU tier's blobs) copied on
        the device (``d2d_blob_bytes``). Where every blob is on the device, only the
        offset table (part 0) crosses from the host."""
        on_device = [(o, b) for o, b in parts if isinstance(b, torch.Tensor)]
        host = [(o, b) for o, b in parts if not isinstance(b, torch.Tensor)]
        blob_bytes = sum(memoryview(b).nbytes for _, b in host[1:])
        t = self.transfers
        if not on_device:
            t["h2d_bytes"] += nbytes
            t["h2d_blob_bytes"] += blob_bytes
            return self._staging.upload(parts, nbytes)
        end = max(o + memoryview(b).nbytes for o, b in host)  # host parts' span
        staged = self._staging.upload(host, end)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dev[:end].copy_(staged)
        for o, b in on_device:
            dev[o : o + b.numel()].copy_(b)
            t["d2d_blob_bytes"] += b.numel()
        t["h2d_bytes"] += end
        t["h2d_blob_bytes"] += blob_bytes
        return dev

    def _inflate(self, dev: torch.Tensor, jobs: tuple[np.ndarray, ...]) -> bool:
        """Inflate the pieces that :meth:`_upload` put in ``dev`` (``jobs``: offsets,
        sizes, raw offsets, raw sizes) into their ``stream ‖ exact`` places, in one nvCOMP
        call. False if nvCOMP fails (a stream it cannot inflate, or nvCOMP itself): the
        caller then inflates them on the host, which names the culprit."""
        offsets, sizes, raw_at, raw_sizes = jobs
        try:
            self._deflater.decompress_spans(dev, offsets, sizes, dev, raw_at, raw_sizes)
        except Exception as exc:  # noqa: BLE001 - the host path gives the exact error
            log.warning("nvCOMP could not inflate the batch (%s): inflating on the host", exc)
            return False
        return True

    @staticmethod
    def _inflate_on_host(parsed: list[_Blob], error: BlobError | None):
        """Inflate the packed payloads on the host (as the CPU decoder does); the prefix
        ends at the first that does not inflate, with that decoder's error."""
        for i, p in enumerate(parsed):
            if p.packed is None:
                continue
            try:
                coder = get_coder(p.header.coder)
                packed = p.packed
                if isinstance(packed, torch.Tensor):  # a device blob's
                    packed = packed.cpu().numpy()
                p.raw = memoryview(coder.decode(bytes(packed), p.stream_len + p.exact_len))
            except BlobError as exc:
                return parsed[:i], exc
            p.packed = None
            p.pieces = None
        return parsed, error

    @staticmethod
    def _verify_packed(parsed: list[_Blob], error: BlobError | None):
        """Verify the checksums of the payloads to inflate on the device, on the host
        threads at once, before nvCOMP reads them (it does not validate its input); the
        prefix ends at the first that fails."""
        checks = [
            (i, host_pool().submit(payload_intact, p.header, p.packed))
            for i, p in enumerate(parsed)
            if p.packed is not None and not isinstance(p.packed, torch.Tensor)
        ]  # device blobs (a GPU tier's) stay unchecked, as ``none`` ones do
        for i, check in checks:
            if not check.result():
                for _, c in checks:
                    c.cancel()
                return parsed[:i], BlobCorruptError(PAYLOAD_CHECKSUM_MISMATCH)
        return parsed, error

    def _parse_all(self, blobs: list[bytes]) -> tuple[list[_Blob], BlobError | None]:
        """Parse blobs up to the first bad one (its error, as :meth:`KVTCCodec.decode_prefix`
        reports it, checked in the same order; payload checksums of ``none``-coded blobs
        are left to the caller, except where another check fails after where the
        checksum would have come)."""
        parsed: list[_Blob] = []
        for blob in blobs:
            try:
                header, payload = unpack_blob_header(blob)
            except BlobError as exc:
                return parsed, exc
            except Exception as exc:  # noqa: BLE001 - a checksummed header that lies
                return parsed, BlobCorruptError(f"blob does not decode: {exc}")
            try:
                parsed.append(self._parse(header, payload))
            except Exception as exc:  # noqa: BLE001 - a checksummed header that lies
                if not isinstance(payload, torch.Tensor) and not payload_intact(header, payload):
                    return parsed, BlobCorruptError(PAYLOAD_CHECKSUM_MISMATCH)
                if isinstance(exc, BlobError):
                    return parsed, exc
                return parsed, BlobCorruptError(f"blob does not decode: {exc}")
        return parsed, None

    @staticmethod
    def _pieces(table, raw_len: int, length: int) -> tuple[np.ndarray, ...]:
        """A ``deflate64k`` payload's pieces (``_Blob.pieces``: offsets, coded sizes, raw
        offsets, raw sizes) from its piece ``table`` (the payload, or its start), checked
        against the payload's ``length`` and ``raw_len``."""
        starts, sizes = read_piece_table(table, raw_len, length)
        raw_sizes = piece_raw_sizes(raw_len)
        raw_at = PIECE_SIZE * np.arange(len(raw_sizes), dtype=np.int64)
        return starts, sizes, raw_at, raw_sizes

    def _parse(self, header: BlobHeader, payload: memoryview) -> _Blob:
        """Check one blob's header against this codec and locate its sections. A ``none``
        payload is left in place, its checksum unverified (``_Blob.payload``); a
        ``deflate64k`` or ``deflate`` one, when this codec has nvCOMP, too (``_Blob.packed``,
        verified by :meth:`_verify_packed`; its pieces located, the table checked); another
        coder's, or one with nothing to inflate, is verified and decoded here, on the host."""
        self.check_header(header)
        layers, heads, dim, tokens = header.shape
        if (layers, heads, dim) != tuple(self.artifact.kv_shape):
            raise BlobCorruptError(f"blob shape {header.shape} does not match the codec")
        a, b = self.compressed_span(tokens, header.first_position, header.exact_tail)
        n_exact = tokens - (b - a)
        want = {
            "stream": header.sections.get("stream", 0) if b > a else 0,
            "exact": exact_nbytes(layers, heads, n_exact, dim, header.exact_dtype),
        }
        if header.sections != want:
            raise BlobCorruptError(f"blob sections {header.sections} do not match {want}")
        if want["stream"] % 2:
            raise BlobCorruptError("rANS stream of odd length")
        if want["stream"] < 4 * (b - a) * self.tables.interleave:
            raise BlobCorruptError("rANS stream shorter than its lanes' states")
        raw_len = sum(want.values())
        if isinstance(payload, torch.Tensor):  # a device blob (a GPU tier's)
            if header.coder == "none" and payload.device == self.device:
                if payload.numel() != raw_len:
                    raise BlobCorruptError(f"payload of {payload.numel()} bytes, sections {want}")
                # stays on the device: no checksum on the host (the tier's copy of what
                # was put; the rANS decoder's final-state check still catches a bad stream)
                return _Blob(header, a, b, payload, want["stream"], want["exact"], None)
            deflated = header.coder == "deflate64k" and self._deflater is not None
            if deflated and raw_len and payload.device == self.device:
                # stays on the device too, inflated there by nvCOMP: only its piece table
                # comes to the host (no checksum, as above; nvCOMP's failure falls back to
                # the host, which names a bad piece)
                table = payload[: table_size(raw_len)].cpu().numpy()
                pieces = self._pieces(table, raw_len, payload.numel())
                return _Blob(header, a, b, None, want["stream"], want["exact"], None, payload,
                             pieces)  # fmt: skip
            payload = memoryview(payload.cpu().numpy())  # inflated on the host, or moved
        if header.coder == "none":  # no copy: the payload goes straight to pinned memory
            if len(payload) != sum(want.values()):
                raise BlobCorruptError(f"payload of {len(payload)} bytes, sections {want}")
            return _Blob(header, a, b, payload, want["stream"], want["exact"], payload)
        if self._deflater is not None and raw_len and header.coder == "deflate64k":
            pieces = self._pieces(payload, raw_len, len(payload))  # inflated on the device
            return _Blob(header, a, b, None, want["stream"], want["exact"], None, payload, pieces)
        if self._deflater is not None and raw_len and header.coder == "deflate" and payload:
            one = (np.zeros(1, np.int64), np.array([len(payload)]), np.zeros(1, np.int64),
                   np.array([raw_len]))  # fmt: skip
            return _Blob(header, a, b, None, want["stream"], want["exact"], None, payload, one)
        verify_payload(header, payload)
        raw = get_coder(header.coder).decode(bytes(payload), sum(want.values()))
        return _Blob(header, a, b, memoryview(raw), want["stream"], want["exact"], None)


@dataclass
class _Blob:
    """One parsed blob: header, coded token span ``[a, b)``, ``raw`` = ``stream ‖ exact``
    bytes (their lengths; None while ``packed``), the payload whose checksum is still to
    verify (or None), the RAW DEFLATE payload to inflate on the device (or None) and its
    pieces (int64 offsets and sizes in ``packed``, offsets and sizes in ``raw``)."""

    header: BlobHeader
    a: int
    b: int
    raw: memoryview | None
    stream_len: int
    exact_len: int
    payload: memoryview | None
    packed: memoryview | None = None
    pieces: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class _Layout:
    """Where :meth:`GpuCodec._upload` put things in the device buffer (bytes)."""

    meta_bytes: int
    exact_at: list[int]
    max_lanes: int
    coded: list[int]  # parsed blobs with a coded token span
    inflate: tuple[np.ndarray, ...] | None  # for :meth:`GpuCodec._inflate`, or None


def _step_parts(colmap: list[int], offsets: list[int], interleave: int, n_steps: int,
                parts: int) -> list[tuple[int, int, list[tuple[int, int, int, bool]]]] | None:  # fmt: skip
    """The rANS decoder's steps cut into ``parts`` ranges and, for each, the projections
    of the coefficient rows that range completes: ``(step0, step1, [(group, row0, row1,
    accumulate)])``, rows local to the group (``accumulate``: an earlier range already
    wrote the group's features, so this GEMM adds to them). Step ``i`` decodes
    components ``i * interleave ..`` of the plan, whose rows ``colmap`` gives. A group no
    range codes gets one GEMM of its (zero) rows in the first range, so that its
    features are written. Bounds fall on multiples of 8 components where they can (the
    tensor cores' operand alignment).

    Returns:
        The ranges, or None where the rows of two ranges interleave within a group (a
        plan that is not in component order per group: the caller decodes in one range).
    """
    rows = np.asarray(colmap, dtype=np.int64)
    align = max(1, 8 // interleave)
    bounds = sorted({min(n_steps, -(-n_steps * i // parts // align) * align)
                     for i in range(parts + 1)})  # fmt: skip
    groups = len(offsets) - 1
    spans: list[list[tuple[int, int]]] = [[] for _ in range(groups)]
    out = []
    for step0, step1 in itertools.pairwise(bounds):
        mine = rows[step0 * interleave : step1 * interleave]
        jobs = []
        for g in range(groups):
            inside = mine[(mine >= offsets[g]) & (mine < offsets[g + 1])] - offsets[g]
            if inside.size:
                a, b = int(inside.min()), int(inside.max()) + 1
                jobs.append((g, a, b, bool(spans[g])))
                spans[g].append((a, b))
        out.append((step0, step1, jobs))
    for found in spans:
        found.sort()
        if any(b0 > a1 for (_, b0), (a1, _) in itertools.pairwise(found)):
            return None
    if not out:
        return None
    for g in range(groups):
        if not spans[g]:
            out[0][2].insert(0, (g, 0, offsets[g + 1] - offsets[g], False))
    return out


def _device_deflater(device: torch.device, wanted: bool | None) -> NvcompCoder | None:
    """nvCOMP's RAW Deflate on ``device``, or None for the host: ``wanted`` None (where
    nvCOMP and CUDA are), False (never) or True (always; NvcompUnavailableError else)."""
    if wanted is False:
        return None
    try:
        return NvcompCoder("deflate", device)
    except NvcompUnavailableError:
        if wanted:
            raise
        return None


def _address(kind: KindLayout) -> tuple:
    """The kernels' arguments for one kind of a :class:`~kvtc_store.codec.layout.ChunkKV`:
    layer 0's origin, the token and layer offset tables (int64, contiguous, on its
    device), the head and dim strides."""
    return (
        kind.base,
        kind.token_offsets.reshape(-1).contiguous(),
        kind.layer_offsets.contiguous(),
        kind.head_stride,
        kind.dim_stride,
    )


def _outside(a: int, b: int, tokens: int) -> torch.Tensor:
    """Token indices ``[0, a)`` then ``[b, tokens)``: a chunk's exactly stored tokens."""
    return torch.cat([torch.arange(0, a), torch.arange(b, tokens)])
