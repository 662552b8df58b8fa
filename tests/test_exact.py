"""The exact section's encodings (:mod:`kvtc_store.codec.exact`): ``bfloat16-planes`` is
the cached bfloat16 values bit for bit, for every bit pattern, on CPU and CUDA; blobs that
carry it are DEFLATEd and no others (with the default coder); blobs of the older
encodings (``bfloat16``, ``float8_e4m3fn``) decode with the default codec; and on the real
SmolLM2's KV the planes make the stored sequence smaller and change no decoded value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtc_store.codec import KVTCCodec
from kvtc_store.codec.blob import unpack_blob
from kvtc_store.codec.exact import (
    DEFAULT_EXACT_DTYPE,
    EXACT_DTYPES,
    exact_nbytes,
    pack_exact,
    unpack_exact,
)
from tests.test_codec import arts, make_chunk  # noqa: F401 - artifact fixture
from tests.test_fp8_tail import DEVICES  # cpu, and cuda (marked gpu) where it runs


def _bits(x: torch.Tensor) -> np.ndarray:
    """The bfloat16 bit patterns of ``x`` as uint16 (numpy, CPU)."""
    return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)


def _every_bf16(shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``shape`` ``(L, H, n, D)`` holding every one of the 65,536
    bfloat16 bit patterns (NaNs of both signs and payloads, ±inf, ±0, subnormals), in a
    seeded random order, then random patterns to fill."""
    count = 2 * int(np.prod(shape))
    g = torch.Generator().manual_seed(17)
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32)
    fill = torch.randint(-(1 << 15), 1 << 15, (max(0, count - every.numel()),), generator=g)
    pats = torch.cat([every, fill.int()])[:count]
    pats = pats[torch.randperm(pats.numel(), generator=g)]
    kv = pats.to(torch.int16).view(torch.bfloat16).view(2, *shape)
    return kv[0], kv[1]


@pytest.mark.parametrize("device", DEVICES)
def test_planes_round_trip_every_bit_pattern(device) -> None:
    keys, values = (x.to(device) for x in _every_bf16((3, 2, 173, 64)))  # 66,432 values
    raw = pack_exact(keys, values, "bfloat16-planes")
    assert raw.dtype == torch.uint8 and raw.device.type == torch.device(device).type
    assert raw.numel() == exact_nbytes(3, 2, 173, 64, "bfloat16-planes")
    k, v = unpack_exact(raw, 3, 2, 173, 64, "bfloat16-planes")
    assert k.dtype == v.dtype == torch.bfloat16 and k.shape == (3, 2, 173, 64)
    assert k.device == raw.device
    assert np.array_equal(_bits(k), _bits(keys)) and np.array_equal(_bits(v), _bits(values))
    # at an odd offset of a larger buffer (as inside a payload): still the same bits
    buf = torch.cat([torch.zeros(3, dtype=torch.uint8, device=device), raw])
    k2, v2 = unpack_exact(buf[3:], 3, 2, 173, 64, "bfloat16-planes")
    assert np.array_equal(_bits(k2), _bits(keys)) and np.array_equal(_bits(v2), _bits(values))


