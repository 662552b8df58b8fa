"""The contract every compression method of the benchmark follows.

A method round-trips one stored context's KV the way kvtc-store stores it: the sequence is
cut into chunks of ``chunk_tokens`` (256, LMCache's default and the store's), each chunk is
turned into bytes that would sit in a tier, and the bytes are turned back into tensors.
Every byte a chunk needs to be decoded counts (headers, scales, exactly stored tokens), so
``bf16 bytes / stored bytes`` is the honest compression ratio of :mod:`kvtc_store`'s
design page.

Shapes, everywhere in this package: ``keys`` and ``values`` are ``(L, H, T, D)``
(layers, KV heads, tokens, head dim), keys with RoPE applied as a transformers
``DynamicCache`` holds them, float32 or bfloat16, on any device; ``first_position`` is the
absolute position of token 0.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtc_store.codec.entropy import get_coder

CHUNK_TOKENS = 256
BF16_BYTES = 2

# Sink and recent-window sizes that define a "middle" chunk for the chunk ratio: the
# store's defaults (4 sinks, the last 128 tokens), the same for every method.
MIDDLE_SINKS = 4
MIDDLE_WINDOW = 128


@dataclass
class Roundtrip:
    """One context after compress -> bytes -> decompress.

    Attributes:
        keys, values: ``(L, H, T, D)``, same dtype and device as the input.
        chunk_bytes: stored bytes of each chunk, in order.
        chunk_tokens: tokens of each chunk, in order.
    """

    keys: torch.Tensor
    values: torch.Tensor
    chunk_bytes: list[int]
    chunk_tokens: list[int]

    @property
    def stored_bytes(self) -> int:
        """Every byte stored for the context."""
        return sum(self.chunk_bytes)


def bf16_bytes(layers: int, heads: int, tokens: int, dim: int) -> int:
    """Bytes of K and V of ``tokens`` tokens in bfloat16 (the honest ratio's numerator)."""
    return 2 * layers * heads * tokens * dim * BF16_BYTES


def middle_chunks(
    tokens: list[int],
    first_position: int = 0,
    sinks: int = MIDDLE_SINKS,
    window: int = MIDDLE_WINDOW,
) -> list[int]:
    """Indices of the chunks that hold no sink position and no token of the last ``window``.

    Their ratio is the steady state of a long stored sequence (the chunk ratio); the same
    chunks count for every method, whatever that method stores exactly.

    Args:
        tokens: tokens of each chunk, in order.
        first_position: absolute position of the first chunk's token 0.
    """
    total = sum(tokens)
    out, start = [], 0
    for i, n in enumerate(tokens):
        if first_position + start >= sinks and start + n <= total - window:
            out.append(i)
        start += n
    return out


@dataclass
class KVMethod:
    """A KV compression method: one subclass per method, in its own file.

    Subclasses override :meth:`encode_chunk` and :meth:`decode_chunk` (or :meth:`roundtrip`
    itself, as the KVTC wrapper does). ``name`` and ``target_ratio`` key the method's row in
    ``benchmarks/results/quality.json``; ``kind`` is ``"ours"``, ``"ablation"``,
    ``"baseline"`` or ``"reference"``. ``parallel``: several contexts may round-trip at once
    in threads (:func:`roundtrip_many`); measured on the H200, it cut a DEFLATE-bound
    baseline's time 3x and slowed the KVTC codec's GPU path (per-range host syncs) by 1.5x.
    """

    name: str = "method"
    target_ratio: float | None = None
    kind: str = "baseline"
    chunk_tokens: int = CHUNK_TOKENS
    parallel: bool = True
    notes: str = field(default="", repr=False)

    def encode_chunk(
        self, keys: torch.Tensor, values: torch.Tensor, first_position: int, exact_tail: int
    ) -> bytes:
        """Bytes of one chunk (``(L, H, T, D)``); ``exact_tail`` is how many of its last
        tokens fall in the sequence's recent window (methods that keep a window exact)."""
        raise NotImplementedError

    def decode_chunk(
        self, blob: bytes, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(L, H, T, D)`` of one chunk's bytes, on ``device`` in ``dtype``."""
        raise NotImplementedError

    def window(self) -> int:
        """Trailing tokens of a stored sequence this method keeps exactly (0: none)."""
        return 0

    @torch.no_grad()
    def roundtrip(
        self, keys: torch.Tensor, values: torch.Tensor, first_position: int = 0
    ) -> Roundtrip:
        """Compress a whole context as chunks, keep only the bytes, decompress.

        Args:
            keys, values: ``(L, H, T, D)``.
            first_position: absolute position of token 0.

        Returns:
            :class:`Roundtrip` with tensors like the input and the bytes of every chunk.
        """
        total = keys.shape[2]
        window = self.window()
        ks, vs, sizes, counts = [], [], [], []
        for s in range(0, total, self.chunk_tokens):
            e = min(s + self.chunk_tokens, total)
            tail = max(0, min(e - s, window - (total - e)))
            blob = self.encode_chunk(keys[:, :, s:e], values[:, :, s:e], first_position + s, tail)
            k, v = self.decode_chunk(blob, keys.device, keys.dtype)
            ks.append(k)
            vs.append(v)
            sizes.append(len(blob))
            counts.append(e - s)
        return Roundtrip(torch.cat(ks, dim=2), torch.cat(vs, dim=2), sizes, counts)


def roundtrip_many(
    method: KVMethod, kvs: list[tuple[torch.Tensor, torch.Tensor]], workers: int = 1
) -> list[Roundtrip]:
    """:meth:`KVMethod.roundtrip` of several contexts (each starting at position 0).

    With ``workers > 1`` and a ``parallel`` method they run in a thread pool: torch ops, device-to-host copies and
    DEFLATE release the GIL, so on a GPU host the per-chunk host work of several contexts
    overlaps (the chunks' bytes are the same as one at a time).
    """
    if workers <= 1 or len(kvs) <= 1 or not method.parallel:
        return [method.roundtrip(k, v, 0) for k, v in kvs]
    with ThreadPoolExecutor(min(workers, len(kvs))) as pool:
        return list(pool.map(lambda kv: method.roundtrip(kv[0], kv[1], 0), kvs))


# -- a small container for the baselines' chunks ------------------------------------------

_HEADER = struct.Struct("<2sBHHHHIH")  # magic, version, L, H, T, D, first position, tail
_MAGIC = b"RD"


def pack_chunk(shape: tuple[int, int, int, int], first_position: int, tail: int, body: bytes):
    """A baseline chunk's bytes: a 16-byte header (shape, first position, exact tail) and the
    body as raw DEFLATE (python-isal, or zlib, as :mod:`kvtc_store.codec.entropy` writes it).

    Args:
        shape: ``(L, H, T, D)`` of the chunk.
        body: packed codes, scales and exact tokens, as the method lays them out.
    """
    layers, heads, tokens, dim = shape
    header = _HEADER.pack(_MAGIC, 1, layers, heads, tokens, dim, first_position, tail)
    return header + get_coder("deflate").encode(body)


def unpack_chunk(blob: bytes, body_size) -> tuple[tuple[int, int, int, int], int, int, bytes]:
    """Inverse of :func:`pack_chunk`: ``(shape, first_position, tail, body)``.

    Args:
        body_size: ``body_size(shape, tail) -> int``, the body's raw size (checked).

    Raises:
        ValueError: not a baseline chunk.
    """
    magic, _version, layers, heads, tokens, dim, first, tail = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError("not a rate-distortion baseline chunk")
    shape = (layers, heads, tokens, dim)
    body = get_coder("deflate").decode(blob[_HEADER.size :], body_size(shape, tail))
    return shape, first, tail, body


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (C order) on the host; 16-bit floats as their bit patterns."""
    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def tensor_from(b: bytes, dtype: torch.dtype, shape, device) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes`."""
    if not b:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)
