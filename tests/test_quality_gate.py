"""The quality gate's verdict (issue 19): KL against the current artifact at the same
honest ratio; a refusal is a named error carrying its report."""

from __future__ import annotations

import json

import pytest
import torch

from kvtc_store.errors import GateRefusedError
from kvtc_store.quality_gate import GateScores, gate_report, judge


def _s(aid: str, kl: float, ratio: float) -> GateScores:
    return GateScores(aid, kl, 0.5, 0.99, ratio, 128)


@pytest.mark.parametrize(
    ("kl", "ratio", "passes"),
    [
        (0.0100, 16.0, True),  # same
        (0.0109, 16.0, True),  # +9%: inside the threshold
        (0.0115, 16.0, False),  # +15% at the same ratio
        (0.0115, 16.5, False),  # +15%, ratio +3% (inside the slack: the same ratio)
        (0.0115, 17.5, True),  # +15% bought with +9% ratio
        (0.0100, 15.0, False),  # same KL at a 6% lower ratio
        (0.0080, 15.0, True),  # lower ratio, but lower KL
    ],
)
def test_judge_compares_kl_at_the_same_honest_ratio(kl, ratio, passes) -> None:
    ok, reason = judge(_s("cand", kl, ratio), _s("cur", 0.0100, 16.0))
    assert ok is passes and reason


def test_first_artifact_and_refusal_with_report() -> None:
    windows = [torch.zeros(256, dtype=torch.int64)]
    first = gate_report("default", _s("a", 0.02, 16.0), None, windows)
    assert first.verdict == "first"
    with pytest.raises(GateRefusedError, match="candidate b refused") as info:
        gate_report("default", _s("b", 0.02, 16.0), _s("a", 0.01, 16.0), windows)
    rep = info.value.report
    assert rep.verdict == "refused" and json.loads(rep.to_json())["current"]["artifact_id"] == "a"
    assert "| current | `a` |" in rep.to_markdown()
    forced = gate_report("default", _s("b", 0.02, 16.0), _s("a", 0.01, 16.0), windows, force=True)
    assert forced.verdict == "forced"
    assert (
        gate_report("p", _s("b", 0.02, 16.0), _s("a", 0.01, 16.0), windows, threshold=2.0).verdict
        == "pass"
    )
