"""Mergeable calibration statistics (issue 19): merging is commutative and associative,
and N shards of the calibration units give the artifact one process gives on the same
windows (same bit plan, bases and decoded chunks within 1e-4), on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.calibration import (
    CalibrationSettings,
    calibration_units,
    collect,
    fit_artifacts_for,
    fit_stats,
    ids_hash,
    merge_stats,
    new_stats,
)
from kvtc_store.codec import KVTCCodec, fit_pca
from kvtc_store.codec.calibrate import fit_device
from kvtc_store.codec.stats import ShardStats
from kvtc_store.errors import CalibrationError
from kvtc_store.model import kv_from_cache, lm_forward, model_info
from tests.tiny_models import VOCAB, build, qwen2_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
"""Stated tolerance of shards against one process: bases and decoded values, relative to
their norm (float64 sums merged in another order; float32 eigendecompositions)."""

SETTINGS = CalibrationSettings(
    windows=6, window_tokens=64, sample_tokens=150, block=8, max_artifact_share=None
)


@pytest.fixture(scope="module")
def tiny():
    model = build(qwen2_config())
    info = model_info(model, "tiny-qwen2")
    ids = torch.randint(0, VOCAB, (1024,), generator=torch.Generator().manual_seed(1))
    return model, info, ids


def _random_window_stats(info, windows: list[int], seed: int = 0) -> ShardStats:
    """Statistics of synthetic KV windows (no model): window w's tensors depend on w only."""
    stats = new_stats(info, SETTINGS)
    layers, heads, dim = info.kv_shape
    for w in windows:
        g = torch.Generator().manual_seed(1000 + w)
        k = torch.randn(layers, heads, 40, dim, generator=g)
        v = torch.randn(layers, heads, 40, dim, generator=g) * 2 + 1
        stats.add_window(k, v, w)
    return stats


def _assert_same(a: ShardStats, b: ShardStats) -> None:
    assert a.units == b.units and a.count == b.count
    np.testing.assert_array_equal(a.sample_keys, b.sample_keys)
    assert torch.equal(a.sample_rows, b.sample_rows)
    for x, y in zip(a.sums + a.grams, b.sums + b.grams):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    parts=st.lists(st.integers(0, 3), min_size=8, max_size=8),
    order=st.permutations(range(4)),
)
def test_merge_is_commutative_and_associative(tiny, parts, order) -> None:
    _, info, _ = tiny
    whole = _random_window_stats(info, list(range(8)))
    shards = [
        _random_window_stats(info, [w for w, p in enumerate(parts) if p == s]) for s in range(4)
    ]
    left = merge_stats([shards[i] for i in order])  # ((a+b)+c)+d in a random order
    right = shards[order[0]].merge(shards[order[1]].merge(shards[order[2]].merge(shards[order[3]])))
    _assert_same(left, whole)
    _assert_same(right, whole)
    assert len(whole.sample_rows) == SETTINGS.sample_tokens  # 8 * (40 - 4 sinks) > 150


def test_a_unit_counted_twice_or_other_settings_do_not_merge(tiny) -> None:
    _, info, _ = tiny
    a, b = _random_window_stats(info, [0, 1]), _random_window_stats(info, [1, 2])
    with pytest.raises(CalibrationError, match="counted twice"):
        a.merge(b)
    with pytest.raises(CalibrationError, match="already in"):
        a.add_window(torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16), 0)
    other = new_stats(info, CalibrationSettings(sample_tokens=10))
    with pytest.raises(CalibrationError, match="different settings"):
        a.merge(other)


