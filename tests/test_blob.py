"""The blob format (DESIGN.md, "Blob format"): self-describing, versioned, msgpack header,
raw DEFLATE payload (64 KiB pieces); truncated, corrupted or foreign bytes raise their named error."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtc_store.codec import (
    CalibrationStats,
    KVTCCodec,
    RopeParams,
    default_groups,
    fit_artifacts,
)
from kvtc_store.codec.blob import (
    FORMAT_VERSION,
    JOIN_UNLOCKED_MIN,
    MAGIC,
    BlobHeader,
    blob_size,
    join_bytes,
    pack_blob,
    pack_blob_parts,
    payload_checksum,
    payload_intact,
    unpack_blob,
    unpack_blob_header,
    verify_payload,
)
from kvtc_store.codec.entropy import PIECE_SIZE, pack_pieces
from kvtc_store.codec.rope import apply_rope
from kvtc_store.errors import (
    BlobCorruptError,
    BlobError,
    BlobFormatError,
    BlobTruncatedError,
    CodecMismatchError,
)

PREFIX = 18  # magic 4 + version 2 + header length 4 + header xxh64 8

# --- a small calibrated codec on synthetic low-rank KV -------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


L, H, D = 2, 2, 16
P = L * H * D
ROPE = RopeParams(head_dim=D, theta=1e4)
FP = "0123456789abcdef" * 4


def make_chunk(tokens: int, first: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (RoPE applied) and values ``(L, H, T, D)``: rank 6 plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 6, P, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, tokens, 6, generator=g) * torch.tensor([3.0, 2, 1.5, 1, 0.5, 0.3])
    kv = z @ w + 0.05 * torch.randn(2, tokens, P, generator=g)
    k, v = (t.reshape(tokens, L, H, D).permute(1, 2, 0, 3) for t in kv)
    return apply_rope(k, torch.arange(first, first + tokens), ROPE).contiguous(), v.contiguous()


@pytest.fixture(scope="module", params=["rans", "minmax"])
def arts(request):
    """Artifacts of both quantisers: the format tests run for each."""
    stats = CalibrationStats((L, H, D), ROPE, default_groups(L), n_sink=4, sample_tokens=512)
    for s in range(2):
        stats.add(*make_chunk(256, 0, seed=s))
    return fit_artifacts(
        stats, [8.0, 16.0], FP, "synthetic", block=8, window=16, quantizer=request.param
    )


@pytest.fixture(scope="module")
def codec(arts):
    return KVTCCodec(arts[0], coder="deflate")


@pytest.fixture(scope="module")
def chunk():
    return make_chunk(40, 0, seed=7)


@pytest.fixture(scope="module")
def blob(codec, chunk) -> bytes:
    """A blob with all three sections: sinks and a tail exact, the rest transform-coded."""
    b = codec.encode(*chunk, first_position=0, exact_tail=6)
    header, _ = unpack_blob(b)
    assert all(v > 0 for v in header.sections.values())
    return b


@dataclasses.dataclass(repr=False)
class _Case:
    """A codec and one of its blobs, with a short repr for hypothesis' reports."""

    codec: KVTCCodec
    blob: bytes

    def __repr__(self) -> str:
        return f"<codec blob of {len(self.blob)} bytes>"


@pytest.fixture(scope="module")
def case(codec, blob) -> _Case:
    return _Case(codec, blob)


def _hlen(b: bytes) -> int:
    return struct.unpack_from("<I", b, 6)[0]


def _repack(b: bytes, **changes) -> bytes:
    """The blob with header fields changed and both checksums made valid again."""
    header, payload = unpack_blob(b)
    return _raw_blob({**dataclasses.asdict(header), **changes}, bytes(payload))


