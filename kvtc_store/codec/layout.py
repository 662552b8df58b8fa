"""Where a batch of chunks' KV lives: a contiguous cache or an engine's pages.

Both codecs read chunks to encode from, and write decoded chunks into, a
:class:`ChunkKV`: keys and values of ``B`` chunks of ``T`` tokens, ``L`` layers, ``H``
KV heads, head dim ``D``, addressed element by element as

    element (b, l, h, t, d) of one kind (keys or values) is at
    layer_offsets[l] + token_offsets[b, t] + h * head_stride + d * dim_stride

elements from the data pointer of ``layers[0]``. One addressing covers

- a contiguous cache (:meth:`ChunkKV.dense`): a ``(B, L, H, T, D)`` tensor of any
  strides (a view of a bigger cache, say);
- a paged cache (:meth:`ChunkKV.paged`): per layer a ``(P, H, S, D)`` tensor of ``P``
  pages of ``S`` token slots (any strides, the same for every layer; layers may be
  separate allocations), and each chunk's pages in token order: vLLM's per-layer views
  with a block table, SGLang's host or device page pools.

So a decoder writes each token's K and V once, straight into the pages (no split, cat
or scatter of the decoded batch), and an encoder gathers from them the same way. The
GPU codec's kernels take the offsets as tables; :meth:`ChunkKV.write` and
:meth:`ChunkKV.read` do the same with torch indexing (the CPU reference, and small
parts such as the exact tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ChunkKV", "KindLayout", "layer_origins"]


@dataclass(frozen=True)
class KindLayout:
    """The addressing of one kind (keys or values) of a :class:`ChunkKV` (module doc).

    Attributes:
        layers: per layer, a tensor whose data pointer is that layer's origin (all of one
            dtype and device).
        layer_offsets: int64 ``(L,)``: each layer's origin in elements from ``layers[0]``'s.
        token_offsets: int64 ``(B, T)``: each chunk token's slot in elements from its
            layer's origin.
        head_stride, dim_stride: elements between heads, and between dims of a head.
        dense: the ``(B, L, H, T, D)`` tensor when the layout is one (fast paths), else None.
    """

    layers: tuple[torch.Tensor, ...]
    layer_offsets: torch.Tensor
    token_offsets: torch.Tensor
    head_stride: int
    dim_stride: int
    dense: torch.Tensor | None = None

    @property
    def base(self) -> torch.Tensor:
        """The tensor whose data pointer the offsets count from (``layers[0]``)."""
        return self.layers[0]

    def _flat(self, layer: int, extent: int) -> torch.Tensor:
        """A 1-D view of ``extent`` elements from layer ``layer``'s origin."""
        t = self.layers[layer]
        return torch.as_strided(t, (extent,), (1,), t.storage_offset())

    def _index(self, chunks: torch.Tensor, tokens: torch.Tensor, heads: int, dim: int):
        """int64 ``(n, H, k, D)`` element offsets of ``chunks`` x ``tokens`` from a layer's
        origin, and the extent they need."""
        dev = self.token_offsets.device
        tok = self.token_offsets[chunks.to(dev)][:, tokens.to(dev)]  # (n, k)
        h = torch.arange(heads, device=dev) * self.head_stride
        d = torch.arange(dim, device=dev) * self.dim_stride
        idx = tok[:, None, :, None] + h[None, :, None, None] + d[None, None, None, :]
        extent = int(idx.max()) + 1 if idx.numel() else 1
        return idx, extent

    def write(self, chunks, tokens, x: torch.Tensor) -> None:
        """Write ``x`` ``(n, L, H, k, D)`` into chunks ``chunks`` (n indices) at their
        tokens ``tokens`` (k indices), cast to the layout's dtype and device."""
        chunks = torch.as_tensor(chunks, dtype=torch.int64)
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if not chunks.numel() or not tokens.numel():
            return
        base = self.base
        x = x.to(base.device, base.dtype)
        if self.dense is not None:
            c, t = chunks.to(base.device), tokens.to(base.device)
            self.dense[c[:, None], :, :, t[None, :]] = x.permute(0, 3, 1, 2, 4)
            return
        idx, extent = self._index(chunks, tokens, x.shape[2], x.shape[4])
        flat_idx = idx.reshape(-1)
        for layer in range(len(self.layers)):
            self._flat(layer, extent).index_put_((flat_idx,), x[:, layer].reshape(-1))

    def read(self, chunks, tokens, heads: int, dim: int) -> torch.Tensor:
        """``(n, L, H, k, D)``: chunks ``chunks`` at tokens ``tokens`` (a copy)."""
        chunks = torch.as_tensor(chunks, dtype=torch.int64)
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if self.dense is not None:
            c, t = chunks.to(self.base.device), tokens.to(self.base.device)
            return self.dense[c[:, None], :, :, t[None, :]].permute(0, 2, 3, 1, 4)
        idx, extent = self._index(chunks, tokens, heads, dim)
        return torch.stack(
            [self._flat(layer, extent)[idx] for layer in range(len(self.layers))], dim=1
        )


