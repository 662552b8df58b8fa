"""End to end on the real model: transformers generation reusing a compressed prefix."""

from __future__ import annotations

import pytest
import torch

from kvtc_store.backends import DiskBackend, MemoryBackend
from kvtc_store.codec import KVTCCodec
from kvtc_store.connectors.transformers import PrefixCachingLM, greedy_continue
from kvtc_store.demo import QUESTION_1, QUESTION_2
from kvtc_store.keys import ChunkNamespace
from kvtc_store.store import TieredStore

pytestmark = pytest.mark.model


def test_reuse_at_ratio_8_reproduces_greedy_continuation(smollm2, artifact8, doc_kv, tmp_path):
    """A second replica reuses 1,024 compressed tokens of a real document and continues it
    as the model does from uncompressed KV: the first 12 greedy tokens identical (with
    the rANS codec this document reaches a near-tie at token 15, "added to" against
    "returned."; greedy agreement over many windows is measured in
    benchmarks/rate_distortion.py)."""
    model, tok, info = smollm2
    doc, _, _ = doc_kv
    ns = ChunkNamespace(info.fingerprint, info.kv_layout(), "e2e")

    def store():
        return TieredStore(
            [MemoryBackend(64 << 20), DiskBackend(tmp_path, 1 << 30)], KVTCCodec(artifact8), ns
        )

    first = PrefixCachingLM(model, store()).prefill(doc)
    assert first.reused_tokens == 0 and first.put.chunks_written == 4

    res = PrefixCachingLM(model, store(), save=False).generate(doc, max_new_tokens=16)
    assert res.prefill.reused_tokens == 1024
    assert res.prefill.computed_tokens == doc.numel() - 1024

    exact = PrefixCachingLM(model, store(), reuse=False, save=False).prefill(doc)
    ref = greedy_continue(model, exact.cache, exact.logits, 16)
    assert torch.equal(res.tokens[:12], ref[:12]), (tok.decode(res.tokens), tok.decode(ref))


def test_question_after_a_reused_document(smollm2, artifact8, doc_kv):
    """Prompts that share the document share its chunks; the question is prefilled."""
    model, tok, info = smollm2
    doc, _, _ = doc_kv
    ns = ChunkNamespace(info.fingerprint, info.kv_layout(), "qa")
    store = TieredStore([MemoryBackend(64 << 20)], KVTCCodec(artifact8), ns)
    q1 = torch.cat([doc, tok(QUESTION_1, return_tensors="pt").input_ids[0]])
    q2 = torch.cat([doc, tok(QUESTION_2, return_tensors="pt").input_ids[0]])
    assert PrefixCachingLM(model, store).prefill(q1).put.chunks_written == 4
    res = PrefixCachingLM(model, store).generate(q2, max_new_tokens=4)
    assert res.prefill.reused_tokens == 1024 and len(res.tokens) == 4


def test_fully_cached_prompt_still_computes_last_token(smollm2, artifact8, doc_kv, tmp_path):
    model, _tok, info = smollm2
    doc, _, _ = doc_kv
    ids = doc[:512]
    ns = ChunkNamespace(info.fingerprint, info.kv_layout(), "full")
    store = TieredStore([MemoryBackend(64 << 20)], KVTCCodec(artifact8), ns)
    PrefixCachingLM(model, store).prefill(ids)
    again = PrefixCachingLM(model, store).prefill(ids)
    assert again.reused_tokens == 511 and again.computed_tokens == 1
    assert again.logits.shape == (model.config.vocab_size,)
