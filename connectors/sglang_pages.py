"""Token ids behind SGLang's page hashes: the bridge from SGLang's keys to ours.

SGLang 0.5.23 hands a HiCache storage backend page hashes only: ``batch_exists``,
``batch_get``/``batch_set`` and their ``_v1`` variants receive the SHA-256 page-hash
chain of ``sglang.srt.mem_cache.utils.get_hash_str`` (one 64-char hex string per page,
each hashing the previous page's hash and the page's token ids), never token ids
(``HiCacheStorageExtraInfo`` carries at most the preceding page hashes). kvtc-store keys
chunks by its own prefix chain over token ids (:mod:`kvtc_store.keys`), so vLLM and
SGLang replicas share chunks; the SGLang connector therefore needs the token ids of
every page it is asked about.

Every page hash SGLang computes goes through that one function: the radix tree hashes
a node's pages with it when the node is inserted (``compute_node_hash_values``), and the
cache controller hashes a request's uncached tokens with it before asking storage
(``get_storage_hash_str``). :func:`install_hash_tap` wraps it, once per process: the
wrapper calls SGLang's function unchanged and records, for each page hash it returns,
the previous page hash and the page's token ids in :data:`PAGE_TOKENS`. A page's full
token prefix is then found by walking parent hashes back to the root of its chain.

Soundness: a record is exactly what SGLang's own hash function was given and returned,
so a page hash never maps to tokens it was not computed from. Each record also keeps
the page SGLang hashed right after it in the same call (its latest continuation): a
store chunk spans several pages and its key needs all of their tokens, so a question
about the first pages of a chunk is answered through that continuation. That is sound
for any continuation: attention is causal, so the KV of a page depends only on the
tokens up to its end, which every continuation shares. What the map cannot answer is
a miss, never wrong data:

- a chain SGLang seeds with a namespace (a request with an ``extra_key``, which holds
  its LoRA id, or a ``cache_salt``: its first page's prior hash is
  ``storage_namespace_seed(extra_key, cache_salt)``, not a page) is answered only when
  the tap saw that seed computed: the tap wraps ``storage_namespace_seed`` too and
  records each seed with the namespace's chunk-key salt (:func:`namespace_salt`), so such a chain's chunks are
  stored and served under that salt, shared only with requests of the same
  ``extra_key`` and ``cache_salt`` (a LoRA changes the KV; a salt separates tenants).
  A chain whose seed was not seen is a miss;
- bigram keys (EAGLE) and token ids outside ``[0, 2**32)`` are not recorded;
- the map holds at most ``capacity`` pages, least recently used dropped first; a page
  whose record (or an ancestor's) was dropped is a miss until SGLang hashes it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .engine import request_salt

log = logging.getLogger(__name__)

__all__ = ["PAGE_TOKENS", "PageChain", "PageTokenMap", "install_hash_tap", "namespace_salt"]

_MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class PageChain:
    """The token prefix behind a run of consecutive SGLang pages.

    Attributes:
        tokens: token ids ``(T,)`` uint32 from position 0 through the end of the last
            page asked about, then through the continuation up to the end of that
            page's chunk where one is known.
        hashes: page hashes of the chain from the first page of the sequence, the pages
            of the continuation included.
        starts: first token of each page in ``hashes`` (same length).
        first: index in ``hashes`` of the first page asked about.
        salt: the chunk-key salt of the chain's namespace (``""``: SGLang did not seed
            it; see :meth:`PageTokenMap.add_seed`).
    """

    tokens: np.ndarray
    hashes: list[str]
    starts: list[int]
    first: int
    salt: str = ""

    def end(self, i: int) -> int:
        """One past the last token of chain page ``i``."""
        return self.starts[i + 1] if i + 1 < len(self.starts) else len(self.tokens)


class PageTokenMap:
    """SGLang page hash -> (previous page hash, the page's token ids), LRU-bounded.

    Thread-safe (SGLang hashes on the scheduler thread and asks storage from its
    prefetch and backup threads).

    Args:
        capacity: most pages held; least recently used are dropped first.
    """

    def __init__(self, capacity: int = 262_144):
        self.capacity = capacity
        # hash -> [parent hash, token bytes, latest continuation hash]
        self._pages: OrderedDict[str, list] = OrderedDict()
        self._seeds: OrderedDict[str, str] = OrderedDict()  # namespace seed -> salt
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pages)

    def add(self, page_hash: str, parent: str | None, tokens: bytes) -> None:
        """Record one page: its hash, the previous page's hash (None: first page of a
        sequence) and its token ids as little-endian uint32 bytes; it becomes the
        parent's latest continuation."""
        with self._lock:
            rec = self._pages.get(page_hash)
            self._pages[page_hash] = [parent, tokens, rec[2] if rec else None]
            self._pages.move_to_end(page_hash)
            if parent is not None and parent in self._pages:
                self._pages[parent][2] = page_hash
            while len(self._pages) > self.capacity:
                self._pages.popitem(last=False)

    def add_seed(self, seed: str, salt: str) -> None:
        """Record a namespace seed (the prior hash SGLang starts a namespaced chain
        from) and the chunk-key salt of that namespace; at most ``capacity`` seeds are
        held, least recently used dropped first."""
        with self._lock:
            self._seeds[seed] = salt
            self._seeds.move_to_end(seed)
            while len(self._seeds) > self.capacity:
                self._seeds.popitem(last=False)

    def chain(self, keys: list[str], complete_to: int = 1) -> PageChain | None:
        """The token prefix behind ``keys``, consecutive page hashes of one sequence.

        Args:
            keys: page hashes, consecutive pages of one chain.
            complete_to: follow the latest continuation past the last key until the
                tokens are a multiple of this (a store chunk), where one is known.

        Returns:
            A :class:`PageChain`, or None when a page of the chain back to the first
            page (or the namespace seed before it) is unknown, or ``keys`` are not
            consecutive pages of one chain.
        """
        if not keys:
            return None
        hashes: list[str] = []
        parts: list[bytes] = []
        salt = ""
        with self._lock:
            h: str | None = keys[-1]
            while h is not None:
                rec = self._pages.get(h)
                if rec is None:
                    if not hashes or h not in self._seeds:
                        return None
                    salt = self._seeds[h]  # a namespaced chain's first page
                    self._seeds.move_to_end(h)
                    break
                self._pages.move_to_end(h)
                hashes.append(h)
                parts.append(rec[1])
                h = rec[0]
            hashes.reverse()
            parts.reverse()
            first = len(hashes) - len(keys)
            if first < 0 or hashes[first:] != list(keys):
                return None
            n = sum(len(p) for p in parts) // 4
            nxt = self._pages[keys[-1]][2]
            while n % complete_to and nxt is not None and nxt in self._pages:
                rec = self._pages[nxt]
                hashes.append(nxt)
                parts.append(rec[1])
                n += len(rec[1]) // 4
                nxt = rec[2]
        starts, pos = [], 0
        for p in parts:
            starts.append(pos)
            pos += len(p) // 4
        tokens = np.frombuffer(b"".join(parts), dtype="<u4")
        return PageChain(tokens, hashes, starts, first, salt)


