"""Any model (issue 17): tiny random models of other architectures than SmolLM2's round
trip through calibration, the codec and the store, their keys' RoPE is undone exactly as
transformers applied it (scaled RoPE included), and what the codec cannot code is refused
with a named error before any weights load."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.models.llama import modeling_llama as llama

from kvtc_store.backends import MemoryBackend
from kvtc_store.calibration import CalibrationSettings, calibrate
from kvtc_store.codec import CodecArtifact, KVTCCodec
from kvtc_store.codec.rope import RopeParams, apply_rope, undo_rope
from kvtc_store.errors import UnsupportedModelError
from kvtc_store.keys import ChunkNamespace
from kvtc_store.model import check_supported, kv_from_cache, kv_geometry, lm_forward, model_info
from kvtc_store.store import TieredStore
from tests.tiny_models import SCALINGS, VOCAB, build, llama3_config, qwen2_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "qwen2": qwen2_config,
    **{name: (lambda s=name: llama3_config(s)) for name in SCALINGS},
}
SETTINGS = CalibrationSettings(
    windows=3, window_tokens=128, block=16, sample_tokens=256, weighting="variance"
)
"""Three 128-token windows (and one held out); variance weighting, since a random model's
layer sensitivities say nothing."""


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _kv_and_pre_rope_keys(model, seq: torch.Tensor):
    """The cache's keys and values ``(L, H, T, D)`` and every layer's ``k_proj`` output
    (the keys before RoPE), captured with forward hooks."""
    pre = []
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: pre.append(o.detach()))
        for layer in model.model.layers
    ]
    try:
        _, cache = lm_forward(model, seq[None])
    finally:
        for h in hooks:
            h.remove()
    keys, values = kv_from_cache(cache)
    _layers, heads, tokens, dim = keys.shape
    pre = torch.stack([p[0].view(tokens, heads, dim).transpose(0, 1) for p in pre])
    return keys.detach(), values.detach(), pre


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_scaled_rope_matches_transformers_rotary_embedding(scaling) -> None:
    """The frequencies are transformers' own; cos/sin (and YaRN's attention factor) as
    LlamaRotaryEmbedding builds them; undo inverts."""
    cfg = llama3_config(scaling)
    _, rope = kv_geometry(cfg)
    rot = llama.LlamaRotaryEmbedding(cfg)
    assert rope.rope_type == scaling
    torch.testing.assert_close(rope.inv_freq().float(), rot.inv_freq, rtol=0, atol=0)
    assert rope.attention_scaling == pytest.approx(rot.attention_scaling)
    assert (rope.attention_scaling > 1) == (scaling == "yarn")
    plain = RopeParams(head_dim=16, theta=5e5)
    assert (rope.inv_freq() - plain.inv_freq()).abs().max() > 1e-3  # the scaling changes them
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 300, 16, generator=g)
    pos = torch.randint(0, 1024, (300,), generator=g)
    cos, sin = rot(k, pos[None])
    _, k_hf = llama.apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(apply_rope(k, pos, rope), k_hf, rtol=0, atol=2e-4)
    torch.testing.assert_close(undo_rope(k_hf, pos, rope), k, rtol=0, atol=2e-4)
    assert RopeParams.from_dict(rope.to_dict()) == rope


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_pre_rope_keys_recovered_from_the_cache(arch) -> None:
    """Undoing the codec's RoPE on the cached keys gives each layer's k_proj output (with
    Qwen2's bias), at positions across the scaled bands; plain RoPE would not."""
    cfg = CONFIGS[arch]()
    model = build(cfg)
    info = model_info(model, arch)
    assert info.kv_shape == (2, cfg.num_key_value_heads, 16)
    keys, _, pre = _kv_and_pre_rope_keys(model, _ids(300, 1))
    pos = torch.arange(300)
    torch.testing.assert_close(undo_rope(keys, pos, info.rope), pre, rtol=0, atol=2e-5)
    if arch != "qwen2":
        plain = RopeParams(head_dim=16, theta=5e5)
        assert (undo_rope(keys, pos, plain) - pre).abs().max() > 1e-2


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_calibrate_and_round_trip_through_the_store(arch, tmp_path, monkeypatch) -> None:
    """Calibrate on a few short windows of token ids, store a sequence's KV, read it back
    close to the model's; a decoder built from the saved artifact alone decodes it."""
    monkeypatch.setenv("KVTC_STORE_HOME", str(tmp_path / "home"))
    cfg = CONFIGS[arch]()
    model = build(cfg)
    info = model_info(model, arch)
    art = calibrate(model, None, info, [4.0], SETTINGS, token_ids=_ids(4 * 128, 0))[0]
    assert art.rope == info.rope and art.calibration["corpus"].startswith("data:")
    seq = _ids(200, 2)
    keys, values, _ = _kv_and_pre_rope_keys(model, seq)
    ns = ChunkNamespace(info.fingerprint, info.kv_layout(), "t")
    with TieredStore([MemoryBackend(64 << 20)], KVTCCodec(art), ns, chunk_tokens=64) as store:
        assert store.put(seq, keys, values).chunks_written == 3
        k, v = store.get(seq)
    n = k.shape[2]
    assert n == 192

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(k, keys[:, :, :n]) < 0.12 and rel(v, values[:, :, :n]) < 0.12
    assert rel(k, keys[:, :, :n]) > 0  # coded, not stored exactly
    assert torch.equal(k[:, :, :4], keys[:, :, :4].to(torch.bfloat16).float())  # sinks
    loaded = CodecArtifact.load(art.save(tmp_path / "art"))
    assert loaded.rope == info.rope
    codec = KVTCCodec(loaded)
    blobs = codec.encode_sequence(keys[:, :, :n], values[:, :, :n], 0, chunk_tokens=64)
    chunks, error = codec.decode_prefix(blobs)
    assert error is None
    torch.testing.assert_close(torch.cat([c.keys for c in chunks], 2), k, rtol=0, atol=1e-6)


def test_supported_configs_pass() -> None:
    for cfg in (
        qwen2_config(),
        llama3_config(),
        tf.MistralConfig(sliding_window=None),
        tf.Qwen2Config(use_sliding_window=False, sliding_window=4096),
        tf.GPTNeoXConfig(),
        tf.GPT2Config(),
    ):
        check_supported(cfg)


@pytest.mark.parametrize(
    "config, words",
    [
        (lambda: tf.DeepseekV3Config(kv_lora_rank=64), "multi-head latent attention"),
        (lambda: tf.DeepseekV2Config(kv_lora_rank=32), "kv_lora_rank=32"),
        (
            lambda: tf.MistralConfig(sliding_window=64, max_position_embeddings=4096),
            "sliding-window",
        ),
        (lambda: tf.Gemma2Config(), "sliding_attention"),
        (
            lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=1),
            "sliding",
        ),
        (lambda: tf.JambaConfig(), "hybrid"),
        (lambda: tf.MambaConfig(), "no attention heads"),
        (lambda: tf.T5Config(), "encoder-decoder"),
        (lambda: tf.BertConfig(), "encoder"),
        (lambda: tf.GPTJConfig(), "interleaved"),
        (lambda: llama3_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (
            lambda: tf.Phi3Config(
                sliding_window=None,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 48,
                    "long_factor": [2.0] * 48,
                    "original_max_position_embeddings": 1024,
                },
                max_position_embeddings=4096,
            ),
            "longrope",
        ),
    ],
)
def test_unsupported_models_refused_by_name(config, words) -> None:
    with pytest.raises(UnsupportedModelError, match=words):
        check_supported(config())


def test_unsupported_rope_cannot_be_undone() -> None:
    rope = RopeParams(head_dim=16, theta=1e4, rope_type="dynamic")
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        undo_rope(torch.zeros(1, 16), torch.tensor([3]), rope)
    with pytest.raises(UnsupportedModelError, match="frequencies"):
        RopeParams(head_dim=16, theta=1e4, rope_type="llama3").inv_freq()


def test_model_without_rope_codes_keys_as_they_are() -> None:
    """GPT-2 (learned positions): nothing to undo, the keys pass unrotated."""
    _, rope = kv_geometry(tf.GPT2Config(n_embd=64, n_head=4, n_layer=2))
    assert rope.rope_type == "none" and rope.rotary_dim == 0
    x = torch.randn(2, 5, 16)
    assert torch.equal(undo_rope(x, torch.arange(5), rope), x)
    assert torch.equal(apply_rope(x, torch.arange(5), rope), x)
