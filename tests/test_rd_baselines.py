"""The rate-distortion benchmark's baselines, byte accounting and result merging
(benchmarks/rd), on random tensors: no model.

Each baseline's round trip must stay within its quantiser's error bound, keep the tokens
it promises exact, and count every stored byte; quality.json rows from different runs
must merge by (method, target ratio) without losing other runs' rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.rd import report, rows, targets
from benchmarks.rd.accounting import ByteCount, roundtrip_counted
from benchmarks.rd.base import Roundtrip, bf16_bytes, middle_chunks
from benchmarks.rd.bf16 import BF16
from benchmarks.rd.fp8 import fp8_cast, fp8_per_token
from benchmarks.rd.int_group import IntGroupQuant, int4_group64, int8_per_token
from benchmarks.rd.kivi import KIVI
from benchmarks.rd.kvtc import KVTC
from kvtc_store.codec import KVTCCodec
from tests.test_codec import arts, make_chunk  # noqa: F401 - synthetic artifact fixture

pytestmark = pytest.mark.usefixtures("one_thread")

L, H, T, D = 2, 3, 600, 64  # 600 tokens: two full 256-token chunks and a short one


def _kv(seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, T, D, generator=g) * scale
    k[:, :, :, 5] += 20.0  # an outlier channel, as real keys have
    v = torch.randn(L, H, T, D, generator=g)
    return k, v


def _group_bound(x: torch.Tensor, rows: int, group: int, bits: int) -> torch.Tensor:
    """Half a quantisation step of each group, broadcast back to its values, plus the
    float16 rounding of the zero point and step."""
    g = x.reshape(rows, group)
    rng = g.amax(1, keepdim=True) - g.amin(1, keepdim=True)
    step = rng / ((1 << bits) - 1)
    slack = 1e-3 * (g.abs().amax(1, keepdim=True) + rng)
    return (step / 2 * (1 + 2**-9) + slack).expand_as(g)


@pytest.mark.parametrize("make, bits", [(int8_per_token, 8), (int4_group64, 4)])
def test_int_group_error_within_half_step(make, bits):
    k, v = _kv()
    m = make()
    rt = m.roundtrip(k, v)
    assert rt.keys.shape == k.shape and rt.keys.dtype == k.dtype
    rows_ = L * H * T * D // 64
    for x, y in ((k, rt.keys), (v, rt.values)):
        err = (x - y).abs().reshape(rows_, 64)
        assert (err <= _group_bound(x, rows_, 64, bits)).all()
    assert rt.chunk_tokens == [256, 256, 88]


def test_int_group_rejects_group_not_dividing_head_dim():
    k, v = _kv()
    with pytest.raises(ValueError, match="does not divide"):
        IntGroupQuant(name="int4-g48", bits=4, group=48).roundtrip(k, v)


def test_fp8_cast_and_per_token_scale_error():
    k, v = _kv()
    for m in (fp8_cast(), fp8_per_token()):
        rt = m.roundtrip(k, v)
        for x, y in ((k, rt.keys), (v, rt.values)):
            # e4m3: 3 mantissa bits (relative error <= 2^-4); per-token scaling also
            # rounds the float16 scale; subnormals below 2^-6 have absolute steps of 2^-9
            scale = x.abs().amax(-1, keepdim=True) / 448 if m.name == "fp8-token" else 1.0
            bound = x.abs() * (2**-4 + 2**-10) + 2**-10 * scale
            assert ((x - y).abs() <= bound * 1.01).all(), m.name
    # the plain cast saturates at the format's maximum instead of producing NaN
    big = torch.full((1, 1, 4, D), 1000.0)
    rt = fp8_cast().roundtrip(big, -big)
    assert torch.equal(rt.keys, torch.full_like(big, 448.0))
    assert torch.equal(rt.values, torch.full_like(big, -448.0))


def test_bf16_is_a_bf16_cast():
    k, v = _kv()
    rt = BF16().roundtrip(k, v)
    assert torch.equal(rt.keys, k.to(torch.bfloat16).float())
    assert torch.equal(rt.values, v.to(torch.bfloat16).float())


def test_kivi_keys_per_channel_values_per_token_window_exact():
    k, v = _kv()
    rt = KIVI().roundtrip(k, v)
    # chunks [0, 256), [256, 512), [512, 600); the window is tokens [472, 600). Chunk 1
    # quantises whole 32-token key groups before the window, [256, 448); KIVI's residual
    # keeps [448, 472) exact too; chunk 2 is all window.
    exact = 448
    assert torch.equal(rt.keys[:, :, exact:], k[:, :, exact:].bfloat16().float())
    assert torch.equal(rt.values[:, :, exact:], v[:, :, exact:].bfloat16().float())
    assert not torch.equal(rt.keys[:, :, exact - 32 : exact], k[:, :, exact - 32 : exact])
    # keys in groups of 32 tokens per channel
    kq = k[:, :, :256].reshape(L, H, 8, 32, D).transpose(3, 4).contiguous()
    kq_hat = rt.keys[:, :, :256].reshape(L, H, 8, 32, D).transpose(3, 4)
    rows_ = L * H * 8 * D
    err = (kq - kq_hat).abs().reshape(rows_, 32)
    assert (err <= _group_bound(kq, rows_, 32, 2)).all()
    # values in groups of 32 channels per token
    vq, vq_hat = v[:, :, :256].contiguous(), rt.values[:, :, :256]
    rows_ = L * H * 256 * 2
    err = (vq - vq_hat).abs().reshape(rows_, 32)
    assert (err <= _group_bound(vq, rows_, 32, 2)).all()
    # per-channel key groups isolate the outlier channel: its error stays at its own scale
    assert (rt.keys[:, :, :256, 5] - k[:, :, :256, 5]).abs().max() < 3.0


def test_honest_ratios_match_the_layout():
    """On uniform random data the integer codes barely deflate (only min/max quantisation's
    half-width end bins do: 2-bit codes hold 1.92 bits), so a middle chunk's ratio is about
    the layout's: 16 bits per value over code bits plus scale bits per value (and a 16-byte
    header per chunk); DEFLATE never costs more than a fraction of a percent."""
    g = torch.Generator().manual_seed(1)
    k = torch.rand(L, H, T, D, generator=g) * 8 - 4
    v = torch.rand(L, H, T, D, generator=g) * 2 - 1
    layout = {
        "int8": 16 / (8 + 32 / 64),
        "int4-g64": 16 / (4 + 32 / 64),
        "kivi-2": 16 / (2 + 32 / 32),
        "fp8-token": 16 / (8 + 16 / 64),
    }
    for m in (int8_per_token(), int4_group64(), KIVI(), fp8_per_token()):
        rt = m.roundtrip(k, v, 256)  # chunk 0 (positions 256..511) is a middle chunk
        count = ByteCount()
        count.add(rt, L, H, D, first_position=256)
        assert count.chunk_ratio >= 0.99 * layout[m.name], m.name
        if m.name != "fp8-token":  # fp8 exponents of uniform data do deflate
            assert count.chunk_ratio == pytest.approx(layout[m.name], rel=0.06), m.name
        # whole context: every byte, the exact window of KIVI included
        assert count.ctx_raw == bf16_bytes(L, H, T, D)
        assert count.ctx_stored == sum(rt.chunk_bytes)
    # only chunk 0 is a middle chunk here (chunk 1 overlaps the last 128 tokens); a sink at
    # position 0 also rules out chunk 0 unless the context starts later
    assert middle_chunks([256, 256, 88]) == []
    assert middle_chunks([256, 256, 88], first_position=256) == [0]
    assert middle_chunks([256] * 6) == [1, 2, 3, 4]


def test_bytes_are_what_decodes():
    """A chunk's bytes alone decode it, and the round trip counts exactly those bytes."""
    k, v = _kv(seed=3)
    k, v = k[:, :, :256], v[:, :, :256]
    m = KIVI()
    blob = m.encode_chunk(k, v, 512, 128)  # a lone chunk: its last 128 tokens are the window
    k2, v2 = m.decode_chunk(bytes(blob), torch.device("cpu"), torch.float32)
    rt = m.roundtrip(k, v, 512)
    assert rt.chunk_bytes == [len(blob)]
    assert torch.equal(rt.keys, k2) and torch.equal(rt.values, v2)
    with pytest.raises(ValueError, match="not a rate-distortion"):
        m.decode_chunk(b"XX" + blob[2:], torch.device("cpu"), torch.float32)