PAGE_TOKENS = PageTokenMap()
"""The process's map, filled by the tap on SGLang's page-hash function."""


def _plain_token_ids(key) -> np.ndarray | None:
    """Token ids of what SGLang hashed (a list, an array or a ``RadixKey``) as uint32,
    or None where they are not plain token ids (bigram keys, tuples, out of range)."""
    if getattr(key, "is_bigram", False):
        return None
    n = len(key)
    raw = key.raw_token_ids() if hasattr(key, "raw_token_ids") else getattr(key, "token_ids", key)
    if n and isinstance(raw[0], tuple):
        return None
    arr = np.asarray(raw[:n], dtype=np.int64)
    if arr.ndim != 1 or (n and (arr.min() < 0 or arr.max() > _MAX_TOKEN_ID)):
        return None
    return arr.astype("<u4")


def _record_page(result, key, prior_hash: str | None = None, page_size: int | None = None) -> None:
    """Record what ``get_hash_str(key, prior_hash, page_size)`` returned (``result``)."""
    tokens = _plain_token_ids(key)
    if tokens is None:
        return
    hashes = [result] if isinstance(result, str) else list(result)
    step = page_size or len(tokens)
    parent = prior_hash
    for i, h in enumerate(hashes):
        PAGE_TOKENS.add(h, parent, tokens[i * step : (i + 1) * step].tobytes())
        parent = h


def namespace_salt(extra_key: str | None, cache_salt: str | None) -> str:
    """The chunk-key salt of SGLang's request namespace ``(extra_key, cache_salt)``
    (what ``storage_namespace_seed`` seeds its page-hash chains with):
    :func:`~kvtc_store.connectors.engine.request_salt`. ``""`` only for the plain
    namespace (both None); a cache salt alone gives vLLM's salt for that cache salt,
    anything else its own JSON text (``None`` and ``""`` kept apart, as SGLang does)."""
    if extra_key is None and cache_salt is None:
        return ""
    if extra_key is None and cache_salt:
        return request_salt(cache_salt)
    return json.dumps({"cache_salt": cache_salt, "extra_key": extra_key}, sort_keys=True)


def _record_seed(seed, extra_key, cache_salt) -> None:
    """Record what ``storage_namespace_seed(extra_key, cache_salt)`` returned."""
    if seed is not None:
        PAGE_TOKENS.add_seed(seed, namespace_salt(extra_key, cache_salt))


def _wrap(utils, name: str, record) -> None:
    """Replace SGLang's ``utils.<name>`` (and the name in every SGLang module loaded so
    far that imported it) by a wrapper that returns what the original returns and then
    calls ``record(result, *args, **kwargs)``; a failure to record is logged, never
    raised.
    Idempotent."""
    import sys

    original = getattr(utils, name)
    if getattr(original, "_kvtc_tap", False):
        return

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            record(result, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never break SGLang's hashing
            log.warning("kvtc-store: could not record what SGLang's %s gave: %s", name, exc)
        return result

    wrapper._kvtc_tap = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__doc__, wrapper.__name__ = original.__doc__, name
    for mod_name, module in list(sys.modules.items()):
        if mod_name.startswith("sglang") and getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def install_hash_tap(capacity: int | None = None) -> None:
    """Wrap ``sglang.srt.mem_cache.utils.get_hash_str`` so every page hash SGLang
    computes is recorded in :data:`PAGE_TOKENS`, and ``storage_namespace_seed`` so every
    namespace seed is recorded with its salt (:func:`namespace_salt`). Idempotent;
    SGLang's results are returned unchanged, and a failure to record is logged, never
    raised.

    Args:
        capacity: raise :data:`PAGE_TOKENS`' capacity to at least this many pages.

    Raises:
        ImportError: SGLang is not installed.
    """
    from sglang.srt.mem_cache import utils

    if capacity is not None:
        PAGE_TOKENS.capacity = max(PAGE_TOKENS.capacity, capacity)
    _wrap(utils, "storage_namespace_seed", _record_seed)
    _wrap(utils, "get_hash_str", _record_page)
    log.info("kvtc-store: recording token ids behind SGLang page hashes")
