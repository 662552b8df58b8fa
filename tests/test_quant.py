"""Per-token uniform quantisation and LSB-first bit packing (kvtc_store.codec.quant)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_store.codec.quant import (
    SCALE_BITS,
    dequantize_range,
    pack_bits,
    quantize_range,
    unpack_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- bit packing ----------------------------------------------------------------------------


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """Code k occupies bits k*b .. k*b+b-1 of a little-endian bit stream."""
    acc = 0
    for k, c in enumerate(codes):
        acc |= c << (k * bits)
    return acc.to_bytes((len(codes) * bits + 7) // 8, "little")


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=97))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (len(codes) * bits + 7) // 8
    assert bytes(packed.numpy().tobytes()) == _reference_pack(codes, bits)
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 9, 31, 255, 1001])
def test_pack_unpack_odd_counts(bits, count) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), codes)
    # extra bytes after the stream are ignored
    longer = torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8)])
    assert torch.equal(unpack_bits(longer, bits, count), codes)


def test_pack_layout_is_lsb_first() -> None:
    u8 = lambda v: torch.tensor(v, dtype=torch.uint8)
    assert pack_bits(u8([1, 0, 1]), 1).tolist() == [0b101]
    assert pack_bits(u8([5, 3]), 3).tolist() == [5 | 3 << 3]
    assert pack_bits(u8([0xA, 0x5]), 4).tolist() == [0x5A]
    assert pack_bits(u8([0b11, 0b01, 0b10, 0b00, 0b11]), 2).tolist() == [0b00100111, 0b11]
    assert pack_bits(u8([200, 7]), 8).tolist() == [200, 7]


def test_pack_reads_codes_in_c_order() -> None:
    codes = torch.randint(0, 8, (5, 7), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(pack_bits(codes, 3), pack_bits(codes.flatten(), 3))
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, 35).view(5, 7), codes)


def test_pack_empty() -> None:
    for bits in (1, 5, 8):
        packed = pack_bits(torch.zeros(0, dtype=torch.uint8), bits)
        assert packed.numel() == 0
        assert unpack_bits(packed, bits, 0).numel() == 0


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_unpack_short_stream_raises(bits) -> None:
    packed = pack_bits(torch.ones(10, dtype=torch.uint8), bits)
    with pytest.raises(ValueError):
        unpack_bits(packed[:-1], bits, 10)


# --- quantisation ---------------------------------------------------------------------------


def _fp16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the float16 spacing at |x| (the rounding error of storing x as float16)."""
    x16 = x.abs().to(torch.float16)
    nxt = torch.nextafter(x16.float(), torch.full_like(x, float("inf"))).to(torch.float16)
    up = torch.where(nxt > x16, nxt, (x16.float() * (1 + 2**-9)).to(torch.float16))
    return (up.float() - x16.float()).clamp_min(2**-24) / 2 + 1e-12


