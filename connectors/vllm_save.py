"""The vLLM worker's saves, off the forward's path: the step's plans and
:class:`PagedSaver`, which :meth:`KVTCConnector.wait_for_save
<kvtc_store.connectors.vllm.KVTCConnector.wait_for_save>` calls.

Nothing here imports vLLM, so the benchmark of the serving path
(``benchmarks/serving_path.py``) drives the same code on a GPU image without vLLM.

A save, in the step that completes its chunks (the hook's part, on the calling thread):
queue a device copy of the chunks' blocks on a copy stream that first waits for the
forward (vLLM frees a preempted request's blocks at once and reuses them in the next
step, so a save may not read the blocks later), make the current stream wait for that
copy (the next step's kernels run after it; the host does not wait), and hand the copies
to the save thread. The save thread encodes and puts them (``TieredStore.put``) on an
encode stream of its own, behind an event of the copy: encoding never sits in front of
a later step's copy. A failed save is logged and dropped (a later miss): the step never
fails for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..store import TieredStore
from .vllm_layout import PagedKVLayout

__all__ = ["PagedSaver", "RequestPlan"]

log = logging.getLogger(__name__)


@dataclass
class RequestPlan:
    """What the workers do for one request in one step.

    Attributes:
        req_id: vLLM's request id.
        token_ids: the prompt's token ids ``[0, max(load_end, save_end))``.
        block_ids: the request's KV block ids in token order (cache group 0), enough
            for ``max(load_end, save_end)`` tokens.
        load_start, load_end: tokens ``[load_start, load_end)`` are loaded into their
            blocks before the forward (``load_end == 0``: nothing to load).
            ``load_start`` is a multiple of the block size.
        save_start, save_end: after the forward, the full chunks of tokens
            ``[save_start, save_end)`` are gathered and put (``save_end == 0``: nothing
            to save); both multiples of the chunk size. The chunks before ``save_start``
            are in the store already (saved in an earlier step, or loaded).
        salt: the request's chunk-key salt (its cache salt and LoRA adapter; ``""``:
            none).
    """

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    load_start: int = 0
    load_end: int = 0
    save_end: int = 0
    save_start: int = 0
    salt: str = ""


class PagedSaver:
    """Saves of whole chunks from a paged KV cache (the module doc).

    Args:
        store: where the chunks go (its codec encodes them on the save thread).
        layout: the engine's paged KV cache.
        block_size: tokens per block (``save_start`` and ``save_end`` of every plan are
            multiples of it).
    """

    def __init__(self, store: TieredStore, layout: PagedKVLayout, block_size: int):
        self.store, self.layout, self.block_size = store, layout, block_size
        cuda = layout.device.type == "cuda"
        self._copy = torch.cuda.Stream(layout.device) if cuda else None
        self._encode = torch.cuda.Stream(layout.device) if cuda else None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def save(self, plans: Sequence[RequestPlan]) -> None:
        """The hook's part of saving ``plans`` (those with ``save_end``): queue the copy
        of their blocks from ``save_start`` to ``save_end`` and hand them to the save
        thread. Returns without waiting for the copy or the encode."""
        plans = [p for p in plans if p.save_end]
        if not plans:
            return
        bs = self.block_size
        copies = []
        main = torch.cuda.current_stream(self.layout.device) if self._copy is not None else None
        with self._on(self._copy):
            if main is not None:
                self._copy.wait_stream(main)
            for plan in plans:
                try:
                    blocks = plan.block_ids[plan.save_start // bs : plan.save_end // bs]
                    copies.append((plan, *self.layout.gather(blocks)))
                except Exception as exc:  # noqa: BLE001 - a lost save is a later miss
                    log.warning("request %s: saving KV failed: %s", plan.req_id, exc)
            copied = None
            if main is not None:
                copied = torch.cuda.Event()
                copied.record(self._copy)
                for _, keys, values in copies:  # read on the encode stream next
                    keys.record_stream(self._encode)
                    values.record_stream(self._encode)
        if main is not None:
            main.wait_stream(self._copy)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtc-vllm-save")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(self._put, copies, copied))

    def _put(self, copies, copied: torch.cuda.Event | None) -> None:
        """Encode and put the copied chunks (on the save thread)."""
        with self._on(self._encode):
            if copied is not None:
                self._encode.wait_event(copied)
            for plan, keys, values in copies:
                try:
                    tokens = torch.tensor(plan.token_ids[: plan.save_end])
                    self.store.put(tokens, keys, values, start=plan.save_start, salt=plan.salt)
                except Exception as exc:  # noqa: BLE001 - a lost save is a later miss
                    log.warning("request %s: saving KV failed: %s", plan.req_id, exc)

    @staticmethod
    def _on(stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def pending(self) -> list[Future]:
        """The saves not yet done."""
        self._pending = [f for f in self._pending if not f.done()]
        return list(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every save handed over so far; False if ``timeout`` seconds passed
        first."""
        _, left = cf.wait(self.pending(), timeout=timeout)
        return not left

    def close(self, timeout: float | None = 60) -> None:
        """Wait for the saves in flight (up to ``timeout`` seconds), then stop the thread."""
        self.wait(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
