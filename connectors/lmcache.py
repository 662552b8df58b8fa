"""LMCache L2 adapter over kvtc-store's tiers, and the ``kvtc`` serde (LMCache 0.5.6).

LMCache's multiprocess storage manager (``lmcache server``) keeps chunks in L1 (host
memory) and writes them to L2 adapters given as JSON specs (``--l2-adapter``). Its
``plugin`` adapter type imports a module and class named in the spec; this module is
such a plugin: :class:`KVTCStoreL2Adapter` stores LMCache's objects in the tiers of a
kvtc-store config (memory, disk, S3; :mod:`kvtc_store.backends`) through a
:class:`~kvtc_store.tierstack.TierStack` (write-down to lower tiers, promotion on hit).
Importing the module also registers the serde ``kvtc``
(:mod:`kvtc_store.connectors.lmcache_serde`), so one spec enables both, with no code::

    lmcache server --l1-size-gb 8 --eviction-policy LRU --l2-adapter '{
        "type": "plugin",
        "module_path": "kvtc_store.connectors.lmcache",
        "class_name": "KVTCStoreL2Adapter",
        "adapter_params": {"config": "/etc/kvtc/store.yaml"},
        "serde": {"type": "kvtc", "config": "/etc/kvtc/store.yaml"}}'

Without the ``serde`` entry the adapter stores LMCache's raw KV bytes in our tiers.

Keys: each LMCache ``ObjectKey`` (model name, KV rank, object group, cache salt, chunk
hash) becomes the SHA-256 hex of those fields and the store config's ``tenant``, so
LMCache's tenants (cache salts) stay apart. These are LMCache's own keys, not the
engine-neutral keys of :mod:`kvtc_store.connectors.engine`: chunks stored through LMCache
are found through LMCache.

Contract kept (``L2AdapterInterface``): non-blocking submit, completion signalled on
three distinct event fds; a key that is missing, unreadable, or larger than the buffer
LMCache provides is a per-key load failure (LMCache recomputes it), never wrong bytes.
Limits: lookup's "lock" cannot pin a chunk in our tiers (they evict on their own), so a
chunk evicted between lookup and load is a load failure; LMCache's byte accounting counts
what this process stored and deleted, not our tiers' own evictions (our tiers enforce
their capacities themselves, so the adapter declares no capacity to LMCache).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import torch
from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.platform import create_event_notifier

from ..config import build_tiers, load_config
from ..tierstack import TierStack
from . import lmcache_serde  # noqa: F401 - registers the serde "kvtc" with LMCache

__all__ = ["KVTCStoreL2Adapter", "KVTCStoreL2AdapterConfig", "object_key_hex"]

log = logging.getLogger(__name__)

_KEY_DOMAIN = b"kvtc-store/lmcache-l2/v1"


def object_key_hex(key: ObjectKey, tenant: str = "") -> str:
    """Our chunk key (64 lowercase hex) for an LMCache ``ObjectKey``.

    SHA-256 over a domain tag and the msgpack of ``tenant`` and every field of the key,
    so keys differ whenever any field differs (cache salt included).
    """
    fields = [
        tenant,
        key.model_name,
        key.kv_rank,
        key.object_group_id,
        key.cache_salt,
        bytes(key.chunk_hash),
    ]
    return hashlib.sha256(_KEY_DOMAIN + msgpack.packb(fields, use_bin_type=True)).hexdigest()


class KVTCStoreL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params`` of :class:`KVTCStoreL2Adapter` (found by LMCache's plugin
    loader by its name: the class name plus ``Config``).

    Args:
        config: path of a kvtc-store YAML config (docs/config.md); its ``tiers``,
            ``tenant``, ``write_mode`` and ``write_queue_chunks`` are used.
        workers: threads running store, lookup and load tasks (default 4).
    """

    def __init__(self, config: str, workers: int = 4) -> None:
        self.config = config
        self.workers = workers

    @classmethod
    def from_dict(cls, d: dict) -> KVTCStoreL2AdapterConfig:
        """Parse ``adapter_params``.

        Raises:
            ValueError: ``config`` missing or not a string, ``workers`` not an int >= 1,
                or an unknown key (LMCache reports it with :meth:`help`).
        """
        unknown = sorted(set(d) - {"config", "workers"})
        if unknown:
            raise ValueError(f"unknown adapter_params {unknown}; known: config, workers")
        config = d.get("config")
        if not isinstance(config, str) or not config:
            raise ValueError("config must be the path of a kvtc-store YAML config")
        workers = d.get("workers", 4)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        return cls(config=config, workers=workers)

    @classmethod
    def help(cls) -> str:
        return (
            "kvtc-store L2 adapter (type plugin, module_path kvtc_store.connectors.lmcache, "
            "class_name KVTCStoreL2Adapter), adapter_params:\n"
            "- config (str): kvtc-store YAML config naming the tiers (required)\n"
            "- workers (int): task threads (default 4)\n"
            'Add "serde": {"type": "kvtc", "config": <same YAML>} to store KVTC blobs.'
        )


