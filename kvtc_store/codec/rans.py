"""Interleaved rANS with calibrated static tables: the entropy coder of fixed-step symbols.

Range asymmetric numeral systems (Duda, arXiv 1311.2540), in the 32-bit-state,
16-bit-word form of Giesen's ``rans_word``, interleaved over *lanes* (Giesen,
"Interleaved entropy coders", arXiv 1402.3392): every lane is one token of a chunk, and
each step codes one principal component for all lanes at once, so the loops run over
components, not symbols, and vectorise in numpy (CPU) or torch (any device).

Symbols are the integers ``q = round(c / step)`` of :mod:`kvtc_store.codec.fixed_step`.
Each component ``j`` has a calibrated *shift* ``s_j`` and *table class* ``t_j``: its high
part ``h = q >> s_j`` is coded with the class's frequency table (a quantised Laplace
distribution, alphabet ``-K..K`` plus an escape), its low ``s_j`` bits with a uniform
model, and an escaped ``h`` as two raw bytes. Tables are built once at calibration and
stored in the artifact, so encoder and decoder use the same integers on every host.

Stream layout of one chunk (little-endian): the final state of each lane (uint32 per
token), then the 16-bit words in the order the decoder reads them.
"""

from __future__ import annotations

import numpy as np

from ..errors import BlobCorruptError

PREC = 15  # frequency precision: tables sum to M = 2**PREC
M = 1 << PREC
RANS_L = 1 << 16  # states live in [RANS_L, 2**32)
K = 31  # table alphabet: high parts -K..K
N_SYM = 2 * K + 2  # ... plus the escape symbol
ESC = N_SYM - 1
B_MAX = 4.0  # largest Laplace scale (in steps) coded without a shift
CLASS_SCALES = np.geomspace(0.02, B_MAX, 48)  # Laplace scales of the table classes
MAX_SHIFT = 13
INTERLEAVE = 4  # lanes per token (components coded side by side); part of the format


def laplace_tables(scales: np.ndarray = CLASS_SCALES) -> np.ndarray:
    """Frequency tables ``(2, n_classes, N_SYM)`` int64, each row summing to ``M``.

    Row ``[0, c]`` is a Laplace of scale ``scales[c]`` over unit bins centred on the
    integers (for ``h = q``, shift 0); row ``[1, c]`` bins ``[h, h + 1)`` (for
    ``h = q >> s``, the floor of a finer value). Every symbol, escape included, gets at
    least frequency 1, so any value can be coded.
    """
    h = np.arange(-K, K + 1, dtype=np.float64)

    def cdf(x, b):
        return np.where(
            x < 0, 0.5 * np.exp(np.minimum(x, 0) / b), 1.0 - 0.5 * np.exp(-np.maximum(x, 0) / b)
        )

    out = np.zeros((2, len(scales), N_SYM), dtype=np.int64)
    for shifted, (lo, hi) in enumerate(((h - 0.5, h + 0.5), (h, h + 1.0))):
        for c, b in enumerate(scales):
            p = np.append(cdf(hi[:, None], b)[:, 0] - cdf(lo[:, None], b)[:, 0], 0.0)
            p[ESC] = max(1.0 - p.sum(), 0.0)
            f = np.maximum(1, np.floor(p * (M - N_SYM)).astype(np.int64))
            f[np.argmax(f)] += M - f.sum()
            out[shifted, c] = f
    return out


def assign_classes(mean_abs: np.ndarray, scales: np.ndarray = CLASS_SCALES):
    """Shift and table class of each component from its calibrated ``mean |c / step|``.

    The Laplace MLE of the scale is the mean absolute value. Components wider than
    ``B_MAX`` steps code their low bits raw: ``s = ceil(log2(b / B_MAX))``.

    Returns:
        ``(shift, cls)``: int64 arrays like ``mean_abs``.
    """
    b = np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-6)
    shift = np.clip(np.ceil(np.log2(b / B_MAX)), 0, MAX_SHIFT).astype(np.int64)
    bs = b / np.exp2(shift)
    cls = np.abs(np.log(bs)[:, None] - np.log(scales)[None, :]).argmin(1)
    return shift, cls