def _raw_blob(header_obj, payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    """Any msgpack object as the header, with a valid header checksum."""
    hb = msgpack.packb(header_obj, use_bin_type=True)
    return struct.pack("<4sHIQ", MAGIC, version, len(hb), xxhash.xxh64_intdigest(hb)) + hb + payload


def _header(**kw) -> BlobHeader:
    fields = {
        "artifact_id": "a" * 16,
        "artifact_version": 3,
        "model": FP,
        "shape": [L, H, D, 8],
        "dtype": "bfloat16",
        "first_position": 12,
        "n_sink": 4,
        "exact_tail": 2,
        "exact_dtype": "bfloat16",
        "coder": "none",
        "sections": {"scales": 4, "codes": 5, "exact": 7},
    }
    fields.update(kw)
    return BlobHeader(**fields)


# --- layout --------------------------------------------------------------------------------


def test_layout_and_msgpack_header() -> None:
    payload = bytes(range(16))
    b = pack_blob(_header(), payload)
    magic, version, hlen, hsum = struct.unpack_from("<4sHIQ", b, 0)
    assert (magic, version) == (b"KVTC", 2) and MAGIC == b"KVTC" and FORMAT_VERSION == 2
    hb = b[PREFIX : PREFIX + hlen]
    assert hsum == xxhash.xxh64_intdigest(hb)
    assert b[PREFIX + hlen :] == payload
    fields = msgpack.unpackb(hb, raw=False)  # a plain msgpack map, not pickle
    assert isinstance(fields, dict) and hb[0] != 0x80
    assert fields["shape"] == [L, H, D, 8] and fields["dtype"] == "bfloat16"
    assert fields["first_position"] == 12 and fields["coder"] == "none"
    assert fields["model"] == FP and fields["artifact_id"] == "a" * 16
    assert fields["artifact_version"] == 3 and fields["step_exp"] == 0
    assert fields["sections"] == {"scales": 4, "codes": 5, "exact": 7}
    assert fields["payload_len"] == 16 and fields["payload_xxh64"] == xxhash.xxh64_intdigest(
        payload
    )


def test_pack_unpack_round_trip() -> None:
    payload = b"\x00\x01" * 50
    header, got = unpack_blob(pack_blob(_header(), payload))
    assert header == dataclasses.replace(
        _header(), payload_len=100, payload_xxh64=xxhash.xxh64_intdigest(payload)
    )
    assert bytes(got) == payload
    # any bytes-like input
    b = pack_blob(_header(), payload)
    assert bytes(unpack_blob(bytearray(b))[1]) == payload
    assert bytes(unpack_blob(memoryview(b))[1]) == payload


def test_blob_from_parts_equals_the_blob_of_their_concatenation() -> None:
    """The batched encoder builds blobs from a stream view and the exact tokens' bytes
    (one copy each); the bytes must be those of pack_blob on the joined payload."""
    a, b = bytes(range(256)) * 9, b"\x07" * 1001
    view = memoryview(np.frombuffer(a, dtype=np.uint8))[5:]
    whole = pack_blob(_header(), a[5:] + b)
    assert pack_blob_parts(_header(), [view, b]) == whole
    assert payload_checksum([view, b]) == xxhash.xxh64_intdigest(a[5:] + b)
    assert pack_blob_parts(_header(), [view, b], payload_checksum([view, b])) == whole
    assert pack_blob_parts(_header(), []) == pack_blob(_header(), b"")
    # a wrong checksum handed in is written as given, and the reader catches it
    with pytest.raises(BlobCorruptError):
        unpack_blob(pack_blob_parts(_header(), [view, b], 12345))


def test_join_bytes_large_parts_from_threads() -> None:
    """Blobs of a few MB are joined without the GIL (uninitialised bytes filled by
    memmove); from several threads at once each must equal b"".join of its parts."""
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, 3 * JOIN_UNLOCKED_MIN + 17, dtype=np.uint8)
    jobs = [[b"prefix", memoryview(big)[i:], b"", bytes(range(i % 256))] for i in range(0, 64, 5)]
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(join_bytes, jobs))
    for parts, got in zip(jobs, out):
        want = b"".join(parts)
        assert type(got) is bytes and got == want and hash(got) == hash(want)
    small = [b"a", memoryview(b"bc")]
    assert join_bytes(small) == b"abc"
    words = np.arange(JOIN_UNLOCKED_MIN, dtype=np.int16)  # any item size: its bytes
    assert join_bytes([b"x", words]) == b"x" + words.tobytes()
    for strided in (memoryview(big)[::2], big[::2]):  # no single run of bytes to copy
        with pytest.raises(BufferError):
            join_bytes([strided])
    assert join_bytes([]) == b"" and join_bytes([b"", memoryview(b"")]) == b""