class KVTCStoreL2Adapter(L2AdapterInterface):
    """An LMCache L2 adapter whose storage is a kvtc-store tier stack.

    Args:
        config: the parsed ``adapter_params`` (or the raw dict).
        l1_memory_desc: LMCache's L1 description; not needed (our tiers copy bytes).

    Raises:
        ConfigError: the kvtc-store config is invalid or a tier cannot be opened.
    """

    def __init__(
        self,
        config: KVTCStoreL2AdapterConfig | dict[str, Any],
        l1_memory_desc: object | None = None,
    ) -> None:
        super().__init__(max_capacity_bytes=0)
        if isinstance(config, dict):
            config = KVTCStoreL2AdapterConfig.from_dict(config)
        cfg = load_config(config.config)
        self.tenant = cfg.tenant
        self.stack = TierStack(build_tiers(cfg), cfg.write_mode, cfg.write_queue_chunks)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="kvtc-l2")
        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._lock = threading.Lock()
        self._next_id: L2TaskId = 0
        self._stored: dict[L2TaskId, L2StoreResult] = {}
        self._looked_up: dict[L2TaskId, Bitmap] = {}
        self._loaded: dict[L2TaskId, Bitmap] = {}
        self._sizes: dict[str, int] = {}  # bytes this adapter stored, for LMCache's usage
        log.info(
            "kvtc-store L2 adapter: tiers %s from %s",
            [t.name for t in self.stack.tiers],
            config.config,
        )

    # --- event fds ----------------------------------------------------------------------

    def get_store_event_fd(self) -> int:
        return self._store_efd.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._lookup_efd.fileno()

    def get_load_event_fd(self) -> int:
        return self._load_efd.fileno()

    # --- tasks ----------------------------------------------------------------------------

    def _submit(
        self, job: Callable[[], Any], results: dict, notifier: Any, on_error: Any
    ) -> L2TaskId:
        """Run ``job`` on the pool; file its result (``on_error`` if it raises) under a
        new task id and signal ``notifier``."""
        with self._lock:
            task_id = self._next_id
            self._next_id += 1

        def run() -> None:
            try:
                result = job()
            except Exception:
                log.exception("kvtc-store L2 adapter: task %d failed", task_id)
                result = on_error
            with self._lock:
                results[task_id] = result
            notifier.notify()

        self._pool.submit(run)
        return task_id

    def _hex(self, keys: list[ObjectKey]) -> list[str]:
        return [object_key_hex(k, self.tenant) for k in keys]

    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        """Store each object's bytes (its used size) under its key: the top tier now, the
        tiers below through the write-down queues. Fails as a whole (LMCache's contract)."""

        def store() -> L2StoreResult:
            hexkeys = self._hex(keys)
            items = [(h, bytes(obj.byte_array)) for h, obj in zip(hexkeys, objects, strict=True)]
            self.stack.put(items)
            with self._lock:  # a re-stored key keeps its blob and is counted once
                new = [i for i, h in enumerate(hexkeys) if h not in self._sizes]
                self._sizes.update((hexkeys[i], len(items[i][1])) for i in new)
            if new:
                self._notify_keys_stored([keys[i] for i in new], [len(items[i][1]) for i in new])
            return L2StoreResult(True, sum(len(b) for _, b in items))

        return self._submit(store, self._stored, self._store_efd, L2StoreResult(False, 0))

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._stored = self._stored, {}
        return done

    def submit_lookup_and_lock_task(
        self, keys: list[ObjectKey], group_layout_descs: dict[int, MemoryLayoutDesc]
    ) -> L2TaskId:
        """Which keys any tier holds (side-effect free). Nothing is pinned: our tiers
        evict on their own, so a later load of an evicted key fails for that key."""

        def lookup() -> Bitmap:
            bitmap = Bitmap(len(keys))
            for i, hit in enumerate(self.stack.exists(self._hex(keys))):
                if hit:
                    bitmap.set(i)
            return bitmap

        return self._submit(lookup, self._looked_up, self._lookup_efd, Bitmap(len(keys)))

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._looked_up.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        """Nothing to release: lookups pin nothing."""

    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        """Copy each key's stored bytes into its buffer (from the highest tier holding
        it; hits below the top are promoted). A missing key, or bytes that do not fit the
        buffer, leave that key's bit 0."""

        def load() -> Bitmap:
            fetched = self.stack.get(self._hex(keys))
            bitmap = Bitmap(len(keys))
            hits = []
            for i, (key, obj, blob) in enumerate(zip(keys, objects, fetched.blobs, strict=True)):
                if blob is not None and _fill(obj, blob, key):
                    bitmap.set(i)
                    hits.append(key)
            if hits:
                self._notify_keys_accessed(hits)
            return bitmap

        return self._submit(load, self._loaded, self._load_efd, Bitmap(len(keys)))

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._loaded.pop(task_id, None)

    # --- eviction, status, lifecycle --------------------------------------------------------

    def delete(self, keys: list[ObjectKey]) -> None:
        """Remove the keys from every tier (LMCache's L2 eviction and quotas)."""
        hexkeys = self._hex(keys)
        self.stack.delete(hexkeys)
        with self._lock:
            sizes = [self._sizes.pop(h, None) for h in hexkeys]
        known = [(k, s) for k, s in zip(keys, sizes, strict=True) if s is not None]
        if known:
            self._notify_keys_deleted([k for k, _ in known], [s for _, s in known])

    def report_status(self) -> dict:
        usage = {t.name: t.snapshot() for t in self.stack.tiers}
        return {
            "is_healthy": True,
            "tiers": {
                name: {"used_bytes": u.used_bytes, "n_items": u.n_items, "errors": u.errors}
                for name, u in usage.items()
            },
            "queue_depths": self.stack.queue_depths(),
            "failures": {f"{t}:{op}": n for (t, op), n in self.stack.failures().items()},
        }

    def close(self) -> None:
        """Finish running tasks, drain the write-down queues, close the tiers and fds."""
        self._pool.shutdown(wait=True)
        self.stack.close()
        for efd in (self._store_efd, self._lookup_efd, self._load_efd):
            efd.close()


def _fill(obj: MemoryObj, blob: bytes, key: ObjectKey) -> bool:
    """Copy ``blob`` to the start of ``obj``'s buffer; False (logged) when it cannot be
    the object LMCache expects there.

    A byte buffer (uint8, what a serde hands the adapter) may be longer than the blob: it
    is narrowed to the blob's length. A KV tensor must be filled exactly.
    """
    raw = obj.raw_tensor
    if raw is None:
        return False
    room = raw.numel() * raw.element_size()
    byte_buffer = obj.get_dtypes() == [torch.uint8]
    if len(blob) > room or (not byte_buffer and len(blob) != obj.get_size()):
        log.warning(
            "kvtc-store L2 adapter: %d stored bytes for chunk %s do not fit LMCache's "
            "%d-byte buffer; reported as a miss",
            len(blob),
            bytes(key.chunk_hash).hex()[:16],
            obj.get_size(),
        )
        return False
    raw.view(torch.uint8).view(-1)[: len(blob)].copy_(
        torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    )
    if byte_buffer and len(blob) != obj.get_size():
        obj.set_used_size(len(blob))
    return True
