"""Prefix-cache reuse for Hugging Face transformers models.

:class:`PrefixCachingLM` wraps a causal LM and a :class:`~kvtc_store.store.TieredStore`.
Before a prompt is prefilled it asks the store for the longest cached prefix; on a hit it
fetches and decodes those chunks into a ``DynamicCache`` and prefills only the rest; then
it stores the prompt's new full chunks. Generation is greedy, token by token, on that
cache. Time to first token (TTFT) covers lookup, fetch, decode and the remaining prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvtc_store.model import cache_from_kv, kv_from_cache, lm_forward
from kvtc_store.store import PutResult, TieredStore


@dataclass
class PrefillResult:
    """Outcome of :meth:`PrefixCachingLM.prefill`.

    Attributes:
        cache: the ``DynamicCache`` holding KV for every prompt token.
        logits: float32 ``(V,)``, next-token logits after the prompt.
        reused_tokens: prompt tokens whose KV came from the store.
        computed_tokens: prompt tokens prefilled by the model.
        ttft_s: seconds from the call to the first token's logits.
        put: what was stored afterwards (None if storing was off).
    """

    cache: object
    logits: torch.Tensor
    reused_tokens: int
    computed_tokens: int
    ttft_s: float
    put: PutResult | None


@dataclass
class GenerationResult:
    """Greedy generation: ``tokens`` ``(n,)`` int64 new tokens, and the prefill's facts."""

    tokens: torch.Tensor
    prefill: PrefillResult


class PrefixCachingLM:
    """A transformers causal LM whose prompt KV is reused from, and saved to, a store.

    Args:
        model: a transformers causal LM (batch of one; KV layout ``(1, H, T, D)``).
        store: the tiered store (its codec must be calibrated for this model).
        reuse: look up and reuse cached prefixes.
        save: store the prompt's new full chunks after prefill.
    """

    def __init__(self, model, store: TieredStore, reuse: bool = True, save: bool = True):
        self.model = model
        self.store = store
        self.reuse = reuse
        self.save = save

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> PrefillResult:
        """Prefill a prompt, reusing the cached prefix.

        Args:
            input_ids: int64 ``(T,)`` or ``(1, T)``, ``T >= 1``.

        Returns:
            :class:`PrefillResult`. At least the last prompt token is always computed
            (its logits are needed), so a fully cached prompt reuses ``T - 1`` tokens.
        """
        ids = input_ids.reshape(-1)
        t0 = time.perf_counter()
        reused = 0
        cache = None
        if self.reuse:
            cached = self.store.lookup(ids)
            kv = self.store.get(ids, n_tokens=cached) if cached else None
            if kv is not None:
                reused = min(kv[0].shape[2], ids.numel() - 1)
                dtype = self.model.dtype
                cache = cache_from_kv(
                    kv[0][:, :, :reused].to(dtype), kv[1][:, :, :reused].to(dtype)
                )
        logits, cache = lm_forward(self.model, ids[None, reused:], cache, last_only=True)
        logits = logits[0, -1].float()
        ttft = time.perf_counter() - t0
        put = None
        if self.save:
            keys, values = kv_from_cache(cache)
            put = self.store.put(ids, keys, values)
        return PrefillResult(cache, logits, reused, ids.numel() - reused, ttft, put)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id=None):
        """Greedy generation after :meth:`prefill`.

        Args:
            input_ids: int64 ``(T,)`` or ``(1, T)``.
            max_new_tokens: tokens to generate (stops early at ``eos_token_id``).

        Returns:
            :class:`GenerationResult`.
        """
        pre = self.prefill(input_ids)
        return GenerationResult(
            greedy_continue(self.model, pre.cache, pre.logits, max_new_tokens, eos_token_id), pre
        )


@torch.no_grad()
def greedy_continue(model, cache, logits: torch.Tensor, max_new_tokens: int, eos_token_id=None):
    """Greedy decoding from a prefilled cache and the last logits; int64 ``(n,)``."""
    out = []
    nxt = int(logits.argmax())
    for _ in range(max_new_tokens):
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        logits, cache = lm_forward(model, torch.tensor([[nxt]]), cache)
        nxt = int(logits[0, -1].argmax())
    return torch.tensor(out, dtype=torch.long)
