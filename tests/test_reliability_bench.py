"""Short runs of benchmarks/reliability.py in the default suite: a minute of fuzzing and
a 30-second fault soak (the long runs, 1M+ inputs and 10 minutes, are the benchmark's;
results in benchmarks/results/reliability.{md,json})."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"
_spec = importlib.util.spec_from_file_location("kvtc_reliability_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_minute_of_fuzzing_finds_no_crash_and_no_hang() -> None:
    out = bench.fuzz(60.0, hang_s=5.0, seed=1, min_inputs=200)
    assert out["fuzz_crashes"] == 0, out["crash_examples"]
    assert out["fuzz_hangs"] == 0
    assert all(t["inputs"] >= 200 for t in out["targets"].values())


def test_a_30_second_fault_soak_serves_no_wrong_chunk_and_loses_none() -> None:
    out = bench.soak(30.0, threads=8, seed=1)
    assert out["soak_chunks_served"] > 0
    assert out["soak_wrong_chunks"] == 0
    assert out["soak_lost_chunks"] == 0
    # every call within its budget + 10%; on failure, which call, in which fault phase
    assert out["soak_max_block_over_deadline_s"] == 0.0, out["soak_worst_call"]
    assert out["disk_cap_max_overshoot_bytes"] <= 32 * 4096  # one write-down batch at most
    # no descriptor or thread piles up (the proxy's leak reached 3,000 fds in this run)
    assert out["fds_max"] < 400 and out["threads_max"] < 400, out["resources_by_phase"]