def test_kvtc_wrapper_counts_every_blob(arts):  # noqa: F811
    art = arts["all", 8.0]
    codec = KVTCCodec(art)
    k, v = make_chunk(700, 0, seed=7)
    m = KVTC(name="kvtc", target_ratio=8.0, codec=codec)
    rt = m.roundtrip(k, v)
    blobs = codec.encode_sequence(k, v, 0, chunk_tokens=256)
    assert rt.chunk_bytes == [len(b) for b in blobs]
    assert rt.keys.shape == k.shape
    # sinks and the artifact's recent window come back as bf16 copies
    w = art.window
    assert torch.equal(rt.values[:, :, -w:], v[:, :, -w:].bfloat16().float())
    assert torch.equal(rt.keys[:, :, :4], k[:, :, :4].bfloat16().float())
    facts = m.facts()
    assert facts["artifact_id"] == art.artifact_id and facts["artifact_params"] > 0


def test_fixed_width_ablation_counts_the_same_symbols_bit_packed(arts):  # noqa: F811
    """``kvtc-nocoder`` of a rans artifact: the same decoded KV as ours, its stream
    replaced by fixed-width packing of the very symbols the stream holds."""
    from benchmarks.rd.kvtc import KVTCFixedWidth, fixed_width_bytes
    from kvtc_store.codec.blob import unpack_blob_header

    art = arts["all", 8.0]
    codec = KVTCCodec(art, coder="none")
    k, v = make_chunk(700, 0, seed=7)
    if art.quantizer != "rans":
        with pytest.raises(ValueError, match="rans"):
            codec.decode_symbols(codec.encode(k[:, :, :256], v[:, :, :256]))
        return
    ours = KVTC(name="kvtc", target_ratio=8.0, codec=codec).roundtrip(k, v)
    fixed = KVTCFixedWidth(name="kvtc-nocoder", target_ratio=8.0, codec=codec).roundtrip(k, v)
    assert torch.equal(fixed.keys, ours.keys) and torch.equal(fixed.values, ours.values)
    blobs = codec.encode_sequence(k, v, 0, chunk_tokens=256)
    n_coded = sum(r.end - r.start for r in art.plan)
    for blob, b_ours, b_fixed in zip(blobs, ours.chunk_bytes, fixed.chunk_bytes):
        sym = codec.decode_symbols(blob)
        header, _ = unpack_blob_header(blob)
        a, b = codec.compressed_span(header.shape[3], header.first_position, header.exact_tail)
        assert sym.shape == (n_coded, b - a)
        assert b_fixed == b_ours - header.sections["stream"] + fixed_width_bytes(sym)
    assert sum(fixed.chunk_bytes) > sum(ours.chunk_bytes)  # rANS beats fixed width
    # the packing: per component 3 bytes + ceil(tokens * bits of its range / 8)
    sym = np.array([[5, 5, 5, 5], [0, 1, 2, 3], [-4, 3, 0, 0]])
    assert fixed_width_bytes(sym) == (3 + 0) + (3 + 1) + (3 + 2)
    assert fixed_width_bytes(np.zeros((3, 0), dtype=np.int32)) == 0


