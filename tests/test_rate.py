"""Rate control (kvtc_store.codec.rate) and the float8 exact tokens (kvtc_store.codec.exact):
blobs land on the target ratio whatever the chunk's energy, older blobs still decode, and
a corrupt header field is a named error."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch
import xxhash

from kvtc_store.codec import KVTCCodec, default_groups, fit_artifacts
from kvtc_store.codec.blob import MAGIC, pack_blob, unpack_blob
from kvtc_store.codec.exact import exact_nbytes, pack_exact, unpack_exact
from kvtc_store.codec.rate import STEP_EXP_MAX, step_multiplier
from kvtc_store.errors import BlobCorruptError
from tests.test_codec import FP, HOLDOUT, WINDOW, D, H, L, P, _stats, make_chunk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def art16():
    (art,) = fit_artifacts(
        _stats(default_groups(L)), [16.0], FP, "synthetic", holdout=[HOLDOUT], block=8,
        window=WINDOW, calibration={"data_hash": "abc"},
    )  # fmt: skip
    return art


def _honest(blob: bytes, tokens: int) -> float:
    return 2 * L * H * tokens * D * 2 / len(blob)


@pytest.mark.parametrize("energy", [0.1, 0.3, 1.0, 3.0, 10.0])
def test_rate_control_lands_on_the_target_at_any_energy(art16, energy) -> None:
    """Chunks whose coefficients are 10x smaller or larger than the calibration's still
    land within 5% of the target; without rate control they miss it by far."""
    keys, values = make_chunk(512, 3000, seed=21)
    mk, mv = keys.mean(dim=2, keepdim=True), values.mean(dim=2, keepdim=True)
    keys, values = mk + energy * (keys - mk), mv + energy * (values - mv)
    blob = KVTCCodec(art16).encode(keys, values, 3000)
    assert abs(_honest(blob, 512) / 16 - 1) <= 0.05, _honest(blob, 512)
    header, _ = unpack_blob(blob)
    fixed = KVTCCodec(art16, rate_control=False).encode(keys, values, 3000)
    assert unpack_blob(fixed)[0].step_exp == 0
    if energy >= 3:  # coarser steps than calibrated, and the fixed steps overshoot
        assert header.step_exp > 0 and _honest(fixed, 512) < 0.9 * 16
    if energy <= 0.3:  # finer steps, and the fixed ones leave bits unspent
        assert header.step_exp < 0 and _honest(fixed, 512) > 1.1 * 16


def test_rate_control_decodes_at_the_chosen_steps(art16) -> None:
    """The decoder applies the header's multiplier: error follows the step size, and a
    blob decodes the same through a codec without rate control (it reads the header)."""
    keys, values = make_chunk(256, 0, seed=3)
    rated = KVTCCodec(art16)
    blob = rated.encode(3 * keys, 3 * values, 0)
    dec = KVTCCodec(art16, rate_control=False).decode(blob, dtype=torch.float32)
    assert torch.equal(dec.keys, rated.decode(blob, dtype=torch.float32).keys)
    header, payload = unpack_blob(blob)
    ignored = KVTCCodec(art16).decode(pack_blob(dataclasses.replace(header, step_exp=0), payload))
    err = ((dec.values - 3 * values) ** 2).mean().item()
    err_ignored = ((ignored.values - 3 * values) ** 2).mean().item()
    assert err < 0.5 * err_ignored  # the multiplier is applied, not off by it
    assert unpack_blob(blob)[0].step_exp > 0


def test_step_exp_beyond_the_range_is_capped_not_a_crash(art16) -> None:
    """A chunk no step can fit (huge values) takes the coarsest exponent and decodes."""
    keys, values = make_chunk(64, 0, seed=4)
    codec = KVTCCodec(art16)
    blob = codec.encode(keys * 1e5, values * 1e5, 0)
    header, _ = unpack_blob(blob)
    assert header.step_exp <= STEP_EXP_MAX
    out = codec.decode(blob, dtype=torch.float32)
    assert torch.isfinite(out.keys).all() and torch.isfinite(out.values).all()


def _raw(header: dict, payload: bytes, version: int) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    prefix = MAGIC + version.to_bytes(2, "little") + len(hb).to_bytes(4, "little")
    return prefix + xxhash.xxh64_intdigest(hb).to_bytes(8, "little") + hb + payload


def test_format_version_1_blobs_still_decode(art16) -> None:
    """A blob written before rate control (format 1, no step_exp field) decodes as it did:
    its steps are the calibrated ones."""
    keys, values = make_chunk(256, 0, seed=5)
    codec = KVTCCodec(art16, rate_control=False)
    blob = codec.encode(keys, values, 0, exact_tail=16)
    header, payload = unpack_blob(blob)
    fields = dataclasses.asdict(header)
    del fields["step_exp"]
    old = _raw(fields, bytes(payload), version=1)
    a, b = KVTCCodec(art16).decode(old), codec.decode(blob)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("field,value", [("step_exp", 10_000), ("exact_dtype", "int3")])
def test_header_fields_out_of_range_are_corrupt(art16, field, value) -> None:
    keys, values = make_chunk(64, 0, seed=6)
    header, payload = unpack_blob(KVTCCodec(art16).encode(keys, values, 0))
    bad = pack_blob(dataclasses.replace(header, **{field: value}), bytes(payload))
    with pytest.raises(BlobCorruptError):
        KVTCCodec(art16).decode(bad)


# --- float8 exact tokens --------------------------------------------------------------------


def test_fp8_exact_section_round_trip_and_size() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 2, 5, 16, generator=g) * torch.logspace(-3, 3, 5)[None, None, :, None]
    v = torch.randn(3, 2, 5, 16, generator=g)
    v[1, 1, 2] = 0  # an all-zero vector keeps scale 1
    raw = pack_exact(k, v, "float8_e4m3fn")
    assert raw.dtype == torch.uint8 and raw.numel() == exact_nbytes(3, 2, 5, 16, "float8_e4m3fn")
    assert raw.numel() == 2 * 3 * 2 * 5 * (16 + 2)  # a float16 scale per vector
    ek, ev = unpack_exact(raw, 3, 2, 5, 16, "float8_e4m3fn")
    for x, y in ((k, ek), (v, ev)):  # e4m3 keeps 3 mantissa bits: |error| <= 1/16 of |x|
        rel = (x - y).abs() / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        assert rel.max() <= 1 / 16 + 1e-3
    assert ev[1, 1, 2].eq(0).all()
    bk, _ = unpack_exact(pack_exact(k, v, "bfloat16"), 3, 2, 5, 16, "bfloat16")
    assert torch.equal(bk, k.to(torch.bfloat16))
    with pytest.raises(ValueError):
        pack_exact(k, v, "int4")
    with pytest.raises(ValueError):
        unpack_exact(raw[:-1], 3, 2, 5, 16, "float8_e4m3fn")


def test_fp8_exact_tokens_in_blobs(art16) -> None:
    """A codec storing exact tokens in float8 writes smaller blobs that any codec reads;
    its compressed tokens decode as with bfloat16 exact tokens."""
    keys, values = make_chunk(64, 0, seed=9)
    bf = KVTCCodec(art16)
    f8 = KVTCCodec(art16, exact_dtype="float8_e4m3fn")
    b_bf = bf.encode(keys, values, 0, exact_tail=20)
    b_f8 = f8.encode(keys, values, 0, exact_tail=20)
    h = unpack_blob(b_f8)[0]
    assert h.exact_dtype == "float8_e4m3fn"
    assert h.sections["exact"] == 2 * L * H * 24 * (D + 2)  # 4 sinks + 20 tail
    assert len(b_f8) < len(b_bf)
    d_bf, d_f8 = bf.decode(b_f8), f8.decode(b_bf)  # each reads the other's
    exact = torch.zeros(64, dtype=torch.bool)
    exact[:4] = exact[-20:] = True
    err = (d_bf.keys[:, :, exact] - keys[:, :, exact]).abs()
    assert err.max() <= keys[:, :, exact].abs().amax() / 16
    assert torch.equal(d_f8.keys[:, :, exact], keys[:, :, exact].to(torch.bfloat16).float())
    assert torch.equal(d_bf.keys[:, :, ~exact], bf.decode(b_bf).keys[:, :, ~exact])
    with pytest.raises(ValueError):
        KVTCCodec(art16, exact_dtype="float4")


def test_step_multiplier() -> None:
    assert step_multiplier(0) == 1.0 and step_multiplier(8) == 2.0 and step_multiplier(-16) == 0.25
    assert torch.equal(step_multiplier(torch.tensor([8, -8])), torch.tensor([2.0, 0.5]).double())
    assert P == L * H * D
