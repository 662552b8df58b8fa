"""The fp8 tail projection (issue 21, :mod:`kvtc_store.codec.fp8_tail`): against the fp16
projection of the same rows within its stated error bound, exact where its inputs are
e4m3 values, and which rows form the tail. Each projection test runs on the CPU
(``torch._scaled_mm`` runs there) and, marked ``gpu``, on CUDA; the codec end to end
(``GpuCodec(fp8_tail=True)``) is marked ``gpu`` (``KVTC_GPU_TEST_DEVICE=cpu
TRITON_INTERPRET=1`` runs it in Triton's interpreter)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvtc_store.codec.fp8_tail import (
    E4M3,
    TAIL_MAX_SCALE,
    Fp8Tail,
    tail_error_bound,
    tail_rows,
)
from kvtc_store.codec.rans import CLASS_SCALES
from tests.test_codec import arts  # noqa: F401 - artifact fixture

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
ROWS, START, P, N = 64, 16, 96, 300


def _fp16_projection(coeffs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """What the codec's fp16 path computes: fp16 operands, float32 accumulation, fp16
    result (``(N, p)``)."""
    prod = coeffs.T.float() @ basis.to(coeffs.device, torch.float16).T.float()
    return prod.to(torch.float16)


def _case(device: str, seed: int = 0, bias: float = 0.1):
    """A group's orthonormal basis ``(P, ROWS)``, per-row steps, and dequantised tail
    coefficients ``(ROWS - START, N)`` fp16 of Laplace symbols (some beyond 16)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(P, ROWS, generator=g, dtype=torch.float64))[0].float()
    steps = torch.logspace(-2, -0.5, ROWS)
    steps[START + 5] = 0.0  # a dropped component: zero row
    lap = torch.distributions.Laplace(0.0, 1.5)
    q = lap.sample((ROWS - START, N)).round().clamp(-60, 60)
    c = (q - bias * q.sign()) * steps[START:, None]
    return basis, steps, c.to(device, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_tail_matches_the_fp16_projection_within_its_bound(device) -> None:
    basis, steps, coeffs = _case(device)
    tail = Fp8Tail.build(basis, steps, START, torch.device(device))
    f16 = _fp16_projection(coeffs, basis[:, START:])
    f8 = torch.full((N, P + 8), float("nan"), dtype=torch.float16, device=device)
    tail.project(coeffs, f8[:, 4 : 4 + P])  # a column slice, as a group's features are
    assert f8[:, :4].isnan().all() and f8[:, 4 + P :].isnan().all()  # nothing outside
    f8 = f8[:, 4 : 4 + P]
    assert not f8.isnan().any()
    err = (f8.double() - f16.double()).abs()
    bound = tail_error_bound(tail, coeffs, f8, f16)
    assert (err <= bound).all(), float((err - bound).max())
    # the fp8 path is in use (it differs), and the bound is not loose by orders: the
    # typical error is a small part of the magnitude sum it is stated against
    assert (err > 0).any()
    a = coeffs.T.double().abs() @ (basis[:, START:].T.double().abs()).to(device)
    assert err.mean() < 0.02 * a.mean()
    # accumulate adds to what is there
    base = torch.randn(N, P, generator=torch.Generator().manual_seed(3)).half().to(device)
    acc = base.clone()
    tail.project(coeffs, acc, accumulate=True)
    prod = torch.empty_like(base)
    tail.project(coeffs, prod)
    assert torch.allclose(acc.float(), (base.float() + prod.float()), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_tail_is_exact_for_e4m3_inputs(device) -> None:
    """Symbols ``|q| <= 16`` with no bias, and step-scaled basis entries that are e4m3
    values: the fp8 product is the exact product rounded once to fp16."""
    g = torch.Generator().manual_seed(1)
    grid = torch.arange(8, 16, dtype=torch.float32) / 8  # e4m3 mantissas in [1, 2)
    mags = grid[torch.randint(0, 8, (P, ROWS), generator=g)]
    mags = mags * 2.0 ** torch.randint(0, 3, (P, ROWS), generator=g).float()
    w = mags * torch.where(torch.rand(P, ROWS, generator=g) < 0.5, -1.0, 1.0) / 64
    steps = torch.full((ROWS,), 2.0**-3)
    basis = w / steps[None, :]  # diag(step) Bᵀ == w exactly
    q = torch.randint(-16, 17, (ROWS - START, N), generator=g).float()
    coeffs = (q * steps[START:, None]).to(device, torch.float16)
    tail = Fp8Tail.build(basis, steps, START, torch.device(device))
    assert torch.equal(tail.symbols(coeffs).float().cpu(), q.T)
    out = torch.empty(N, P, dtype=torch.float16, device=device)
    tail.project(coeffs, out)
    exact = (q.T.double() @ w[:, START:].T.double()).to(torch.float16)
    assert torch.equal(out.cpu(), exact)


def test_the_tail_is_the_run_of_small_unshifted_components() -> None:
    small = int(np.flatnonzero(CLASS_SCALES <= TAIL_MAX_SCALE).max())
    wide = small + 1
    n = len(CLASS_SCALES)
    coded = {r: (0, small) for r in range(64)}
    assert tail_rows(64, coded, n) == 0
    coded[40] = (0, wide)  # a wide component ends the tail: rows 41..63, cut to 16
    assert tail_rows(64, coded, n) == 48
    coded[40] = (0, small)
    coded[20] = (2, small)  # a shifted one too: rows 21..63 -> 32 rows
    assert tail_rows(64, coded, n) == 32
    coded[55] = (1, 0)  # fewer than 16 rows after it: no tail
    assert tail_rows(64, coded, n) == 64
    del coded[55]  # a row not coded (dropped) belongs to the tail
    assert tail_rows(64, coded, n) == 32
    assert tail_rows(64, coded, n + 1) == 64  # tables that are not the Laplace classes


def test_symbols_saturate_instead_of_overflowing() -> None:
    tail = Fp8Tail.build(torch.eye(16), torch.ones(16), 0, torch.device("cpu"))
    c = torch.tensor([[1000.0], [-1000.0], [17.0]] + [[0.0]] * 13).half()
    u = tail.symbols(c).float()[0]
    assert u[:3].tolist() == [448.0, -448.0, 16.0] and u.dtype == torch.float32
    assert tail.weight_t.dtype == E4M3


# ---- the codec end to end (marked gpu) ----------------------------------------------------

GPU_DEV = os.environ.get("KVTC_GPU_TEST_DEVICE", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(GPU_DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arts", ["rans"], indirect=True)  # the GPU codec codes rANS only
def test_gpu_codec_decodes_with_the_fp8_tail_close_to_fp16(arts) -> None:  # noqa: F811
    pytest.importorskip("triton")
    from kvtc_store.codec import ChunkBatch
    from kvtc_store.codec.gpu import GpuCodec
    from tests.test_serving_path import T, _sequence

    art = arts["all", 4.0]
    assert art.quantizer == "rans"
    plain = GpuCodec(art, GPU_DEV)
    fp8 = GpuCodec(art, GPU_DEV, fp8_tail=True)
    assert any(start < w for start, w in zip(fp8.tail_rows, plain.tail_rows))
    keys, values = (x.to(GPU_DEV) for x in _sequence(3, seed=5))
    batch = ChunkBatch.of(keys.unflatten(2, (3, T)).movedim(2, 0),
                          values.unflatten(2, (3, T)).movedim(2, 0), [0, T, 2 * T])  # fmt: skip
    blobs = plain.encode_batch(batch)
    a, b = plain.decode_batch(blobs), fp8.decode_batch(blobs)
    assert a.count == b.count == 3
    for x, y, ref in ((a.keys, b.keys, keys), (a.values, b.values, values)):
        ref = ref.unflatten(2, (3, T)).movedim(2, 0).float()
        assert not torch.equal(x, y)  # the fp8 path ran
        e16 = (x.float() - ref).pow(2).mean()
        e8 = (y.float() - ref).pow(2).mean()
        assert e8 <= 1.05 * e16, (float(e8), float(e16))


def test_only_the_batched_codec_takes_the_fp8_tail(arts) -> None:  # noqa: F811
    from kvtc_store.codec import make_codec

    art = arts["all", 8.0]
    with pytest.raises(ValueError, match="fp8"):
        make_codec(art, device="cpu", batched=False, fp8_tail=True)
