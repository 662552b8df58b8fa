"""`kvtc-store calibrate --model --data --out` (issue 17): calibration from the user's own
files (text and token ids) on a tiny model saved with ``save_pretrained``, a hub id read
from a local Hugging Face cache, and one-line named errors for bad arguments, checked
before any model loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kvtc_store.calibration_data import cut_windows, read_token_ids
from kvtc_store.cli import main
from kvtc_store.codec import CodecArtifact, KVTCCodec
from kvtc_store.errors import CalibrationDataError
from kvtc_store.model import kv_from_cache, lm_forward, load_model
from tests.tiny_models import SAMPLE_TEXT, VOCAB, byte_tokenizer, qwen2_config, save

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--windows", "2", "--window-tokens", "64"]
"""Two 64-token windows and one held out: 192 tokens of data."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Qwen2-style model with a byte-level BPE tokenizer, saved to a folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    return save(qwen2_config(), folder, tokenizer=byte_tokenizer())


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _check_artifact(folder, model_dir, ratio: float = 8.0) -> CodecArtifact:
    """The artifact in ``folder`` is for the model, and codes the model's KV."""
    art = CodecArtifact.load(folder)
    model, _, info = load_model(model_dir)
    art.check_model(info.fingerprint, info.kv_shape)
    assert art.target_ratio == ratio and art.calibration["corpus"].startswith("data:")
    ids = torch.randint(0, VOCAB, (128,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        keys, values = kv_from_cache(lm_forward(model, ids[None])[1])
    codec = KVTCCodec(art)
    chunks, error = codec.decode_prefix(codec.encode_sequence(keys, values, 0, chunk_tokens=64))
    assert error is None
    got = torch.cat([c.values for c in chunks], 2)
    assert float((got - values).norm() / values.norm()) < 0.5
    return art


def test_calibrate_on_a_text_file(tiny_model, tmp_path, capsys) -> None:
    text = tmp_path / "traffic.txt"
    text.write_text(SAMPLE_TEXT * 12)
    out = tmp_path / "out"
    args = ["calibrate", "--model", str(tiny_model), "--data", str(text), "--ratio", "8", "12"]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"ratio 8: {out / 'cr8'}" in printed and f"ratio 12: {out / 'cr12'}" in printed
    art = _check_artifact(out / "cr8", tiny_model)
    _check_artifact(out / "cr12", tiny_model, 12.0)
    tok = byte_tokenizer()
    ids = read_token_ids([text], tok, VOCAB)
    assert ids.tolist() == tok(SAMPLE_TEXT * 12).input_ids
    assert art.calibration["data_hash"]  # names the windows the data gave


def test_calibrate_on_token_id_files(tiny_model, tmp_path) -> None:
    """.jsonl (both line forms) and .npy, a folder of them, give one stream in order."""
    g = np.random.default_rng(0)
    docs = [g.integers(0, VOCAB, n).tolist() for n in (50, 70, 40)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(
        json.dumps({"input_ids": docs[0]}) + "\n\n" + json.dumps(docs[1]) + "\n"
    )
    np.save(data / "b.npy", np.array(docs[2], dtype=np.int32))
    extra = tmp_path / "more.npy"
    np.save(extra, g.integers(0, VOCAB, (2, 30)).astype(np.int64))
    ids = read_token_ids([data, extra])
    assert ids.tolist()[:160] == docs[0] + docs[1] + docs[2] and ids.numel() == 220
    out = tmp_path / "out"
    args = ["calibrate", "--model", str(tiny_model), "--data", str(data), "--data", str(extra)]
    assert main([*args, "--ratio", "8", "--out", str(out), *SMALL]) == 0
    _check_artifact(out / "cr8", tiny_model)


def test_hub_id_from_the_local_cache(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    """``org/name`` resolves from the Hugging Face cache offline; an uncached id is a
    named error that says so."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    snap = cache / "models--kvtc--tiny-qwen2" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    _, _, info = load_model("kvtc/tiny-qwen2")
    assert info.name == "kvtc--tiny-qwen2"
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps(list(range(200))) + "\n")
    assert main(["calibrate", "--model", "kvtc/tiny-qwen2", "--data", str(ids), *SMALL]) == 0
    assert "kvtc--tiny-qwen2-" in capsys.readouterr().out  # cached under the model's name
    assert main(["calibrate", "--model", "kvtc/absent", "--data", str(ids), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvtc-store: ModelNotFoundError:") and "local Hugging Face cache" in err


def test_bad_arguments_are_one_line_errors_before_any_model_loads(
    tiny_model, tmp_path, capsys, monkeypatch
) -> None:
    import kvtc_store.model as model_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps(list(range(100))) + "\n")
    (tmp_path / "cr16").mkdir()  # the user's folder, where --out would write ratio 16
    (tmp_path / "cr16" / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        m.setattr(model_mod, "load_model", no_load)
        for args, words in [
            (["--data", str(tmp_path / "absent.txt")], "CalibrationDataError: "),
            (["--data", str(tiny_model / "config.json")], "unknown kind of data file"),
            (["--model", str(tmp_path / "nowhere"), "--data", str(ids)], "ModelNotFoundError"),
            (["--model", str(ids), "--data", str(ids)], "not a GGUF model"),
            (["--data", str(ids), "--corpus", "shakespeare"], "exclude each other"),
            (["--data", str(ids), "--out", str(ids)], "is a file, not a folder"),
            (["--data", str(ids), "--out", str(tmp_path)], "exists and is not an artifact"),
            (["--data", str(ids), *SMALL], "hold 100 tokens"),  # token ids: counted first
        ]:
            assert main(["calibrate", *args]) == 2
            err = capsys.readouterr().err
            assert words in err and err.count("\n") == 1, err
        assert (tmp_path / "cr16" / "notes.txt").read_text() == "mine"
        for bad in (["--ratio", "1"], ["--ratio", "0.5"], ["--windows", "0"]):
            with pytest.raises(SystemExit):
                main(["calibrate", "--data", str(ids), *bad])
            assert "error: argument" in capsys.readouterr().err


def test_data_too_short_or_out_of_vocabulary(tiny_model, tmp_path, capsys) -> None:
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps(list(range(100))) + "\n")
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ids), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "hold 100 tokens" in err and "need 192" in err
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"input_ids": [1] * 200 + [VOCAB]}) + "\n")  # long enough
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(big), *SMALL]) == 2
    assert f"token id {VOCAB} is outside" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, body, words",
    [
        ("empty.txt", "  \n", "holds no tokens"),
        ("bad.jsonl", '{"input_ids": [1, 2]}\n{"text": "hi"}\n', "line 2"),
        ("bad2.jsonl", "[1, 2\n", "line 1: not JSON"),
    ],
)
def test_malformed_data_files_name_the_file(tmp_path, name, body, words) -> None:
    f = tmp_path / name
    f.write_text(body)
    with pytest.raises(CalibrationDataError, match=words):
        read_token_ids([f], byte_tokenizer())


def test_npy_must_hold_integers_and_text_needs_a_tokenizer(tmp_path) -> None:
    f = tmp_path / "x.npy"
    np.save(f, np.zeros(10, dtype=np.float32))
    with pytest.raises(CalibrationDataError, match="integer array"):
        read_token_ids([f])
    t = tmp_path / "x.md"
    t.write_text("hello")
    with pytest.raises(CalibrationDataError, match="tokenizer"):
        read_token_ids([t], None)


def test_windows_cover_the_data_evenly() -> None:
    ids = torch.arange(1000)
    w = cut_windows(ids, 3, 100).view(4, 100)
    assert w[:, 0].tolist() == [0, 300, 600, 900]  # the last window ends the data
    assert torch.equal(cut_windows(ids[:400], 3, 100), ids[:400])
    with pytest.raises(CalibrationDataError, match="need 400"):
        cut_windows(ids[:399], 3, 100)


def test_model_without_tokenizer_or_rope(tmp_path, capsys) -> None:
    """GPT-2 (learned positions, fused q/k/v) saved without a tokenizer: token ids
    calibrate; text data and the built-in corpus need a tokenizer, a named error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB)).save_pretrained(
        folder
    )
    _, tok, info = load_model(folder)
    assert tok is None and info.rope.rope_type == "none" and info.kv_shape == (2, 4, 16)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps(list(range(VOCAB))[:200]) + "\n")
    out = tmp_path / "out"
    args = ["calibrate", "--model", str(folder), "--ratio", "8", *SMALL]
    assert main([*args, "--data", str(ids), "--out", str(out)]) == 0
    assert CodecArtifact.load(out / "cr8").rope.rope_type == "none"
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    assert main([*args, "--data", str(text)]) == 2
    assert "needs the model's tokenizer" in capsys.readouterr().err
    assert main(args) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_model_specs_resolve_without_loading(tiny_model, tmp_path) -> None:
    """A folder, a .gguf file (not read here) and a hub id's spelling each name their
    kind of source; the names become cache-folder names without '/'."""
    from kvtc_store.model import resolve_model

    gguf = tmp_path / "My-Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    folder = resolve_model(tiny_model)
    assert (folder.kind, folder.name) == ("folder", "tiny-qwen2")
    assert (resolve_model(gguf).kind, resolve_model(gguf).name) == ("gguf", "My-Model.Q4")
    hub = resolve_model("meta-llama/Llama-3.2-1B")
    assert (hub.kind, hub.name) == ("hub", "meta-llama--Llama-3.2-1B")
    # the demo's own GGUF named explicitly is the default source: one conversion, one cache
    assert resolve_model(resolve_model(None).where) == resolve_model(None)