def test_empty_payload() -> None:
    header, payload = unpack_blob(pack_blob(_header(), b""))
    assert header.payload_len == 0 and bytes(payload) == b""


# --- damage at the format level ---------------------------------------------------------------


def test_truncated_at_every_cut_point() -> None:
    b = pack_blob(_header(), bytes(range(40)))
    for cut in range(len(b)):
        with pytest.raises(BlobTruncatedError):
            unpack_blob(b[:cut])


def test_trailing_bytes_are_corruption() -> None:
    b = pack_blob(_header(), b"payload")
    with pytest.raises(BlobCorruptError):
        unpack_blob(b + b"\x00")


def test_blob_size_finds_a_blob_in_a_larger_buffer() -> None:
    b = pack_blob(_header(), bytes(range(40)))
    buffer = b + bytes(1000)  # a fixed-size container's buffer: the blob, then anything
    assert blob_size(buffer) == len(b) == blob_size(b)
    assert unpack_blob(buffer[: blob_size(buffer)])[1] == bytes(range(40))


def test_blob_size_refuses_what_is_no_blob() -> None:
    b = pack_blob(_header(), b"payload")
    with pytest.raises(BlobFormatError):
        blob_size(bytes(len(b)))  # a zeroed buffer: nothing was ever written
    with pytest.raises(BlobTruncatedError):
        blob_size(b[: PREFIX + 3])  # ends inside the header
    bad = bytearray(b)
    bad[PREFIX + 2] ^= 0x10  # inside the header
    with pytest.raises(BlobCorruptError):
        blob_size(bytes(bad))


def _expected_for_flip(offset: int, hlen: int):
    if offset < 6:
        return (BlobFormatError,)  # magic or version
    if offset < 10:
        return (BlobTruncatedError, BlobCorruptError)  # header length: too long or wrong
    return (BlobCorruptError,)  # header checksum, header, payload


def test_every_single_byte_flip_is_detected() -> None:
    b = pack_blob(_header(), bytes(range(64)))
    hlen = _hlen(b)
    for offset in range(len(b)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(b)
            bad[offset] ^= mask
            with pytest.raises(_expected_for_flip(offset, hlen)):
                unpack_blob(bytes(bad))


def test_header_only_parse_defers_exactly_the_payload_checksum() -> None:
    """``unpack_blob_header`` raises what ``unpack_blob`` raises for every byte flip,
    except a flip in the payload, which only ``payload_intact``/``verify_payload`` see."""
    b = pack_blob(_header(), bytes(range(64)))
    payload_at = len(b) - 64
    for offset in range(len(b)):
        bad = bytearray(b)
        bad[offset] ^= 0x80
        if offset < payload_at:
            with pytest.raises(_expected_for_flip(offset, _hlen(b))) as full:
                unpack_blob(bytes(bad))
            with pytest.raises(type(full.value), match=re.escape(str(full.value))):
                unpack_blob_header(bytes(bad))
            continue
        header, payload = unpack_blob_header(bytes(bad))
        assert header == unpack_blob(b)[0] and bytes(payload) == bytes(bad[payload_at:])
        assert not payload_intact(header, payload)
        with pytest.raises(BlobCorruptError, match="payload checksum"):
            verify_payload(header, payload)
    header, payload = unpack_blob_header(b)
    assert payload_intact(header, payload)
    verify_payload(header, payload)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        pickle.dumps({"shape": [1, 2, 3]}),
        gzip.compress(b"hello world" * 10),
        b"kvtc" + b"\x01\x00" + b"\x00" * 30,
        b"\x00" * 64,
        b"not a blob",
        b"KVTX" + b"\x00" * 30,
    ],
)
def test_foreign_bytes_raise_format_error(data) -> None:
    with pytest.raises(BlobFormatError):
        unpack_blob(data)


