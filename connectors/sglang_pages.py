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

- chains SGLang seeds with a namespace (requests with a LoRA ``extra_key`` or a
  ``cache_salt``: their first page's prior hash is a seed, not a page) never reach a
  root, so they are neither stored nor served (a LoRA changes the KV; a salt separates
  tenants, which kvtc-store does with its ``tenant`` setting instead);
- bigram keys (EAGLE) and token ids outside ``[0, 2**32)`` are not recorded;
- the map holds at most ``capacity`` pages, least recently used dropped first; a page
  whose record (or an ancestor's) was dropped is a miss until SGLang hashes it again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["PAGE_TOKENS", "PageChain", "PageTokenMap", "install_hash_tap"]

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
    """

    tokens: np.ndarray
    hashes: list[str]
    starts: list[int]
    first: int

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

    def chain(self, keys: list[str], complete_to: int = 1) -> PageChain | None:
        """The token prefix behind ``keys``, consecutive page hashes of one sequence.

        Args:
            keys: page hashes, consecutive pages of one chain.
            complete_to: follow the latest continuation past the last key until the
                tokens are a multiple of this (a store chunk), where one is known.

        Returns:
            A :class:`PageChain`, or None when a page of the chain back to the first
            page is unknown, or ``keys`` are not consecutive pages of one chain.
        """
        if not keys:
            return None
        hashes: list[str] = []
        parts: list[bytes] = []
        with self._lock:
            h: str | None = keys[-1]
            while h is not None:
                rec = self._pages.get(h)
                if rec is None:
                    return None
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
        return PageChain(tokens, hashes, starts, first)


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


def _record(key, prior_hash: str | None, page_size: int | None, result) -> None:
    tokens = _plain_token_ids(key)
    if tokens is None:
        return
    hashes = [result] if isinstance(result, str) else list(result)
    step = page_size or len(tokens)
    parent = prior_hash
    for i, h in enumerate(hashes):
        PAGE_TOKENS.add(h, parent, tokens[i * step : (i + 1) * step].tobytes())
        parent = h


def install_hash_tap(capacity: int | None = None) -> None:
    """Wrap ``sglang.srt.mem_cache.utils.get_hash_str`` so every page hash SGLang
    computes is recorded in :data:`PAGE_TOKENS` (idempotent; SGLang's result is
    returned unchanged, and a failure to record is logged, never raised).

    Args:
        capacity: raise :data:`PAGE_TOKENS`' capacity to at least this many pages.

    Raises:
        ImportError: SGLang is not installed.
    """
    from sglang.srt.mem_cache import utils

    if capacity is not None:
        PAGE_TOKENS.capacity = max(PAGE_TOKENS.capacity, capacity)
    original = utils.get_hash_str
    if getattr(original, "_kvtc_tap", False):
        return

    def get_hash_str(token_ids, prior_hash=None, page_size=None):
        result = original(token_ids, prior_hash, page_size)
        try:
            _record(token_ids, prior_hash, page_size, result)
        except Exception as exc:  # noqa: BLE001 - never break SGLang's hashing
            log.warning("kvtc-store: could not record SGLang page tokens: %s", exc)
        return result

    get_hash_str._kvtc_tap = True  # type: ignore[attr-defined]
    get_hash_str.__wrapped__ = original  # type: ignore[attr-defined]
    get_hash_str.__doc__ = original.__doc__
    utils.get_hash_str = get_hash_str
    log.info("kvtc-store: recording token ids behind SGLang page hashes")
