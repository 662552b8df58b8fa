"""vLLM's paged KV cache as its attention backend lays it out: gather a request's blocks
into ``(L, H, T, D)`` keys and values, and scatter them back.

vLLM 0.33 hands KV connectors one view per attention layer with the logical shape
``(B, H, N, C)`` (``vllm/v1/kv_cache_interface.py``, ``create_kv_cache_views``; RFC
#42082): ``B`` blocks (kernel blocks when the backend splits each of the manager's
blocks into several), ``H`` KV heads, ``N`` token slots per block and ``C = head_size +
head_size_v`` elements. The physical order (``KVCacheLayout``: LBHNC, LBNHC, BLHNC, ...)
is carried by the view's strides, so indexing the logical dims is right for every
layout. The older ``get_kv_cache_shape``/``get_kv_cache_stride_order`` methods are gone
from the backends in 0.33.

What ``C`` holds is the attention backend's own convention, read from its source:

- ``"token"``: ``C`` is ``[K | V]`` of one token and head. FLASH_ATTN, TRITON_ATTN,
  FLEX_ATTENTION and FLASHINFER split with ``kv_cache.transpose(1, 2).split(head_size,
  dim=-1)``.
- ``"page"``: the ``(N, C)`` page of one block and head holds the ``N`` keys, then the
  ``N`` values. CPU_ATTN splits with ``kv_cache.view(B, H, 2 * N, D).chunk(2, dim=2)``,
  which needs each page contiguous (it only takes the LBHNC layout).

Any other backend (ROCm's paged layouts, MLA), a quantised KV cache or K and V of
different widths raises :class:`~kvtc_store.errors.KVLayoutError`: never guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..codec import ChunkKV
from ..codec.layout import layer_origins
from ..errors import KVLayoutError

__all__ = ["BACKEND_CONTENT", "PagedKVLayout", "layer_order"]


def _triton_gather():
    """:func:`kvtc_store.codec.gpu.pages.gather_pages`, or None without Triton."""
    try:
        from ..codec.gpu.pages import gather_pages
    except ImportError:
        return None
    return gather_pages


BACKEND_CONTENT: dict[str, str] = {
    "FLASH_ATTN": "token",
    "TRITON_ATTN": "token",
    "FLEX_ATTENTION": "token",
    "FLASHINFER": "token",
    "CPU_ATTN": "page",
}
"""What the content dim ``C`` of each known attention backend holds (see the module doc)."""

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_order(layer_names) -> list[str]:
    """Attention layer names in model order, by the layer index in each name
    (``model.layers.7.self_attn.attn`` -> 7).

    Raises:
        KVLayoutError: a name has no single layer index, or two names share one.
    """
    indexed = {}
    for name in layer_names:
        found = _LAYER_INDEX.findall(name)
        if len(found) != 1:
            raise KVLayoutError(f"cannot tell the layer index of attention layer {name!r}")
        index = int(found[0])
        if index in indexed:
            raise KVLayoutError(
                f"layers {indexed[index]!r} and {name!r} share index {index} (KV sharing "
                "between layers is not supported)"
            )
        indexed[index] = name
    return [indexed[i] for i in sorted(indexed)]


@dataclass
class PagedKVLayout:
    """The paged KV cache of one model, ready to gather and scatter whole blocks.

    Build it with :meth:`from_views`. Block ids are the scheduler's (manager) block ids;
    token ``t`` of a request lives in its block ``t // block_size``.

    Attributes:
        views: per attention layer in model order, the ``(B', H, N, C)`` view vLLM gave.
        layer_names: the layers' names, same order.
        content: ``"token"`` or ``"page"`` (module doc).
        block_size: tokens per manager block.
        sub_blocks: view blocks per manager block (``B' = num_blocks * sub_blocks``).
        head_size: ``D`` of keys and of values.
        fused_gather: :meth:`gather`'s default for ``fused`` (None: on CUDA where Triton
            imports).
    """

    views: list[torch.Tensor]
    layer_names: list[str]
    content: str
    block_size: int
    sub_blocks: int
    head_size: int
    fused_gather: bool | None = field(default=None, kw_only=True)
    _lay: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_views(
        cls,
        kv_caches: dict[str, torch.Tensor],
        backend_name: str,
        *,
        block_size: int,
        num_blocks: int,
        num_kv_heads: int,
        head_size: int,
        head_size_v: int,
        dtype: torch.dtype,
    ) -> PagedKVLayout:
        """Check vLLM's per-layer views against the KV cache spec and the backend.

        Args:
            kv_caches: layer name -> the view ``register_kv_caches`` received.
            backend_name: the layers' attention backend (``AttentionBackend.get_name()``).
            block_size, num_blocks, num_kv_heads, head_size, head_size_v, dtype: from
                the layers' ``AttentionSpec`` and the ``KVCacheConfig``.

        Raises:
            KVLayoutError: an unknown backend, a quantised or mixed-width KV cache, or a
                view whose shape, dtype or strides do not match the spec and backend.
        """
        content = BACKEND_CONTENT.get(backend_name)
        if content is None:
            raise KVLayoutError(
                f"attention backend {backend_name} is not supported by the kvtc-store "
                f"connector (supported: {', '.join(sorted(BACKEND_CONTENT))})"
            )
        if head_size_v != head_size:
            raise KVLayoutError(f"keys of {head_size} and values of {head_size_v} channels")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise KVLayoutError(f"KV cache dtype {dtype} is not supported (quantised KV)")
        names = layer_order(kv_caches)
        views = [kv_caches[n] for n in names]
        first = views[0]
        for name, v in zip(names, views):
            if v.ndim != 4 or v.dtype != dtype or v.device != first.device:
                raise KVLayoutError(
                    f"{name}: KV view {tuple(v.shape)} {v.dtype} on {v.device}, expected a "
                    f"4-D (B, H, N, C) {dtype} view like the first layer's"
                )
            blocks, heads, slots, width = v.shape
            if heads != num_kv_heads or width != head_size + head_size_v:
                raise KVLayoutError(
                    f"{name}: KV view (B, H, N, C) = {tuple(v.shape)}, the spec says H = "
                    f"{num_kv_heads} and C = {head_size + head_size_v}"
                )
            if blocks % num_blocks or slots * (blocks // num_blocks) != block_size:
                raise KVLayoutError(
                    f"{name}: KV view of {blocks} blocks of {slots} slots does not split "
                    f"{num_blocks} blocks of {block_size} tokens"
                )
            if content == "page" and (v.stride(3) != 1 or v.stride(2) != width):
                raise KVLayoutError(
                    f"{name}: {backend_name} reads each (N, C) page as one contiguous "
                    f"run, but the view has strides {v.stride()}"
                )
            if tuple(v.shape) != tuple(first.shape):
                raise KVLayoutError(f"{name}: KV view {tuple(v.shape)} != {tuple(first.shape)}")
        return cls(
            views,
            names,
            content,
            block_size,
            first.shape[0] // num_blocks,
            head_size,
        )

    @property
    def device(self) -> torch.device:
        return self.views[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.views[0].dtype

    def _view_blocks(self, block_ids, on_device: bool = True) -> torch.Tensor:
        """Indices into dim 0 of the views for ``block_ids``, in token order (on the
        cache's device, sent from pinned memory without waiting: a save's hook must not
        wait for the forward its copy stream is queued behind; else on the host)."""
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        sub = torch.arange(self.sub_blocks, dtype=torch.long)
        idx = (ids[:, None] * self.sub_blocks + sub[None, :]).reshape(-1)
        if not on_device or self.device.type != "cuda":
            return idx
        return idx.pin_memory().to(self.device, non_blocking=True)

    def kv_pages(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, ``(B', H, N, D)`` views of the keys and of the values (no copy): the
        pages a :class:`~kvtc_store.codec.ChunkKV` addresses."""
        dim = self.head_size
        if self.content == "token":
            return [v[..., :dim] for v in self.views], [v[..., dim:] for v in self.views]
        keys, values = [], []
        for v in self.views:  # each (N, 2D) page is N keys then N values, contiguous
            blocks, heads, slots, _ = v.shape
            kv = torch.as_strided(
                v,
                (blocks, heads, 2, slots, dim),
                (v.stride(0), v.stride(1), slots * dim, dim, 1),
                v.storage_offset(),
            )
            keys.append(kv[:, :, 0])
            values.append(kv[:, :, 1])
        return keys, values

    def chunk_kv(self, block_rows) -> ChunkKV:
        """Chunks that fill whole blocks, as a :class:`~kvtc_store.codec.ChunkKV` over the
        cache itself (a decoder writes into it, an encoder reads it; no copy).

        Args:
            block_rows: per chunk, its manager block ids in token order (all rows of one
                length: ``chunk tokens / block_size`` blocks).
        """
        ids = torch.stack([self._view_blocks(row, on_device=False) for row in block_rows])
        keys, values = self.kv_pages()
        return ChunkKV.paged(keys, values, ids)

    def gather(self, block_ids, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks.

        Args:
            block_ids: manager block ids in token order.
            fused: copy every layer in one Triton launch per kind
                (:func:`kvtc_store.codec.gpu.pages.gather_pages`) instead of one
                ``index_select`` per layer and kind. Default: ``fused_gather``, else on
                CUDA where Triton imports. Either way the copies are queued on the
                current stream.

        Returns:
            ``(keys, values)``, each ``(L, H, T, D)`` with ``T = len(block_ids) *
            block_size``, on the cache's device and in its dtype (copies).
        """
        idx = self._view_blocks(block_ids)
        _, heads, slots, _ = self.views[0].shape
        n, dim = idx.numel(), self.head_size
        shape = (len(self.views), heads, n * slots, dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        pages = self.kv_pages()
        fused = self.fused_gather if fused is None else fused
        gather_pages = (
            _triton_gather() if fused or (fused is None and self.device.type == "cuda") else None
        )
        if fused and gather_pages is None:
            raise KVLayoutError("fused gather needs Triton (the gpu extra)")
        if gather_pages is not None:
            sp, _, ss, _ = pages[0][0].stride()
            slot = torch.arange(slots, dtype=torch.long, device=self.device) * ss
            tok = (idx[:, None] * sp + slot[None, :]).reshape(-1)
            lay = self._layer_offsets()
            for kind, dst in zip(pages, (keys, values)):
                h_stride, d_stride = kind[0].stride(1), kind[0].stride(3)
                gather_pages(kind[0], tok, lay, h_stride, d_stride, dst)
            return keys, values
        for layer, layer_pages in enumerate(zip(*pages)):
            for src, dst in zip(layer_pages, (keys, values)):  # one pass: pages -> (H, n, N, D)
                out = dst[layer].view(heads, n, slots, dim)
                torch.index_select(src.permute(1, 0, 2, 3), 1, idx, out=out)
        return keys, values

    def _layer_offsets(self) -> torch.Tensor:
        """int64 ``(L,)`` on the cache's device: each layer's origin in elements from
        layer 0's (the same for keys and values; made once)."""
        if self._lay is None:
            try:
                lay = torch.tensor(layer_origins(self.views), dtype=torch.long)
            except ValueError as exc:
                raise KVLayoutError(f"the layers' caches: {exc}") from exc
            self._lay = (
                lay.pin_memory().to(self.device, non_blocking=True)
                if (self.device.type == "cuda")
                else lay
            )
        return self._lay

    def scatter(self, block_ids, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write keys and values into whole blocks (the inverse of :meth:`gather`).

        Args:
            block_ids: manager block ids in token order.
            keys, values: ``(L, H, T, D)``, ``T = len(block_ids) * block_size``; cast to
                the cache's dtype and moved to its device.

        Raises:
            ValueError: the shapes do not match the blocks and the cache.
        """
        idx = self._view_blocks(block_ids)
        n = idx.numel()
        layers, heads, tokens, dim = keys.shape
        slots = self.views[0].shape[2]
        if (
            tuple(values.shape) != tuple(keys.shape)
            or layers != len(self.views)
            or heads != self.views[0].shape[1]
            or dim != self.head_size
            or tokens != n * slots
        ):
            raise ValueError(
                f"KV {tuple(keys.shape)}/{tuple(values.shape)} does not fill "
                f"{len(idx) // self.sub_blocks} blocks of {self.block_size} tokens of "
                f"{len(self.views)} layers x {self.views[0].shape[1]} heads x {self.head_size}"
            )
        keys = keys.to(self.device, self.dtype)
        values = values.to(self.device, self.dtype)
        for layer, view in enumerate(self.views):
            k = keys[layer].reshape(heads, n, slots, dim).permute(1, 0, 2, 3)
            v = values[layer].reshape(heads, n, slots, dim).permute(1, 0, 2, 3)
            if self.content == "token":
                pages = torch.cat([k, v], dim=-1)
            else:
                pages = torch.stack([k, v], dim=2).reshape(n, heads, slots, 2 * dim)
            view.index_copy_(0, idx, pages)