@pytest.mark.parametrize("data", [b"", b"K", b"KV", b"KVT", b"KVTC", b"KVTC\x01\x00"])
def test_prefixes_of_a_blob_are_truncated(data) -> None:
    with pytest.raises(BlobTruncatedError):
        unpack_blob(data)


@pytest.mark.parametrize("version", [0, 3, 7, 0xFFFF])
def test_unknown_format_version(version) -> None:
    b = _raw_blob(dataclasses.asdict(_header()), b"", version=version)
    with pytest.raises(BlobFormatError):
        unpack_blob(b)


@pytest.mark.parametrize(
    "header_obj",
    [
        [1, 2, 3],
        "a string",
        42,
        {"artifact_id": "x"},  # fields missing
        {**dataclasses.asdict(_header()), "surprise": 1},  # a field this version lacks
    ],
    ids=["list", "str", "int", "missing fields", "extra field"],
)
def test_malformed_header_with_valid_checksum_is_corrupt(header_obj) -> None:
    with pytest.raises(BlobCorruptError):
        unpack_blob(_raw_blob(header_obj, b""))


def test_header_that_is_not_msgpack_is_corrupt() -> None:
    hb = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    b = struct.pack("<4sHIQ", MAGIC, 1, len(hb), xxhash.xxh64_intdigest(hb)) + hb
    with pytest.raises(BlobCorruptError):
        unpack_blob(b)


@pytest.mark.parametrize(
    "field,value", [("payload_len", "12"), ("payload_len", None), ("payload_len", [3])]
)
def test_header_field_of_wrong_type_is_corrupt(field, value) -> None:
    """A header whose checksum matches but whose fields have the wrong types is a
    malformed header: BlobCorruptError, not a TypeError."""
    fields = {**dataclasses.asdict(_header()), "payload_len": 3, "payload_xxh64": 0}
    fields[field] = value
    with pytest.raises(BlobCorruptError):
        unpack_blob(_raw_blob(fields, b"abc"))


# --- damage through the codec ----------------------------------------------------------------


def test_codec_blob_truncated_at_many_cut_points(codec, blob) -> None:
    cuts = sorted(set(range(40)) | set(range(40, len(blob), 7)) | {len(blob) - 1})
    for cut in cuts:
        with pytest.raises(BlobTruncatedError):
            codec.decode(blob[:cut])
        with pytest.raises(BlobTruncatedError):
            codec.read_header(blob[:cut])


def test_codec_blob_every_byte_flip(codec, blob) -> None:
    hlen = _hlen(blob)
    for offset in range(len(blob)):
        bad = bytearray(blob)
        bad[offset] ^= 0x10
        with pytest.raises(_expected_for_flip(offset, hlen)):
            codec.decode(bytes(bad))


def test_codec_blob_flip_in_header_and_payload_is_corrupt(codec, blob) -> None:
    hlen = _hlen(blob)
    for offset in (PREFIX, PREFIX + hlen // 2, PREFIX + hlen - 1, PREFIX + hlen, len(blob) - 1):
        bad = bytearray(blob)
        bad[offset] ^= 0x01
        with pytest.raises(BlobCorruptError):
            codec.decode(bytes(bad))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_damage_only_raises_blob_errors(case, data) -> None:
    codec, blob = case.codec, case.blob
    bad = bytearray(blob)
    offsets = data.draw(st.sets(st.integers(0, len(bad) - 1), min_size=1, max_size=4))
    for offset in offsets:
        bad[offset] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        bad = bad[: data.draw(st.integers(0, len(bad) - 1))]
    with pytest.raises(BlobError):
        codec.decode(bytes(bad))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: MAGIC + b))
