"""Interleaved rANS on CUDA: Triton kernels that encode and decode a batch of chunks.

Bit-exact with the numpy reference :class:`~kvtc_store.codec.rans.RansTables` (same
streams byte for byte; see that module and ``docs/blob-format.md`` for the format):
32-bit states in ``[2^16, 2^32)``, 15-bit frequencies, 16-bit words, ``G`` lanes per
token (lane ``t*G + g`` codes components ``g, g + G, ...`` of token ``t``).

One Triton program codes one chunk: its ``T*G`` lanes sit side by side in one block and
a loop runs over the ``ceil(n / G)`` steps (one component per lane per step). A step has
up to four *phases*, each a vectorised put/get over the lanes that take part (the table
symbol of every lane; the two raw bytes of escaped lanes; the low bits of shifted
lanes). Lanes that renormalise in one phase read (decoder) or write (encoder) consecutive
16-bit words; their places come from an exclusive prefix sum over the lanes
(``tl.cumsum``), exactly the order the reference uses (Giesen, "Interleaved entropy
coders", arXiv 1402.3392, §3: the interleaving only needs encoder and decoder to agree on
which lane touches the stream when).

Host code, top to bottom:

- encode: :func:`_encode_kernel` writes each chunk's words in *emission* order into a
  per-chunk buffer (capacity from the tables' entropy; a chunk that overflows is coded
  again with the exact size) and its lanes' final states; :func:`_pack_kernel` lays out
  each stream (states, then the words reversed: the decoder reads them last-in first-out)
  in one device buffer (:class:`DeviceStreams`), which the caller copies to the host once.
- decode: the streams are joined and copied to the device once; :func:`_decode_kernel`
  reads them and writes the symbols (or, fused, the dequantised coefficients) wherever
  a column map and strides say, in one launch or, through :class:`RansDecode`, in ranges
  of steps whose lanes' states wait in device memory in between (so that work on the
  components of one range can overlap the decoding of the next).

Sources: Duda, "Asymmetric numeral systems", arXiv 1311.2540 (rANS); Giesen's
``rans_word`` (32-bit state, 16-bit words); Triton language reference (``tl.cumsum``,
``tl.gather``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import BlobCorruptError
from ..rans import ESC, MAX_SHIFT, N_SYM, PREC, RANS_L, K, M, RansTables

log = logging.getLogger(__name__)

_PREC = tl.constexpr(PREC)
_M = tl.constexpr(M)
_RANS_L = tl.constexpr(RANS_L)
_K = tl.constexpr(K)
_ESC = tl.constexpr(ESC)
_N_SYM = tl.constexpr(N_SYM)


# -- tables -------------------------------------------------------------------------------


@dataclass
class DeviceTables:
    """One artifact's rANS tables as device tensors, in the kernels' flat layout.

    Built from the same public fields as :class:`~kvtc_store.codec.rans.RansTables`
    (table ``t = (shift > 0) * n_classes + class``; padding components of the last step
    code a constant 0 with table 0 and shift 0, as the reference does).

    Attributes:
        freq, cum: int32 ``(n_tables * N_SYM,)``: frequency and exclusive cumulative
            frequency of each table's symbols.
        slot2sym: uint8 ``(n_tables * M,)``: the symbol owning each slot of each table.
        col_shift, col_table: int32 ``(n_steps * G,)``: shift and table of component
            ``i * G + g`` (zeros past ``n_components``).
        step_shift: int32 ``(n_steps,)``: 1 where some component of the step is shifted
            (the kernels skip the low-bits phase elsewhere without a block reduction).
        n_components, interleave, n_steps: as in the reference.
        words_per_lane: int: expected 16-bit words per lane of one token (the largest over
            the ``G`` lanes) from the tables' entropies plus the raw low bits; sizes the
            encoder's buffer before its exact size is known.
    """

    freq: torch.Tensor
    cum: torch.Tensor
    slot2sym: torch.Tensor
    col_shift: torch.Tensor
    col_table: torch.Tensor
    step_shift: torch.Tensor
    n_components: int
    interleave: int
    n_steps: int
    words_per_lane: float

    @classmethod
    def from_rans(cls, tables: RansTables, device: str | torch.device = "cuda") -> DeviceTables:
        """Device copy of ``tables`` (freq ``(2, n_classes, N_SYM)``, shift and class per
        component, interleave ``G``)."""
        freq = np.asarray(tables.freq, dtype=np.int64)
        shift = np.asarray(tables.shift, dtype=np.int64)
        klass = np.asarray(tables.cls, dtype=np.int64)
        g = int(tables.interleave)
        n_cls = freq.shape[1]
        flat = freq.reshape(-1, N_SYM)
        cum = np.zeros_like(flat)
        cum[:, 1:] = np.cumsum(flat, axis=1)[:, :-1]
        slot2sym = np.concatenate([np.repeat(np.arange(N_SYM, dtype=np.uint8), f) for f in flat])
        n = shift.size
        n_steps = -(-n // g)
        pad = n_steps * g - n
        table = (shift > 0) * n_cls + klass
        col_shift = np.concatenate([shift, np.zeros(pad, np.int64)])
        col_table = np.concatenate([table, np.zeros(pad, np.int64)])
        # expected bits of each component: its table's entropy plus the raw low bits
        p = flat / M
        entropy = -(p * np.log2(p)).sum(1)
        bits = entropy[col_table] + col_shift
        words_per_lane = float(bits.reshape(n_steps, g).sum(0).max() / 16.0) if n else 0.0

        def dev(a, dtype=torch.int32):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        return cls(
            freq=dev(flat.reshape(-1)),
            cum=dev(cum.reshape(-1)),
            slot2sym=dev(slot2sym, torch.uint8),
            col_shift=dev(col_shift),
            col_table=dev(col_table),
            step_shift=dev((col_shift.reshape(n_steps, g) > 0).any(1)),
            n_components=n,
            interleave=g,
            n_steps=n_steps,
            words_per_lane=words_per_lane,
        )


def _block(lanes: int) -> tuple[int, int]:
    """Power-of-two lane block of one program and its warps (about 128 lanes a warp)."""
    block = max(16, triton.next_power_of_2(max(1, lanes)))
    return block, max(1, min(16, block // 128))


# -- kernels ------------------------------------------------------------------------------


@triton.jit
def _put(x, active, start, freq, words_ptr, e, cap):
    """Encode one symbol ``(start, freq)`` in every ``active`` lane: lanes whose state
    would overflow first emit their low 16 bits at emission indices ``e, e + 1, ...``
    (ascending lane order). Returns the new states and emission count."""
    emit = active & (x >= (freq.to(tl.int64) << (32 - _PREC)))
    n = emit.to(tl.int32)
    rank = tl.cumsum(n, axis=0) - n
    at = e + rank
    tl.store(words_ptr + at, (x & 0xFFFF).to(tl.int16), mask=emit & (at < cap))
    x = tl.where(emit, x >> 16, x)
    xu = x.to(tl.uint32)
    fu = freq.to(tl.uint32)
    qt = (xu // fu).to(tl.int64)
    new = (qt << _PREC) + (x - qt * freq.to(tl.int64)) + start.to(tl.int64)
    return tl.where(active, new, x), e + tl.sum(n, axis=0).to(tl.int64)


@triton.jit
def _put_bits(x, active, value, bits, words_ptr, e, cap):
    """Encode ``value`` (``bits`` bits, uniform: frequency ``M >> bits``) in every
    ``active`` lane; ``bits`` may differ per lane (1..MAX_SHIFT). As :func:`_put`."""
    bits64 = bits.to(tl.int64)
    emit = active & (x >= (tl.full(x.shape, 1, tl.int64) << (32 - bits64)))
    n = emit.to(tl.int32)
    rank = tl.cumsum(n, axis=0) - n
    at = e + rank
    tl.store(words_ptr + at, (x & 0xFFFF).to(tl.int16), mask=emit & (at < cap))
    x = tl.where(emit, x >> 16, x)
    keep = _PREC - bits64  # x // (M >> bits) and x % (M >> bits) as shifts
    new = ((x >> keep) << _PREC) + (x & ((tl.full(x.shape, 1, tl.int64) << keep) - 1))
    new += value.to(tl.int64) << keep
    return tl.where(active, new, x), e + tl.sum(n, axis=0).to(tl.int64)


@triton.jit
def _encode_kernel(
    q_ptr,  # (comp, col) at q_ptr + colmap[comp] * q_comp_stride + col * q_col_stride
    colmap_ptr,  # int64 (n_comp,)
    q_comp_stride,
    q_col_stride,
    step_ptr,  # float32 (n_comp,) (QUANT only)
    rounding,  # (QUANT only)
    col0_ptr,  # int64 (n_chunks,): column of each chunk's first token
    lanes_ptr,  # int32 (n_chunks,): tokens * G
    col_shift_ptr,
    col_table_ptr,
    step_shift_ptr,
    freq_ptr,
    cum_ptr,
    words_ptr,  # int16 (n_chunks * cap,): words in emission order
    cap,  # words per chunk in words_ptr
    states_ptr,  # int64 (total lanes,): final states
    lane0_ptr,  # int64 (n_chunks,): first lane of each chunk in states_ptr
    n_words_ptr,  # int64 (n_chunks,): words emitted (may exceed cap: then code again)
    n_comp,
    n_steps,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
):
    c = tl.program_id(0)
    col0 = tl.load(col0_ptr + c)
    lanes = tl.load(lanes_ptr + c)
    idx = tl.arange(0, BLOCK)
    live = idx < lanes
    tok = (idx // G).to(tl.int64)
    g = idx % G
    words = words_ptr + c.to(tl.int64) * cap
    x = tl.full([BLOCK], _RANS_L, tl.int64)
    e = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    for j in range(n_steps):
        i = n_steps - 1 - j
        comp = i * G + g
        shift = tl.load(col_shift_ptr + comp)
        table = tl.load(col_table_ptr + comp)
        keep = live & (comp < n_comp)
        src = tl.load(colmap_ptr + comp, mask=keep, other=0)
        v = tl.load(q_ptr + src * q_comp_stride + (col0 + tok) * q_col_stride, mask=keep, other=0)
        if QUANT:  # quantize_step: sign(y) * floor(|y| + rounding), |.| <= 32767
            y = tl.math.div_rn(v.to(tl.float32), tl.load(step_ptr + comp, mask=keep, other=1.0))
            mag = tl.minimum(tl.floor(tl.abs(y) + rounding), 32767.0).to(tl.int32)
            q = tl.where(y < 0, -mag, mag)
        else:
            q = v.to(tl.int32)
        h = q >> shift
        shifted = live & (shift > 0)
        if tl.load(step_shift_ptr + i) != 0:
            low = q & ((1 << shift) - 1)
            x, e = _put_bits(x, shifted, low, shift, words, e, cap)
        esc = live & ((h < -_K) | (h > _K))
        if tl.max(esc.to(tl.int32), axis=0) > 0:
            raw = h + 32768
            eight = tl.full([BLOCK], 8, tl.int32)
            x, e = _put_bits(x, esc, raw & 0xFF, eight, words, e, cap)
            x, e = _put_bits(x, esc, raw >> 8, eight, words, e, cap)
        sym = tl.where(esc, _ESC, h + _K)
        flat = table * _N_SYM + sym
        freq = tl.load(freq_ptr + flat, mask=live, other=1)
        start = tl.load(cum_ptr + flat, mask=live, other=0)
        x, e = _put(x, live, start, freq, words, e, cap)
    lane0 = tl.load(lane0_ptr + c)
    tl.store(states_ptr + lane0 + idx, x, mask=live)
    tl.store(n_words_ptr + c, e)


@triton.jit
def _pack_kernel(
    states_ptr,  # int64 (total lanes,)
    lane0_ptr,  # int64 (n_chunks,)
    lanes_ptr,  # int32 (n_chunks,)
    words_ptr,  # int16 (n_chunks * cap,) emission order
    cap,
    n_words_ptr,  # int64 (n_chunks,)
    out0_ptr,  # int64 (n_chunks,): first uint16 of each stream in out_ptr
    out_ptr,  # int16 (total,): streams, back to back
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lanes = tl.load(lanes_ptr + c).to(tl.int64)
    n_words = tl.load(n_words_ptr + c)
    lane0 = tl.load(lane0_ptr + c)
    out0 = tl.load(out0_ptr + c)
    n_state = 2 * lanes  # each state: low then high 16 bits (little-endian uint32)
    in_state = p < n_state
    st = tl.load(states_ptr + lane0 + p // 2, mask=in_state, other=0)
    half = tl.where(p % 2 == 0, st & 0xFFFF, st >> 16)
    j = p - n_state
    in_words = (j >= 0) & (j < n_words)
    w = tl.load(words_ptr + c.to(tl.int64) * cap + (n_words - 1 - j), mask=in_words, other=0)
    val = tl.where(in_state, half.to(tl.int16), w)
    tl.store(out_ptr + out0 + p, val, mask=in_state | in_words)


@triton.jit
def _renorm(x, need, words_ptr, cursor, end):
    """Decoder renormalisation: each lane in ``need`` reads one word; the ``k``-th such
    lane (ascending) reads word ``cursor + count - 1 - k`` (the reference's order).
    Returns states, cursor and 1 where the stream ran out (else 0)."""
    n = need.to(tl.int32)
    rank = tl.cumsum(n, axis=0) - n
    count = tl.sum(n, axis=0).to(tl.int64)
    pos = cursor + count - 1 - rank
    w = tl.load(words_ptr + pos, mask=need & (pos < end), other=0).to(tl.int64) & 0xFFFF
    x = tl.where(need, (x << 16) | w, x)
    return x, cursor + count, (cursor + count > end).to(tl.int32)


@triton.jit
def _get_bits(x, active, bits, words_ptr, cursor, end):
    """Decode a uniform ``bits``-bit value (per lane) in every ``active`` lane."""
    bits64 = bits.to(tl.int64)
    keep = _PREC - bits64
    slot = x & (_M - 1)
    value = slot >> keep
    new = ((x >> _PREC) << keep) + (slot & ((tl.full(x.shape, 1, tl.int64) << keep) - 1))
    x = tl.where(active, new, x)
    x, cursor, bad = _renorm(x, active & (x < _RANS_L), words_ptr, cursor, end)
    return value, x, cursor, bad


@triton.jit(do_not_specialize=["step0", "step1"])  # one compile for every range
def _decode_kernel(
    words_ptr,  # int16 (total,): all streams back to back
    base_ptr,  # int64 (n_chunks,): first uint16 of each stream
    end_ptr,  # int64 (n_chunks,): one past its last
    lanes_ptr,  # int64 (n_chunks,): tokens * G
    col0_ptr,  # int64 (n_chunks,): output column of each chunk's first token
    col_shift_ptr,
    col_table_ptr,
    step_shift_ptr,
    freq_ptr,
    cum_ptr,
    slot2sym_ptr,
    out_ptr,  # value of (comp, col) at out_ptr + colmap[comp] * out_comp_stride + col * out_col_stride
    colmap_ptr,  # int64 (n_comp,)
    out_comp_stride,
    out_col_stride,
    step_ptr,  # float32 (n_comp,) (DEQUANT only)
    bias,  # reconstruction offset toward zero, in steps (DEQUANT only)
    status_ptr,  # int32 (n_chunks,): 0 = ok, 1 = corrupt (between ranges: so far)
    state_ptr,  # int64 (n_chunks, BLOCK): the lanes' states between ranges of steps
    cursor_ptr,  # int64 (n_chunks,): each stream's read position between ranges
    n_comp,
    step0,  # the steps [step0, step1) this launch decodes
    step1,
    G: tl.constexpr,
    BLOCK: tl.constexpr,
    DEQUANT: tl.constexpr,
    FIRST: tl.constexpr,  # step0 == 0: the states come from the stream's head
    LAST: tl.constexpr,  # step1 == n_steps: check the final states, write the status
):
    c = tl.program_id(0)
    base = tl.load(base_ptr + c)
    end = tl.load(end_ptr + c)
    lanes = tl.load(lanes_ptr + c)
    col0 = tl.load(col0_ptr + c)
    idx = tl.arange(0, BLOCK)
    live = idx < lanes
    tok = (idx // G).to(tl.int64)
    g = idx % G
    if FIRST:
        lo = tl.load(words_ptr + base + 2 * idx, mask=live, other=0).to(tl.int64) & 0xFFFF
        hi = tl.load(words_ptr + base + 2 * idx + 1, mask=live, other=0).to(tl.int64) & 0xFFFF
        x = tl.where(live, lo | (hi << 16), _RANS_L)
        bad = tl.max((x < _RANS_L).to(tl.int32), axis=0)
        x = tl.maximum(x, _RANS_L)  # a corrupt stream still decodes (to garbage), flagged
        cursor = base + 2 * lanes.to(tl.int64)
    else:
        x = tl.load(state_ptr + c * BLOCK + idx)
        bad = tl.load(status_ptr + c)
        cursor = tl.load(cursor_ptr + c)
    for i in range(step0, step1):
        # the BLOCK words from the cursor on: those the step's renormalisation can read
        # (at most one a lane), loaded before the table lookups so that the latency of
        # this load does not add to theirs; the lanes pick their words from it below
        ahead = cursor + idx
        window = tl.load(words_ptr + ahead, mask=ahead < end, other=0)
        comp = i * G + g
        shift = tl.load(col_shift_ptr + comp)
        table = tl.load(col_table_ptr + comp)
        slot = x & (_M - 1)
        sym = tl.load(slot2sym_ptr + table.to(tl.int64) * _M + slot).to(tl.int32)
        flat = table * _N_SYM + sym
        freq = tl.load(freq_ptr + flat).to(tl.int64)
        start = tl.load(cum_ptr + flat).to(tl.int64)
        x = tl.where(live, freq * (x >> _PREC) + slot - start, x)
        # renormalise, and count the escapes in the same scan: (escape << 16) | need
        need = live & (x < _RANS_L)
        esc = live & (sym == _ESC)
        packed = need.to(tl.int32) | (esc.to(tl.int32) << 16)
        rank = (tl.cumsum(packed, axis=0) & 0xFFFF) - need.to(tl.int32)
        total = tl.sum(packed, axis=0)
        count = (total & 0xFFFF).to(tl.int64)
        rel = tl.where(need, count - 1 - rank, 0).to(tl.int32)  # < count <= BLOCK
        w = tl.gather(window, rel, 0).to(tl.int64) & 0xFFFF
        x = tl.where(need, (x << 16) | w, x)
        cursor += count
        bad = bad | (cursor > end).to(tl.int32)
        h = sym - _K
        if (total >> 16) > 0:
            eight = tl.full([BLOCK], 8, tl.int32)
            hi8, x, cursor, b = _get_bits(x, esc, eight, words_ptr, cursor, end)
            bad = bad | b
            lo8, x, cursor, b = _get_bits(x, esc, eight, words_ptr, cursor, end)
            bad = bad | b
            h = tl.where(esc, ((hi8 << 8) | lo8).to(tl.int32) - 32768, h)
        shifted = live & (shift > 0)
        if tl.load(step_shift_ptr + i) != 0:
            low, x, cursor, b = _get_bits(x, shifted, shift, words_ptr, cursor, end)
            bad = bad | b
            h = tl.where(shifted, (h << shift) | low.to(tl.int32), h)
        keep = live & (comp < n_comp)
        dest = tl.load(colmap_ptr + comp, mask=keep, other=0)
        ptr = out_ptr + dest * out_comp_stride + (col0 + tok) * out_col_stride
        if DEQUANT:
            step = tl.load(step_ptr + comp, mask=keep, other=0.0)
            hf = h.to(tl.float32)
            sign = tl.where(h > 0, 1.0, tl.where(h < 0, -1.0, 0.0))
            val = (hf - sign * bias) * step
            tl.store(ptr, val.to(out_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(ptr, h.to(out_ptr.dtype.element_ty), mask=keep)
    if LAST:
        ok_end = (cursor == end) & (tl.max((x != _RANS_L).to(tl.int32), axis=0) == 0)
        bad = bad | (1 - ok_end.to(tl.int32))
    else:
        tl.store(state_ptr + c * BLOCK + idx, x)
        tl.store(cursor_ptr + c, cursor)
    tl.store(status_ptr + c, bad)


# -- host ---------------------------------------------------------------------------------


def _counts(tokens_per_chunk, g: int):
    tok = np.asarray(list(tokens_per_chunk), dtype=np.int64)
    if (tok < 0).any():
        raise ValueError("negative token count")
    lanes = tok * g
    lane0 = np.concatenate([[0], np.cumsum(lanes)[:-1]]).astype(np.int64)
    return tok, lanes, lane0


def encode_symbols_gpu(
    q: torch.Tensor,
    tables: DeviceTables,
    tokens_per_chunk: list[int],
    col0: list[int] | None = None,
    capacity: int | None = None,
) -> list[bytes]:
    """rANS-encode a batch of chunks on the GPU; the same bytes as
    :meth:`RansTables.encode <kvtc_store.codec.rans.RansTables.encode>`.

    Args:
        q: int16 or int32 symbols ``(n_components, T)`` on CUDA, any strides (a transposed
            view of a token-major ``(T, n_components)`` tensor works as is).
        tables: from :meth:`DeviceTables.from_rans`, on ``q``'s device.
        tokens_per_chunk: tokens of each chunk.
        col0: column of each chunk's first token (default: chunks are consecutive from 0).
        capacity: 16-bit words per chunk of the encoder's buffer (default: 1.5x the
            tables' expected size plus 16 per lane; a chunk above it is coded again at its
            exact size, so this only trades memory for a rare second pass).

    Returns:
        One stream (bytes) per chunk.

    Raises:
        ValueError: ``q`` has another number of components than the tables.
    """
    if q.shape[0] != tables.n_components:
        raise ValueError(f"{q.shape[0]} components for tables of {tables.n_components}")
    colmap = torch.arange(tables.n_components, device=q.device)
    return encode_gpu_device(q, colmap, tables, tokens_per_chunk, col0, capacity=capacity).to_host()


@dataclass
class DeviceStreams:
    """The rANS streams of a batch of chunks, back to back in one device buffer.

    Attributes:
        data: int16 ``(total,)`` on the device; stream ``c`` is bytes
            ``[offsets[c], offsets[c] + sizes[c])`` of ``data.view(torch.uint8)``.
        offsets, sizes: int64 numpy ``(n_chunks,)``, in bytes.
    """

    data: torch.Tensor
    offsets: np.ndarray
    sizes: np.ndarray

    def span(self, c: int) -> tuple[int, int]:
        """Byte offset and size of stream ``c``."""
        return int(self.offsets[c]), int(self.sizes[c])

    def to_host(self) -> list[bytes]:
        """One ``bytes`` per stream (one device-to-host copy, then a split)."""
        total = int(self.sizes.sum())
        host = self.data.view(torch.uint8)[:total].cpu().numpy().tobytes()
        return [host[a : a + n] for a, n in zip(self.offsets.tolist(), self.sizes.tolist())]


def encode_gpu_device(
    src: torch.Tensor,
    colmap: torch.Tensor,
    tables: DeviceTables,
    tokens_per_chunk: list[int],
    col0: list[int] | None = None,
    steps: torch.Tensor | None = None,
    rounding: float = 0.5,
    capacity: int | None = None,
) -> DeviceStreams:
    """The general form of :func:`encode_symbols_gpu`, leaving the streams on the device
    (the caller downloads them once, e.g. into a pinned buffer it keeps).

    Args:
        src: the values to code: component ``j`` of the chunk token in column ``col`` is
            ``src[colmap[j], col]``; int symbols, or float coefficients with ``steps``.
        colmap: int64 ``(n_components,)`` on ``src``'s device.
        tables, tokens_per_chunk, col0, capacity: as for :func:`encode_symbols_gpu`.
        steps: float32 ``(n_components,)``: quantise ``src`` on the fly as
            :func:`~kvtc_store.codec.quant.quantize_step` does (``rounding`` its dead
            zone); None: ``src`` holds symbols already.

    Returns:
        The streams, back to back in one device buffer (empty for no chunks).
    """
    g = tables.interleave
    tok, lanes, lane0 = _counts(tokens_per_chunk, g)
    n_chunks = tok.size
    if n_chunks == 0:
        empty = np.zeros(0, np.int64)
        return DeviceStreams(torch.empty(0, dtype=torch.int16, device=src.device), empty, empty)
    if col0 is None:
        col0 = np.concatenate([[0], np.cumsum(tok)[:-1]])
    dev = src.device
    max_lanes = int(lanes.max())
    if capacity is None:
        capacity = int(max_lanes * (1.5 * tables.words_per_lane + 16))
    block, warps = _block(max_lanes)
    col0_t = torch.as_tensor(np.asarray(col0, np.int64), device=dev)
    lanes_t = torch.as_tensor(lanes.astype(np.int32), device=dev)
    lane0_t = torch.as_tensor(lane0, device=dev)
    states = torch.empty(int(lanes.sum()), dtype=torch.int64, device=dev)
    n_words_t = torch.empty(n_chunks, dtype=torch.int64, device=dev)
    quant = steps is not None
    if steps is None:
        steps = torch.ones(1, dtype=torch.float32, device=dev)
    for _ in range(2):
        words = torch.empty(n_chunks * capacity, dtype=torch.int16, device=dev)
        _encode_kernel[(n_chunks,)](
            src, colmap, src.stride(0), src.stride(1), steps, float(rounding),
            col0_t, lanes_t,
            tables.col_shift, tables.col_table, tables.step_shift, tables.freq, tables.cum,
            words, capacity, states, lane0_t, n_words_t,
            tables.n_components, tables.n_steps,
            G=g, BLOCK=block, QUANT=quant, num_warps=warps,
        )  # fmt: skip
        n_words = n_words_t.cpu().numpy()
        if int(n_words.max()) <= capacity:
            break
        log.debug("rANS encoder buffer of %d words too small: again at %d", capacity, n_words.max())
        capacity = int(n_words.max())
    return _pack(states, lane0_t, lanes, lanes_t, words, capacity, n_words, n_words_t)


def _pack(states, lane0_t, lanes, lanes_t, words, capacity, n_words, n_words_t) -> DeviceStreams:
    """Lay the streams out back to back on the device."""
    dev = states.device
    sizes = 2 * lanes + n_words  # uint16 per stream
    out0 = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(sizes.sum())
    out = torch.empty(max(total, 1), dtype=torch.int16, device=dev)
    pblock = 1024
    grid = (len(sizes), max(1, triton.cdiv(int(sizes.max()), pblock)))
    _pack_kernel[grid](
        states, lane0_t, lanes_t, words, capacity, n_words_t,
        torch.as_tensor(out0, device=dev), out, BLOCK=pblock,
    )  # fmt: skip
    return DeviceStreams(out, 2 * out0, 2 * sizes.astype(np.int64))


def upload_streams(streams: list, device: str | torch.device = "cuda"):
    """Join streams (bytes or memoryviews) and copy them to the device once: each is
    copied straight into one pinned host buffer (CUDA), then one host-to-device copy.

    Returns:
        ``(words, base, end)``: int16 ``(total,)`` on the device; int64 numpy arrays of
        each stream's first and one-past-last uint16.

    Raises:
        BlobCorruptError: a stream of odd length.
    """
    sizes = np.fromiter((len(s) for s in streams), dtype=np.int64, count=len(streams))
    if (sizes % 2).any():
        raise BlobCorruptError("rANS stream of odd length")
    base = np.concatenate([[0], np.cumsum(sizes // 2)[:-1]]).astype(np.int64)
    end = base + sizes // 2
    pin = torch.device(device).type == "cuda"
    host = torch.empty(max(1, int(sizes.sum()) // 2), dtype=torch.int16, pin_memory=pin)
    flat = host.numpy().view(np.uint8)
    for s, b, n in zip(streams, base.tolist(), sizes.tolist()):
        flat[2 * b : 2 * b + n] = np.frombuffer(s, dtype=np.uint8)
    return host.to(device, non_blocking=True), base, end


def decode_words_gpu(
    words: torch.Tensor,
    base: np.ndarray,
    end: np.ndarray,
    tables: DeviceTables,
    tokens_per_chunk: list[int],
    out: torch.Tensor,
    colmap: torch.Tensor | None = None,
    col0: list[int] | None = None,
    steps: torch.Tensor | None = None,
    bias: float = 0.0,
) -> np.ndarray:
    """Decode streams already on the device into ``out``; the general form of
    :func:`decode_symbols_gpu`.

    Args:
        words: int16 device buffer holding the streams (:func:`upload_streams`).
        base, end: first and one-past-last uint16 of each chunk's stream in ``words``.
        tables: the artifact's :class:`DeviceTables`.
        tokens_per_chunk: tokens of each chunk.
        out: 2-D device tensor; component ``j`` of the chunk token in column ``col``
            goes to ``out[colmap[j], col]`` (through ``out``'s strides, so a transposed
            view of a token-major matrix works).
        colmap: int64 ``(n_components,)`` rows of ``out`` (default: identity).
        col0: column of each chunk's first token (default: consecutive from 0).
        steps: float32 ``(n_components,)``: when given, write the dequantised value
            ``(q - sign(q) * bias) * steps[j]`` (cast to ``out``'s float dtype) instead
            of the symbol (:func:`~kvtc_store.codec.quant.dequantize_step`).
        bias: reconstruction offset toward zero, in steps.

    Returns:
        bool numpy ``(n_chunks,)``: True where the chunk's stream decoded cleanly (to the
        coder's initial state, every word used); the others' outputs are garbage.

    Raises:
        BlobCorruptError: a stream shorter than its lanes' states.
    """
    g = tables.interleave
    tok, lanes, _ = _counts(tokens_per_chunk, g)
    n_chunks = tok.size
    if n_chunks == 0:
        return np.zeros(0, dtype=bool)
    if ((end - base) < 2 * lanes).any():
        raise BlobCorruptError("rANS stream shorter than its lanes' states")
    dev = words.device
    if col0 is None:
        col0 = np.concatenate([[0], np.cumsum(tok)[:-1]])
    meta = torch.as_tensor(
        np.stack([base, end, lanes, np.asarray(col0)]).astype(np.int64), device=dev
    )
    run = RansDecode(
        words, meta[0], meta[1], meta[2], meta[3], int(lanes.max()), tables, out,
        colmap=colmap, steps=steps, bias=bias,
    )  # fmt: skip
    run.launch(0, tables.n_steps)
    return run.status.cpu().numpy() == 0


class RansDecode:
    """The decoder of one batch queued on the device in ranges of steps, one kernel a
    range (no synchronisation): between ranges the lanes' states and the streams' read
    positions wait in device memory. Step ``i`` decodes components ``i * G .. i * G +
    G - 1`` of every token, so once a range is queued, work on the output rows of its
    components can be queued after it (on another stream, behind an event) while the
    next range decodes.

    Args:
        words: int16 device buffer holding the streams.
        base, end, lanes, col0: int64 device ``(n_chunks,)``: each stream's first and
            one-past-last uint16 in ``words``, its lanes (tokens times the interleave,
            each stream at least two words per lane: the caller checks) and its first
            output column.
        max_lanes: the largest of ``lanes`` (sizes the program's block).
        tables, out, colmap, steps, bias: as for :func:`decode_words_gpu`.

    Attributes:
        status: int32 device ``(n_chunks,)``: once ranges up to ``tables.n_steps`` are
            queued, 0 where the chunk's stream decoded cleanly.

    Raises:
        ValueError: more than 32768 lanes in a chunk.
    """

    def __init__(
        self,
        words: torch.Tensor,
        base: torch.Tensor,
        end: torch.Tensor,
        lanes: torch.Tensor,
        col0: torch.Tensor,
        max_lanes: int,
        tables: DeviceTables,
        out: torch.Tensor,
        colmap: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
        bias: float = 0.0,
    ):
        dev = words.device
        self.n_chunks = base.numel()
        self.status = torch.empty(self.n_chunks, dtype=torch.int32, device=dev)
        self.block, self.warps = _block(max_lanes)
        if self.block > 1 << 15:  # the decoder's packed scan counts lanes in 16 bits
            raise ValueError(f"{max_lanes} lanes per chunk (at most 32768)")
        if colmap is None:
            colmap = torch.arange(tables.n_components, device=dev)
        self.dequant = steps is not None
        if steps is None:
            steps = torch.zeros(1, dtype=torch.float32, device=dev)
        self.tables = tables
        self._args = (words, base, end, lanes, col0, tables.col_shift, tables.col_table,
                      tables.step_shift, tables.freq, tables.cum, tables.slot2sym, out,
                      colmap, out.stride(0), out.stride(1), steps, float(bias))  # fmt: skip
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._next = 0  # the first step not yet queued

    def launch(self, step0: int, step1: int) -> None:
        """Queue steps ``[step0, step1)``; ranges must come in order, without gaps.

        Raises:
            ValueError: a range out of order or past the last step.
        """
        n_steps = self.tables.n_steps
        if step0 != self._next or not step0 <= step1 <= n_steps:
            raise ValueError(f"steps [{step0}, {step1}) after {self._next} of {n_steps}")
        self._next = step1
        if self.n_chunks == 0 or (step0 == step1 and n_steps > 0):
            return  # an empty range has nothing to decode (a batch of none, only one)
        first, last = step0 == 0, step1 == n_steps
        if self._state is None and not (first and last):
            dev = self.status.device
            self._state = (
                torch.empty(self.n_chunks * self.block, dtype=torch.int64, device=dev),
                torch.empty(self.n_chunks, dtype=torch.int64, device=dev),
            )
        state, cursor = self._state if self._state is not None else (self.status, self.status)
        _decode_kernel[(self.n_chunks,)](
            *self._args, self.status, state, cursor, self.tables.n_components, step0, step1,
            G=self.tables.interleave, BLOCK=self.block, DEQUANT=self.dequant, FIRST=first,
            LAST=last, num_warps=self.warps,
        )  # fmt: skip


def decode_symbols_gpu(
    streams: list[bytes],
    tables: DeviceTables,
    tokens_per_chunk: list[int],
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """rANS-decode a batch of chunks on the GPU: the inverse of
    :func:`encode_symbols_gpu` and of the numpy reference's encoder.

    Args:
        streams: one stream per chunk (lane states, then words).
        tables: the artifact's :class:`DeviceTables` (its device is used).
        tokens_per_chunk: tokens of each chunk.
        dtype: int32 (default) or int16.

    Returns:
        Symbols ``(n_components, sum(tokens))`` on the tables' device.

    Raises:
        BlobCorruptError: a stream that is too short or too long, or that does not decode
            to the coder's initial state (altered data); the message names the first.
    """
    dev = tables.freq.device
    words, base, end = upload_streams(streams, dev)
    n_tok = int(sum(tokens_per_chunk))
    out = torch.empty(tables.n_components, n_tok, dtype=dtype, device=dev)
    ok = decode_words_gpu(words, base, end, tables, tokens_per_chunk, out)
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise BlobCorruptError(
            f"rANS stream of chunk {first} does not decode to its initial state (altered)"
        )
    return out


assert MAX_SHIFT < PREC - 1  # _put_bits/_get_bits shift by PREC - bits >= 1
assert math.log2(M) == PREC
