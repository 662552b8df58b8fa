"""SGLang's host KV pages as the connector reads them, without SGLang: the pool's page
layout (:class:`HostPageLayout`), a batch of stored chunks decoded into flat pages
(:func:`fetch_pages`) and their copy into the host pages (:func:`copy_pages`).

:class:`~kvtc_store.connectors.sglang.KVTCHiCacheStorage` serves ``batch_get`` and
``batch_get_v1`` through these; nothing here imports SGLang, so the serving-path
benchmark (``benchmarks/serving_path.py``) times the same code on a GPU image without
SGLang. With the GPU codec, a batch's blobs go to the device in one upload, decode into a
device staging buffer, are laid out as the pool's flat pages there in one pass, and each
page is copied to its host page once; no per-chunk CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec import ChunkKV
from ..errors import ConfigError
from ..store import TieredStore
from .engine import KV_DTYPE_NAMES

__all__ = ["HostPageLayout", "copy_pages", "fetch_pages"]

# Flat page order of each MHA host layout, as axis names; canonical is (2, L, P, H, D).
_PAGE_AXES = {
    "layer_first": "KLPHD",
    "page_first_direct": "KLPHD",
    "page_first": "KPLHD",
    "page_head": "KHPLD",
}
_CANONICAL = "KLPHD"


@dataclass(frozen=True)
class HostPageLayout:
    """How one SGLang host pool lays out a page, and conversion to and from it.

    Canonical page: ``(2, L, P, H, D)`` (K then V; layers, tokens, KV heads, head dim).

    Attributes:
        layout: the pool's ``layout`` (``layer_first``, ``page_first``,
            ``page_first_direct`` or ``page_head``).
        layers, page_size, heads, head_dim: the pool's ``layer_num``, ``page_size``,
            ``head_num``, ``head_dim``.
        dtype: the pool's KV dtype.
    """

    layout: str
    layers: int
    page_size: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, pool) -> HostPageLayout:
        """The layout of an SGLang MHA host pool (``MHATokenToKVPoolHost``).

        Raises:
            ConfigError: not an MHA pool of a supported layout and dtype (MLA pools,
                ``page_unified``, K-only or asymmetric K/V widths, fp8 KV).
        """
        layout = getattr(pool, "layout", None)
        if layout not in _PAGE_AXES:
            raise ConfigError(
                f"kvtc-store's SGLang backend supports host layouts {sorted(_PAGE_AXES)}; "
                f"the host pool {type(pool).__name__} has {layout!r}"
            )
        needed = ("layer_num", "page_size", "head_num", "head_dim", "v_head_dim", "dtype")
        missing = [a for a in needed if not hasattr(pool, a)]
        if missing:
            raise ConfigError(
                f"host pool {type(pool).__name__} is not an MHA pool (no {missing}); "
                "MLA models are not supported"
            )
        if pool.v_head_dim != pool.head_dim:
            raise ConfigError(
                f"host pool {type(pool).__name__}: K width {pool.head_dim} != V width "
                f"{pool.v_head_dim} (not supported)"
            )
        if pool.dtype not in KV_DTYPE_NAMES or getattr(pool, "storage_format_tag", None):
            raise ConfigError(
                f"host pool {type(pool).__name__}: KV dtype {pool.dtype} / format "
                f"{getattr(pool, 'storage_format_tag', None)!r} is not supported "
                f"(supported: {sorted(KV_DTYPE_NAMES.values())})"
            )
        return cls(layout, pool.layer_num, pool.page_size, pool.head_num, pool.head_dim, pool.dtype)

    @property
    def dtype_name(self) -> str:
        """The dtype as the chunk-key namespace names it (``"bfloat16"``)."""
        return KV_DTYPE_NAMES[self.dtype]

    def _shape(self, axes: str) -> tuple[int, ...]:
        size = {"K": 2, "L": self.layers, "P": self.page_size, "H": self.heads}
        return tuple(size.get(a, self.head_dim) for a in axes)

    def _perm(self) -> tuple[int, ...]:
        # Every supported order differs from canonical by one swap: its own inverse.
        axes = _PAGE_AXES[self.layout]
        return tuple(axes.index(a) for a in _CANONICAL)

    def to_canonical(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page in the pool's order -> ``(2, L, P, H, D)`` (a view)."""
        return flat.reshape(self._shape(_PAGE_AXES[self.layout])).permute(self._perm())

    def to_flat(self, page: torch.Tensor) -> torch.Tensor:
        """``(2, L, P, H, D)`` -> a flat page in the pool's order (contiguous)."""
        return page.permute(self._perm()).contiguous().flatten()

    def flat_pages(self, kv: torch.Tensor) -> torch.Tensor:
        """Chunks ``kv (2, B, L, H, T, D)`` (K, V) -> ``(B * T / P, page elements)``:
        their pages in token order, each flat in the pool's order (one copy, on
        ``kv``'s device)."""
        batch, tokens = kv.shape[1], kv.shape[4]
        x = kv.unflatten(4, (tokens // self.page_size, self.page_size))  # 2 B L H n P D
        canon = x.permute(1, 4, 0, 2, 5, 3, 6)  # B n | K L P H D
        pool = canon.permute(0, 1, *(2 + i for i in self._perm()))
        return pool.reshape(batch * (tokens // self.page_size), -1)


def fetch_pages(
    store: TieredStore, layout: HostPageLayout, tokens, start: int, salt: str = ""
) -> torch.Tensor | None:
    """The stored chunks of ``tokens`` from ``start`` on, as flat pages in the pool's order.

    One batched fetch and one batched decode (``TieredStore.get(out=)``) into a staging
    buffer on the store's codec device (the GPU codec's device; the host for the CPU
    codec), then :meth:`HostPageLayout.flat_pages` there.

    Args:
        store: the store (its chunks a multiple of ``layout.page_size`` tokens).
        layout: the host pool's page layout.
        tokens: token ids ``(T,)``; its full chunks are fetched.
        start: first token, a multiple of the store's chunk size.
        salt: the chunk-key salt.

    Returns:
        ``(n_pages, page elements)`` in ``layout.dtype`` on the codec's device: the pages
        of the chunks from ``start`` up to the first missing, corrupt or undecodable one;
        None when there is none.
    """
    ct = store.chunk_tokens
    n_chunks = len(tokens) // ct - start // ct
    if n_chunks <= 0:
        return None
    shape = (2, n_chunks, layout.layers, layout.heads, ct, layout.head_dim)
    stage = torch.empty(shape, dtype=layout.dtype, device=store.codec.device)
    got = store.get(tokens, start=start, salt=salt, out=ChunkKV.dense(stage[0], stage[1]))
    if not got:
        return None
    return layout.flat_pages(stage[:, : got // ct])


def copy_pages(pages, targets) -> None:
    """Copy each page (from :func:`fetch_pages`) into its target host page, the copies
    queued back to back and waited for once.

    Args:
        pages: flat pages (any device).
        targets: as many host tensors of a page's size (SGLang's host pool pages or
            its flat page buffers).
    """
    cuda = None
    for page, target in zip(pages, targets):
        target.copy_(page.reshape(target.shape), non_blocking=page.is_cuda)
        cuda = page.device if page.is_cuda else cuda
    if cuda is not None:
        torch.cuda.current_stream(cuda).synchronize()