def symbol_bits(q: np.ndarray, shift: np.ndarray, cls: np.ndarray, tables: np.ndarray):
    """Bits each symbol costs: ``q`` ``(N, n)`` int, per-column shift and class ``(n,)``.

    Returns:
        float64 ``(n,)``: total bits per column over the ``N`` rows (the calibration
        estimate of the coded size; the coder adds 16-bit word granularity and the
        lanes' final states).
    """
    q = np.asarray(q, dtype=np.int64)
    h = q >> shift[None, :]
    esc = (h < -K) | (h > K)
    idx = np.where(esc, ESC, h + K)
    freq = tables[(shift > 0).astype(np.int64)[None, :], cls[None, :], idx]
    bits = PREC - np.log2(freq) + shift[None, :] + 16.0 * esc
    return bits.sum(0)


def _cumulative(tables: np.ndarray):
    cum = np.zeros(tables.shape[:-1] + (N_SYM + 1,), dtype=np.int64)
    cum[..., 1:] = np.cumsum(tables, axis=-1)
    return cum


class RansTables:
    """Tables of one artifact and the coder that uses them.

    Args:
        freq: int64 ``(2, n_classes, N_SYM)`` frequency tables (:func:`laplace_tables`).
        shift, cls: int64 ``(n_components,)``: each coded component's shift and class,
            in plan order.
        interleave: ``G``, components coded side by side per token. Each token has ``G``
            lanes (lane ``g`` codes components ``g, g + G, ...``), so a chunk of ``T``
            tokens runs ``ceil(n / G)`` vectorised steps over ``T * G`` lanes and stores
            ``T * G`` final states (32 bits each).

    Raises:
        ValueError: malformed tables or per-component arrays.
    """

    def __init__(
        self, freq: np.ndarray, shift: np.ndarray, cls: np.ndarray, interleave: int = INTERLEAVE
    ):
        freq = np.asarray(freq, dtype=np.int64)
        if freq.ndim != 3 or freq.shape[0] != 2 or freq.shape[2] != N_SYM:
            raise ValueError(f"rANS tables must be (2, classes, {N_SYM}), got {freq.shape}")
        if (freq < 1).any() or (freq.sum(-1) != M).any():
            raise ValueError(f"rANS tables must be positive and sum to {M}")
        shift = np.asarray(shift, dtype=np.int64)
        cls = np.asarray(cls, dtype=np.int64)
        if shift.shape != cls.shape or shift.ndim != 1:
            raise ValueError("rANS shift/class arrays do not match")
        if (cls < 0).any() or (cls >= freq.shape[1]).any() or (shift < 0).any():
            raise ValueError("rANS class or shift out of range")
        if (shift > MAX_SHIFT).any():
            raise ValueError(f"rANS shift above {MAX_SHIFT}")
        self.freq, self.shift, self.cls, self.interleave = freq, shift, cls, int(interleave)
        n_cls = freq.shape[1]
        self.n_components = shift.size
        # flat lookups: table t = shifted * n_cls + cls
        self._freq = freq.reshape(-1)
        self._cum = _cumulative(freq).reshape(-1, N_SYM + 1)[:, :-1].reshape(-1)
        self._slot2sym = np.concatenate(
            [np.repeat(np.arange(N_SYM, dtype=np.int64), f) for f in freq.reshape(-1, N_SYM)]
        )
        # columns of G components; padding components code a constant 0 (shift 0, the
        # narrowest class) and cost almost nothing
        g = self.interleave
        n_steps = -(-shift.size // g)
        pad = n_steps * g - shift.size
        self._steps = n_steps
        self._col_shift = np.concatenate([shift, np.zeros(pad, np.int64)]).reshape(n_steps, g)
        table = (shift > 0) * n_cls + cls
        self._col_table = np.concatenate([table, np.zeros(pad, np.int64)]).reshape(n_steps, g)

    def _columns(self, q: np.ndarray) -> np.ndarray:
        """``(n, T)`` symbols -> ``(steps, T * G)``: step ``i``, lane ``t * G + g`` holds
        component ``i * G + g`` of token ``t``."""
        n, t = q.shape
        g = self.interleave
        full = np.zeros((self._steps * g, t), dtype=np.int64)
        full[:n] = q
        return full.reshape(self._steps, g, t).transpose(0, 2, 1).reshape(self._steps, t * g)

    # -- encode ---------------------------------------------------------------------------

    def encode(self, q: np.ndarray, tokens_per_chunk: list[int]) -> list[bytes]:
        """Code symbols ``q`` int ``(n_components, T)`` into one stream per chunk.

        Args:
            q: symbols, component-major; column ``t`` is token ``t``; chunks' tokens are
                consecutive columns.
            tokens_per_chunk: tokens of each chunk (summing to ``T``).

        Returns:
            One byte string per chunk (lane states then words, see the module docstring).
        """
        n_comp, n_tok = q.shape
        if n_comp != self.n_components:
            raise ValueError(f"{n_comp} components for tables of {self.n_components}")
        g = self.interleave
        counts_tok = np.asarray(tokens_per_chunk, dtype=np.int64)
        n_chunks = counts_tok.size
        lane_chunk = np.repeat(np.arange(n_chunks), counts_tok * g)
        cols = self._columns(q)
        n_lanes = n_tok * g
        x = np.full(n_lanes, RANS_L, dtype=np.int64)
        out_lane: list[np.ndarray] = []
        out_word: list[np.ndarray] = []

        def put(lanes, start, freq):
            xs = x if lanes is None else x[lanes]
            emit = xs >= (freq << (32 - PREC))
            if emit.any():
                idx = np.flatnonzero(emit)
                out_lane.append(idx if lanes is None else lanes[idx])
                out_word.append(xs[idx] & 0xFFFF)
                xs = np.where(emit, xs >> 16, xs)
            qt, r = np.divmod(xs, freq)
            xs = (qt << PREC) + r + start
            if lanes is None:
                x[:] = xs
            else:
                x[lanes] = xs

        for i in range(self._steps - 1, -1, -1):
            shift = np.tile(self._col_shift[i], n_tok)
            table = np.tile(self._col_table[i], n_tok)
            qi = cols[i]
            h = qi >> shift
            if self._col_shift[i].any():
                lanes = np.flatnonzero(shift)
                s = shift[lanes]
                put(lanes, (qi[lanes] & ((1 << s) - 1)) << (PREC - s), M >> s)
            esc = (h < -K) | (h > K)
            if esc.any():
                lanes = np.flatnonzero(esc)
                raw = h[lanes] + 32768
                put(lanes, (raw & 0xFF) << (PREC - 8), M >> 8)
                put(lanes, (raw >> 8) << (PREC - 8), M >> 8)
            sym = np.where(esc, ESC, h + K) + table * N_SYM
            put(None, self._cum[sym], self._freq[sym])

        # The decoder reads words in reverse emission order, chunk by chunk: reverse them
        # and stable-sort by the chunk of the emitting lane.
        if out_lane:
            lanes_cat = np.concatenate(out_lane)[::-1]
            words = np.concatenate(out_word)[::-1]
            order = np.argsort(lane_chunk[lanes_cat], kind="stable")
            words = words[order].astype("<u2")
            n_words = np.bincount(lane_chunk[lanes_cat], minlength=n_chunks)
        else:
            words = np.zeros(0, dtype="<u2")
            n_words = np.zeros(n_chunks, dtype=np.int64)
        out, w0, l0 = [], 0, 0
        for c in range(n_chunks):
            lanes = int(counts_tok[c]) * g
            out.append(
                x[l0 : l0 + lanes].astype("<u4").tobytes() + words[w0 : w0 + n_words[c]].tobytes()
            )
            w0 += int(n_words[c])
            l0 += lanes
        return out

    # -- decode ---------------------------------------------------------------------------

    def decode(self, streams: list[bytes], tokens_per_chunk: list[int]) -> np.ndarray:
        """Inverse of :meth:`encode`: symbols int32 ``(n_components, sum(tokens))``.

        Raises:
            BlobCorruptError: a stream is too short, too long, or does not end in the
                coder's initial state (the data were altered).
            ValueError: a negative token count.
        """
        g = self.interleave
        counts_tok = np.asarray(tokens_per_chunk, dtype=np.int64)
        n_chunks = counts_tok.size
        n_tok = int(counts_tok.sum())
        if (counts_tok < 0).any():
            raise ValueError(f"token counts must be >= 0, got {tokens_per_chunk}")
        if n_tok == 0:  # nothing coded: a stream of any byte is altered data
            if any(len(s) for s in streams):
                raise BlobCorruptError("rANS stream bytes for a chunk with no coded tokens")
            return np.zeros((self.n_components, 0), dtype=np.int32)
        n_lanes = n_tok * g
        lane_chunk = np.repeat(np.arange(n_chunks), counts_tok * g)
        states, words, bases = [], [], [0]
        for s, t in zip(streams, counts_tok):
            n = int(t) * g
            if len(s) < 4 * n or (len(s) - 4 * n) % 2:
                raise BlobCorruptError(f"rANS stream of {len(s)} bytes for {n} lanes")
            states.append(np.frombuffer(s, dtype="<u4", count=n))
            words.append(np.frombuffer(s, dtype="<u2", offset=4 * n))
            bases.append(bases[-1] + words[-1].size)
        x = np.concatenate(states).astype(np.int64) if states else np.zeros(0, np.int64)
        if (x < RANS_L).any():
            raise BlobCorruptError("rANS state below the coder's range (data altered)")
        stream = np.concatenate(words).astype(np.int64) if words else np.zeros(0, np.int64)
        cursor = np.asarray(bases[:-1], dtype=np.int64)
        ends = np.asarray(bases[1:], dtype=np.int64)

        def renorm(lanes, xs):
            need = xs < RANS_L
            if not need.any():
                return xs
            idx = np.flatnonzero(need)
            ch = lane_chunk[idx if lanes is None else lanes[idx]]
            cnt = np.bincount(ch, minlength=n_chunks)
            if (cursor + cnt > ends).any():
                raise BlobCorruptError("rANS stream ends early (data altered)")
            first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
            pos = cursor[ch] + cnt[ch] - 1 - (np.arange(idx.size) - first[ch])
            xs[idx] = (xs[idx] << 16) | stream[pos]
            cursor[:] += cnt
            return xs

        def get_uniform(lanes, bits):
            xs = x[lanes]
            slot = xs & (M - 1)
            sym = slot >> (PREC - bits)
            xs = (M >> bits) * (xs >> PREC) + slot - (sym << (PREC - bits))
            x[lanes] = renorm(lanes, xs)
            return sym

        cols = np.zeros((self._steps, n_lanes), dtype=np.int64)
        for i in range(self._steps):
            shift = np.tile(self._col_shift[i], n_tok)
            table = np.tile(self._col_table[i], n_tok)
            slot = x & (M - 1)
            sym = self._slot2sym[table * M + slot]
            flat = table * N_SYM + sym
            xs = self._freq[flat] * (x >> PREC) + slot - self._cum[flat]
            x[:] = renorm(None, xs)
            h = sym - K
            esc = sym == ESC
            if esc.any():
                lanes = np.flatnonzero(esc)
                hi = get_uniform(lanes, 8)
                lo = get_uniform(lanes, 8)
                h[lanes] = ((hi << 8) | lo) - 32768
            if self._col_shift[i].any():
                lanes = np.flatnonzero(shift)
                s = shift[lanes]
                xs = x[lanes]
                slot = xs & (M - 1)
                low = slot >> (PREC - s)
                xs = (M >> s) * (xs >> PREC) + slot - (low << (PREC - s))
                x[lanes] = renorm(lanes, xs)
                h[lanes] = (h[lanes] << s) | low
            cols[i] = h
        if (cursor != ends).any() or (x != RANS_L).any():
            raise BlobCorruptError("rANS stream does not decode to its initial state (altered)")
        full = cols.reshape(self._steps, n_tok, g).transpose(0, 2, 1).reshape(-1, n_tok)
        return full[: self.n_components].astype(np.int32)


STATE_BITS = 32  # each lane's final state, stored per compressed token


def tables_of(artifact) -> RansTables:
    """The rANS tables of a ``rans`` artifact (:class:`~.artifact.CodecArtifact`), checked
    against its bit plan; both codecs build theirs here.

    Raises:
        ArtifactError: malformed tables, or tables that do not cover the plan's coded
            components.
    """
    from ..errors import ArtifactError

    try:
        tables = RansTables(
            artifact.rans_freq.numpy(),
            artifact.rans_shift.numpy(),
            artifact.rans_cls.numpy(),
            artifact.rans_interleave,
        )
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"artifact {artifact.artifact_id}: bad rANS tables: {exc}") from exc
    if tables.n_components != artifact.coded_components():
        raise ArtifactError(
            f"artifact {artifact.artifact_id}: rANS tables cover {tables.n_components} "
            f"components, the plan codes {artifact.coded_components()}"
        )
    return tables