def test_planes_layout_is_the_documented_one() -> None:
    """High bytes of ``(2, L, H, D, n)`` in order, then low bytes (docs/blob-format.md),
    computed with numpy alone; float32 input is rounded to bfloat16 as in ``bfloat16``."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    raw = pack_exact(keys, values, "bfloat16-planes").numpy()
    bits = np.stack([_bits(keys), _bits(values)]).transpose(0, 1, 2, 4, 3).reshape(-1)
    assert np.array_equal(raw[: bits.size], (bits >> 8).astype(np.uint8))
    assert np.array_equal(raw[bits.size :], (bits & 0xFF).astype(np.uint8))
    plain = pack_exact(keys, values, "bfloat16").numpy().view(np.uint16)
    assert np.array_equal(np.sort(plain), np.sort(bits))  # the same values, permuted


def test_default_is_planes_and_unknown_dtypes_are_refused() -> None:
    assert DEFAULT_EXACT_DTYPE == "bfloat16-planes" and DEFAULT_EXACT_DTYPE in EXACT_DTYPES
    with pytest.raises(ValueError, match="unknown exact dtype"):
        pack_exact(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), "bfloat16-shuffle")
    with pytest.raises(ValueError, match="bytes"):
        unpack_exact(torch.zeros(7, dtype=torch.uint8), 1, 1, 1, 2, "bfloat16-planes")


def test_default_coder_deflates_blobs_with_exact_tokens_only(arts) -> None:  # noqa: F811
    """``rans``: ``deflate64k`` for a blob with exact tokens in planes, ``none`` for one
    without and for every blob of the older encodings; a named coder for every blob;
    ``minmax``: ``deflate64k`` for every blob, as before."""
    art = arts["all", 8.0]
    keys, values = make_chunk(64, 0, seed=5)
    codec = KVTCCodec(art)
    assert codec.exact_dtype == "bfloat16-planes"
    with_exact = unpack_blob(codec.encode(keys, values, 0, exact_tail=8))[0]
    without = unpack_blob(codec.encode(keys, values, 5000))[0]
    assert with_exact.exact_dtype == without.exact_dtype == "bfloat16-planes"
    assert with_exact.sections["exact"] > 0 and without.sections["exact"] == 0
    if art.quantizer == "rans":
        assert (with_exact.coder, without.coder) == ("deflate64k", "none")
    else:
        assert with_exact.coder == without.coder == "deflate64k"
    for dtype in ("bfloat16", "float8_e4m3fn"):
        old = unpack_blob(KVTCCodec(art, exact_dtype=dtype).encode(keys, values, 0, 0, None))
        assert old[0].coder == ("none" if art.quantizer == "rans" else "deflate64k")
    for coder, name in (("none", "none"), ("deflate", "deflate64k")):
        named = KVTCCodec(art, coder=coder)
        for first, tail in ((0, 8), (5000, 0)):
            assert unpack_blob(named.encode(keys, values, first, tail))[0].coder == name


def test_older_encodings_decode_with_the_default_codec(arts) -> None:  # noqa: F811
    """Blobs of ``bfloat16`` (what every blob before ``bfloat16-planes`` holds) and
    ``float8_e4m3fn`` decode with a default codec exactly as with their writer; the
    planes blob decodes to the same values as the ``bfloat16`` one, bit for bit."""
    art = arts["all", 8.0]
    keys, values = make_chunk(64, 0, seed=6)
    reader = KVTCCodec(art)
    decoded = {}
    for dtype in EXACT_DTYPES:
        writer = KVTCCodec(art, exact_dtype=dtype)
        blob = writer.encode(keys, values, 0, exact_tail=8)
        assert unpack_blob(blob)[0].exact_dtype == dtype
        got, want = reader.decode(blob), writer.decode(blob)
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        decoded[dtype] = got
    a, b = decoded["bfloat16-planes"], decoded["bfloat16"]
    assert np.array_equal(_bits(a.keys), _bits(b.keys))
    assert np.array_equal(_bits(a.values), _bits(b.values))


def test_real_kv_planes_are_lossless_and_smaller(smollm2, artifact8, doc_kv) -> None:
    """SmolLM2's real KV (400 tokens of Python's docs, two chunks with the sinks and the
    128-token window): the planes blobs decode to the very values the ``bfloat16`` blobs
    give (exact tokens equal to the cached bfloat16 bit for bit), and are smaller."""
    _, keys, values = doc_kv
    keys, values = keys[:, :, :400], values[:, :, :400]
    exact = torch.zeros(400, dtype=torch.bool)
    exact[:4] = True
    exact[-128:] = True
    sizes, decoded = {}, {}
    for dtype in ("bfloat16-planes", "bfloat16"):
        codec = KVTCCodec(artifact8, exact_dtype=dtype)
        blobs = codec.encode_sequence(keys, values, 0, chunk_tokens=256)
        sizes[dtype] = [len(b) for b in blobs]
        chunks, error = codec.decode_prefix(blobs)
        assert error is None
        decoded[dtype] = [torch.cat([getattr(c, x) for c in chunks], 2) for x in ("keys", "values")]
    for got, want in zip(decoded["bfloat16-planes"], (keys, values)):
        assert np.array_equal(_bits(got[:, :, exact]), _bits(want[:, :, exact]))
    for a, b in zip(decoded["bfloat16-planes"], decoded["bfloat16"]):
        assert torch.equal(a, b)
    planes, plain = sizes["bfloat16-planes"], sizes["bfloat16"]
    # the exact section is 2 * 30 * 3 * 64 * 2 = 23,040 bytes a token; DEFLATE over the
    # planes saves over 25% of it on real KV (1.4x measured), far beyond any stream cost
    exact_bytes = 23_040 * int(exact.sum())
    assert sum(plain) - sum(planes) > 0.25 * exact_bytes, (planes, plain)
