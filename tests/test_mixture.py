"""A per-chunk mixture of calibrations (issue 17, :class:`kvtc_store.codec.MixtureCodec`):
two real calibrations on synthetic KV of two "genres" (different latent subspaces), the
real encoders and decoders, a real store over a disk folder, and the config path from
cached artifacts. No model runs: each calibration is a few thousand synthetic tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvtc_store.codec import (
    CalibrationStats,
    ChunkKV,
    CodecArtifact,
    KVTCCodec,
    MixtureCodec,
    default_groups,
    fit_artifacts,
)
from kvtc_store.codec.blob import ChunkBinding, unpack_blob_header
from kvtc_store.codec.rope import apply_rope
from kvtc_store.config import CodecConfig, codec_from_config, load_config
from kvtc_store.errors import BlobMisfiledError, CodecMismatchError, ConfigError, MixtureError
from kvtc_store.model import ModelInfo
from kvtc_store.store import TieredStore
from tests.test_calibrate_cli import tiny_model  # noqa: F401 - a tiny real model
from tests.test_codec import FP, ROPE, D, H, L, P
from tests.tiny_codec import CHUNK, tiny_artifact, tiny_codec, tiny_namespace, tiny_sequence

pytestmark = pytest.mark.usefixtures("one_thread")

T = 64  # tokens per chunk here
SPECTRUM = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3])


def genre_chunk(genre: int, tokens: int, first: int, seed: int):
    """``(L, H, T, D)`` keys (RoPE applied at ``first``...) and values of one synthetic
    genre: 8 latent directions fixed per genre, decaying variance, small noise."""
    gm = torch.Generator().manual_seed(100 + genre)
    wk, mk = torch.randn(8, P, generator=gm), torch.randn(P, generator=gm)
    wv, mv = torch.randn(8, P, generator=gm), torch.randn(P, generator=gm)
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(tokens, 8, generator=g) * SPECTRUM) @ wk + mk
    v = (torch.randn(tokens, 8, generator=g) * SPECTRUM) @ wv + mv
    k = k + 0.05 * torch.randn(tokens, P, generator=g)
    v = v + 0.05 * torch.randn(tokens, P, generator=g)
    k = k.reshape(tokens, L, H, D).permute(1, 2, 0, 3)
    v = v.reshape(tokens, L, H, D).permute(1, 2, 0, 3).contiguous()
    return apply_rope(k, torch.arange(first, first + tokens), ROPE).contiguous(), v


def calibrate_genre(genre: int, corpus: str, ratios: list[float]):
    """Real calibrations (PCA, DP, rANS tables) on 2,048 tokens of one genre."""
    stats = CalibrationStats((L, H, D), ROPE, default_groups(L), n_sink=4, sample_tokens=2048)
    for s in range(4):
        stats.add(*genre_chunk(genre, 512, 0, seed=10 * genre + s), first_position=0)
    holdout = [(*genre_chunk(genre, 256, 7000, seed=999 + genre), 7000)]
    return fit_artifacts(stats, ratios, FP, "synthetic", holdout=holdout, block=8, window=16,
                         calibration={"corpus": corpus})  # fmt: skip


@pytest.fixture(scope="module")
def arts():
    """``{(corpus, ratio): artifact}``: genre 0 is the default (``broad``), genre 1 the
    specialist (``manpages``)."""
    out = {}
    for genre, corpus, ratios in ((0, "broad", [4.0, 8.0]), (1, "manpages", [8.0])):
        out.update({(corpus, a.target_ratio): a for a in calibrate_genre(genre, corpus, ratios)})
    return out


@pytest.fixture(scope="module")
def mix(arts) -> MixtureCodec:
    return MixtureCodec([KVTCCodec(arts["broad", 8.0]), KVTCCodec(arts["manpages", 8.0])])


def nmse(got, want) -> float:
    return float((got.float() - want).pow(2).sum() / want.pow(2).sum())


def owner(blob: bytes) -> str:
    return unpack_blob_header(blob)[0].artifact_id


# --- (a) the specialist's text picks the specialist ----------------------------------------


def test_a_chunk_like_the_specialists_text_picks_it_and_round_trips(arts) -> None:
    default, special = KVTCCodec(arts["broad", 8.0]), KVTCCodec(arts["manpages", 8.0])
    mix = MixtureCodec([default, special])
    assert mix.names == ["broad", "manpages"]
    for genre, want in ((1, special), (0, default)):
        k, v = genre_chunk(genre, T, 256, seed=500 + genre)
        blob = mix.encode(k, v, first_position=256)
        assert owner(blob) == want.artifact.artifact_id
        got = mix.decode(blob)
        ref = want.decode(blob)
        assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)
        other = special if want is default else default
        back = other.decode(other.encode(k, v, first_position=256))
        mine = nmse(got.keys, k) + nmse(got.values, v)
        assert mine < 0.5 * (nmse(back.keys, k) + nmse(back.values, v))
        assert mine < 0.05
    assert mix.chosen == [1, 1]
    assert [n for _, _, n in mix.chosen_by_artifact()] == [1, 1]


def test_a_tie_goes_to_the_default(mix) -> None:
    """A chunk stored wholly exact decodes the same from either member: the first keeps it."""
    before = mix.chosen
    k, v = genre_chunk(1, T, 0, seed=7)
    blob = mix.encode(k, v, first_position=0, exact_tail=T)
    assert owner(blob) == mix.members[0].artifact.artifact_id
    assert mix.chosen == [before[0] + 1, before[1]]


# --- (b) decode of a list mixing both members ----------------------------------------------


def mixed_sequence(n: int = 4):
    """``n`` chunks of ``T`` tokens alternating genres 0, 1, 0, 1, ... at positions 0, T, ..."""
    parts = [genre_chunk(i % 2, T, i * T, seed=600 + i) for i in range(n)]
    return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


def test_a_list_mixing_both_members_decodes_in_order(mix) -> None:
    k, v = mixed_sequence(4)
    names = [f"{i}" * 64 for i in range(4)]
    blobs = mix.encode_sequence(k, v, 0, chunk_tokens=T, window=0, chunk_keys=names)
    ids = [m.artifact.artifact_id for m in mix.members]
    assert [owner(b) for b in blobs] == [ids[0], ids[1], ids[0], ids[1]]
    by_id = dict(zip(ids, mix.members))
    want = [by_id[owner(b)].decode(b) for b in blobs]

    chunks, error = mix.decode_prefix(blobs)  # one batch per member, back in order
    assert error is None and len(chunks) == 4
    for c, w, i in zip(chunks, want, range(4)):
        assert c.first_position == i * T
        assert torch.equal(c.keys, w.keys) and torch.equal(c.values, w.values)

    # into a caller's destination, in another order: each chunk lands in its own slot
    order = [3, 0, 2, 1]
    shape = (4, L, H, T, D)
    out = ChunkKV.dense(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
    got = mix.decode_batch([blobs[i] for i in order], out)
    assert got.count == 4 and got.error is None
    assert got.first_positions == [i * T for i in order]
    for slot, i in enumerate(order):
        assert torch.equal(got.keys[slot], want[i].keys.float())
        assert torch.equal(got.values[slot], want[i].values.float())

    # bindings are checked as a single codec checks them
    expect = [ChunkBinding(names[i], i * T, T) for i in range(4)]
    chunks, error = mix.decode_prefix(blobs, expect=expect)
    assert len(chunks) == 4 and error is None
    swapped = [blobs[0], blobs[2], blobs[1], blobs[3]]
    chunks, error = mix.decode_prefix(swapped, expect=expect)
    assert len(chunks) == 1 and isinstance(error, BlobMisfiledError)
    got = mix.decode_batch(swapped, expect=expect)
    assert got.count == 1 and isinstance(got.error, BlobMisfiledError)


# --- (c) a blob of a third artifact --------------------------------------------------------


def test_a_blob_of_an_artifact_no_member_holds_ends_the_prefix(arts, mix) -> None:
    third = KVTCCodec(arts["broad", 4.0])  # same model, another calibration
    k, v = mixed_sequence(3)
    blobs = mix.encode_sequence(k, v, 0, chunk_tokens=T, window=0)
    foreign = third.encode_sequence(k, v, 0, chunk_tokens=T, window=0)
    chunks, error = mix.decode_prefix([blobs[0], blobs[1], foreign[2]])
    assert len(chunks) == 2 and isinstance(error, CodecMismatchError)
    assert third.artifact.artifact_id in str(error)
    got = mix.decode_batch([blobs[0], foreign[1], blobs[2]])
    assert got.count == 1 and isinstance(got.error, CodecMismatchError)
    with pytest.raises(CodecMismatchError):
        mix.decode(foreign[0])
    with pytest.raises(CodecMismatchError):
        mix.read_header(foreign[0])
    assert mix.read_header(blobs[1]).artifact_id == mix.members[1].artifact.artifact_id


def tiny_version(bits: int) -> KVTCCodec:
    return KVTCCodec(tiny_artifact(bits=bits))


def test_a_store_over_a_mixture_serves_both_members_and_misses_a_third(tmp_path: Path) -> None:
    from kvtc_store.backends import DiskBackend, MemoryBackend

    tokens, keys, values = tiny_sequence(3, seed=4)
    mixture = MixtureCodec([tiny_version(4), tiny_version(6)])
    with TieredStore([DiskBackend(tmp_path, 1 << 20)], mixture, tiny_namespace(),
                     chunk_tokens=CHUNK) as store:  # fmt: skip
        store.put(tokens, keys, values)
        assert store.flush(timeout=30)
        assert store.get(tokens)[0].shape[2] == 3 * CHUNK
        assert sum(mixture.chosen) == 3
        text = store.metrics.text()
        for aid, _, n in mixture.chosen_by_artifact():
            assert f'artifact_id="{aid}"' in text
        assert "kvtc_codec_mixture_chunks_chosen_total" in text
    # a third calibration's chunks are misses, never decoded with a member's basis
    other, okeys, ovalues = tiny_sequence(2, seed=5)
    with TieredStore([DiskBackend(tmp_path, 1 << 20)], tiny_version(5), tiny_namespace(),
                     chunk_tokens=CHUNK) as old:  # fmt: skip
        old.put(other, okeys, ovalues)
    reader = TieredStore([MemoryBackend(1 << 20), DiskBackend(tmp_path, 1 << 20)], mixture,
                         tiny_namespace(), chunk_tokens=CHUNK)  # fmt: skip
    with reader:
        assert reader.get(other) is None
        assert reader.stats.undecodable_dropped == 2
        assert reader.get(tokens)[0].shape[2] == 3 * CHUNK


# --- (d) configuration ---------------------------------------------------------------------


MINIMAL = "tiers:\n  - kind: memory\n    capacity: 1MiB\n"


def test_specialists_config_is_validated(tmp_path: Path) -> None:
    assert CodecConfig().specialists == []
    assert CodecConfig(specialists=["manpages"]).specialists == ["manpages"]
    path = tmp_path / "s.yaml"
    for text, match in [
        ("codec:\n  specialists: [wiki]\n", r"codec\.specialists\.0"),
        (
            "codec:\n  specialists: [manpages, manpages]\n",
            r"codec\.specialists: manpages named twice",
        ),
        ("codec:\n  specialists: [broad]\n", r"codec\.specialists: 'broad' is the calibration"),
        ("codec:\n  artifact: a\n  specialists: [manpages]\n", "give either artifact"),
        ("codec:\n  specialists: 3\n", r"codec\.specialists"),
    ]:
        path.write_text(MINIMAL + text)
        with pytest.raises(ConfigError, match=match):
            load_config(path)
    path.write_text(MINIMAL)
    env = {"KVTC_STORE_CODEC__SPECIALISTS": "manpages"}
    assert load_config(path, env=env).codec.specialists == ["manpages"]
    env = {"KVTC_STORE_CODEC__SPECIALISTS": "[manpages, shakespeare]"}
    assert load_config(path, env=env).codec.specialists == ["manpages", "shakespeare"]
    env = {"KVTC_STORE_CODEC__SPECIALISTS": "nope"}
    with pytest.raises(ConfigError, match=r"KVTC_STORE_CODEC__SPECIALISTS"):
        load_config(path, env=env)
    # a check across fields names the variable that gave a value, not only the file
    env = {"KVTC_STORE_CODEC__SPECIALISTS": "manpages,manpages"}
    with pytest.raises(ConfigError, match=r"codec\.specialists \(env KVTC_STORE_CODEC__SPEC"):
        load_config(path, env=env)
    path.write_text(MINIMAL + "codec:\n  artifact: a\n")
    env = {"KVTC_STORE_CODEC__SPECIALISTS": "manpages"}
    with pytest.raises(ConfigError, match=r"codec \(env KVTC_STORE_CODEC__SPECIALISTS\): give"):
        load_config(path, env=env)
    path.write_text(MINIMAL + "codec:\n  artifact: a\n")  # an empty list with an artifact
    assert load_config(path, env={"KVTC_STORE_CODEC__SPECIALISTS": ""}).codec.specialists == []


def test_config_with_specialists_builds_a_mixture_from_cached_calibrations(
    tmp_path: Path, monkeypatch, arts
) -> None:
    from kvtc_store.calibration import artifact_dir

    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    info = ModelInfo("synthetic", FP, (L, H, D), ROPE)
    cfg = CodecConfig(target_ratio=8, calibration_windows=2, specialists=["manpages"])
    arts["broad", 8.0].save(artifact_dir(info, cfg.calibration_settings(), 8.0))
    with pytest.raises(ConfigError, match="corpus manpages"):  # the specialist is not cached
        codec_from_config(cfg, info)
    arts["manpages", 8.0].save(artifact_dir(info, cfg.calibration_settings("manpages"), 8.0))
    codec = codec_from_config(cfg, info)
    assert isinstance(codec, MixtureCodec)
    assert [m.artifact.artifact_id for m in codec.members] == [
        arts["broad", 8.0].artifact_id,
        arts["manpages", 8.0].artifact_id,
    ]
    plain = codec_from_config(CodecConfig(target_ratio=8, calibration_windows=2), info)
    assert isinstance(plain, KVTCCodec)


# --- (e) members that do not fit together --------------------------------------------------


def test_members_of_another_ratio_shape_model_or_twice_are_refused(arts) -> None:
    a8, a4 = KVTCCodec(arts["broad", 8.0]), KVTCCodec(arts["broad", 4.0])
    with pytest.raises(MixtureError, match="targets ratio 4"):
        MixtureCodec([a8, a4])
    with pytest.raises(MixtureError, match="KV shape"):
        MixtureCodec([a8, KVTCCodec(dataclasses.replace(tiny_artifact(), model_fingerprint=FP))])
    with pytest.raises(MixtureError, match="for model"):
        MixtureCodec([tiny_codec(), KVTCCodec(tiny_artifact(fingerprint="e" * 64, bits=6))])
    with pytest.raises(MixtureError, match="twice"):
        MixtureCodec([a8, KVTCCodec(arts["broad", 8.0])])
    with pytest.raises(MixtureError, match="at least one"):
        MixtureCodec([])


# --- `kvtc-store calibrate --specialist` ---------------------------------------------------


def test_calibrate_cli_calibrates_specialists_where_the_config_finds_them(
    tiny_model,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    """``--specialist`` calibrates each named corpus with the same settings and ratio, into
    the cache folders ``codec.specialists`` reads; the main corpus twice is refused."""
    from kvtc_store.cli import main
    from kvtc_store.model import load_model

    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    args = ["calibrate", "--model", str(tiny_model), "--ratio", "8", "--windows", "2"]
    args += ["--corpus", "shakespeare+numpy"]  # no sampling of the model; 2,048-token windows
    assert main([*args, "--specialist", "shakespeare+numpy"]) == 2
    assert "--specialist shakespeare+numpy" in capsys.readouterr().err
    monkeypatch.setenv("KVTC_TEXTS", str(tmp_path / "no-texts"))  # told before the model runs
    assert main([*args, "--specialist", "pycode"]) != 0
    assert "make calibration-texts" in capsys.readouterr().err
    assert not (tmp_path / "home" / "codecs").exists()  # nothing calibrated first
    monkeypatch.delenv("KVTC_TEXTS")
    out = tmp_path / "out"
    assert main([*args, "--specialist", "shakespeare", "--out", str(out)]) == 0
    assert "shakespeare: ratio 8:" in capsys.readouterr().out
    spec = CodecArtifact.load(out / "shakespeare" / "cr8")
    first = CodecArtifact.load(out / "cr8")
    assert spec.calibration["corpus"] == "shakespeare"
    assert first.calibration["corpus"] == "shakespeare+numpy"
    _, _, info = load_model(tiny_model)
    cfg = CodecConfig(target_ratio=8, calibration_windows=2,
                      calibration_corpus="shakespeare+numpy", specialists=["shakespeare"])  # fmt: skip
    codec = codec_from_config(cfg, info)  # from the cache calibrate wrote, no model run
    assert [m.artifact.artifact_id for m in codec.members] == [first.artifact_id, spec.artifact_id]


def test_config_corpus_names_are_the_built_in_corpora() -> None:
    """``CorpusName`` (config) lists exactly the corpora ``kvtc_store.texts.CORPORA``
    calibrates on: a corpus added to one and not the other fails here."""
    import typing

    from kvtc_store.config import CorpusName
    from kvtc_store.texts import CORPORA

    assert set(typing.get_args(CorpusName)) == set(CORPORA)