@dataclass(frozen=True)
class ChunkKV:
    """Keys and values of ``batch`` chunks of ``tokens`` tokens (module doc).

    Build with :meth:`dense` or :meth:`paged`.

    Attributes:
        keys, values: each kind's :class:`KindLayout`.
        batch, tokens, layers, heads, dim: ``B``, ``T``, ``L``, ``H``, ``D``.
    """

    keys: KindLayout
    values: KindLayout
    batch: int
    tokens: int
    layers: int
    heads: int
    dim: int

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.base.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.base.device

    @property
    def is_dense(self) -> bool:
        """Whether both kinds are ``(B, L, H, T, D)`` tensors (:meth:`dense`)."""
        return self.keys.dense is not None and self.values.dense is not None

    @classmethod
    def dense(cls, keys: torch.Tensor, values: torch.Tensor) -> ChunkKV:
        """Chunks held as ``(B, L, H, T, D)`` tensors (any strides; keys and values may
        differ in strides, not in shape, dtype or device).

        Raises:
            ValueError: shapes, dtypes or devices differ, or not 5-D.
        """
        if keys.dim() != 5 or keys.shape != values.shape:
            raise ValueError(
                f"dense chunks need (B, L, H, T, D) keys and values of one shape, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        _same(keys, values)
        batch, layers, heads, tokens, dim = keys.shape

        def kind(x: torch.Tensor) -> KindLayout:
            sb, sl, sh, st, sd = x.stride()
            b = torch.arange(batch, device=x.device)[:, None] * sb
            tok = b + torch.arange(tokens, device=x.device)[None, :] * st
            lay = torch.arange(layers, device=x.device) * sl  # x[:, 0]'s origin is x's
            views = tuple(x[:, i] for i in range(layers))
            return KindLayout(views, lay, tok, sh, sd, x)

        return cls(kind(keys), kind(values), batch, tokens, layers, heads, dim)

    @classmethod
    def paged(
        cls,
        key_pages: Sequence[torch.Tensor],
        value_pages: Sequence[torch.Tensor],
        page_ids,
        tokens: int | None = None,
    ) -> ChunkKV:
        """Chunks held in pages.

        Args:
            key_pages, value_pages: per layer, ``(P, H, S, D)``: ``P`` pages of ``S`` token
                slots (any strides, the same for every layer of a kind; one dtype and
                device). A vLLM ``(B, H, N, C)`` view split at ``D`` on ``C`` is one.
            page_ids: int ``(B, T / S)``: each chunk's pages, in token order.
            tokens: ``T`` (default ``S`` times the pages per chunk).

        Raises:
            ValueError: the layers differ in shape, strides, dtype or device; page ids
                out of range; ``tokens`` not ``S`` times the pages per chunk.
        """
        if not key_pages or len(key_pages) != len(value_pages):
            raise ValueError(f"{len(key_pages)} key layers, {len(value_pages)} value layers")
        first = key_pages[0]
        if first.dim() != 4:
            raise ValueError(f"pages must be (P, H, S, D), got {tuple(first.shape)}")
        n_pages, heads, slots, dim = first.shape
        ids = torch.as_tensor(page_ids, dtype=torch.int64)
        if ids.dim() != 2:
            raise ValueError(f"page_ids must be (B, pages per chunk), got {tuple(ids.shape)}")
        batch, per_chunk = ids.shape
        tokens = per_chunk * slots if tokens is None else tokens
        if tokens != per_chunk * slots:
            raise ValueError(f"{tokens} tokens per chunk in {per_chunk} pages of {slots} slots")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_pages):
            raise ValueError(f"page ids outside [0, {n_pages})")

        def kind(pages: Sequence[torch.Tensor]) -> KindLayout:
            p0 = pages[0]
            for p in pages:
                _same(p0, p)
                if p.shape != p0.shape or p.stride() != p0.stride():
                    raise ValueError(
                        f"page layers differ: {tuple(p.shape)}/{p.stride()} against "
                        f"{tuple(p0.shape)}/{p0.stride()}"
                    )
            sp, sh, ss, sd = p0.stride()
            dev = p0.device
            t = torch.arange(tokens)
            tok = ids[:, t // slots] * sp + (t % slots)[None, :] * ss
            lay_t = torch.tensor(layer_origins(pages), dtype=torch.int64, device=dev)
            return KindLayout(tuple(pages), lay_t, tok.to(dev), sh, sd)

        _same(first, value_pages[0])
        return cls(kind(key_pages), kind(value_pages), batch, tokens, len(key_pages), heads, dim)

    def select(self, chunks: Sequence[int]) -> ChunkKV:
        """The chunks ``chunks`` (indices, in order) of this batch, at the same places."""
        chunks = list(chunks)
        idx = torch.as_tensor(chunks, dtype=torch.int64)
        a = chunks[0] if chunks else 0
        run = chunks == list(range(a, a + len(chunks)))

        def kind(k: KindLayout) -> KindLayout:
            dense = k.dense[a : a + len(chunks)] if k.dense is not None and run else None
            return KindLayout(
                k.layers,
                k.layer_offsets,
                k.token_offsets[idx.to(k.token_offsets.device)],
                k.head_stride,
                k.dim_stride,
                dense,
            )

        return ChunkKV(
            kind(self.keys), kind(self.values), len(idx), self.tokens, self.layers,
            self.heads, self.dim,
        )  # fmt: skip

    def write(self, chunks, tokens, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``(n, L, H, k, D)`` keys and values into ``chunks`` at ``tokens``
        (:meth:`KindLayout.write`)."""
        self.keys.write(chunks, tokens, keys)
        self.values.write(chunks, tokens, values)

    def read(self, chunks, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, L, H, k, D)`` keys and values of ``chunks`` at ``tokens`` (copies)."""
        return (
            self.keys.read(chunks, tokens, self.heads, self.dim),
            self.values.read(chunks, tokens, self.heads, self.dim),
        )

    def check(self, layers: int, heads: int, dim: int, batch: int, tokens: int) -> None:
        """Raise ValueError unless this holds ``batch`` chunks (or more) of ``tokens``
        tokens of ``(layers, heads, dim)``."""
        if (self.layers, self.heads, self.dim, self.tokens) != (layers, heads, dim, tokens) or (
            self.batch < batch
        ):
            raise ValueError(
                f"destination of {self.batch} chunks of {self.tokens} tokens, "
                f"(L, H, D) = {(self.layers, self.heads, self.dim)}, does not fit {batch} "
                f"chunks of {tokens} tokens of {(layers, heads, dim)}"
            )


def layer_origins(layers: Sequence[torch.Tensor]) -> list[int]:
    """Each layer's origin (data pointer) in elements from ``layers[0]``'s: a
    :class:`KindLayout`'s ``layer_offsets``.

    Raises:
        ValueError: an origin is not a whole number of elements away.
    """
    size = layers[0].element_size()
    delta = [t.data_ptr() - layers[0].data_ptr() for t in layers]
    if any(o % size for o in delta):
        raise ValueError("page layers are not aligned to their element size")
    return [o // size for o in delta]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"KV tensors differ: {a.dtype} on {a.device}, {b.dtype} on {b.device}")