def _check_quant(x: torch.Tensor, bits: int) -> None:
    codes, scales = quantize_range(x, bits)
    levels = (1 << bits) - 1
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.dtype == torch.float16 and scales.shape == (x.shape[0], 2)
    assert int(codes.max()) <= levels
    assert torch.isfinite(scales.float()).all()
    step = scales[:, 1].float()
    assert (step > 0).all()
    y = dequantize_range(codes, scales)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # |error| <= step/2, plus the float16 rounding of the offset and float32 arithmetic
    lo = x.amin(dim=1)
    tol = step / 2 + _fp16_half_ulp(lo) + 4e-7 * x.abs().amax(dim=1) + 1e-7
    err = (y - x).abs()
    assert (err <= tol[:, None]).all(), float((err / tol[:, None]).max())
    # the top value is reachable: offset + levels * step covers the row's maximum (up to
    # float16's subnormal spacing, 2**-24, when the step itself is subnormal)
    top = scales[:, 0].float() + levels * step
    slack = levels * 2**-25 * (step < 2**-14) + 4e-7 * x.abs().amax(dim=1)
    assert (top >= x.amax(dim=1) - slack).all()


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    tokens=st.integers(1, 9),
    width=st.integers(1, 33),
    log_scale=st.floats(-3, 3),
    offset=st.floats(-50, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_error_at_most_half_a_step(bits, tokens, width, log_scale, offset, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * 10**log_scale + offset
    _check_quant(x, bits)


@settings(max_examples=100, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.lists(
        st.lists(st.floats(-1000, 1000, allow_nan=False, width=32), min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ),
)
def test_quantize_arbitrary_values(bits, rows) -> None:
    width = min(len(r) for r in rows)
    x = torch.tensor([r[:width] for r in rows], dtype=torch.float32)
    _check_quant(x, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_step_rounding_down_never_clips_the_top(bits) -> None:
    """Rows whose exact step rounds *down* in float16 still decode their maximum within
    half a step (the encoder widens the step by one float16 ulp)."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, 6, generator=g) * torch.rand(4000, 1, generator=g) * 20
    levels = (1 << bits) - 1
    lo16 = x.amin(1).to(torch.float16).float()
    hi = x.amax(1)
    naive = ((hi - lo16) / levels).to(torch.float16).float()
    rounded_down = naive * levels < hi - lo16
    assert rounded_down.sum() > 100  # the case under test does occur
    codes, scales = quantize_range(x, bits)
    y = dequantize_range(codes, scales)
    i = x.argmax(1)
    rows = torch.arange(x.shape[0])
    top_err = (y[rows, i] - x[rows, i]).abs()
    step = scales[:, 1].float()
    assert (top_err[rounded_down] <= step[rounded_down] / 2 * (1 + 1e-3) + 1e-6).all()
    assert (codes[rows, i][rounded_down] == levels).any()


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("value", [0.0, 0.1, -3.25, 1234.5, 1e-5])
def test_constant_rows(bits, value) -> None:
    x = torch.full((3, 10), value)
    codes, scales = quantize_range(x, bits)
    assert torch.isfinite(scales.float()).all() and (scales[:, 1].float() > 0).all()
    assert (codes == codes[:, :1]).all()  # one code per row
    y = dequantize_range(codes, scales)
    assert (y == y[:, :1]).all()
    assert (y - x).abs().max() <= float(_fp16_half_ulp(torch.tensor([value]))[0])
    if float(torch.tensor(value, dtype=torch.float16)) == value:  # offset exact: code 0
        assert (codes == 0).all() and torch.equal(y, x)


def test_constant_row_among_varying_rows() -> None:
    x = torch.randn(5, 16)
    x[2] = 0.5
    codes, scales = quantize_range(x, 3)
    y = dequantize_range(codes, scales)
    assert torch.equal(y[2], torch.full((16,), 0.5))
    _check_quant(x, 3)


def test_more_bits_less_error() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=g)
    errs = []
    for bits in range(1, 9):
        codes, scales = quantize_range(x, bits)
        errs.append(float(((dequantize_range(codes, scales) - x) ** 2).mean()))
    assert all(a > b for a, b in itertools.pairwise(errs))
    # uniform-noise model: mean squared error close to step^2 / 12 at 8 bits
    _, scales = quantize_range(x, 8)
    model = float((scales[:, 1].float() ** 2).mean() / 12)
    assert errs[-1] == pytest.approx(model, rel=0.3)


def test_dequantize_is_offset_plus_code_times_step() -> None:
    codes = torch.tensor([[0, 1, 7], [3, 3, 0]], dtype=torch.uint8)
    scales = torch.tensor([[-1.0, 0.5], [2.0, 0.25]], dtype=torch.float16)
    expected = torch.tensor([[-1.0, -0.5, 2.5], [2.75, 2.75, 2.0]])
    assert torch.equal(dequantize_range(codes, scales), expected)


def test_scale_bits_is_two_float16() -> None:
    assert SCALE_BITS == 2 * 16
    _, scales = quantize_range(torch.randn(7, 3), 4)
    assert scales.numpy().nbytes * 8 == 7 * SCALE_BITS
    assert np.dtype(np.float16).itemsize * 2 * 8 == SCALE_BITS


def test_subnormal_step_never_clips_the_top() -> None:
    """A range so narrow that its step is a float16 subnormal (hypothesis found bits=5,
    row [0, 1e-5]): widening the step by one float16 ulp, not by 2**-10, keeps the top."""
    _check_quant(torch.tensor([[0.0, 1e-5]]), 5)