# -- quality.json rows -------------------------------------------------------------------


def _row(method, ratio, run, kl=0.01, kind="ours", honest=None):
    return {
        "method": method,
        "target_ratio": ratio,
        "kind": kind,
        "honest_ratio": honest or (ratio or 2.0),
        "kl": kl,
        "run": run,
    }


V1 = rows.LEGACY_GENRE  # rows without a genre: the suite before issue 17


def test_rows_merge_keeps_other_runs(tmp_path):
    path = tmp_path / "quality.json"
    first = rows.merge(
        rows.load(path),
        [_row("kvtc", 4, "a"), _row("kvtc", 8.0, "a"), _row("kivi-2", None, "a", kind="baseline")],
        "a",
        {"date": "1"},
    )
    first = rows.merge(first, [_row("cachegen", None, "p", kind="baseline")], "p", {"date": "2"})
    rows.save(path, first)
    doc = rows.merge(
        rows.load(path),
        [_row("kvtc", 8, "b", kl=0.005), _row("fp8", None, "b", kind="baseline")],
        "b",
        {"date": "3"},
    )
    keys = {rows.row_key(r): r for r in doc["rows"]}
    assert set(keys) == {
        ("kvtc", 4.0, V1),
        ("kvtc", 8.0, V1),
        ("kivi-2", None, V1),
        ("cachegen", None, V1),
        ("fp8", None, V1),
    }
    assert keys["kvtc", 8.0, V1]["kl"] == 0.005 and keys["kvtc", 8.0, V1]["run"] == "b"
    assert keys["cachegen", None, V1]["run"] == "p"
    assert set(doc["runs"]) == {"a", "p", "b"}
    # a run whose rows were all replaced is dropped
    doc = rows.merge(doc, [_row("cachegen", None, "q", kind="baseline")], "q", {"date": "4"})
    assert "p" not in doc["runs"] and "q" in doc["runs"]
    # ours sort before baselines, by ratio
    order = [rows.row_key(r) for r in doc["rows"]]
    assert (
        order.index(("kvtc", 4.0, V1))
        < order.index(("kvtc", 8.0, V1))
        < order.index(("fp8", None, V1))
    )
    # a whole other results file (say, another GPU's) merges row by row, runs kept
    other = rows.merge(
        {"rows": [], "runs": {}}, [_row("kvtc", 64, "g1"), _row("kvtc", 4, "g1", kl=0.5)], "g1", {}
    )
    both = rows.merge_docs(doc, other)
    keys = {rows.row_key(r): r for r in both["rows"]}
    assert keys["kvtc", 64.0, V1]["run"] == "g1" and keys["kvtc", 4.0, V1]["kl"] == 0.5
    assert keys["kvtc", 8.0, V1]["run"] == "b" and {"a", "b", "g1"} <= set(both["runs"])


