"""Quality gate before a calibrated codec is published: held-out KL and perplexity change
of the candidate against the profile's current artifact, on the same windows.

Each gate window of ``T`` token ids is split into a context (the first ``T - c``, with
``c = min(128, T // 8)``) and a continuation (the last ``c``). The model's KV of the
context is coded as a store would (:meth:`~kvtc_store.codec.KVTCCodec.encode_sequence`:
sinks and the recent window exact, chunks of ``chunk_tokens``), decoded, and the model
continues over the continuation from exact and from decoded KV
(:func:`~kvtc_store.evaluate.compare_logits`). Scores pool all windows: mean KL (nats per
position), perplexity change (%), top-1 agreement, and the honest ratio (bf16 bytes of
the context's KV over the blobs' bytes).

The verdict (:func:`judge`) compares at the same honest ratio: the candidate is refused
when its KL exceeds the current's by more than ``threshold`` (default 10%) unless its
honest ratio is higher by more than ``ratio_slack`` (default 5%: more compression buys
some KL), or when its ratio is lower by more than ``ratio_slack`` and its KL is no
better. Windows must never have been calibrated on: the fleet job uses the calibration's
held-out window and the user's ``--gate-data``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .codec import CodecArtifact, KVTCCodec
from .errors import GateRefusedError
from .evaluate import ContinuationScores, compare_logits, continuation_logits
from .model import kv_from_cache, lm_forward

DEFAULT_THRESHOLD = 0.10
"""Largest KL increase (relative) a candidate may show at the same honest ratio."""
DEFAULT_RATIO_SLACK = 0.05
"""Honest ratios within this share of each other count as the same."""


@dataclass
class GateScores:
    """Pooled scores of one artifact on the gate windows (see the module doc)."""

    artifact_id: str
    kl: float
    ppl_change_pct: float
    top1_agreement: float
    honest_ratio: float
    positions: int


@dataclass
class GateReport:
    """The gate's decision: ``verdict`` is ``"first"`` (the profile had no artifact),
    ``"pass"``, ``"refused"`` or ``"forced"`` (refused, published anyway)."""

    profile: str
    candidate: GateScores
    current: GateScores | None
    threshold: float
    ratio_slack: float
    verdict: str
    reason: str
    windows: int
    window_tokens: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        """Every field, as JSON."""
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self) -> str:
        """A short Markdown table of both artifacts' scores and the verdict."""
        rows = [("candidate", self.candidate)] + (
            [("current", self.current)] if self.current else []
        )
        lines = [
            f"# Quality gate, profile `{self.profile}`: {self.verdict}",
            "",
            self.reason,
            "",
            (
                f"{self.windows} held-out window(s) of {self.window_tokens} tokens; threshold "
                f"KL +{self.threshold:.0%} at the same honest ratio (±{self.ratio_slack:.0%})."
            ),
            "",
            "| | artifact | KL (nats) | perplexity change | top-1 | honest ratio |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, s in rows:
            lines.append(
                f"| {name} | `{s.artifact_id}` | {s.kl:.5f} | {s.ppl_change_pct:+.2f}% "
                f"| {s.top1_agreement:.3f} | {s.honest_ratio:.2f} |"
            )
        return "\n".join(lines) + "\n"


@torch.no_grad()
def score_artifact(
    model, artifact: CodecArtifact, windows: list[torch.Tensor], chunk_tokens: int = 256
) -> GateScores:
    """Scores of ``artifact`` on gate ``windows`` (int64 ``(T,)`` token ids each).

    Raises:
        ValueError: a window shorter than 16 tokens.
    """
    codec = KVTCCodec(artifact)
    pooled = ContinuationScores()
    raw = coded = 0
    layers, heads, dim = artifact.kv_shape
    for ids in windows:
        if ids.numel() < 16:
            raise ValueError(f"a gate window needs at least 16 tokens, got {ids.numel()}")
        c = min(128, ids.numel() // 8)
        ctx, cont = ids[:-c], ids[-c:]
        _, cache = lm_forward(model, ctx[None], last_only=True)
        keys, values = kv_from_cache(cache)
        blobs = codec.encode_sequence(keys, values, 0, chunk_tokens=chunk_tokens)
        chunks, error = codec.decode_prefix(blobs, dtype=torch.float32)
        if error is not None:
            raise error
        dk = torch.cat([ch.keys for ch in chunks], 2)
        dv = torch.cat([ch.values for ch in chunks], 2)
        ref = continuation_logits(model, keys, values, cont)
        pooled.add(compare_logits(ref, continuation_logits(model, dk, dv, cont), cont))
        raw += 2 * layers * heads * dim * 2 * ctx.numel()
        coded += sum(len(b) for b in blobs)
    return GateScores(
        artifact.artifact_id,
        pooled.kl,
        pooled.ppl_change_pct,
        pooled.top1_agreement,
        raw / max(coded, 1),
        pooled.positions,
    )


def judge(
    candidate: GateScores,
    current: GateScores | None,
    threshold: float = DEFAULT_THRESHOLD,
    ratio_slack: float = DEFAULT_RATIO_SLACK,
) -> tuple[bool, str]:
    """``(passes, reason)`` of ``candidate`` against ``current`` (see the module doc)."""
    if current is None:
        return True, "the profile has no current artifact: nothing to compare with"
    if candidate.artifact_id == current.artifact_id:
        return True, "the candidate is the current artifact"
    kl_limit = current.kl * (1 + threshold)
    higher = candidate.honest_ratio > current.honest_ratio * (1 + ratio_slack)
    lower = candidate.honest_ratio < current.honest_ratio * (1 - ratio_slack)
    if candidate.kl > kl_limit and not higher:
        return False, (
            f"KL {candidate.kl:.5f} is {candidate.kl / max(current.kl, 1e-30) - 1:+.0%} "
            f"against the current {current.kl:.5f} (limit +{threshold:.0%}) at honest ratio "
            f"{candidate.honest_ratio:.2f} against {current.honest_ratio:.2f}"
        )
    if lower and candidate.kl >= current.kl:
        return False, (
            f"honest ratio {candidate.honest_ratio:.2f} is below the current "
            f"{current.honest_ratio:.2f} by more than {ratio_slack:.0%} with no lower KL "
            f"({candidate.kl:.5f} against {current.kl:.5f})"
        )
    return True, (
        f"KL {candidate.kl:.5f} against the current {current.kl:.5f} at honest ratio "
        f"{candidate.honest_ratio:.2f} against {current.honest_ratio:.2f}"
    )


def gate_report(
    profile: str,
    candidate: GateScores,
    current: GateScores | None,
    windows: list[torch.Tensor],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    ratio_slack: float = DEFAULT_RATIO_SLACK,
    force: bool = False,
) -> GateReport:
    """The :class:`GateReport` of a decision.

    Raises:
        GateRefusedError: the candidate fails (:func:`judge`) and ``force`` is off.
    """
    ok, reason = judge(candidate, current, threshold, ratio_slack)
    verdict = "first" if current is None else ("pass" if ok else "forced" if force else "refused")
    report = GateReport(
        profile,
        candidate,
        current,
        threshold,
        ratio_slack,
        verdict,
        reason,
        len(windows),
        [int(w.numel()) for w in windows],
    )
    if verdict == "refused":
        raise GateRefusedError(f"candidate {candidate.artifact_id} refused: {reason}", report)
    return report
