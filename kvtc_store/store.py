"""The tiered chunk store: KV chunks compressed with KVTC over GPU/CPU/disk/S3 tiers.

A stored sequence is cut into chunks of ``chunk_tokens`` tokens; chunk ``i`` is named by
the prefix-hash chain of :mod:`kvtc_store.keys` (model fingerprint, KV layout and tenant
salt in every link), so equal prefixes share chunks across processes and replicas and
tenants never see each other's chunks. Each chunk is encoded once with the KVTC codec
into a blob; the blob goes to the top tier at once and down the tiers asynchronously
(:mod:`kvtc_store.tierstack`: write-through by default, write-back as an option, bounded
queues with back-pressure). A get fetches the longest cached prefix with one batched
call per tier, each chunk from the highest tier holding it, promotes hits, and decodes
the prefix in one batch. :meth:`TieredStore.prefetch` starts that fetch ahead of need.

A blob that fails its checksum, does not decode, or was written for another chunk (its
header binds it to its key, first position and length) is deleted and counted as a
miss: a damaged, misfiled or failed tier never yields wrong KV. A blob written by a codec
this store cannot decode is deleted too, so it never blocks its prefix.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch
from typing_extensions import Self

from .backends import Backend
from .codec import ChunkKV, Codec
from .codec.format import ChunkBinding
from .errors import (
    BlobError,
    BlobMisfiledError,
    CodecMismatchError,
    ConfigError,
    StoreError,
    UnknownArtifactError,
)
from .guard import BreakerSettings
from .keys import ChunkNamespace, chunk_keys
from .metrics import StoreMetrics, register_codec_metrics
from .model import ModelInfo
from .tierstack import TierStack, WriteMode
from .writedown import FlushResult

log = logging.getLogger(__name__)

PREFETCHED = "prefetch"
UNREADABLE_KEYS = 65536  # keys of blobs of unknown artifacts remembered (not counted present)
"""Source name of a chunk a get took from what :meth:`TieredStore.prefetch` fetched."""


@dataclass
class StoreStats:
    """Counters of one store instance (chunks, bytes, seconds).

    ``chunks_hit`` counts chunks served by source: a tier's name, ``"write-queue"`` (a
    chunk still on its way down) or ``"prefetch"``. Blobs dropped by ``get``:
    ``corrupt_dropped`` (damaged), ``misfiled_dropped`` (an intact blob of another chunk
    under this key), ``undecodable_dropped`` (written by a codec this store cannot
    decode; deleted so that it no longer blocks its prefix). ``lower_tier_put_errors`` counts
    failed write-down batches (each one ``put`` call on a lower tier);
    ``writedown_failed_chunks`` the chunks in them.
    """

    chunks_put: int = 0
    chunks_skipped: int = 0
    bytes_put: int = 0
    raw_bf16_bytes_put: int = 0
    chunks_hit: dict[str, int] = field(default_factory=dict)
    chunks_missed: int = 0
    corrupt_dropped: int = 0
    misfiled_dropped: int = 0
    undecodable_dropped: int = 0
    lower_tier_put_errors: int = 0
    writedown_failed_chunks: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    def honest_ratio(self) -> float:
        """bf16 bytes of everything put / every byte of the blobs written."""
        return self.raw_bf16_bytes_put / self.bytes_put if self.bytes_put else 0.0


@dataclass(frozen=True)
class Load:
    """One request's part of :meth:`TieredStore.get_batch`.

    Attributes:
        tokens: the request's token ids ``(T,)`` from position 0.
        at: the destination chunk its first fetched chunk goes to.
        n_tokens: fetch at most this many tokens (whole chunks; default every full one).
        start: fetch from this token on (rounded down to a chunk).
        salt: the request's isolation salt (:meth:`TieredStore.keys_for`).
    """

    tokens: object
    at: int = 0
    n_tokens: int | None = None
    start: int = 0
    salt: str = ""


@dataclass
class PutResult:
    """What :meth:`TieredStore.put` did: chunks encoded and written, chunks already
    present, blob bytes written and the bf16 bytes they stand for."""

    chunks_written: int
    chunks_present: int
    blob_bytes: int
    raw_bf16_bytes: int


class TieredStore:
    """KV chunks of one model, compressed with KVTC, over an ordered list of tiers.

    Thread-safe: any number of threads may put, get, lookup and prefetch at once.
    Use it as a context manager, or call :meth:`close`, so queued writes reach the
    lower tiers before the process ends (a store that is garbage-collected, or still
    open at interpreter exit, flushes for up to 60 s first).

    Args:
        tiers: backends from the top (fastest) to the bottom; at least one.
        codec: a KVTC codec (:class:`~kvtc_store.codec.Codec`: the CPU reference or the
            batched CUDA codec, :func:`~kvtc_store.codec.make_codec`; its artifact must
            match the model whose KV is stored), or
            a :class:`~kvtc_store.registry.VersionedCodec` following a registry profile
            (encodes with the current artifact, decodes every artifact the registry
            holds; its metrics join the store's, and :meth:`close` stops it).
        namespace: model fingerprint, KV layout and tenant salt for the chunk keys.
        chunk_tokens: tokens per chunk (256, LMCache's default).
        write_mode: ``"write-through"`` (default: every new chunk is queued for every
            lower tier) or ``"write-back"`` (a chunk goes down a tier when the tier
            above evicts it).
        write_queue_chunks: capacity of each lower tier's write-down queue, in chunks;
            a put blocks while a queue it needs is full (back-pressure).
        prefetch_buffer_bytes: most bytes of prefetched blobs held for a later get
            (they are also promoted into the top tier).
        prefetch_threads: prefetches fetched at once (default 4). Each waits at most its
            tiers' deadlines; a prefetch submitted while all threads are busy queues
            behind them, so set it to the number of requests that prefetch at once.
        metrics_registry: Prometheus registry for :attr:`metrics`; default: the
            store's own.
        breaker: circuit-breaker settings of every tier (:mod:`kvtc_store.guard`;
            each tier's deadline is its ``deadline_s``).

    Attributes:
        tiers: the backends, top first.
        metrics: :class:`~kvtc_store.metrics.StoreMetrics` (Prometheus).

    Raises:
        ConfigError: no tiers, duplicate tier names, a bad write mode or queue size.
    """

    def __init__(
        self,
        tiers: Sequence[Backend],
        codec: Codec,
        namespace: ChunkNamespace,
        chunk_tokens: int = 256,
        *,
        write_mode: WriteMode = "write-through",
        write_queue_chunks: int = 256,
        prefetch_buffer_bytes: int = 256 << 20,
        prefetch_threads: int = 4,
        metrics_registry=None,
        breaker: BreakerSettings | None = None,
    ):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        if (
            not isinstance(prefetch_threads, int)
            or isinstance(prefetch_threads, bool)
            or prefetch_threads < 1
        ):
            raise ConfigError(
                f"prefetch_threads must be an int of at least 1, got {prefetch_threads!r}"
            )
        self._stack = TierStack(tiers, write_mode, queue_chunks=write_queue_chunks, breaker=breaker)
        self.tiers = self._stack.tiers
        self.codec = codec
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.metrics = StoreMetrics(self._stack, metrics_registry)
        register_codec_metrics(codec, self.metrics.registry)  # versions, mixture members
        self._stats = StoreStats()
        self._lock = threading.Lock()  # stats and the prefetch state
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}  # key -> its prefetch job
        self._prefetched: OrderedDict[str, bytes] = OrderedDict()
        self._unreadable: OrderedDict[str, None] = OrderedDict()  # kept, not counted present
        self._prefetch_source: dict[str, str] = {}  # key -> tier a prefetched blob came from
        self._prefetched_bytes = 0
        self.prefetch_buffer_bytes = prefetch_buffer_bytes
        self.prefetch_threads = prefetch_threads
        self._closed = False
        # a store dropped without close() is flushed and closed when collected, without
        # joining threads: collection can run inside threading's bookkeeping, where a
        # join deadlocks (Backend.close)
        self._finalizer = weakref.finalize(self, _release, self._stack, self.metrics, 60.0, False)

    @classmethod
    def from_config(
        cls,
        path,
        info: ModelInfo,
        *,
        model=None,
        tokenizer=None,
        dtype: str = "bfloat16",
        tp_rank: int = 0,
        tp_size: int = 1,
        progress=None,
        codec_device: str | None = None,
    ) -> TieredStore:
        """A store as the YAML config at ``path`` (plus ``KVTC_STORE_*`` overrides) says.

        Tiers, write mode and queue size, tenant (the key namespace's salt), codec,
        and the metrics endpoint (``metrics.port``) all come from the config.

        Args:
            path: YAML file (see docs/config.md).
            info: the model's identity (:func:`kvtc_store.model.model_info`).
            model, tokenizer: needed only when ``codec.artifact`` is unset and no
                calibrated artifact is cached for the model yet.
            dtype, tp_rank, tp_size: the KV layout, part of the chunk-key namespace.
            codec_device: run the codec here instead of the config's ``codec.device``
                (a serving engine passes the device its KV cache lives on).

        Raises:
            ConfigError: malformed config (the message names the field), a tier that
                cannot be opened (a GPU tier without CUDA that is not ``optional``).
            ArtifactError: the codec artifact is missing, malformed or for another model.
        """
        from .config import build_tiers, codec_from_config, load_config

        cfg = load_config(path)
        if codec_device is not None:
            codec_cfg = cfg.codec.model_copy(update={"device": codec_device})
            cfg = cfg.model_copy(update={"codec": codec_cfg})
        codec = codec_from_config(cfg, info, model=model, tokenizer=tokenizer, progress=progress)
        namespace = ChunkNamespace(
            info.fingerprint, info.kv_layout(dtype, tp_rank, tp_size), cfg.tenant
        )
        tiers = build_tiers(cfg)
        if not tiers:
            raise ConfigError(f"{path}: tiers: every tier was optional and unavailable")
        store = cls(
            tiers,
            codec,
            namespace,
            chunk_tokens=cfg.chunk_tokens,
            write_mode=cfg.write_mode,
            write_queue_chunks=cfg.write_queue_chunks,
            prefetch_buffer_bytes=cfg.prefetch_buffer,
            prefetch_threads=cfg.prefetch_threads,
            breaker=cfg.breaker.settings(),
        )
        if cfg.metrics.port is not None:
            try:
                port = store.metrics.serve(cfg.metrics.port, cfg.metrics.addr)
            except OSError as exc:  # e.g. a second process on one host with one config
                store.close()
                raise ConfigError(
                    f"{path}: metrics.port: cannot serve on {cfg.metrics.addr}:"
                    f"{cfg.metrics.port}: {exc.strerror or exc} (each process on a host "
                    "needs its own port: set KVTC_STORE_METRICS__PORT or 0 for a free one)"
                ) from exc
            log.info("metrics at http://%s:%d/metrics", cfg.metrics.addr, port)
        return store

    # --- keys and lookup -----------------------------------------------------------------

    def keys_for(self, tokens, salt: str = "") -> list[str]:
        """Chunk keys of every full chunk of ``tokens`` (token ids, 1-D), in the store's
        namespace with ``salt`` (per-request isolation: an engine's cache salt or LoRA
        adapter; requests of different salts never share a chunk)."""
        ns = self.namespace if not salt else replace(self.namespace, salt=salt)
        return chunk_keys(tokens, ns, self.chunk_tokens)

    def lookup(self, tokens, start: int = 0, salt: str = "") -> int:
        """Length in tokens of the longest cached prefix of ``tokens``.

        One batched ``exists`` per tier, asked only for chunks no tier above holds;
        chunks on their way down (queued) or prefetched count as cached, and a prefetch
        still running on these chunks is waited for. Side-effect free; returns a
        multiple of ``chunk_tokens``.

        Args:
            tokens: token ids ``(T,)`` from position 0.
            start: ask only about the chunks from this token on (rounded down to a
                chunk), for an engine that holds the KV before it: the result is then
                the end of the cached run of chunks that begins there (``start``
                rounded down when that chunk is missing).
            salt: the request's isolation salt (:meth:`keys_for`).
        """
        first = self._first_chunk(start)
        ckeys = self.keys_for(tokens, salt)[first:]
        return (first + self._cached_chunks(ckeys)) * self.chunk_tokens

    def _first_chunk(self, start: int) -> int:
        """Chunk index of token ``start`` (``ValueError`` if negative)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        return start // self.chunk_tokens

    def _cached_chunks(self, keys: list[str], local_only: bool = False) -> int:
        """How many leading ``keys`` are cached.

        A prefetch still running on some of them is waited for (its fetch answers for
        them; asking the tiers again would double its requests), except with
        ``local_only``, which never waits on the network.
        """
        if not local_only:
            self._wait_for_prefetches(keys)
        with self._lock:
            ready = [k in self._prefetched for k in keys]
            unreadable = [k in self._unreadable for k in keys]
        present = ready if all(ready) else self._stack.exists(keys, local_only)
        n = 0
        while n < len(keys) and (present[n] or ready[n]) and not unreadable[n]:
            n += 1
        return n

    def _wait_for_prefetches(self, keys: list[str]) -> None:
        """Wait until no prefetch is running on any of ``keys``."""
        with self._lock:
            jobs = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
        for job in jobs.values():
            job.exception()  # waits; a failed prefetch only means asking the tiers

    # --- put -----------------------------------------------------------------------------

    @torch.no_grad()
    def put(
        self, tokens, keys: torch.Tensor, values: torch.Tensor, start: int = 0, salt: str = ""
    ) -> PutResult:
        """Store the KV of every full chunk of ``tokens`` not yet stored.

        Args:
            tokens: token ids ``(T,)`` of the sequence, from position 0.
            keys, values: ``(L, H, T', D)``, the KV of tokens ``[start, start + T')``;
                ``start + T'`` at least the length of the full chunks; RoPE applied to
                keys (as cached).
            start: first token the KV holds, a multiple of ``chunk_tokens``: only the
                chunks from there on are stored (an engine that holds the KV of a
                suffix); the chunks before it are neither written nor needed.
            salt: the request's isolation salt (:meth:`keys_for`).

        The stored sequence is the full chunks of ``tokens``; its last ``window`` tokens
        are stored exactly. The prefix already cached in a local tier (or queued) is
        skipped: blobs are immutable and content-addressed. Remote tiers (S3) are not
        asked, so a put never waits on the network; a connector that called
        :meth:`lookup` and :meth:`get` first has the S3 hits promoted into the top
        tier already. The new chunks are encoded once, written to the top tier before
        this returns, and queued for the lower tiers (this blocks while a queue is
        full); :meth:`flush` waits for them.

        Raises:
            ValueError: fewer KV tokens than the full chunks need, or ``start`` not a
                multiple of ``chunk_tokens``.
            StoreError: the top tier failed to write (CapacityError if it is full), or
                the store is closed. A lower tier's failure is logged and counted, never
                raised: the chunks stay in the tiers above.
        """
        if self._closed:
            raise StoreError("the store is closed")
        if start % self.chunk_tokens:
            raise ValueError(f"start {start} is not a multiple of {self.chunk_tokens}")
        first = self._first_chunk(start)
        ckeys = self.keys_for(tokens, salt)
        stored = len(ckeys) * self.chunk_tokens
        if start + keys.shape[2] < stored:
            raise ValueError(
                f"KV holds tokens [{start}, {start + keys.shape[2]}), the chunks need "
                f"[{start}, {stored})"
            )
        first_new = first + self._cached_chunks(ckeys[first:], local_only=True)
        todo = list(range(first_new, len(ckeys)))
        if not todo:
            with self._lock:
                self._stats.chunks_skipped += len(ckeys) - first
            return PutResult(0, len(ckeys) - first, 0, 0)
        t0 = time.perf_counter()
        s = first_new * self.chunk_tokens
        blobs = self.codec.encode_sequence(
            keys[:, :, s - start : stored - start],
            values[:, :, s - start : stored - start],
            first_position=s,
            chunk_tokens=self.chunk_tokens,
            chunk_keys=[ckeys[i] for i in todo],
        )
        dt = time.perf_counter() - t0
        self.metrics.encode_seconds.observe(dt)
        self.metrics.chunks_encoded.inc(len(blobs))
        with self._lock:  # blobs of artifacts the codec lacks, replaced by this put
            stale = [ckeys[i] for i in todo if ckeys[i] in self._unreadable]
            for k in stale:
                del self._unreadable[k]
        if stale:
            self._stack.delete(stale)
        self._stack.put([(ckeys[i], b) for i, b in zip(todo, blobs)])
        nbytes = sum(len(b) for b in blobs)
        raw = len(todo) * self.chunk_tokens * keys.shape[0] * keys.shape[1] * keys.shape[3] * 4
        with self._lock:
            st = self._stats
            st.encode_seconds += dt
            st.chunks_put += len(todo)
            st.chunks_skipped += first_new - first
            st.bytes_put += nbytes
            st.raw_bf16_bytes_put += raw
        return PutResult(len(todo), first_new - first, nbytes, raw)

    # --- get and prefetch ----------------------------------------------------------------

    def _fetch(
        self, keys: list[str], device_blobs: bool = False
    ) -> tuple[list[bytes | None], list[str | None], list[str | None]]:
        """Blobs for ``keys``, what served each (a tier, the write queue or
        ``prefetch``) and the tier each came from: what a prefetch fetched first
        (waiting for one still running), the rest from the tiers, one batched call each."""
        self._wait_for_prefetches(keys)
        blobs: list[bytes | None] = [None] * len(keys)
        sources: list[str | None] = [None] * len(keys)
        origins: list[str | None] = [None] * len(keys)
        with self._lock:
            for i, k in enumerate(keys):
                blob = self._prefetched.pop(k, None)
                if blob is not None:
                    self._prefetched_bytes -= len(blob)
                    blobs[i], sources[i] = blob, PREFETCHED
                    origins[i] = self._prefetch_source.pop(k, None)
        rest = [i for i, b in enumerate(blobs) if b is None]
        if rest:
            got = self._stack.get([keys[i] for i in rest], device_blobs)
            for i, blob, src in zip(rest, got.blobs, got.sources):
                blobs[i], sources[i], origins[i] = blob, src, src
        return blobs, sources, origins

    @torch.no_grad()
    def get(
        self,
        tokens,
        n_tokens: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        start: int = 0,
        salt: str = "",
        out: ChunkKV | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | int | None:
        """KV of the longest cached prefix of ``tokens`` (up to ``n_tokens``).

        One batched ``get`` per tier for all the chunks (each from the highest tier
        holding it; hits below the top are promoted), then one batched decode. With
        ``out``, the decode writes each chunk straight into the caller's memory (an
        engine's pages or a contiguous cache; :class:`~kvtc_store.codec.ChunkKV`):
        no split, ``torch.cat`` or scatter copies.

        Args:
            tokens: token ids ``(T,)``.
            n_tokens: fetch at most this many tokens (rounded down to whole chunks);
                default: every full chunk of ``tokens``.
            device, dtype: of the returned tensors (default: codec device, stored dtype).
            start: fetch from this token on (rounded down to a chunk), for an engine
                that holds the KV before it; the chunks before it are not fetched.
            salt: the request's isolation salt (:meth:`keys_for`).
            out: destination of the chunks from ``start`` on, chunk ``i`` of the fetch
                into chunk ``i`` of ``out`` (it holds ``out.batch`` chunks of
                ``chunk_tokens`` tokens; at most that many are fetched).

        Returns:
            With ``out``: the number of tokens written (a multiple of ``chunk_tokens``,
            0 when nothing is cached there); chunks past it in ``out`` are untouched
            or undefined. Without: ``(keys, values)``, each ``(L, H, n, D)`` with ``n`` a multiple of
            ``chunk_tokens``: the KV of tokens ``[s, s + n)``, ``s`` = ``start`` rounded
            down to a chunk, keys with RoPE applied; or ``None`` when nothing is cached
            there. A chunk that is missing, corrupt or undecodable ends the run there
            (corrupt blobs are deleted from every tier).
        """
        ckeys = self.keys_for(tokens, salt)
        if n_tokens is not None:
            ckeys = ckeys[: n_tokens // self.chunk_tokens]
        first = self._first_chunk(start)
        ckeys = ckeys[first:]
        if out is not None:
            if out.tokens != self.chunk_tokens:
                raise ValueError(f"out holds chunks of {out.tokens} tokens, the store's are "
                                 f"{self.chunk_tokens}")  # fmt: skip
            ckeys = ckeys[: out.batch]
        # a GPU tier's hits stay on the device for a codec that decodes them there
        blobs, sources, origins = self._fetch(
            ckeys, getattr(self.codec, "takes_device_blobs", False)
        )
        present = 0
        while present < len(blobs) and blobs[present] is not None:
            present += 1
        ct = self.chunk_tokens
        expect = [ChunkBinding(k, (first + i) * ct, ct) for i, k in enumerate(ckeys[:present])]
        t0 = time.perf_counter()
        if out is not None:
            got = self.codec.decode_batch(blobs[:present], out, expect=expect)
            chunks, error = range(got.count), got.error
        else:
            chunks, error = self.codec.decode_prefix(
                blobs[:present], device=device, dtype=dtype, expect=expect
            )
        missed = int(present < len(blobs) or error is not None)
        self._account(time.perf_counter() - t0, sources[: len(chunks)], missed)
        if error is not None:
            i = len(chunks)
            self._drop_bad_chunk(ckeys[i], origins[i], error, list(zip(ckeys, blobs))[i + 1 :])
        if out is not None:
            return len(chunks) * ct
        if not chunks:
            return None
        return (
            torch.cat([c.keys for c in chunks], dim=2),
            torch.cat([c.values for c in chunks], dim=2),
        )

    def _account(self, seconds: float, served: Sequence[str | None], missed: int) -> None:
        """Count a decode: its seconds, the chunks served by source, the prefixes that
        ended at a missing or undecodable chunk."""
        self.metrics.decode_seconds.observe(seconds)
        for src in served:
            self.metrics.chunks_served.labels(src).inc()
        with self._lock:
            st = self._stats
            st.decode_seconds += seconds
            for src in served:
                st.chunks_hit[src] = st.chunks_hit.get(src, 0) + 1
            st.chunks_missed += missed

    @torch.no_grad()
    def get_batch(self, loads: Sequence[Load], out: ChunkKV) -> list[int]:
        """The cached prefixes of several requests, fetched together (one batched
        ``get`` per tier for all their chunks) and decoded as one batch straight into
        ``out`` (an engine's pages): what a serving engine's step loads.

        Each request's chunks go to consecutive chunks of ``out`` from ``load.at``; a
        chunk that is missing, corrupt or undecodable ends that request's run there
        (the others go on; corrupt blobs are dropped as :meth:`get` drops them).

        Args:
            loads: the requests (:class:`Load`).
            out: the destination, ``chunk_tokens`` tokens a chunk.

        Returns:
            Per load, the tokens written (a multiple of ``chunk_tokens``), from the
            load's ``start`` rounded down to a chunk.

        Raises:
            ValueError: ``out``'s chunks are not ``chunk_tokens`` tokens, or a load's
                chunks do not fit in ``out``.
        """
        ct = self.chunk_tokens
        if out.tokens != ct:
            raise ValueError(f"out holds chunks of {out.tokens} tokens, the store's are {ct}")
        runs: list[tuple[int, list[str]]] = []  # per load: first chunk index, keys
        for ld in loads:
            ckeys = self.keys_for(ld.tokens, ld.salt)
            if ld.n_tokens is not None:
                ckeys = ckeys[: ld.n_tokens // ct]
            first = self._first_chunk(ld.start)
            ckeys = ckeys[first:]
            if ld.at < 0 or ld.at + len(ckeys) > out.batch:
                raise ValueError(f"{len(ckeys)} chunks at {ld.at} do not fit in {out.batch}")
            runs.append((first, ckeys))
        flat = [k for _, ckeys in runs for k in ckeys]
        blobs, sources, origins = self._fetch(
            flat, getattr(self.codec, "takes_device_blobs", False)
        )
        todo: list[tuple[int, int, int]] = []  # (load, chunk of the load, index in flat)
        at, missed = 0, 0
        for r, (_, ckeys) in enumerate(runs):
            n = 0
            while n < len(ckeys) and blobs[at + n] is not None:
                todo.append((r, n, at + n))
                n += 1
            missed += n < len(ckeys)
            at += len(ckeys)
        done = [0] * len(loads)
        served: list[str | None] = []
        t0 = time.perf_counter()
        while todo:
            got = self.codec.decode_batch(
                [blobs[j] for _, _, j in todo],
                out.select([loads[r].at + i for r, i, _ in todo]),
                expect=[ChunkBinding(flat[j], (runs[r][0] + i) * ct, ct) for r, i, j in todo],
            )
            for r, i, j in todo[: got.count]:
                done[r] = i + 1
                served.append(sources[j])
            if got.error is None:
                break
            r, i, j = todo[got.count]
            missed += 1
            later = [(flat[x], blobs[x]) for rr, _, x in todo[got.count + 1 :] if rr == r]
            self._drop_bad_chunk(flat[j], origins[j], got.error, later)
            todo = [t for t in todo[got.count + 1 :] if t[0] != r]
        self._account(time.perf_counter() - t0, served, missed)
        return [n * ct for n in done]

    def _drop_bad_chunk(
        self,
        key: str,
        origin: str | None,
        error: Exception,
        rest: list[tuple[str, bytes | None]],
    ) -> None:
        """Count and delete a fetched blob that did not decode as the chunk ``key``.

        - :class:`~kvtc_store.errors.UnknownArtifactError` (a registry's store meets a blob
          of an artifact the registry does not hold, perhaps not yet): kept, but no
          longer counted present by ``lookup`` (in this process, for the last
          :data:`UNREADABLE_KEYS` such keys), so the next put writes it again.
        - :class:`CodecMismatchError` (written by a codec this store cannot decode): it
          would block its prefix for ever (counted present by ``lookup``, skipped by
          ``put``), so it is deleted from every tier, with the blobs of ``rest`` (the
          chunks fetched after it) that this codec cannot decode either; the next put of
          that prefix writes them again with this store's codec.
        - :class:`BlobMisfiledError` (an intact blob of another chunk) and a damaged blob:
          deleted from the tier that served it and the tiers it was promoted into (the
          copies below may be good).
        """
        if isinstance(error, UnknownArtifactError):
            # another version's chunk, maybe one the registry will hold (a replica running
            # a newer codec): kept, a counted miss (the codec counts it), no longer counted
            # present by lookup, and overwritten by the next put of its prefix
            log.info("chunk %s (from %s): %s", key[:12], origin, error)
            with self._lock:
                self._unreadable[key] = None
                while len(self._unreadable) > UNREADABLE_KEYS:
                    self._unreadable.popitem(last=False)
            return
        if isinstance(error, CodecMismatchError):
            log.warning(
                "dropping chunk %s (from %s) no codec here decodes: %s", key[:12], origin, error
            )
            foreign = [key] + [k for k, b in rest if b is not None and not self._decodable(b)]
            self.metrics.undecodable_chunks.inc(len(foreign))
            with self._lock:
                self._stats.undecodable_dropped += len(foreign)
            self._stack.delete(foreign)
            return
        if isinstance(error, BlobMisfiledError):
            log.warning("dropping misfiled blob under %s (from %s): %s", key[:12], origin, error)
            self.metrics.misfiled_chunks.inc()
            through, counter = origin, "misfiled_dropped"
        else:
            log.warning("dropping undecodable chunk %s (from %s): %s", key[:12], origin, error)
            self.metrics.corrupt_chunks.inc()
            through, counter = origin, "corrupt_dropped"
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
        self._stack.delete([key], through=through)

    def _decodable(self, blob: bytes) -> bool:
        """Whether this store's codec can decode ``blob`` (its header, checked; a damaged
        blob counts as decodable here: the get that meets it drops it as corrupt)."""
        try:
            self.codec.read_header(blob)
        except CodecMismatchError:
            return False
        except BlobError:
            pass
        return True

    def prefetch(self, tokens, n_tokens: int | None = None, salt: str = "") -> Future:
        """Start fetching the cached prefix of ``tokens`` in the background.

        The blobs of the chunks not in the top tier are fetched (one batched call per
        tier, in a background thread), promoted into the top tier and held (up to
        ``prefetch_buffer_bytes``) for the next :meth:`get`, which waits for a prefetch
        still running on its chunks instead of fetching them again.

        Args:
            tokens: token ids ``(T,)``.
            n_tokens: prefetch at most this many tokens (whole chunks).
            salt: the request's isolation salt (:meth:`keys_for`).

        Returns:
            A future of the cached prefix length in tokens once the fetch is done (a
            multiple of ``chunk_tokens``). It never raises for a failed tier (that is a
            miss).

        Raises:
            StoreError: the store is closed.
        """
        ckeys = self.keys_for(tokens, salt)
        if n_tokens is not None:
            ckeys = ckeys[: n_tokens // self.chunk_tokens]
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            if self._prefetch_pool is None:
                self._prefetch_pool = ThreadPoolExecutor(
                    self.prefetch_threads, thread_name_prefix="kvtc-prefetch"
                )
            todo = [k for k in ckeys if k not in self._inflight and k not in self._prefetched]
            job: Future = self._prefetch_pool.submit(self._prefetch_job, ckeys, todo)
            for k in todo:
                self._inflight[k] = job
        return job

    def _prefetch_job(self, ckeys: list[str], todo: list[str]) -> int:
        """Fetch ``todo`` (skipping what the top tier holds); the prefix length of ckeys."""
        try:
            top = self._stack.tiers[0]
            resident = set()
            if todo:
                try:
                    resident = {k for k, p in zip(todo, top.exists(todo)) if p}
                except Exception as exc:  # noqa: BLE001 - then fetch them all
                    log.debug("prefetch: top tier exists failed: %s", exc)
            fetch = [k for k in todo if k not in resident]
            got = self._stack.get(fetch) if fetch else None
            with self._lock:
                if got is not None:
                    for k, blob, src in zip(fetch, got.blobs, got.sources):
                        if blob is not None and k not in self._prefetched:
                            self._prefetched[k] = blob
                            self._prefetch_source[k] = src
                            self._prefetched_bytes += len(blob)
                    while self._prefetched_bytes > self.prefetch_buffer_bytes:
                        old_key, old = self._prefetched.popitem(last=False)
                        self._prefetch_source.pop(old_key, None)
                        self._prefetched_bytes -= len(old)
                ready = [k in self._prefetched or k in resident for k in ckeys]
        finally:
            with self._lock:
                for k in todo:
                    if self._inflight.get(k) is not None:
                        del self._inflight[k]
        if not all(ready):  # chunks prefetched earlier, or written since: ask the tiers
            present = self._stack.exists(ckeys)
            ready = [r or p for r, p in zip(ready, present)]
        n = 0
        while n < len(ckeys) and ready[n]:
            n += 1
        return n * self.chunk_tokens

    # --- life cycle ----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until the lower tiers have every chunk put so far.

        Returns:
            :class:`~kvtc_store.writedown.FlushResult`: ``complete`` (False if
            ``timeout`` seconds passed first) and, per tier, the chunks whose write-down
            failed since the previous flush (counts and keys). Truthy only when complete
            and nothing failed.
        """
        return self._stack.flush(timeout)

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush (up to ``timeout`` seconds), stop the writer and prefetch threads, stop
        the metrics server and close the tiers. Returns the flush's
        :class:`~kvtc_store.writedown.FlushResult`; past ``timeout`` no tier is waited
        for. Idempotent; the store must not be used afterwards."""
        with self._lock:
            if self._closed:
                return FlushResult(True)
            self._closed = True
            pool, self._prefetch_pool = self._prefetch_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._finalizer.detach()
        if hasattr(self.codec, "close"):  # stops a versioned codec's refresh thread
            self.codec.close()
        return _release(self._stack, self.metrics, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- state ---------------------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the store's counters."""
        failures = self._stack.failures()
        with self._lock:
            snap = replace(self._stats, chunks_hit=dict(self._stats.chunks_hit))
        snap.lower_tier_put_errors = sum(n for (_, op), n in failures.items() if op == "write-down")
        wd = self._stack.write_down
        snap.writedown_failed_chunks = sum(wd.failed(t) for t in range(1, len(self.tiers)))
        return snap

    def queue_depths(self) -> dict[str, int]:
        """Chunks queued or being written for each lower tier, by tier name (no I/O)."""
        return self._stack.queue_depths()

    def usage(self) -> dict:
        """Per tier: :class:`~kvtc_store.backends.TierUsage` as a dict, plus
        ``queue_depth`` (chunks waiting to be written to it) for lower tiers."""
        depths = self._stack.queue_depths()
        out = {}
        for t in self.tiers:
            out[t.name] = asdict(t.usage())
            if t.name in depths:
                out[t.name]["queue_depth"] = depths[t.name]
        return out


def _release(
    stack: TierStack, metrics: StoreMetrics, timeout: float | None = 60.0, wait: bool = True
) -> FlushResult:
    """Flush and close a store's tiers and metrics server (also its finalizer, with
    ``wait=False``: no thread joined)."""
    metrics.close()
    flushed = stack.close(timeout, wait=wait)
    if not flushed.complete:
        log.warning("store closed with chunks still queued for the lower tiers")
    if flushed.failed_chunks:
        log.warning(
            "store closed; write-downs failed since the last flush: %s", flushed.failed_chunks
        )
    return flushed
