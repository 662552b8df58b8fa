"""Tiny random decoder-only models of other architectures than SmolLM2's, built from
configs (no weights downloaded), for the any-model calibration tests:

- Qwen2-style: attention biases on q/k/v, RoPE theta 1e6, 7 query heads per KV head;
- Llama-3-style: RoPE scaling ``llama3`` (as every Llama-3.1/3.2/3.3 config has), and
  the ``linear`` and ``yarn`` scalings on the same shape.

Two layers, head dim 16, a 512-token vocabulary: a forward pass over a few hundred
tokens takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 512
SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}
"""RoPE scalings, with an original context short enough that the tiny windows reach
every band of llama3's and yarn's frequency ramps."""


def qwen2_config(**overrides) -> Qwen2Config:
    """Qwen2-style: biases on q/k/v (Qwen2 always has them), theta 1e6, 14 query heads
    over 2 KV heads (7 per KV head, as Qwen2.5-0.5B's 14/2)."""
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 112,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": True,
    }
    kw.update(overrides)
    return Qwen2Config(**kw)


def llama3_config(scaling: str = "llama3", **overrides) -> LlamaConfig:
    """Llama-3-style (theta 5e5, 4 query heads per KV head) with RoPE scaling
    ``scaling`` (a key of :data:`SCALINGS`)."""
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,  # yarn's factor 4 over 256
        "rope_parameters": {**SCALINGS[scaling], "rope_theta": 5e5},
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def build(config, seed: int = 0):
    """A random model of ``config`` in eval mode (float32)."""
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if config.model_type == "qwen2" else LlamaForCausalLM
    return cls(config).eval()


def save(config, folder: Path, seed: int = 0, tokenizer=None) -> Path:
    """A random model of ``config`` saved with ``save_pretrained`` (and ``tokenizer``)."""
    build(config, seed).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def byte_tokenizer():
    """A byte-level BPE tokenizer of :data:`VOCAB` ids trained in memory on a few lines
    of text (``tokenizers``), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


SAMPLE_TEXT = (
    "The store keeps compressed chunks of the key-value cache in tiers: GPU memory, host "
    "memory, a local disk and an object store. Each chunk is named by the hash of its "
    "prefix, so two replicas that see the same prompt share the same chunks. "
)