def test_state_round_trips_without_pickle(tiny) -> None:
    model, info, ids = tiny
    units = calibration_units(SETTINGS)
    stats = collect(model, ids, [units[0], units[-1], units[SETTINGS.windows]], info, SETTINGS)
    state = stats.state()
    assert all(isinstance(v, (np.ndarray, str)) for v in state.values())
    back = ShardStats.from_state(state)
    _assert_same(back, stats)
    assert torch.equal(back.sensitivity(), stats.sensitivity())
    assert [h[3] for h in back.holdout] == [h[3] for h in stats.holdout]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(back.holdout, stats.holdout))
    with pytest.raises(CalibrationError, match="malformed"):
        ShardStats.from_state({"meta": "{}"})


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative difference of ``y`` from ``x`` (0 for empty tensors)."""
    return float((x - y).norm() / x.norm().clamp_min(1e-30)) if x.numel() else 0.0


def _artifacts(model, info, ids, shards: list[list]):
    parts = [collect(model, ids, s, info, SETTINGS) for s in shards]
    fit, holdout = fit_stats(merge_stats(parts[::-1]), SETTINGS)
    return fit_artifacts_for(fit, holdout, info, [4.0, 8.0], SETTINGS, ids_hash(ids), 0)


def test_shards_give_the_artifact_of_one_process(tiny) -> None:
    model, info, ids = tiny
    units = calibration_units(SETTINGS)
    one = _artifacts(model, info, ids, [units])
    # three shards, units interleaved, merged in reverse
    three = _artifacts(model, info, ids, [units[0::3], units[1::3], units[2::3]])
    with torch.no_grad():
        keys, values = kv_from_cache(lm_forward(model, ids[None, 900:1000])[1])
    for a, b in zip(one, three):
        assert a.plan == b.plan and len(a.plan) > 1
        for x, y in zip(a.bases, b.bases):
            assert x.shape == y.shape and _rel(x, y) < TOL
        got = [KVTCCodec(art).decode(KVTCCodec(art).encode(keys, values, 900)) for art in (a, b)]
        for x, y in zip((got[0].keys, got[0].values), (got[1].keys, got[1].values)):
            assert _rel(x.float(), y.float()) < TOL
        assert a.quality["honest_ratio"] == pytest.approx(b.quality["honest_ratio"], rel=1e-3)
    with pytest.raises(CalibrationError, match="missing"):
        fit_stats(collect(model, ids, units[:2], info, SETTINGS), SETTINGS)


def test_absorb_is_merge_in_place_and_merge_leaves_its_inputs(tiny) -> None:
    _, info, _ = tiny
    a, b = _random_window_stats(info, [0, 2]), _random_window_stats(info, [1, 3])
    a_gram, b_gram = a.grams[0].clone(), b.grams[0].clone()
    merged = a.merge(b)
    assert torch.equal(a.grams[0], a_gram) and torch.equal(b.grams[0], b_gram)
    assert a.units == {"kv:0", "kv:2"} and merged.units == {f"kv:{w}" for w in range(4)}
    # a shard without sums (sensitivity only) absorbing one with them, as a driver does
    empty = new_stats(info, SETTINGS)
    assert empty.absorb(a) is empty and empty.absorb(b) is empty
    _assert_same(empty, merged)
    _assert_same(merged, _random_window_stats(info, [0, 1, 2, 3]))


def test_statistics_from_a_state_own_their_arrays(tiny) -> None:
    _, info, _ = tiny
    stats = _random_window_stats(info, [0, 1])
    assert stats.device == torch.device("cpu") and stats.to("cpu") is stats
    back = ShardStats.from_state(stats.state())
    _assert_same(back, stats)
    before = stats.grams[0].clone()
    back.absorb(_random_window_stats(info, [2]))  # in place: the copy owns its arrays
    assert torch.equal(stats.grams[0], before) and not torch.equal(back.grams[0], before)


def _kv_windows(info, n: int):
    layers, heads, dim = info.kv_shape
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(layers, heads, 64, dim, generator=g),
            torch.randn(layers, heads, 64, dim, generator=g),
        )
        for _ in range(n)
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_statistics_on_the_gpu_equal_the_cpu_statistics(tiny) -> None:
    """The same windows added on CUDA and on the CPU: same units, counts and sample
    positions, sums and Gram matrices within float32 matmul rounding."""
    _, info, _ = tiny
    on = {d: new_stats(info, SETTINGS, device=d) for d in ("cpu", "cuda")}
    for w, (k, v) in enumerate(_kv_windows(info, 4)):
        for d, s in on.items():
            s.add_window(k.to(d), v.to(d), w)
    gpu = on["cuda"].to("cpu")
    cpu = on["cpu"]
    assert gpu.units == cpu.units and gpu.count == cpu.count
    np.testing.assert_array_equal(gpu.sample_keys, cpu.sample_keys)
    torch.testing.assert_close(gpu.sample_rows, cpu.sample_rows, rtol=1e-3, atol=1e-3)
    for x, y in zip(gpu.sums + gpu.grams, cpu.sums + cpu.grams):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def _decaying_stats(info, device: str = "cpu") -> ShardStats:
    """Statistics of windows whose values have a spectrum decaying by 1.1 per component
    (well separated eigenvalues: their eigenvectors are defined to float precision)."""
    layers, heads, dim = info.kv_shape
    p = layers * heads * dim
    g = torch.Generator().manual_seed(3)
    mix = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    sd = 1.1 ** -torch.arange(p, dtype=torch.float64)
    stats = new_stats(info, SETTINGS, device=device)
    for w in range(6):
        rows = (torch.randn(200, p, generator=g, dtype=torch.float64) * sd) @ mix.T
        v = rows.float().reshape(200, layers, heads, dim).permute(1, 2, 0, 3)
        k = torch.randn(layers, heads, 200, dim, generator=g)
        stats.add_window(k.to(device), v.to(device), w)
    return stats.to("cpu")


def _top_value_components(stats, pcas, above: float = 1e-3) -> tuple[int, slice]:
    """``(value group, its components with eigenvalues above ``above`` of the largest)``:
    those float32 resolves (the tail, under float32's ~1e-7 of the largest, is noise in
    any float32 decomposition, and carries no energy)."""
    g = next(i for i, (kind, _) in enumerate(stats.slices) if kind == "v")
    ev = pcas[g].eigenvalues
    return g, slice(0, int((ev > above * ev[0]).sum()))


def test_float32_eigendecomposition_keeps_the_bases_of_float64(tiny) -> None:
    """The default float32 ``eigh`` (see ``fit_pca``) against float64 on the same float64
    covariance: eigenvalues, and the value components float32 resolves, within 1e-4, far
    below the float16 storage of the bases."""
    _, info, _ = tiny
    stats = _decaying_stats(info)
    grams = [g.clone() for g in stats.grams]
    timings: dict = {}
    f32 = fit_pca(stats, 0.5, device="cpu", timings=timings)
    f64 = fit_pca(stats, 0.5, device="cpu", eigh_dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(grams, stats.grams))  # stats untouched
    assert timings["device"] == "cpu" and timings["eigh_s"] > 0 and timings["covariance_s"] > 0
    for a, b in zip(f32, f64):
        assert a.components.dtype == torch.float32 and a.components.device.type == "cpu"
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-4, atol=1e-6)
    v = _top_value_components(stats, f64)
    assert _rel(f64[v[0]].components[:, v[1]], f32[v[0]].components[:, v[1]]) < TOL


def test_fit_reports_its_stages(tiny) -> None:
    model, info, ids = tiny
    stats = collect(model, ids, calibration_units(SETTINGS), info, SETTINGS)
    timings: dict = {}
    fit, holdout = fit_stats(stats, SETTINGS, device="cpu", timings=timings)
    fit_artifacts_for(fit, holdout, info, [4.0, 8.0], SETTINGS, ids_hash(ids), 0, timings=timings)
    assert set(timings) >= {"device", "covariance_s", "eigh_s", "sample_s", "step_tables_s"}
    assert set(timings["ratios"]) == {"4", "8"}
    assert all(r["measure_s"] > 0 for r in timings["ratios"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_the_gpu_equals_the_cpu_fit(tiny) -> None:
    _, info, _ = tiny
    stats = _decaying_stats(info, device="cuda")
    cpu, gpu = fit_pca(stats, 0.5, device="cpu"), fit_pca(stats, 0.5, device="cuda")
    assert fit_device() == torch.device("cuda")
    for a, b in zip(cpu, gpu):  # two float32 solvers: each within ~5e-7 of the truth
        assert b.components.device.type == "cpu"
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.mean, b.mean)
    v = _top_value_components(stats, cpu, above=1e-2)
    assert _rel(cpu[v[0]].components[:, v[1]], gpu[v[0]].components[:, v[1]]) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_tables_on_the_gpu_equal_the_cpu_tables(tiny) -> None:
    from kvtc_store.codec.steps import StepTables

    model, info, ids = tiny
    stats = collect(model, ids, calibration_units(SETTINGS), info, SETTINGS)
    fit, _ = fit_stats(stats, SETTINGS, device="cpu")
    cpu = StepTables(fit.coefficients("cpu"), SETTINGS.block, 0.5, SETTINGS.quant_bias)
    gpu = StepTables(fit.coefficients("cuda"), SETTINGS.block, 0.5, SETTINGS.quant_bias)
    np.testing.assert_allclose(gpu.err, cpu.err, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gpu.bits, cpu.bits, rtol=1e-4, atol=1e-3)
    assert gpu.blocks == cpu.blocks
