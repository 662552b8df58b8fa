"""RoPE undone before PCA and redone after decoding (DESIGN.md, "The codec"): the library's
rotation must be Hugging Face's rotate_half convention, invertible at any position."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.llama import modeling_llama as llama

from kvtc_store.codec.rope import RopeParams, apply_rope, undo_rope
from kvtc_store.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


SMOL = RopeParams(head_dim=64, theta=1e5)  # SmolLM2's head dim and base


def _hf_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float64, partial: float = 1.0
):
    """cos/sin the way LlamaRotaryEmbedding.forward builds them, at ``dtype`` precision."""
    dim = int(head_dim * partial)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _positions(seed: int, n: int, hi: int = 100_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([0, 1, hi - 1]), torch.randint(0, hi, (n - 3,), generator=g)])


def test_inv_freq_matches_llama_rotary_embedding() -> None:
    cfg = LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e5
    )
    hf = llama.LlamaRotaryEmbedding(cfg).inv_freq.double()
    torch.testing.assert_close(SMOL.inv_freq(), hf, rtol=1e-6, atol=0)
    assert SMOL.inv_freq().dtype == torch.float64


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_undo_inverts_apply_at_large_positions(dtype, tol) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, 64, generator=g, dtype=torch.float64).to(dtype)
    pos = _positions(1, 256)
    y = apply_rope(x, pos, SMOL)
    assert y.dtype == dtype and y.shape == x.shape
    assert (y - x).abs().max() > 0.1  # it did rotate
    torch.testing.assert_close(undo_rope(y, pos, SMOL), x, rtol=0, atol=tol)
    torch.testing.assert_close(apply_rope(undo_rope(x, pos, SMOL), pos, SMOL), x, rtol=0, atol=tol)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(3, 40),
    head_dim=st.sampled_from([2, 8, 16, 64, 128]),
    theta=st.sampled_from([1e4, 1e5, 5e5, 1e6]),
)
def test_round_trip_and_norms_hypothesis(seed, tokens, head_dim, theta) -> None:
    params = RopeParams(head_dim=head_dim, theta=theta)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, head_dim, generator=g, dtype=torch.float64)
    pos = _positions(seed, tokens, hi=200_000)
    y = apply_rope(x, pos, params)
    torch.testing.assert_close(undo_rope(y, pos, params), x, rtol=0, atol=1e-10)
    # Each rotated pair (i, i + D/2) keeps its norm, hence so does every vector.
    half = head_dim // 2
    pair = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2
    torch.testing.assert_close(pair(y), pair(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_norm_preserved_float32() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 128, 64, generator=g)
    y = apply_rope(x, _positions(3, 128), SMOL)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_position_zero_is_identity_and_input_untouched() -> None:
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    before = x.clone()
    torch.testing.assert_close(apply_rope(x, torch.zeros(5, dtype=torch.long), SMOL), x)
    apply_rope(x, torch.arange(5), SMOL)
    undo_rope(x, torch.arange(5), SMOL)
    assert torch.equal(x, before)


def test_undo_is_apply_at_negative_positions() -> None:
    x = torch.randn(3, 50, 64, dtype=torch.float64)
    pos = _positions(5, 50)
    torch.testing.assert_close(
        undo_rope(x, pos, SMOL), apply_rope(x, -pos, SMOL), rtol=0, atol=1e-10
    )


def test_attention_scores_depend_on_relative_position_only() -> None:
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 64, generator=g, dtype=torch.float64)
    m, n, shift = 70_000, 69_123, 12_345
    qm = apply_rope(q[None], torch.tensor([m]), SMOL)[0]
    kn = apply_rope(k[None], torch.tensor([n]), SMOL)[0]
    qs = apply_rope(q[None], torch.tensor([m + shift]), SMOL)[0]
    ks = apply_rope(k[None], torch.tensor([n + shift]), SMOL)[0]
    assert float(qm @ kn) == pytest.approx(float(qs @ ks), rel=1e-9, abs=1e-9)


def test_matches_transformers_apply_rotary_pos_emb_float64() -> None:
    """Same numbers as Llama's apply_rotary_pos_emb + rotate_half, theta=1e5, up to 1e5."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 300, 64, generator=g, dtype=torch.float64)
    k = torch.randn(1, 3, 300, 64, generator=g, dtype=torch.float64)
    pos = _positions(6, 300)
    cos, sin = _hf_cos_sin(pos, 64, 1e5)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(k, pos, SMOL), k_hf, rtol=0, atol=1e-10)
    torch.testing.assert_close(apply_rope(q, pos, SMOL), q_hf, rtol=0, atol=1e-10)
    # and undoing the library's rotation recovers what transformers was given
    torch.testing.assert_close(undo_rope(k_hf, pos, SMOL), k, rtol=0, atol=1e-10)


