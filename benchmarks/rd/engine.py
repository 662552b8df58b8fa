"""The model side of the benchmark: batched prefill, continuation and greedy decoding.

Rows of a batch share one length (no padding, no attention mask): the continuation windows
all have 1,536 context tokens, and the haystacks of one task and length are built to one
stored length. KV comes out and goes back as ``(L, H, T, D)`` per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_store.model import lm_forward

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Runner:
    """A causal LM on one device.

    Attributes:
        model: a transformers causal LM (eval mode) already on ``device``.
        device: ``torch.device`` of the model.
    """

    model: object
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> list[KV]:
        """Exact KV of each row of ``ids`` ``(B, T)``: ``[(keys, values) (L, H, T, D)]``."""
        _, cache = lm_forward(self.model, ids.to(self.device), last_only=True)
        keys = torch.stack([layer.keys for layer in cache.layers])  # (L, B, H, T, D)
        values = torch.stack([layer.values for layer in cache.layers])
        return [(keys[:, b], values[:, b]) for b in range(ids.shape[0])]

    def cache(self, kvs: list[KV]):
        """A ``DynamicCache`` holding ``kvs`` (each ``(L, H, T, D)``, one length) as a batch."""
        from transformers import DynamicCache

        layers = kvs[0][0].shape[0]
        data = [
            (
                torch.stack([k[i] for k, _ in kvs]).to(self.device, self.dtype),
                torch.stack([v[i] for _, v in kvs]).to(self.device, self.dtype),
            )
            for i in range(layers)
        ]
        return DynamicCache(ddp_cache_data=data)

    @torch.no_grad()
    def logits(self, kvs: list[KV], ids: torch.Tensor) -> torch.Tensor:
        """float32 logits ``(B, n, V)`` of ``ids`` ``(B, n)`` continuing from ``kvs``."""
        out, _ = lm_forward(self.model, ids.to(self.device), self.cache(kvs))
        return out.float()

    @torch.no_grad()
    def greedy(self, kvs: list[KV], ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy tokens ``(B, steps)`` after feeding ``ids`` ``(B, n)`` on top of ``kvs``."""
        cache = self.cache(kvs)
        x = ids.to(self.device)
        out = []
        for _ in range(steps):
            logits, cache = lm_forward(self.model, x, cache, last_only=True)
            x = logits[:, -1].argmax(-1, keepdim=True)
            out.append(x)
        return torch.cat(out, dim=1)