def test_rows_load_legacy_single_run_file(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(
        json.dumps(
            {
                "command": "python benchmarks/quality.py",
                "machine": "x86",
                "rows": [{"method": "kvtc", "target_ratio": 4, "honest_ratio": 4.1, "kl": 0.001}],
            }
        )
    )
    doc = rows.load(path)
    assert doc["runs"]["legacy"]["command"] == "python benchmarks/quality.py"
    assert doc["rows"][0]["run"] == "legacy" and doc["rows"][0]["kind"] == "ours"
    assert doc["rows"][0]["genre"] == V1  # readable, and never pooled with the genres
    assert not any(r.get("derived") for r in doc["rows"])


def test_report_keeps_log_and_shows_earlier_suite(tmp_path):
    """Rows of the suite before issue 17 stay readable in their own table."""
    data = [
        {**_row("kvtc", 12, "r", kl=0.009, honest=12.5), "ppl_change_pct": 0.8},
        _row("fp8", None, "r", kl=0.0001, kind="baseline", honest=2.4),
    ]
    md = tmp_path / "rate_distortion.md"
    md.write_text("old\n" + report.LOG_MARKER + "\n## Experiment log\n| my row |\n")
    doc = rows.merge({"rows": [], "runs": {}}, data, "r", {"date": "d", "command": "c"})
    text = report.write(doc, md)
    assert text.endswith("## Experiment log\n| my row |\n")
    earlier = text.split("## Earlier suite (`suite-v1`)")[1]
    assert "| kvtc | 12 | 12.50 |" in earlier
    assert "[NOT MEASURED] worst genre at target 16" in text  # old rows gate nothing


def test_roundtrip_counted_counts_and_passes_exact_through():
    k, v = _kv()
    count = ByteCount()
    assert roundtrip_counted(None, [(k, v)], count) == [(k, v)] and count.ctx_stored == 0
    out = roundtrip_counted(BF16(), [(k, v), (k, v)], count, workers=2)
    assert torch.equal(out[1][0], k.bfloat16().float())
    assert count.ctx_raw == 2 * bf16_bytes(L, H, T, D) and count.ctx_stored > 0


def test_roundtrip_dataclass_sums_bytes():
    rt = Roundtrip(torch.zeros(1), torch.zeros(1), [10, 20, 5], [256, 256, 3])
    assert rt.stored_bytes == 35


def _ret_row(method, ratio, run, wrong):
    """A row of genre technical whose retrieval missed the prompts in ``wrong`` ({group:
    [prompt index]})."""
    return {
        **_row(method, ratio, run),
        "genre": "technical",
        "retrieval": {g: 0.0 for g in wrong},
        "retrieval_wrong": wrong,
        "retrieval_groups": sorted(wrong),
    }


def test_pool_retrieval_sums_answers_over_prompt_slices():
    """Retrieval runs over other prompts pool with a row's own by counting answers; the
    groups that qualify are decided on the pooled uncompressed accuracy, and the
    ratio-16 target reads the pooled change."""
    g2, g4 = "passkey@2048", "passkey@4096"
    doc = {"rows": [], "runs": {}}
    doc = rows.merge(
        doc,
        [
            _ret_row("exact", None, "a", {g2: [3], g4: [1, 2]}),
            _ret_row("kvtc", 16, "a", {g2: [3], g4: [1, 2, 5]}),
            _ret_row("kvtc", 8, "a", {g2: [], g4: [1, 2]}),
        ],
        "a",
        {"retrieval_first": 0, "retrieval_samples": 10},
    )

    def slice_doc(run, first, exact_wrong, kvtc_wrong):
        return rows.merge(
            {"rows": [], "runs": {}},
            [_ret_row("exact", None, run, exact_wrong), _ret_row("kvtc", 16, run, kvtc_wrong)],
            run,
            {"retrieval_first": first, "retrieval_samples": 10},
        )

    s1 = slice_doc("b", 10, {g2: [], g4: [11, 12]}, {g2: [14], g4: [11]})
    s2 = slice_doc("c", 20, {g2: [], g4: [21, 22, 23, 24]}, {g2: [], g4: [21, 22, 23, 24, 25]})
    pooled = rows.pool_retrieval(doc, [s1, s2], min_accuracy=0.8)
    r16 = next(r for r in pooled["rows"] if rows.row_key(r) == ("kvtc", 16.0, "technical"))
    p = r16["retrieval_pooled"]
    assert p["n"] == {g2: 30, g4: 30}
    assert p["exact_correct"] == {g2: 29, g4: 22} and p["correct"] == {g2: 28, g4: 21}
    assert p["groups"] == [g2]  # 22/30 < 80% at 4096 over all 30 prompts
    assert p["prompts"] == 30 and p["delta_pts"] == pytest.approx(-100 / 30, abs=0.01)
    assert [q["first"] for q in p["parts"]] == [0, 10, 20]
    assert "retrieval_pooled" not in next(
        r for r in pooled["rows"] if rows.row_key(r) == ("kvtc", 8.0, "technical")
    )  # no slice measured it
    # the pooled genre row ("all") reads the pooled prompts, and the target reads it
    r16_all = next(r for r in pooled["rows"] if rows.row_key(r) == ("kvtc", 16.0, "all"))
    assert r16_all["retrieval_prompts"] == 30 and r16_all["retrieval_groups"] == [f"technical:{g2}"]
    got = {t.text.split(",")[0]: t for t in targets.check(pooled["rows"])}
    r16_line = got["retrieval within 1 point of uncompressed at target 16"]
    assert r16_line.met is False and "over 30 prompts" in r16_line.detail
    # the same prompts twice are refused
    with pytest.raises(ValueError, match="pooled twice"):
        rows.pool_retrieval(doc, [s1, s1])


@pytest.mark.parametrize("greedy_tokens", [0, 3])
def test_continuation_suite_skips_the_greedy_suite_at_zero_tokens(greedy_tokens) -> None:
    """``--greedy-tokens 0`` skips suite (c) (its agreement is no measure, not 0 or 1); a
    positive count compares that many greedy tokens per window. A tiny real Qwen2 model."""
    from benchmarks.rd.continuation import ContinuationSuite
    from benchmarks.rd.engine import Runner
    from tests.tiny_models import VOCAB, build, qwen2_config

    model = build(qwen2_config()).eval()
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    windows = [("a", ids[0]), ("a", ids[1]), ("b", ids[2])]
    suite = ContinuationSuite(Runner(model, torch.device("cpu")), windows, 32, 2, greedy_tokens)
    res = suite.run(BF16())
    assert res.windows == 3 and res.greedy_total == (3 if greedy_tokens else 0)
    assert res.greedy_prefix_sum <= 3 * greedy_tokens


def test_mixture_stores_each_chunk_as_the_nearer_codecs_blob(arts):  # noqa: F811
    """``kvtc-mix-ml``'s round trip: each chunk comes back as the decode of whichever
    calibration's blob is nearer the chunk, counted at that blob's bytes, and the
    choices are tallied per codec."""
    from benchmarks.rd.kvtc import KVTCMixture

    a, b = KVTCCodec(arts["all", 8.0]), KVTCCodec(arts["layer", 8.0])
    k, v = make_chunk(700, 0, seed=9)
    mix = KVTCMixture(name="kvtc-mix", target_ratio=8.0, codec=a, others=[b])
    got = mix.roundtrip(k, v)
    singles = [
        KVTC(name=n, target_ratio=8.0, codec=c).roundtrip(k, v) for n, c in (("a", a), ("b", b))
    ]
    start = 0
    for i, n in enumerate(got.chunk_tokens):
        s = slice(start, start + n)

        def err(rt, s=s) -> float:
            ek, ev = k[:, :, s].pow(2).sum(), v[:, :, s].pow(2).sum()
            return float((rt.keys[:, :, s] - k[:, :, s]).pow(2).sum() / ek
                         + (rt.values[:, :, s] - v[:, :, s]).pow(2).sum() / ev)  # fmt: skip

        best = min((0, 1), key=lambda j: err(singles[j]))
        assert torch.equal(got.keys[:, :, s], singles[best].keys[:, :, s])
        assert got.chunk_bytes[i] == singles[best].chunk_bytes[i]
        start += n
    assert sum(mix.chosen) == len(got.chunk_tokens)
    facts = mix.facts()
    assert facts["mixture_artifacts"] == [a.artifact.artifact_id, b.artifact.artifact_id]
    assert facts["mixture_chunks_chosen"] == mix.chosen
