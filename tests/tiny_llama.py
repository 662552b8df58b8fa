"""A tiny Llama shape (2 layers, 2 KV heads, head dim 16) served by an "engine": its
transformers config, a hand-made codec artifact for it and a store config naming it,
for the engine-connector tests (vLLM, SGLang). No model weights, no calibration.

The artifact codes all 64 components of a random rotation at 4 bits, stores only the 4 sink tokens
exactly (``window=0``), so what a store serves is visibly the codec's round trip, not
the input, and a chunk codes the same whichever put wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig

from kvtc_store.codec import CodecArtifact, KVTCCodec, PlanRange, RopeParams, default_groups

LAYERS, HEADS, DIM = 2, 2, 16
CHUNK = 32
"""Tokens per chunk in these tests (a multiple of 16, as the config requires)."""


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The served model's transformers config (what vLLM and SGLang hand a connector)."""
    kw = {
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": HEADS,
        "hidden_size": 4 * DIM,
        "intermediate_size": 64,
        "vocab_size": 1000,
        "rope_theta": 10000.0,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama_artifact(fingerprint: str = "a" * 64, bits: int = 4) -> CodecArtifact:
    """The hand-made artifact; another ``bits`` is another codec version (another id)."""
    groups = default_groups(LAYERS)
    p = LAYERS * HEADS * DIM
    # A seeded random rotation mixes every layer and head into each component, so KV
    # put in the wrong orientation decodes visibly wrong.
    basis, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(5)))
    return CodecArtifact(
        model_fingerprint=fingerprint,
        model_name="tiny-llama",
        kv_shape=(LAYERS, HEADS, DIM),
        rope=RopeParams(head_dim=DIM, theta=10000.0),
        groups=groups,
        means=[torch.zeros(p) for _ in groups],
        bases=[basis for _ in groups],
        plan=[PlanRange(g, 0, p, bits) for g in range(len(groups))],
        target_ratio=8.0,
        window=0,
    )


def write_store_config(
    folder: Path,
    *,
    disk: Path | None = None,
    tenant: str = "",
    fingerprint: str = "a" * 64,
    artifact: Path | None = None,
    registry: Path | None = None,
) -> Path:
    """Save the artifact under ``folder`` and a store YAML naming it (memory tier, then a
    disk tier at ``disk``, default ``folder/disk``); returns the YAML's path. With
    ``artifact`` (a saved artifact's folder) the YAML names that one instead; with
    ``registry`` (a registry folder) it names that registry's ``default`` profile
    (refreshed on demand only, fetched artifacts cached under ``folder/cache``)."""
    folder.mkdir(parents=True, exist_ok=True)
    art = artifact
    if art is None and registry is None:
        art = folder / "artifact"
        tiny_llama_artifact(fingerprint).save(art)
    codec = {"artifact": str(art)}
    if registry is not None:
        codec = {
            "registry": str(registry),
            "profile": "default",
            "refresh_seconds": 0,
            "cache_dir": str(folder / "cache"),
        }
    cfg = {
        "chunk_tokens": CHUNK,
        "tenant": tenant,
        "tiers": [
            {"kind": "memory", "capacity": "64MiB"},
            {"kind": "disk", "path": str(disk or folder / "disk"), "capacity": "64MiB"},
        ],
        "codec": codec,
    }
    path = folder / "store.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def publish_two_versions(registry: Path) -> tuple[CodecArtifact, CodecArtifact]:
    """Publish two versions of the tiny artifact (4 and 6 bits) to a registry folder and
    point its ``default`` profile at the first; returns both."""
    from kvtc_store.registry import open_registry

    reg = open_registry(registry, create=True)
    v1, v2 = tiny_llama_artifact(bits=4), tiny_llama_artifact(bits=6)
    for art in (v1, v2):
        reg.publish(art)
    reg.promote(v1.model_fingerprint, v1.artifact_id, "default")
    return v1, v2


def promote(registry: Path, art: CodecArtifact) -> None:
    """Point the registry's ``default`` profile at ``art`` (as an operator would)."""
    from kvtc_store.registry import open_registry

    open_registry(registry).promote(art.model_fingerprint, art.artifact_id, "default")


def round_trip(
    keys: torch.Tensor,
    values: torch.Tensor,
    first_position: int = 0,
    dtype: torch.dtype | None = None,
    artifact: CodecArtifact | None = None,
):
    """What the store serves for KV ``(L, H, T, D)`` of whole chunks from
    ``first_position``: the codec's encode then decode (to ``dtype``), chunk by chunk
    (with ``artifact``, default the 4-bit tiny artifact)."""
    codec = KVTCCodec(artifact or tiny_llama_artifact())
    blobs = codec.encode_sequence(keys, values, first_position, chunk_tokens=CHUNK)
    chunks, error = codec.decode_prefix(blobs, dtype=dtype)
    assert error is None
    return torch.cat([c.keys for c in chunks], 2), torch.cat([c.values for c in chunks], 2)