def test_random_bytes_only_raise_blob_errors(case, data) -> None:
    with pytest.raises(BlobError):
        case.codec.decode(data)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(
        ["shape", "first_position", "exact_tail", "sections", "dtype", "n_sink", "exact_dtype"]
    ),
    value=st.one_of(
        st.integers(-(2**20), 2**20),
        st.text(max_size=5),
        st.none(),
        st.lists(st.integers(-3, 100), max_size=5),
        st.dictionaries(
            st.sampled_from(["stream", "scales", "codes", "exact"]), st.integers(0, 10**4)
        ),
    ),
)
def test_lying_header_with_valid_checksums_only_raises_blob_errors(case, field, value) -> None:
    """A header that passed its checksum but lies (a buggy or foreign writer) still never
    returns garbage or escapes as another exception."""
    codec, blob = case.codec, case.blob
    bad = _repack(blob, **{field: value})
    try:
        dec = codec.decode(bad)
    except BlobError:
        return
    # decoding may only succeed when the lie changed nothing that matters
    ref = codec.decode(blob)
    torch.testing.assert_close(dec.keys.float(), ref.keys, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dec.values.float(), ref.values, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "changes",
    [
        {"shape": [L, H, D, 41]},
        {"shape": [L, H + 1, D, 40]},
        {"first_position": 100},  # sinks no longer exact: sections disagree
        {"exact_tail": 3},
        {"sections": {"stream": 1, "scales": 1, "codes": 2, "exact": 3}},
    ],
)
def test_header_lying_about_sizes_is_corrupt(codec, blob, changes) -> None:
    with pytest.raises(BlobCorruptError):
        codec.decode(_repack(blob, **changes))


@pytest.mark.parametrize("field,value", [("model", 123), ("artifact_id", None), ("model", None)])
def test_identity_fields_of_wrong_type_raise_blob_errors(codec, blob, field, value) -> None:
    with pytest.raises(BlobError):
        codec.decode(_repack(blob, **{field: value}))


def test_unknown_coder_is_format_error(codec, blob, arts) -> None:
    with pytest.raises(BlobFormatError):
        codec.decode(_repack(blob, coder="zstd"))
    with pytest.raises(BlobFormatError):
        KVTCCodec(arts[0], coder="zstd")


# --- other artifact or model ----------------------------------------------------------------


def test_blob_from_another_artifact_is_mismatch(arts, chunk) -> None:
    a, b = KVTCCodec(arts[0]), KVTCCodec(arts[1])
    assert arts[0].artifact_id != arts[1].artifact_id
    blob = b.encode(*chunk, first_position=0)
    with pytest.raises(CodecMismatchError):
        a.decode(blob)
    with pytest.raises(CodecMismatchError):
        a.read_header(blob)
    a.decode(a.encode(*chunk, first_position=0))  # its own blobs are fine


def test_blob_for_another_model_is_mismatch(arts, chunk) -> None:
    other = dataclasses.replace(arts[0], model_fingerprint="f" * 64, artifact_id="")
    blob = KVTCCodec(other).encode(*chunk, first_position=0)
    with pytest.raises(CodecMismatchError, match="model"):
        KVTCCodec(arts[0]).decode(blob)
    # even with the artifact id forged to match, the model fingerprint is checked
    forged = _repack(blob, artifact_id=arts[0].artifact_id)
    with pytest.raises(CodecMismatchError):
        KVTCCodec(arts[0]).decode(forged)


def test_blob_from_artifact_with_other_rope_is_mismatch(arts, chunk) -> None:
    """Same tensors and plan, other RoPE base: the decoder would re-rotate keys wrongly."""
    other = dataclasses.replace(arts[0], rope=RopeParams(head_dim=D, theta=5e5), artifact_id="")
    blob = KVTCCodec(other).encode(*chunk, first_position=100)
    with pytest.raises(CodecMismatchError):
        KVTCCodec(arts[0]).decode(blob)


