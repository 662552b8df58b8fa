"""The model adapter on the real SmolLM2: KV layout, RoPE convention, fingerprint, errors."""

from __future__ import annotations

import pytest
import torch

from kvtc_store.codec import undo_rope
from kvtc_store.errors import ArtifactModelMismatchError, ModelNotFoundError
from kvtc_store.model import cache_from_kv, kv_from_cache, lm_forward, load_model, model_info

pytestmark = pytest.mark.model


def test_info_matches_smollm2(smollm2):
    _, _, info = smollm2
    assert info.kv_shape == (30, 3, 64)
    assert info.rope.theta == 1e5
    assert info.kv_bytes_per_token_bf16 == 23040


def test_undo_rope_recovers_pre_rope_keys(smollm2, doc_kv):
    """Cached keys with RoPE undone equal layer 0's k_proj output (rotate_half convention)."""
    model, _, info = smollm2
    ids, keys, _ = doc_kv
    seen = {}
    attn = model.model.layers[0].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    try:
        with torch.no_grad():
            model(ids[None, :300])
    finally:
        hook.remove()
    pre = seen["k"][0].view(300, 3, 64).transpose(0, 1)  # (H, T, D)
    got = undo_rope(keys[0, :, :300], torch.arange(300), info.rope)
    assert (got - pre).abs().max().item() < 1e-3 * pre.abs().max().item()


def test_cache_round_trip_continues_like_full_forward(smollm2, doc_kv):
    model, _, _ = smollm2
    ids, keys, values = doc_kv
    with torch.no_grad():
        full = model(ids[None, :200]).logits[0, -1]
        cache = cache_from_kv(keys[:, :, :199], values[:, :, :199])
        step = lm_forward(model, ids[None, 199:200], cache)[0][0, -1]
    assert (full - step).abs().max().item() < 1e-3
    k2, v2 = kv_from_cache(cache, 0, 199)
    assert torch.equal(k2, keys[:, :, :199]) and torch.equal(v2, values[:, :, :199])


def test_fingerprint_changes_with_weights(smollm2):
    model, _, info = smollm2
    assert model_info(model, "x").fingerprint == info.fingerprint
    w = model.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        w[0, 0] += 1.0
        try:
            assert model_info(model, "x").fingerprint != info.fingerprint
        finally:
            w[0, 0] -= 1.0


def test_artifact_for_another_model_is_refused(artifact8):
    with pytest.raises(ArtifactModelMismatchError):
        artifact8.check_model("0" * 64, artifact8.kv_shape)
    with pytest.raises(ArtifactModelMismatchError):
        artifact8.check_model(artifact8.model_fingerprint, (32, 8, 128))


def test_missing_model_folder_is_a_named_error(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "no-such-model")


def test_new_ratio_reuses_the_cached_pca_fit(smollm2, test_settings):
    """Once a calibration has cached its PCA fit, another ratio needs no model run
    (``model=None`` here)."""
    from kvtc_store.calibration import calibrate, settings_dir

    model, tok, info = smollm2
    if not (settings_dir(info, test_settings) / "pca-fit.safetensors").is_file():
        calibrate(model, tok, info, [8.0], test_settings)  # a cache from before fits existed
    (art,) = calibrate(None, tok, info, [12.0], test_settings)
    assert art.target_ratio == 12.0 and art.model_fingerprint == info.fingerprint
    assert 11.0 < art.quality["honest_ratio"] < 14.0


def test_layer_sensitivity_is_measured_on_the_model(smollm2):
    """Noise in one layer's keys or values moves the predictions by a finite, positive
    KL per unit of squared error; more noise in the same layer moves them more."""
    from kvtc_store.sensitivity import measure_sensitivity

    model, tok, info = smollm2
    ids = torch.tensor(tok("The quick brown fox jumps over the lazy dog. " * 20).input_ids)
    kw = {"windows": 1, "context": 64, "continuation": 8, "window": 8}
    w = measure_sensitivity(model, ids, **kw)
    assert w.shape == (2, info.kv_shape[0]) and torch.isfinite(w).all() and (w > 0).all()
    assert w.max() / w.min() > 3  # layers differ: the point of weighting them
    with pytest.raises(ValueError):
        measure_sensitivity(model, ids[:50], **kw)


