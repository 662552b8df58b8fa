"""Suites (a) and (c): continuation quality and greedy agreement on held-out windows.

Each window is 1,536 context + 256 continuation tokens (:func:`.data.windows`). The
context's exact KV is computed once; each method round-trips it (compress -> bytes ->
decompress) and the model continues from the result:

Windows are grouped by genre (batches never mix genres) and every measure is kept per
genre as well as pooled.

- (a) over the 256 continuation tokens: mean KL of next-token distributions against the
  exact run, top-1 agreement, perplexity change (:func:`kvtc_store.evaluate.compare_logits`);
- (c) from the same decoded KV, fed the first continuation token, 64 greedy tokens: the
  share of windows whose greedy tokens all equal the exact run's, and the mean length of
  the shared prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvtc_store.evaluate import ContinuationScores, compare_logits

from .accounting import ByteCount, roundtrip_counted
from .base import KVMethod
from .engine import KV, Runner


@dataclass
class Tally:
    """Sums of one method's measures over some windows (all, or one genre's)."""

    scores: ContinuationScores = field(default_factory=ContinuationScores)
    bytes: ByteCount = field(default_factory=ByteCount)
    windows: int = 0
    greedy_same: int = 0
    greedy_total: int = 0
    greedy_prefix_sum: int = 0

    @property
    def greedy_agreement(self) -> float:
        """Share of windows whose greedy continuation equals the exact one."""
        return self.greedy_same / max(self.greedy_total, 1)

    @property
    def greedy_prefix_mean(self) -> float:
        """Mean number of leading greedy tokens equal to the exact run's."""
        return self.greedy_prefix_sum / max(self.greedy_total, 1)


@dataclass
class ContinuationResult(Tally):
    """One method's measures pooled over all windows, and per genre (``per_text``)."""

    per_text: dict[str, Tally] = field(default_factory=dict)
    seconds: float = 0.0


class ContinuationSuite:
    """Exact references of every window, then one :meth:`run` per method.

    Args:
        runner: the model.
        windows: ``[(text name, ids (ctx + cont,))]``.
        ctx: context tokens of each window (stored and round-tripped).
        batch: windows per forward.
        greedy_tokens: greedy continuation length.
        workers: contexts round-tripped at once (threads; see :func:`.base.roundtrip_many`).
    """

    def __init__(
        self,
        runner: Runner,
        windows: list[tuple[str, torch.Tensor]],
        ctx: int,
        batch: int,
        greedy_tokens: int = 64,
        workers: int = 1,
    ):
        self.runner, self.ctx, self.batch, self.greedy_tokens = runner, ctx, batch, greedy_tokens
        self.workers = workers
        self.names = [n for n, _ in windows]
        self.ids = torch.stack([w for _, w in windows]).to(runner.device)
        self.exact: list[KV] = []
        self.ref_logits: list[torch.Tensor] = []
        self.ref_greedy: list[torch.Tensor] = []
        for rows in self._batches():
            kvs = runner.prefill(self.ids[rows, :ctx])
            self.exact += kvs
            self.ref_logits += list(runner.logits(kvs, self.ids[rows, ctx:]))
            if greedy_tokens:  # 0: suite (c) is skipped
                self.ref_greedy += list(
                    runner.greedy(kvs, self.ids[rows, ctx : ctx + 1], greedy_tokens)
                )

    def _batches(self) -> list[list[int]]:
        """Rows in batches of at most ``batch``, each of one genre (bytes count per genre)."""
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            by_name.setdefault(name, []).append(i)
        out = []
        for rows in by_name.values():
            out += [rows[j : j + self.batch] for j in range(0, len(rows), self.batch)]
        return out

    def run(self, method: KVMethod | None) -> ContinuationResult:
        """Measure ``method`` (None: the exact KV itself, a sanity check that scores 0)."""
        t0 = time.time()
        res = ContinuationResult()
        ctx = self.ctx
        for rows in self._batches():
            kvs = [self.exact[r] for r in rows]
            part = res.per_text.setdefault(self.names[rows[0]], Tally())
            count = ByteCount()
            kvs = roundtrip_counted(method, kvs, count, self.workers)
            part.bytes.add_count(count)
            res.bytes.add_count(count)
            logits = self.runner.logits(kvs, self.ids[rows, ctx:])
            greedy = None
            if self.greedy_tokens:
                greedy = self.runner.greedy(kvs, self.ids[rows, ctx : ctx + 1], self.greedy_tokens)
            for j, r in enumerate(rows):
                s = compare_logits(self.ref_logits[r], logits[j], self.ids[r, ctx:])
                for t in (res, part):
                    t.scores.add(s)
                    t.windows += 1
                if greedy is None:
                    continue
                same = (greedy[j] == self.ref_greedy[r]).long()
                for t in (res, part):
                    t.greedy_same += int(same.all())
                    t.greedy_prefix_sum += int(same.cumprod(0).sum())
                    t.greedy_total += 1
        res.seconds = time.time() - t0
        return res
