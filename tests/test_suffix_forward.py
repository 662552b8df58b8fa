"""The TTFT benchmark's suffix prefill (``benchmarks/suffix_forward.py``) against Hugging
Face's own path, on a tiny random-weight Llama in float32 on the CPU (the arithmetic and
the cache plumbing); the FlashAttention call itself against that arithmetic on CUDA (runs
on the GPU machine, skipped elsewhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from suffix_forward import (
    SuffixForward,
    _splits,
    causal_flash_attention,
    prefix_suffix_attention,
)


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hf_prefix_and_logits(model, ids, prefix):
    """Hugging Face's path: prefill the prefix into a DynamicCache, then the suffix."""
    cache = transformers.DynamicCache()
    kw = _cache_kwarg(model)
    with torch.no_grad():
        model(ids[:, :prefix], use_cache=True, **{kw: cache})
        kv = [(la.keys[0].clone(), la.values[0].clone()) for la in cache.layers]
        logits = model(ids[:, prefix:], use_cache=True, logits_to_keep=1, **{kw: cache}).logits
    return kv, logits


@pytest.mark.parametrize("attention", ["flash", "split"])
@pytest.mark.parametrize("prefix", [1024, 300])
def test_suffix_logits_match_hugging_face(prefix, attention):
    """Attention over the cache buffers gives Hugging Face's logits: a prefix cut into
    splits by the split variant (1024: two of 512) and one that is not (300),
    grouped-query heads, and a second call gives the same logits (the suffix is written
    at its positions, not appended)."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, prefix + 7), generator=torch.Generator().manual_seed(1))
    kv, want = _hf_prefix_and_logits(model, ids, prefix)
    sf = SuffixForward(model, ids[:, prefix:], prefix, graph=False, attention=attention)
    keys, values = sf.prefix_kv()
    for i, (k, v) in enumerate(kv):
        keys[i].copy_(k)
        values[i].copy_(v)
    got = sf.logits().clone()
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(sf.logits(), got)
    keys[0].zero_()  # the logits come from the buffers: change them, the logits change
    assert not torch.allclose(sf.logits(), want, atol=1e-3)


def test_chunk_views_are_the_prefix_buffers():
    model = _tiny_llama()
    sf = SuffixForward(model, torch.zeros(1, 4, dtype=torch.long), 512, graph=False)
    kc, _ = sf.chunk_views(256)
    assert tuple(kc.shape) == (2, 2, 2, 256, 16)  # (chunks, L, Hk, 256, D)
    kc[1, 0, 1, 3].fill_(5.0)
    assert torch.all(sf.prefix_kv()[0][0, 1, 256 + 3] == 5.0)


def test_attention_refuses_what_it_cannot_do():
    q = torch.zeros(2, 4, 3, 8)
    kv = torch.zeros(2, 2, 10, 8)
    with pytest.raises(ValueError, match="prefix_suffix_attention"):
        prefix_suffix_attention(None, q, kv, kv, None)
    with pytest.raises(ValueError, match="causal_flash_attention"):
        causal_flash_attention(None, q, kv, kv, None)
    with pytest.raises(ValueError, match="attention 'paged'"):
        SuffixForward(_tiny_llama(), torch.zeros(1, 4, dtype=torch.long), 8, attention="paged")
    assert _splits(32768) == 64 and _splits(8192) == 16 and _splits(1024) == 2
    assert _splits(768) == 3 and _splits(300) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefix", [8192, 1000, 0])
def test_flash_call_is_bottom_right_causal_with_gqa_on_cuda(prefix):
    """The one FlashAttention call on CUDA (bf16, 32 query heads over 8 KV heads, 16 new
    tokens) against the float32 reference with the bottom-right mask, and against the
    split variant: a top-left mask, or heads paired wrongly, would be off by O(1)."""
    g = torch.Generator(device="cuda").manual_seed(prefix)
    q = torch.randn(1, 32, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (
        torch.randn(1, 8, prefix + 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(2)
    )
    got = causal_flash_attention(None, q, k, v, None)[0].float()
    want = causal_flash_attention(None, q.cpu(), k.cpu(), v.cpu(), None)[0].float()
    assert got.shape == (1, 16, 32, 128)
    assert torch.allclose(got.cpu(), want, atol=2e-2, rtol=2e-2)
    split = prefix_suffix_attention(None, q, k, v, None)[0].float()
    assert torch.allclose(got, split, atol=2e-2, rtol=2e-2)