def test_calibration_corpus_mix_takes_windows_in_turn(smollm2):
    """``shakespeare+numpy``: even windows are Shakespeare's (the same tokens as the
    plain corpus, in order), odd ones NumPy's docstrings; an unknown corpus is named."""
    import dataclasses

    from kvtc_store.calibration import CalibrationSettings, calibration_token_ids
    from kvtc_store.errors import CalibrationError
    from kvtc_store.texts import numpy_docs

    _model, tok, _info = smollm2
    plain = CalibrationSettings(windows=4, window_tokens=256, corpus="shakespeare")
    mix = dataclasses.replace(plain, corpus="shakespeare+numpy")
    assert mix.key() != plain.key()  # a fit of its own in the cache
    a, b = calibration_token_ids(tok, plain), calibration_token_ids(tok, mix)
    assert a.shape == b.shape == (5 * 256,)
    w = b.view(5, 256)
    assert torch.equal(w[0], a[:256]) and torch.equal(w[2], a[256:512])
    assert torch.equal(w[4], a[512:768])
    first_doc = tok(numpy_docs()[0][1]).input_ids
    assert w[1].tolist() == first_doc[:256]
    with pytest.raises(CalibrationError, match="shakespeare\\+numpy"):
        calibration_token_ids(tok, dataclasses.replace(plain, corpus="wiki"))


def test_broad_corpus_takes_four_sources_in_turn_and_caches_the_samples(smollm2, tmp_path):
    """``broad``: windows in turn from Shakespeare, NumPy's docstrings, Python's reference
    docs and the model's own samples (in its chat template); the samples are kept in the
    cache folder, so a later run needs no model, and without both it is a named error."""
    import dataclasses

    from kvtc_store.calibration import CalibrationSettings, calibration_token_ids
    from kvtc_store.errors import CalibrationError
    from kvtc_store.texts import python_docs

    model, tok, _info = smollm2
    broad = CalibrationSettings(windows=3, window_tokens=128, corpus="broad")
    plain = dataclasses.replace(broad, corpus="shakespeare")
    with pytest.raises(CalibrationError, match="samples the model"):
        calibration_token_ids(tok, broad, None, tmp_path)
    ids = calibration_token_ids(tok, broad, model, tmp_path)
    assert ids.shape == (4 * 128,)
    w = ids.view(4, 128)
    assert torch.equal(w[0], calibration_token_ids(tok, plain)[:128])
    assert w[2].tolist() == tok(python_docs("first")[0][1]).input_ids[:128]
    assert python_docs("first")[0] == python_docs()[0]  # the calibration's part starts it
    assert not {k for k, _ in python_docs("first")} & {k for k, _ in python_docs("second")}
    sample = tok.decode(w[3])
    assert "<|im_start|>user" in sample and "<|im_start|>assistant" in sample, sample[:200]
    assert list(tmp_path.glob("samples-*.npy"))  # cached, and used without the model
    assert torch.equal(calibration_token_ids(tok, broad, None, tmp_path), ids)


