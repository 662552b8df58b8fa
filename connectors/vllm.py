"""vLLM KV connector: vLLM's prefix KV cached in the tiered KVTC store.

Load it out of tree (vLLM 0.33)::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTCConnector",
        "kv_connector_module_path": "kvtc_store.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "store.yaml"}}'

The contract is vLLM's ``KVConnectorBase_V1``
(``vllm/distributed/kv_transfer/kv_connector/v1/base.py``), split by role:

- Scheduler side (:meth:`get_num_new_matched_tokens`, :meth:`update_state_after_alloc`,
  :meth:`build_connector_meta`, :meth:`request_finished`): how many prompt tokens the
  store holds beyond vLLM's own prefix cache (``TieredStore.lookup``, side-effect free,
  whole chunks, never the whole prompt), and per step the metadata the workers need:
  each request's prompt tokens, block ids, the token range to load and how many tokens
  of full chunks to save.
- Worker side (:meth:`register_kv_caches`, :meth:`start_load_kv`,
  :meth:`wait_for_save`, :meth:`get_block_ids_with_load_errors`): the layout is read
  from vLLM's KV cache spec, its per-layer views and the layers' attention backend
  (:mod:`kvtc_store.connectors.vllm_layout`).

Loads are asynchronous: ``get_num_new_matched_tokens`` reports ``load_async=True``, vLLM
allocates the request's blocks and parks it (``WAITING_FOR_REMOTE_KVS``) while a worker
thread fetches every load of the step with one batched call per tier and decodes them as
one batch straight into their blocks (``TieredStore.get_batch`` into
``PagedKVLayout.chunk_kv``: no split, cat or scatter); :meth:`get_finished` reports the
requests whose load is done, and the blocks whose chunk was missing, corrupt or
undecodable go to vLLM through :meth:`get_block_ids_with_load_errors` in the same step,
so vLLM recomputes them. Other requests' forward steps never wait for a load.

Saves leave the forward's path: after the forward, :meth:`wait_for_save` copies the
newly computed full chunks' blocks (a device copy, queued on a copy stream on CUDA, that
the next step's work waits for: vLLM frees a preempted request's blocks at once, so a
save may not read them later) and hands encoding and the put to a worker thread, which
encodes on a stream of its own (:class:`~kvtc_store.connectors.vllm_save.PagedSaver`). A
finished request's blocks are therefore free at once (:meth:`request_finished`).
Chunk keys come from
:func:`kvtc_store.connectors.engine.open_engine_store`, so vLLM and SGLang replicas of
one model with one config share every chunk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ..errors import ConfigError, KVLayoutError
from ..store import Load, TieredStore
from .engine import KV_DTYPE_NAMES, open_engine_store, request_salt, warn_if_codec_on_cpu
from .vllm_layout import PagedKVLayout
from .vllm_save import PagedSaver, RequestPlan

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KVTCConnector", "KVTCConnectorMetadata", "RequestPlan"]

log = logging.getLogger(__name__)


# One store per (config file, KV dtype) and process: when vLLM runs its worker in the
# engine-core process (one GPU, the default executor) the scheduler side and the worker
# side share it, memory tiers included.
_STORES: dict[tuple[str, str], TieredStore] = {}
_STORES_LOCK = threading.Lock()


def _shared_store(
    config: str, hf_config, dtype: str, codec_device: str | None = None
) -> TieredStore:
    """The process's store for ``config`` and ``dtype``, opened on first use.

    The worker passes its KV device as ``codec_device``; a store already open with its
    codec elsewhere is not reused by it (the codec runs where the KV lives).
    """
    key = (os.path.abspath(config), dtype)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is not None and (
            codec_device is None or store.codec.device == torch.device(codec_device)
        ):
            return store
        store = open_engine_store(config, hf_config, dtype=dtype, codec_device=codec_device)
        _STORES[key] = store
        return store


@dataclass
class KVTCConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker metadata of one step: one :class:`RequestPlan` per request
    that loads or saves in it."""

    requests: list[RequestPlan] = field(default_factory=list)


@dataclass
class _Tracked:
    """Scheduler-side state of a request the connector serves."""

    token_ids: list[int]
    block_ids: list[int]
    salt: str = ""  # the request's chunk-key salt (cache salt, LoRA adapter)
    saved_end: int = 0  # tokens of full chunks already in the store (saved or loaded)
    saved_once: bool = False  # a save planned: later ones start at saved_end


class KVTCConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by the kvtc-store tiered store (module doc).

    Args:
        vllm_config: vLLM's config; ``kv_transfer_config.kv_connector_extra_config``
            must name the store's YAML config as ``"config"``.
        role: scheduler or worker.
        kv_cache_config: vLLM's KV cache config (one cache group of full attention).

    Raises:
        ConfigError: no ``config`` in the extra config, tensor or pipeline parallel
            size above 1, a store config without ``codec.artifact`` or
            ``codec.registry`` (or one for another model), or a chunk size that is not a multiple of vLLM's block size.
        KVLayoutError: a KV cache the connector cannot read (hybrid or MLA models, a
            quantised KV cache, an unknown attention backend).
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = self._kv_transfer_config.get_from_extra_config("config", None)
        if not config:
            raise ConfigError(
                "kv_connector_extra_config.config: name the kvtc-store config file, e.g. "
                '{"config": "store.yaml"}'
            )
        self._config = str(config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ConfigError(
                "the kvtc-store connector supports tensor and pipeline parallel size 1 (got "
                f"TP {parallel.tensor_parallel_size}, PP {parallel.pipeline_parallel_size})"
            )
        self._spec = _attention_spec(kv_cache_config)
        self._dtype = KV_DTYPE_NAMES[self._spec.dtype]
        self._block_size = self._spec.block_size
        self._hf_config = vllm_config.model_config.hf_config
        self._store: TieredStore | None = None
        self._chunk = 0
        # scheduler side
        self._matched: dict[str, int] = {}  # req_id -> num_computed_tokens of the last ask
        self._loads: dict[str, tuple[int, int]] = {}  # req_id -> tokens loaded (async)
        self._recv: list[RequestPlan] = []  # async loads for the next metadata
        self._tracked: dict[str, _Tracked] = {}
        self._uncacheable: set[str] = set()  # requests the chunk keys cannot name
        self._salts: dict[str, str] = {}  # req_id -> its chunk-key salt
        # worker side
        self._layout: PagedKVLayout | None = None
        self._load_errors: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None  # loads
        self._saver: PagedSaver | None = None  # copies, then encodes and puts
        self._loading: dict[str, tuple[Future, RequestPlan]] = {}  # req_id -> job, plan
        self._streams: dict[str, torch.cuda.Stream] = {}  # the loads' side stream
        if role == KVConnectorRole.SCHEDULER:
            self._open_store(None)

    # ---- shared -------------------------------------------------------------------------

    def _open_store(self, codec_device: str | None) -> TieredStore:
        store = _shared_store(self._config, self._hf_config, self._dtype, codec_device)
        if store.chunk_tokens % self._block_size:
            raise ConfigError(
                f"{self._config}: chunk_tokens ({store.chunk_tokens}) must be a multiple of "
                f"vLLM's block size ({self._block_size}); change chunk_tokens or --block-size"
            )
        self._store, self._chunk = store, store.chunk_tokens
        return store

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped save is a later miss, never wrong output."""
        return False

    def shutdown(self) -> None:
        """Wait for loads and saves in flight, then for the queued writes to reach the
        lower tiers."""
        self.wait_for_transfers(timeout=60)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._saver is not None:
            self._saver.close()
        if self._store is not None:
            self._store.flush(timeout=60)

    # ---- scheduler side -----------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Prompt tokens the store holds beyond the ``num_computed_tokens`` vLLM has.

        Whole chunks only, and never the whole prompt (vLLM computes at least its last
        token). Side-effect free on the store; requests the keys cannot name (multimodal
        inputs, prompt embeddings) get 0. A request with a cache salt or a LoRA adapter
        is looked up (and later saved) under its own salt (:func:`_request_salt`), so
        it shares chunks only with requests of the same salt and adapter.

        Returns:
            ``(tokens, True)``: the load is asynchronous (:meth:`get_finished`);
            ``(0, False)`` when nothing is to load.
        """
        self._matched.pop(request.request_id, None)
        tokens = _cacheable_prompt(request)
        if tokens is None:
            self._uncacheable.add(request.request_id)
            return 0, False
        self._uncacheable.discard(request.request_id)
        salt = self._salts[request.request_id] = _request_salt(request)
        limit = (len(tokens) - 1) // self._chunk * self._chunk
        if limit <= num_computed_tokens:
            return 0, False
        # only from the chunk of vLLM's computed prefix on: the chunks before it need
        # not be in the store
        hit = self._store.lookup(tokens[:limit], start=num_computed_tokens, salt=salt)
        if hit <= num_computed_tokens:
            return 0, False
        self._matched[request.request_id] = num_computed_tokens
        return hit - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Plan the asynchronous load of ``request`` into the blocks vLLM just allocated
        (from the computed prefix vLLM had when it asked, for ``num_external_tokens``
        tokens); it goes out with the next step's metadata."""
        start = self._matched.pop(request.request_id, None)
        tokens = _cacheable_prompt(request)
        if num_external_tokens <= 0 or start is None or tokens is None:
            return
        end = start + num_external_tokens
        self._loads[request.request_id] = (start, end)
        fetch_end = min(-(-end // self._chunk) * self._chunk, len(tokens))
        block_ids = list(blocks.get_block_ids()[0])
        n_blocks = min(len(block_ids), -(-fetch_end // self._block_size))
        fetch_end = min(fetch_end, n_blocks * self._block_size)
        self._recv.append(
            RequestPlan(
                request.request_id,
                tokens[:fetch_end],
                block_ids[:n_blocks],
                start,
                min(end, fetch_end),
                salt=self._salts.get(request.request_id, ""),
            )
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVTCConnectorMetadata:
        """Per request of this step: what to load before and what to save after the forward.

        Tokens saved are the prompt's full chunks computed by the end of the step
        (``num_computed_tokens + num_scheduled_tokens``), from the first chunk not yet
        in the store; loaded chunks count as stored.
        """
        meta = KVTCConnectorMetadata(requests=self._recv)
        self._recv = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None or new.req_id in self._uncacheable:
                self._loads.pop(new.req_id, None)
                continue
            salt = self._salts.get(new.req_id, "")
            state = _Tracked(list(new.prompt_token_ids), list(new.block_ids[0]), salt)
            self._tracked[new.req_id] = state
            self._plan(meta, new.req_id, state, new.num_computed_tokens, scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._tracked.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted: blocks given anew
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, state, cached.num_computed_tokens[i], scheduled[req_id])
        return meta

    def _plan(
        self, meta: KVTCConnectorMetadata, req_id: str, state: _Tracked, computed: int, n: int
    ) -> None:
        _, load_end = self._loads.pop(req_id, (0, 0))  # loaded while it waited
        # vLLM recomputes from `computed` (a preempted request, or blocks that failed to
        # load): what lies beyond it may not be in the store, so save it again
        state.saved_end = min(state.saved_end, computed // self._chunk * self._chunk)
        if load_end:  # what loaded of it (vLLM rolled back past blocks that failed)
            loaded = min(load_end, computed)
            state.saved_end = max(state.saved_end, loaded // self._chunk * self._chunk)
        done = min(computed + n, len(state.token_ids))
        save_end = done // self._chunk * self._chunk
        # a request's first save starts at token 0, so that chunks vLLM held from its own
        # prefix cache reach the store too (put skips those stored already); later ones
        # gather only the chunks completed since
        save_start = state.saved_end if state.saved_once else 0
        if save_end <= state.saved_end:
            save_end = save_start = 0
        else:
            state.saved_end, state.saved_once = save_end, True
        if not save_end:
            return
        n_blocks = save_end // self._block_size
        meta.requests.append(
            RequestPlan(
                req_id,
                state.token_ids[:save_end],
                state.block_ids[:n_blocks],
                save_end=save_end,
                save_start=save_start,
                salt=state.salt,
            )
        )

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request. Its saves copied their blocks before the step ended (the
        module doc), so its blocks can be freed at once (``False``)."""
        self._forget(request.request_id)
        return False, None

    def _forget(self, req_id: str) -> None:
        self._tracked.pop(req_id, None)
        self._loads.pop(req_id, None)
        self._recv = [p for p in self._recv if p.req_id != req_id]
        self._matched.pop(req_id, None)
        self._uncacheable.discard(req_id)
        self._salts.pop(req_id, None)

    # ---- worker side --------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Read the KV layout (spec, views, the layers' attention backend) and open the
        store with its codec on the KV cache's device.

        Raises:
            KVLayoutError: the layers use no or several attention backends, or a layout
                :class:`~kvtc_store.connectors.vllm_layout.PagedKVLayout` cannot read.
            ConfigError, ArtifactModelMismatchError: from opening the store.
        """
        group = self._kv_cache_config.kv_cache_groups[0]
        names = [n for n in group.layer_names if n in kv_caches]
        layers = get_layers_from_vllm_config(self._vllm_config, AttentionLayerBase, names)
        backends = {layer.get_attn_backend().get_name() for layer in layers.values()}
        if len(layers) != len(names) or len(backends) != 1:
            raise KVLayoutError(
                f"expected one attention backend for the {len(names)} attention layers, "
                f"found {sorted(backends)} on {len(layers)} layers"
            )
        spec = self._spec
        self._layout = PagedKVLayout.from_views(
            {n: kv_caches[n] for n in names},
            backends.pop(),
            block_size=spec.block_size,
            num_blocks=self._kv_cache_config.num_blocks,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
        )
        store = self._open_store(str(self._layout.device))
        self._saver = PagedSaver(store, self._layout, self._block_size)
        if self._layout.device.type == "cuda":
            warn_if_codec_on_cpu(store, "vLLM")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Start every load of this step on the worker thread, as one batch (the module
        doc); :meth:`get_finished` reports each request once its load is done."""
        if not self.has_connector_metadata():
            return
        plans = [p for p in self._get_connector_metadata().requests if p.load_end > p.load_start]
        if not plans:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtc-vllm-load")
        job = self._pool.submit(self._load_batch, plans)
        for plan in plans:
            self._loading[plan.req_id] = job, plan

    def _load_batch(self, plans: list[RequestPlan]) -> dict[str, set[int]]:
        """Load ``plans`` (on the worker thread): the chunks that start at or after each
        load's start decoded as one batch straight into their blocks; a first chunk that
        begins before it (the blocks before ``load_start`` are vLLM's own) decoded apart
        and its tail scattered. Returns each request's blocks that did not load."""
        ct, bs = self._chunk, self._block_size
        layout = self._layout
        whole, heads, rows = [], [], []  # loads into the pages; partial first chunks
        for plan in plans:
            first = plan.load_start // ct * ct
            aligned = -(-plan.load_start // ct) * ct
            end = len(plan.token_ids) // ct * ct
            if first < aligned:
                heads.append(plan)
            n = max(0, (end - aligned) // ct)
            whole.append(Load(plan.token_ids, len(rows), end, aligned, plan.salt))
            rows += [plan.block_ids[(aligned + c * ct) // bs : (aligned + (c + 1) * ct) // bs]
                     for c in range(n)]  # fmt: skip
        loaded = {p.req_id: p.load_start for p in plans}  # tokens valid from 0
        with self._on_side_stream("load") as side:
            for plan in heads:  # rare: vLLM's own prefix ends inside a chunk
                loaded[plan.req_id] = self._load_head(plan)
            got = self._store.get_batch(whole, layout.chunk_kv(rows)) if rows else []
            if side is not None:
                side.synchronize()  # the pages are written before vLLM is told
        errors = {}
        for plan, ld, n in zip(plans, whole, got or [0] * len(plans)):
            valid = ld.start + n if loaded[plan.req_id] >= ld.start else loaded[plan.req_id]
            end = min(valid, len(plan.block_ids) * bs) // bs * bs
            first_bad = max(end, plan.load_start)
            if first_bad < plan.load_end:
                bad = set(plan.block_ids[first_bad // bs : -(-plan.load_end // bs)])
                log.warning("request %s: tokens %d..%d did not load (%d blocks recomputed)",
                            plan.req_id, first_bad, plan.load_end, len(bad))  # fmt: skip
                errors[plan.req_id] = bad
        return errors

    def _load_head(self, plan: RequestPlan) -> int:
        """The chunk in which ``plan.load_start`` falls, fetched and decoded, and its
        tokens from ``load_start`` on scattered into their blocks; the end of what is
        valid (``load_start`` when it did not load)."""
        ct, bs = self._chunk, self._block_size
        first = plan.load_start // ct * ct
        got = self._store.get(plan.token_ids, n_tokens=first + ct, device=self._layout.device,
                              start=first, salt=plan.salt)  # fmt: skip
        if got is None:
            return plan.load_start
        s, e = plan.load_start, min(first + ct, len(plan.block_ids) * bs)
        keys, values = (x[:, :, s - first : e - first] for x in got)
        self._layout.scatter(plan.block_ids[s // bs : e // bs], keys, values)
        return e

    @contextlib.contextmanager
    def _on_side_stream(self, name: str):
        """Run the body on this worker's side stream ``name`` (CUDA; yields it), else
        where it is (yields None)."""
        if self._layout is None or self._layout.device.type != "cuda":
            yield None
            return
        side = self._streams.get(name)
        if side is None:
            side = self._streams[name] = torch.cuda.Stream(self._layout.device)
        with torch.cuda.stream(side):
            yield side

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load is done (``(None, done)``): their blocks hold
        the KV (those that failed are in :meth:`get_block_ids_with_load_errors`, which
        vLLM reads in the same step). A load job that raised is a failed load of all its
        requests' blocks: a recompute, never a crash."""
        done: set[str] = set()
        bs = self._block_size
        for req_id, (job, plan) in list(self._loading.items()):
            if not job.done():
                continue
            del self._loading[req_id]
            done.add(req_id)
            try:
                self._load_errors |= job.result().get(req_id, set())
            except Exception as exc:  # noqa: BLE001 - a failed load is a recompute
                log.warning("request %s: loading KV failed: %s", req_id, exc)
                self._load_errors |= set(
                    plan.block_ids[plan.load_start // bs : -(-plan.load_end // bs)]
                )
        return None, done or None

    def wait_for_transfers(self, timeout: float | None = None) -> bool:
        """Wait until the loads and saves in flight are done (tests, shutdown); False if
        ``timeout`` seconds passed first."""
        import concurrent.futures as cf

        pending = [job for job, _ in self._loading.values()]
        pending += self._saver.pending() if self._saver is not None else []
        _, left = cf.wait(pending, timeout=timeout)
        return not left

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: :meth:`start_load_kv` loads every layer before the forward."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Nothing per layer: a chunk holds every layer, so :meth:`wait_for_save` gathers
        all layers at once after the forward."""

    def wait_for_save(self) -> None:
        """Copy the blocks of each request's newly computed full chunks (only those: from
        ``save_start``) and hand encoding and the put to the save thread; the step does
        not wait for them. On CUDA the copy is queued on a copy stream behind the
        forward, and the current stream waits for it, so no later step overwrites the
        blocks first (the host does not wait; :class:`~.vllm_save.PagedSaver`).

        A failed save is logged and dropped (a later miss): the step never fails for it.
        """
        if not self.has_connector_metadata() or self._saver is None:
            return
        self._saver.save(self._get_connector_metadata().requests)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids whose KV failed to load since the last call (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors


def _attention_spec(kv_cache_config: KVCacheConfig) -> FullAttentionSpec:
    """The one full-attention spec every layer shares.

    Raises:
        KVLayoutError: several cache groups (hybrid models), or a spec that is not plain
            full attention (MLA, quantised or packed KV, compressed states).
    """
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise KVLayoutError(
            f"the kvtc-store connector needs one KV cache group; this model has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    plain = (
        isinstance(spec, FullAttentionSpec)
        and type(spec).__name__ == "FullAttentionSpec"
        and spec.num_head_slots is None
        and spec.state_content_bytes is None
        and spec.tokens_per_state == 1
        and spec.kv_quant_mode.name == "NONE"
        and spec.dtype in KV_DTYPE_NAMES
    )
    if not plain:
        raise KVLayoutError(
            f"KV cache spec {spec} is not plain full attention in bf16/fp16/fp32 (MLA, "
            "sliding-window groups and quantised KV are not supported)"
        )
    return spec


def _cacheable_prompt(request: Request) -> list[int] | None:
    """The prompt's token ids if the store's keys name its KV, else None (multimodal
    inputs and prompt embeddings change the KV in ways token ids do not tell; a cache
    salt or a LoRA adapter goes into the key's salt, :func:`_request_salt`)."""
    if request.prompt_token_ids is None or request.prompt_embeds is not None or request.mm_features:
        return None
    return list(request.prompt_token_ids)


def _request_salt(request: Request) -> str:
    """The chunk-key salt of a request: its ``cache_salt`` and its LoRA adapter's
    identity (``lora_name`` and ``lora_int_id``, what vLLM's own prefix-cache block
    hashes take from a LoRA request), as JSON; ``""`` for a plain request, whose keys
    stay those of every other plain request."""
    lora = request.lora_request
    adapter = None if lora is None else [lora.lora_name, lora.lora_int_id]
    return request_salt(getattr(request, "cache_salt", None), adapter)
