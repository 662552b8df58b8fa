"""What every serving-engine connector (vLLM, SGLang) shares: the store opened for the
engine's model, with engine-neutral chunk keys.

Engines never run our calibration, so their store config must name a saved codec
artifact (``codec.artifact``; make one with ``kvtc-store calibrate``) or a codec registry
(``codec.registry`` and ``codec.profile``: the store then encodes with the profile's
current artifact and decodes every version the registry holds). The artifact says
which model it was calibrated for; the engine's transformers config must have the same
KV shape and RoPE, or :class:`~kvtc_store.errors.ArtifactModelMismatchError` is raised.

Chunk keys are the store's own SHA-256 prefix chain (:mod:`kvtc_store.keys`) over the
token ids, namespaced by the artifact's model fingerprint and the KV layout
(``L{layers}-H{heads}-D{dim}-{dtype}-tp{rank}of{size}``), never an engine's block or page
hash. A vLLM replica and an SGLang replica of one model with one config therefore derive
the same keys for the same tokens and share every chunk (``tests/test_engine_keys.py``).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ..codec.artifact import CodecArtifact
from ..config import artifact_from_config, load_config
from ..errors import ArtifactModelMismatchError, ConfigError
from ..model import ModelInfo, kv_geometry
from ..store import TieredStore

__all__ = [
    "KV_DTYPE_NAMES",
    "engine_model_info",
    "open_engine_store",
    "request_salt",
    "warn_if_codec_on_cpu",
]

log = logging.getLogger(__name__)

KV_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
"""KV cache dtypes the connectors serve, and the name each takes in the chunk-key
namespace. One table for every engine, so a vLLM and an SGLang replica serving the same
dtype name it the same way and share chunks."""


def request_salt(cache_salt: str | None = None, lora: list | None = None) -> str:
    """The chunk-key salt of an engine request (:meth:`TieredStore.keys_for`): requests
    share chunks only when their salts are equal.

    Args:
        cache_salt: the request's cache salt (vLLM and SGLang both take one per request;
            the same salt names the same namespace in either engine).
        lora: vLLM's LoRA adapter identity ``[lora_name, lora_int_id]``, or None.
            (SGLang's ``extra_key``, its LoRA id among others, gets a salt of its own:
            :func:`~kvtc_store.connectors.sglang_pages.namespace_salt`.)

    Returns:
        ``""`` for a request with neither (the plain namespace), else their JSON text.
    """
    if not cache_salt and lora is None:
        return ""
    return json.dumps({"cache_salt": cache_salt or "", "lora": lora}, sort_keys=True)


def engine_model_info(hf_config, artifact: CodecArtifact) -> ModelInfo:
    """The served model's identity, from the engine's config and the codec artifact.

    Args:
        hf_config: the engine's transformers config (``PretrainedConfig``).
        artifact: the codec artifact the store config names.

    Returns:
        A :class:`~kvtc_store.model.ModelInfo` with the artifact's model name and
        fingerprint and the config's KV shape and RoPE.

    Raises:
        ArtifactModelMismatchError: the config's KV shape or RoPE differs from the
            artifact's (the artifact was calibrated for another model).
    """
    kv_shape, rope = kv_geometry(hf_config)
    if tuple(kv_shape) != tuple(artifact.kv_shape):
        raise ArtifactModelMismatchError(
            f"codec artifact {artifact.artifact_id} ({artifact.model_name}) is for KV shape "
            f"{tuple(artifact.kv_shape)}; the engine's model has {tuple(kv_shape)}"
        )
    if rope.to_dict() != artifact.rope.to_dict():
        raise ArtifactModelMismatchError(
            f"codec artifact {artifact.artifact_id} ({artifact.model_name}) is for RoPE "
            f"{artifact.rope.to_dict()}; the engine's model has {rope.to_dict()}"
        )
    return ModelInfo(artifact.model_name, artifact.model_fingerprint, tuple(kv_shape), rope)


def open_engine_store(
    config_path: str | os.PathLike,
    hf_config,
    *,
    dtype: str = "bfloat16",
    tp_rank: int = 0,
    tp_size: int = 1,
    codec_device: str | None = None,
) -> TieredStore:
    """Open the store a connector's config names, for the engine's model.

    Args:
        config_path: the store's YAML config (docs/config.md); ``codec.artifact`` or
            ``codec.registry`` is required.
        hf_config: the engine's transformers config of the served model.
        dtype: the KV dtype the engine serves (``"bfloat16"``, ``"float16"``); part of
            the chunk-key namespace.
        tp_rank, tp_size: tensor-parallel rank and size; only ``tp_size == 1`` is
            supported (the codec is calibrated on every KV head).
        codec_device: run the codec on this device (the one the engine's KV cache lives
            on) instead of the config's ``codec.device``.

    Raises:
        ConfigError: malformed config, neither ``codec.artifact`` nor ``codec.registry``,
            or ``tp_size > 1``.
        RegistryError: the registry's profile has no current artifact, or it cannot be
            reached (and nothing is cached).
        ArtifactError: the artifact is missing or malformed;
            ArtifactModelMismatchError: it is for another model.
    """
    if tp_size != 1:
        raise ConfigError(
            f"kvtc-store connectors support tensor parallel size 1 (got {tp_size}): the "
            "codec is calibrated on all KV heads of a layer"
        )
    cfg = load_config(config_path)
    if cfg.codec.artifact is None and cfg.codec.registry is None:
        raise ConfigError(
            f"{config_path}: codec.artifact: a serving engine needs a saved codec artifact "
            "(make one with `kvtc-store calibrate`, then name its folder here) or a "
            "codec.registry with a profile"
        )
    info = engine_model_info(hf_config, artifact_from_config(cfg.codec))
    return TieredStore.from_config(
        config_path, info, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size, codec_device=codec_device
    )


def warn_if_codec_on_cpu(store: TieredStore, engine: str) -> bool:
    """Tell the user, once per store, when an engine's KV will be coded by the CPU
    reference codec although a CUDA device is present (the store config's
    ``codec.device`` is ``cpu``, or the artifact cannot run on the batched GPU codec):
    a log line and the ``kvtc_codec_on_cpu`` gauge set to 1. Tens of MB/s on the CPU
    against tens of GB/s on the GPU, so never silently.

    Returns:
        True when it warned (now or before) for this store.
    """
    if getattr(store.codec, "takes_device_blobs", False) or not torch.cuda.is_available():
        store.metrics.codec_on_cpu.set(0)
        return False
    if not getattr(store, "_warned_codec_on_cpu", False):
        store._warned_codec_on_cpu = True
        log.warning(
            "kvtc-store: %s's KV is coded by the CPU reference codec (codec on %s) although "
            "CUDA is present: set codec.device: cuda in the store config for the batched "
            "GPU codec (a rans artifact with a power-of-two head dim)",
            engine,
            store.codec.device,
        )
    store.metrics.codec_on_cpu.set(1)
    return True