def test_multilingual_corpus_reads_the_man_pages_in_turn(smollm2, tmp_path, monkeypatch):
    """``broad-ml``: its fifth window is Debian's man pages (German first, groff stripped,
    links skipped); a source named twice takes new windows each time; without the
    unpacked packages the error names ``make calibration-texts``."""
    import dataclasses

    from kvtc_store import texts
    from kvtc_store.calibration import CalibrationSettings, calibration_token_ids
    from kvtc_store.errors import ModelNotFoundError

    if not (texts.calibration_texts_dir() / "usr" / "share" / "man" / "de").is_dir():
        pytest.skip("needs `make calibration-texts` (.ci/run fetches them)")
    _model, tok, _info = smollm2
    pieces = texts.manpages_multilingual()
    langs = [lang for lang, _ in pieces[: len(texts.MANPAGE_LANGUAGES)]]
    assert langs == list(texts.MANPAGE_LANGUAGES)
    assert all(".TH" not in t and "\\f" not in t for _, t in pieces[:20])
    twice = dataclasses.replace(CalibrationSettings(windows=3, window_tokens=128), corpus="twice")
    monkeypatch.setitem(texts.CORPORA, "twice", ("manpages", "numpy", "manpages"))
    w = calibration_token_ids(tok, twice).view(4, 128)
    first = tok(pieces[0][1]).input_ids
    assert w[0].tolist() == first[:128] and w[2].tolist() == first[128:256]
    assert w[3].tolist() == first[256:384]  # the fourth window: the source's third turn
    monkeypatch.setenv("KVTC_TEXTS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="make calibration-texts"):
        texts.manpages_multilingual()


def test_code_corpus_reads_the_packages_sources_in_turn(smollm2, tmp_path, monkeypatch):
    """``pycode``: Python source of the pinned packages, pieces in turn per package, each
    file after its path line; its calibration windows are that text's tokens; never the
    evaluation's ``rich`` or the validation's ``attrs``; without the unpacked wheels the
    error names ``make calibration-texts``."""
    import dataclasses

    from kvtc_store import texts
    from kvtc_store.calibration import CalibrationSettings, calibration_token_ids
    from kvtc_store.errors import ModelNotFoundError

    if not (texts.calibration_texts_dir() / "py" / "networkx").is_dir():
        pytest.skip("needs `make calibration-texts` (.ci/run fetches them)")
    _model, tok, _info = smollm2
    pieces = texts.python_sources()
    pkgs = [p for p, _ in pieces[: len(texts.PYCODE_PACKAGES)]]
    assert pkgs == list(texts.PYCODE_PACKAGES)
    assert pieces[0][1].startswith("# networkx/")
    assert not {"rich", "attr", "attrs"} & set(texts.PYCODE_PACKAGES)
    code = dataclasses.replace(CalibrationSettings(windows=2, window_tokens=128), corpus="pycode")
    w = calibration_token_ids(tok, code).view(3, 128)
    assert w[0].tolist() == tok(pieces[0][1]).input_ids[:128]
    texts.check_fetched_texts("pycode")
    monkeypatch.setenv("KVTC_TEXTS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="make calibration-texts"):
        texts.python_sources()
    texts.check_fetched_texts("broad")  # ships with the install
    for corpus in ("pycode", "manpages", "broad-ml"):  # told before any model runs
        with pytest.raises(ModelNotFoundError, match=f"corpus '{corpus}' missing"):
            texts.check_fetched_texts(corpus)


def test_capped_ratio_from_the_cached_fit_needs_no_model(smollm2, test_settings):
    """The artifact cap (default: 15% of the model's parameters from target 16 up) is
    applied from the cached fit too: the fit's folder keeps the model's parameter count.
    Without a cached fit, no model is a named error."""
    import dataclasses

    from kvtc_store.calibration import calibrate, settings_dir
    from kvtc_store.errors import CalibrationError

    model, tok, info = smollm2
    calibrate(model, tok, info, [16.0], test_settings)  # caches the fit and the count
    n = sum(p.numel() for p in model.parameters())
    (art,) = calibrate(None, tok, info, [20.0], test_settings)
    assert art.stored_params() <= test_settings.max_artifact_share * n
    (settings_dir(info, test_settings) / "model-params.json").unlink()
    with pytest.raises(CalibrationError, match="parameter count"):
        calibrate(None, tok, info, [20.0], test_settings)
    other = dataclasses.replace(test_settings, window_tokens=512)
    with pytest.raises(CalibrationError, match="no cached PCA fit"):
        calibrate(None, tok, info, [8.0], other)