def test_rotate_half_convention() -> None:
    """Channel i pairs with channel i + D/2 (not interleaved pairs 2i, 2i+1)."""
    x = torch.randn(1, 16, dtype=torch.float64)
    params = RopeParams(head_dim=16, theta=1e4)
    y = apply_rope(x, torch.tensor([1]), params)
    # the fastest frequency (1 rad per position) acts on channels 0 and 8
    c, s = (
        torch.cos(torch.tensor(1.0, dtype=torch.float64)),
        torch.sin(torch.tensor(1.0, dtype=torch.float64)),
    )
    torch.testing.assert_close(y[0, 0], x[0, 0] * c - x[0, 8] * s)
    torch.testing.assert_close(y[0, 8], x[0, 8] * c + x[0, 0] * s)
    torch.testing.assert_close(llama.rotate_half(x), torch.cat([-x[:, 8:], x[:, :8]], dim=-1))


def test_matches_llama_rotary_embedding_module_float32() -> None:
    """Against the real LlamaRotaryEmbedding (float32 angles, so modest positions)."""
    cfg = LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e5
    )
    rot = llama.LlamaRotaryEmbedding(cfg)
    k = torch.randn(1, 2, 200, 64)
    pos = torch.randint(0, 2048, (200,))
    cos, sin = rot(k, pos[None])
    _, k_hf = llama.apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(apply_rope(k, pos, SMOL), k_hf, rtol=0, atol=2e-3)


@pytest.mark.parametrize("partial", [0.5, 0.25])
def test_partial_rotary_factor_matches_gpt_neox(partial) -> None:
    """Only the first ``head_dim * partial`` channels rotate (GPT-NeoX/Phi convention)."""
    params = RopeParams(head_dim=64, theta=1e4, partial_rotary_factor=partial)
    rot = int(64 * partial)
    assert params.inv_freq().shape == (rot // 2,)
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, 2, 100, 64, generator=g, dtype=torch.float64)
    pos = _positions(7, 100)
    cos, sin = _hf_cos_sin(pos, 64, 1e4, partial=partial)
    _, k_hf = neox.apply_rotary_pos_emb(k, k, cos[None], sin[None])
    y = apply_rope(k, pos, params)
    torch.testing.assert_close(y, k_hf, rtol=0, atol=1e-10)
    assert torch.equal(y[..., rot:], k[..., rot:])
    torch.testing.assert_close(undo_rope(y, pos, params), k, rtol=0, atol=1e-10)


def test_dtype_and_shape_kept() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(2, 2, 7, 16).to(dtype)
        y = apply_rope(x, torch.arange(100, 107), RopeParams(16, 1e4))
        assert y.dtype == dtype and y.shape == x.shape


def test_params_dict_round_trip_and_unsupported_type() -> None:
    p = RopeParams(head_dim=64, theta=1e5, partial_rotary_factor=0.5)
    assert RopeParams.from_dict(p.to_dict()) == p
    with pytest.raises(UnsupportedModelError, match="llama3"):  # scaled, without frequencies
        apply_rope(torch.zeros(1, 64), torch.tensor([3]), RopeParams(64, 1e5, rope_type="llama3"))
