"""SGLang HiCache storage backend: KV pages through the KVTC tiered store.

Loaded by SGLang 0.5.23's storage backend factory (``--hicache-storage-backend
dynamic``), which imports ``module_path``, checks that ``class_name`` subclasses
``HiCacheStorage`` and calls ``class_name(storage_config, kwargs)``; the controller
then calls :meth:`KVTCHiCacheStorage.register_mem_pool_host` with its host KV pool.
See docs/engines/sglang.md for the launch command.

Pages and chunks. SGLang moves KV between its host pool and storage in pages of
``page_size`` tokens named by its page hashes; the store keeps chunks of
``chunk_tokens`` tokens (a multiple of ``page_size``) named by its own prefix chain
over token ids, which vLLM replicas derive too. The token ids behind a page hash come
from :mod:`kvtc_store.connectors.sglang_pages`. The rule:

- a page is cached (``batch_exists``) and served (``batch_get``) when the whole chunk
  holding it is in the store; pages of an incomplete chunk are never stored or served;
- ``batch_set`` stores every chunk whose pages it has: the full chunks within the
  batch, and the chunk the batch starts inside when the earlier pages of that chunk
  came in an earlier ``batch_set`` (they wait, uncompressed, in a bounded staging area:
  SGLang writes a radix node's pages as one operation and a node can start anywhere
  on a page boundary). Pages of the chunk a batch ends inside are staged for the next.

Host layouts. SGLang's MHA host pool (``MHATokenToKVPoolHost``) hands pages over as
flat tensors in its own order: ``layer_first`` and ``page_first_direct`` ``(2, L, P, H,
D)``, ``page_first`` ``(2, P, L, H, D)``, ``page_head`` ``(2, H, P, L, D)`` (``2`` = K,
V). :class:`HostPageLayout` reads that order from the pool's ``layout``; the generic
API (``batch_get``/``batch_set``, flat pages) and the zero-copy one
(``batch_get_v1``/``batch_set_v1``, host indices; chosen by SGLang when the extra
config has ``"interface_v1": 1``) both go through it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from ..errors import ConfigError, KVTCError
from ..store import TieredStore
from .engine import open_engine_store, warn_if_codec_on_cpu
from .sglang_host import HostPageLayout, copy_pages, fetch_pages
from .sglang_pages import PAGE_TOKENS, PageChain, install_hash_tap

log = logging.getLogger(__name__)

__all__ = ["HostPageLayout", "KVTCHiCacheStorage", "SGLangOptions"]


@dataclass(frozen=True)
class SGLangOptions:
    """The kvtc-store keys of ``--hicache-storage-backend-extra-config``.

    Attributes:
        config: the store's YAML config (docs/config.md); must name ``codec.artifact``
            or ``codec.registry`` (docs/registry.md).
        model: where transformers finds the served model's config (a local folder or
            hub id; default: SGLang's ``model_name``, the served model path).
        trust_remote_code: passed to ``AutoConfig.from_pretrained``.
        token_map_pages: pages of the page-hash -> token-ids map (LRU).
        staging_pages: pages of incomplete chunks held for the next ``batch_set``.
    """

    config: str
    model: str
    trust_remote_code: bool = False
    token_map_pages: int = 262_144
    staging_pages: int = 4096

    @classmethod
    def from_storage_config(cls, storage_config: HiCacheStorageConfig) -> SGLangOptions:
        """Read the options SGLang passes in ``storage_config.extra_config``.

        Raises:
            ConfigError: no ``config``, no model, or a malformed value.
        """
        extra = dict(storage_config.extra_config or {})
        if not extra.get("config"):
            raise ConfigError(
                "--hicache-storage-backend-extra-config: 'config' (the kvtc-store YAML "
                "file) is required"
            )
        model = extra.get("model") or storage_config.model_name
        if not model:
            raise ConfigError(
                "--hicache-storage-backend-extra-config: 'model' (the served model's "
                "folder or id) is required when SGLang passes no model name"
            )
        try:
            return cls(
                config=str(extra["config"]),
                model=str(model),
                trust_remote_code=bool(extra.get("trust_remote_code", False)),
                token_map_pages=int(extra.get("token_map_pages", 262_144)),
                staging_pages=int(extra.get("staging_pages", 4096)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--hicache-storage-backend-extra-config: {exc}") from exc


class KVTCHiCacheStorage(HiCacheStorage):
    """An SGLang HiCache storage backend over the KVTC tiered store.

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig``; its ``extra_config`` holds
            :class:`SGLangOptions` beside SGLang's own keys (``backend_name``,
            ``module_path``, ``class_name``, ``interface_v1``).
        kwargs: what SGLang's factory passes second (unused).
        hf_config: the served model's transformers config (default: loaded with
            ``AutoConfig.from_pretrained(options.model)``).

    The store opens in :meth:`register_mem_pool_host`, when the KV dtype and page
    layout are known. Keys SGLang passes are its page hashes; the store's keys are
    its own (module docstring).

    Raises:
        ConfigError: bad options; tensor or pipeline parallel size above 1; MLA model.
    """

    def __init__(
        self,
        storage_config: HiCacheStorageConfig,
        kwargs: dict | None = None,
        *,
        hf_config=None,
    ):
        self.options = SGLangOptions.from_storage_config(storage_config)
        if storage_config.tp_size != 1 or storage_config.pp_size != 1:
            raise ConfigError(
                "kvtc-store's SGLang backend supports tensor and pipeline parallel size 1 "
                f"(got tp {storage_config.tp_size}, pp {storage_config.pp_size})"
            )
        if storage_config.is_mla_model:
            raise ConfigError("kvtc-store's SGLang backend does not support MLA models")
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(
                self.options.model, trust_remote_code=self.options.trust_remote_code
            )
        self.storage_config = storage_config
        self.hf_config = hf_config
        self.store: TieredStore | None = None
        self.layout: HostPageLayout | None = None
        self._staged: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._staged_lock = threading.Lock()
        install_hash_tap(self.options.token_map_pages)

    # --- set-up -------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Take SGLang's host KV pool and open the store for its layout and dtype.

        Raises:
            ConfigError: unsupported pool; ``chunk_tokens`` not a multiple of the page
                size; the pool's KV shape differs from the model config's.
            ArtifactModelMismatchError: the codec artifact is for another model.
        """
        super().register_mem_pool_host(mem_pool_host)
        layout = HostPageLayout.of(mem_pool_host)
        store = open_engine_store(self.options.config, self.hf_config, dtype=layout.dtype_name)
        try:
            layers, heads, dim = store.codec.artifact.kv_shape
            if (layout.layers, layout.heads, layout.head_dim) != (layers, heads, dim):
                raise ConfigError(
                    f"SGLang's host pool holds KV of shape (layers {layout.layers}, heads "
                    f"{layout.heads}, dim {layout.head_dim}); the model's is ({layers}, "
                    f"{heads}, {dim}) (draft layers or replicated KV heads?)"
                )
            if store.chunk_tokens % layout.page_size:
                raise ConfigError(
                    f"chunk_tokens {store.chunk_tokens} is not a multiple of SGLang's page "
                    f"size {layout.page_size} (set --page-size to a divisor of it)"
                )
        except ConfigError:
            store.close()
            raise
        if self.store is not None:
            self.store.close()
        self.store, self.layout = store, layout
        warn_if_codec_on_cpu(store, "SGLang")

    def close(self) -> None:
        """Flush queued writes to the lower tiers and close the store."""
        if self.store is not None:
            self.store.close()

    def clear(self) -> None:
        """Does nothing: the store is shared with other replicas and engines; its tiers
        evict by capacity. (SGLang calls this when its cache is flushed.)"""
        log.info("kvtc-store: clear() ignored (the store is shared)")

    # --- the page rule ------------------------------------------------------------------

    def _ready(self) -> tuple[TieredStore, HostPageLayout]:
        if self.store is None or self.layout is None:
            raise KVTCError("register_mem_pool_host was not called: no host pool, no store")
        return self.store, self.layout

    def _chain(self, keys: list[str]) -> PageChain | None:
        store, _ = self._ready()
        chain = PAGE_TOKENS.chain(list(keys), complete_to=store.chunk_tokens)
        if chain is None:
            log.debug(
                "kvtc-store: tokens of page %s unknown (a miss)", keys[-1][:12] if keys else ""
            )
        return chain

    def _exists(self, keys: list[str]) -> int:
        store, layout = self._ready()
        chain = self._chain(keys)
        if chain is None:
            return 0
        end = store.lookup(chain.tokens, start=chain.starts[chain.first], salt=chain.salt)
        n = 0
        while n < len(keys) and self._within(chain, chain.first + n, layout, end):
            n += 1
        return n

    @staticmethod
    def _within(chain: PageChain, i: int, layout: HostPageLayout, end: int) -> bool:
        """Chain page ``i`` is a full page and ends by token ``end``."""
        full = chain.end(i) - chain.starts[i] == layout.page_size
        return full and chain.end(i) <= end

    def _read(self, keys: list[str]) -> list[torch.Tensor | None]:
        """Flat pages in the pool's order for ``keys``, decoded as one batch (on the
        codec's device: :func:`~.sglang_host.fetch_pages`); None from the first miss on."""
        store, layout = self._ready()
        out: list[torch.Tensor | None] = [None] * len(keys)
        chain = self._chain(keys)
        if chain is None:
            return out
        base = chain.starts[chain.first]
        base -= base % store.chunk_tokens
        pages = fetch_pages(store, layout, chain.tokens, base, chain.salt)
        if pages is None:
            return out
        have = base + pages.shape[0] * layout.page_size
        for j in range(len(keys)):
            i = chain.first + j
            if not self._within(chain, i, layout, have):
                break
            out[j] = pages[(chain.starts[i] - base) // layout.page_size]
        return out

    def _write(self, keys: list[str], pages: list[torch.Tensor]) -> bool:
        """Store the chunks ``pages`` (canonical) complete; stage a trailing partial
        chunk. False when the tokens are unknown or the store failed."""
        store, layout = self._ready()
        chain = self._chain(keys)
        if chain is None:
            return False
        c, p = store.chunk_tokens, layout.page_size
        idx = list(range(chain.first, chain.first + len(keys)))
        if any(chain.end(i) - chain.starts[i] != p for i in idx):
            return False  # a short page: SGLang's pages are full, so not ours to store
        start = chain.starts[idx[0]]
        lead = start - start % c
        before = [i for i in range(chain.first) if chain.starts[i] >= lead]
        with self._staged_lock:
            earlier = [self._staged.get(chain.hashes[i]) for i in before]
        if all(t is not None for t in earlier):
            idx, pages, start = before + idx, earlier + list(pages), lead
            with self._staged_lock:
                for i in before:
                    self._staged.pop(chain.hashes[i], None)
        else:
            skip = (c - start % c) // p  # the rest of an incomplete leading chunk
            idx, pages, start = idx[skip:], list(pages)[skip:], start + skip * p
        if not pages:
            return True
        end = chain.end(idx[-1])
        full_end = end - end % c
        n_full = (full_end - start) // p
        if n_full > 0:
            kv = torch.stack(pages[:n_full]).permute(1, 2, 4, 0, 3, 5)  # (2, L, H, n, P, D)
            kv = kv.reshape(2, layout.layers, layout.heads, n_full * p, layout.head_dim)
            try:
                store.put(chain.tokens[:full_end], kv[0], kv[1], start=start, salt=chain.salt)
            except KVTCError as exc:
                log.warning("kvtc-store: SGLang pages not stored: %s", exc)
                return False
        with self._staged_lock:
            for i, page in zip(idx[n_full:], pages[n_full:]):
                self._staged[chain.hashes[i]] = page.clone()
            while len(self._staged) > self.options.staging_pages:
                self._staged.popitem(last=False)
        return True

    # --- SGLang's storage API -------------------------------------------------------------

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """Number of consecutive pages from ``keys[0]`` whose chunks are stored.

        Stores, fetches and promotes nothing (the store's ``lookup``). ``extra_info``
        is not needed (the chain comes from the page map). Pages of a chunk the store
        lacks or cannot name (tokens unknown, no known continuation completes it) are
        misses.
        """
        return self._exists(list(keys))

    def exists(self, key: str) -> bool:
        """Whether page ``key`` is stored (see :meth:`batch_exists`)."""
        return self._exists([key]) == 1

    def batch_get(
        self,
        keys: list[str],
        target_locations: list[torch.Tensor] | None = None,
        target_sizes: Any = None,
    ) -> list[torch.Tensor | None]:
        """Pages as flat tensors in the host pool's order, written into
        ``target_locations`` (SGLang passes ``get_dummy_flat_data_page()`` buffers) when
        given; None for a page not served and every page after it. The pages are decoded
        as one batch into a staging buffer on the codec's device and copied from it
        once each (:func:`~.sglang_host.copy_pages`)."""
        pages = []
        for page in self._read(list(keys)):
            if page is None:
                break
            pages.append(page)
        if target_locations is None:
            targets = [torch.empty(p.shape, dtype=p.dtype) for p in pages]
        else:
            targets = list(target_locations[: len(pages)])
        copy_pages(pages, targets)
        return [*targets, *([None] * (len(keys) - len(pages)))]

    def get(
        self, key: str, target_location: Any = None, target_sizes: Any = None
    ) -> torch.Tensor | None:
        """One page (see :meth:`batch_get`)."""
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_set(
        self,
        keys: list[str],
        values: list[torch.Tensor] | None = None,
        target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:
        """Store pages given as flat tensors in the host pool's order
        (``get_data_page(index)``), by the page rule of the module docstring.

        Returns:
            True when every chunk that the rule stores was stored (or staged); False
            when the pages' tokens are unknown or the store failed.
        """
        _, layout = self._ready()
        if values is None or len(values) != len(keys):
            return False
        return self._write(list(keys), [layout.to_canonical(v) for v in values])

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        """One page (see :meth:`batch_set`)."""
        return self.batch_set([key], [value])

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Load pages straight into the host pool: page ``j`` at token slot
        ``host_indices[j * page_size]``. Per page, whether it was loaded."""
        _, layout = self._ready()
        pool = self.mem_pool_host
        ok = []
        for j, page in enumerate(self._read(list(keys))):
            if page is None:
                ok.extend([False] * (len(keys) - j))
                break
            pool.set_from_flat_data_page(int(host_indices[j * layout.page_size]), page)
            ok.append(True)
        return ok

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store pages straight from the host pool (page ``j`` at token slot
        ``host_indices[j * page_size]``). One verdict for the batch, per page."""
        _, layout = self._ready()
        pool = self.mem_pool_host
        pages = [
            layout.to_canonical(pool.get_data_page(int(host_indices[j * layout.page_size])))
            for j in range(len(keys))
        ]
        return [self._write(list(keys), pages)] * len(keys)