# --- the payload ------------------------------------------------------------------------------


def _inflate_with_zlib(payload) -> bytes:
    """A ``deflate64k`` payload inflated by plain zlib, read as docs/blob-format.md says."""
    payload = bytes(payload)
    (n,) = struct.unpack_from("<I", payload)
    sizes = struct.unpack_from(f"<{n}I", payload, 4)
    o, raw = 4 + 4 * n, []
    for c in sizes:
        o = -(-o // 16) * 16
        raw.append(zlib.decompress(payload[o : o + c], -15))  # no header, no isal
        o += c
    assert o == len(payload)
    return b"".join(raw)


def test_deflate_payload_is_raw_streams_of_64k_pieces(codec, blob, chunk) -> None:
    header, payload = unpack_blob(blob)
    assert header.coder == "deflate64k"  # what a request for "deflate" writes
    raw = _inflate_with_zlib(payload)
    assert len(raw) == sum(header.sections.values())
    # sections in order (scales, codes | stream), exact; exact is bfloat16-planes: the
    # bf16 values of keys then values in (L, H, D, n) order, every high byte, then every
    # low byte (docs/blob-format.md), read here with numpy alone
    keys, values = chunk
    idx = [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]
    exact = raw[sum(v for k, v in header.sections.items() if k != "exact") :]
    bf16 = [t[:, :, idx].to(torch.bfloat16).view(torch.int16).numpy() for t in (keys, values)]
    bits = np.stack(bf16).view(np.uint16).transpose(0, 1, 2, 4, 3).reshape(-1)
    assert header.exact_dtype == "bfloat16-planes"
    hi, lo = (bits >> 8).astype(np.uint8), (bits & 0xFF).astype(np.uint8)
    assert exact == hi.tobytes() + lo.tobytes()


def test_payload_written_by_zlib_decodes_the_same(codec, blob) -> None:
    """Streams from any raw-DEFLATE writer (zlib here, nvCOMP on a GPU) are interchangeable,
    in 64 KiB pieces or, as older blobs have them, one stream for the whole payload."""
    header, payload = unpack_blob(blob)
    raw = _inflate_with_zlib(payload)
    for level in (1, 6, 9):
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        stream = c.compress(raw) + c.flush()
        pieces = []
        for s in range(0, len(raw), PIECE_SIZE):
            c = zlib.compressobj(level, zlib.DEFLATED, -15)
            pieces.append(c.compress(raw[s : s + PIECE_SIZE]) + c.flush())
        legacy = pack_blob(dataclasses.replace(header, coder="deflate"), stream)
        other = pack_blob(dataclasses.replace(header), pack_pieces(pieces))
        a = codec.decode(blob)
        for b in (codec.decode(other), codec.decode(legacy)):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_coder_none_stores_sections_verbatim(arts, codec, chunk, blob) -> None:
    plain = KVTCCodec(arts[0], coder="none")
    nb = plain.encode(*chunk, first_position=0, exact_tail=6)
    header, payload = unpack_blob(nb)
    assert header.coder == "none"
    assert bytes(payload) == _inflate_with_zlib(unpack_blob(blob)[1])
    a, b = plain.decode(nb), codec.decode(blob)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # a short "none" payload (with matching checksums) is corruption, not garbage
    with pytest.raises(BlobCorruptError):
        plain.decode(pack_blob(dataclasses.replace(header), bytes(payload)[:-1]))


def test_header_records_the_chunk(codec, blob) -> None:
    header = codec.read_header(blob)
    assert header.shape == [L, H, D, 40]
    assert header.dtype == "float32" and header.exact_dtype == "bfloat16-planes"
    assert header.first_position == 0 and header.exact_tail == 6 and header.n_sink == 4
    assert header.model == FP and header.artifact_id == codec.artifact.artifact_id
    assert header.artifact_version == codec.artifact.version
