"""Quality of reused KV: the measures the demo and the benchmarks report.

All compare a model continuing from exact KV (the reference) with the same model
continuing from decoded KV, over the same continuation tokens:

- mean KL divergence ``KL(p_exact || p_decoded)`` of next-token distributions (nats);
- top-1 agreement: share of positions where both predict the same next token;
- perplexity of the continuation under each, and the change in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import cache_from_kv, lm_forward


@dataclass
class ContinuationScores:
    """Sums over positions, so windows can be pooled; see the properties for means."""

    positions: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    nll_ref_sum: float = 0.0
    nll_got_sum: float = 0.0

    def add(self, other: ContinuationScores) -> None:
        """Pool another window's sums into this one."""
        self.positions += other.positions
        self.kl_sum += other.kl_sum
        self.agree += other.agree
        self.nll_ref_sum += other.nll_ref_sum
        self.nll_got_sum += other.nll_got_sum

    @property
    def kl(self) -> float:
        """Mean KL divergence per position (nats)."""
        return self.kl_sum / max(self.positions, 1)

    @property
    def top1_agreement(self) -> float:
        """Share of positions with the same argmax."""
        return self.agree / max(self.positions, 1)

    @property
    def ppl_change_pct(self) -> float:
        """Perplexity change of the decoded run against the exact one, in percent."""
        n = max(self.positions, 1)
        return 100.0 * (math.exp((self.nll_got_sum - self.nll_ref_sum) / n) - 1.0)


@torch.no_grad()
def continuation_logits(model, keys: torch.Tensor, values: torch.Tensor, cont_ids: torch.Tensor):
    """Logits ``(n, V)`` float32, on the model's device, of ``cont_ids`` ``(n,)`` given a
    prefix's KV ``(L, H, T, D)`` (any device: moved to the model's)."""
    dev, dtype = next(model.parameters()).device, model.dtype
    cache = cache_from_kv(keys.to(dev, dtype), values.to(dev, dtype))
    return lm_forward(model, cont_ids[None].to(dev), cache)[0][0].float()


def compare_logits(ref: torch.Tensor, got: torch.Tensor, cont_ids: torch.Tensor):
    """Scores of ``got`` against ``ref`` (both ``(n, V)`` logits for ``cont_ids`` ``(n,)``).

    Position ``i``'s logits predict token ``i + 1``; the perplexity uses ``n - 1``
    positions, KL and agreement all ``n``.
    """
    lp = F.log_softmax(ref, dim=-1)
    lq = F.log_softmax(got, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    tgt = cont_ids[1:].to(ref.device)
    nll_ref = F.nll_loss(lp[:-1], tgt, reduction="sum").item()
    nll_got = F.nll_loss(lq[:-1], tgt, reduction="sum").item()
    s = ContinuationScores(
        positions=ref.shape[0],
        kl_sum=float(kl.sum()),
        agree=int((ref.argmax(-1) == got.argmax(-1)).sum()),
    )
    # perplexity sums are over n-1 positions; rescale so ppl_change uses the same count
    scale = ref.shape[0] / max(ref.shape[0] - 1, 1)
    s.nll_ref_sum, s.nll_got_sum = nll_ref * scale, nll_got * scale
    return s
