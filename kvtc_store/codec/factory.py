"""Pick a codec implementation for an artifact and a device.

:func:`make_codec` returns the batched CUDA codec (:class:`~kvtc_store.codec.gpu.GpuCodec`)
where it runs (a CUDA device, a ``rans`` artifact whose head dim is a power of two, and
triton installed), else the CPU reference (:class:`~kvtc_store.codec.KVTCCodec`). Both
follow :class:`~kvtc_store.codec.protocol.Codec` and write the same blobs. This module
is the only place that knows both.
"""

from __future__ import annotations

import logging

import torch

from .artifact import CodecArtifact
from .codec import KVTCCodec
from .exact import DEFAULT_EXACT_DTYPE
from .protocol import Codec

log = logging.getLogger(__name__)

__all__ = ["batched_unavailable", "make_codec"]


def batched_unavailable(artifact: CodecArtifact, device: torch.device) -> str | None:
    """Why the batched CUDA codec cannot run ``artifact`` on ``device`` (None: it can)."""
    dim = artifact.kv_shape[2]
    if device.type != "cuda":
        return f"device {device} (needs CUDA)"
    if artifact.quantizer != "rans":
        return f"quantiser {artifact.quantizer!r} (needs rans)"
    if dim & (dim - 1):
        return f"head dim {dim} (needs a power of two)"
    try:
        from .gpu import GpuCodec  # noqa: F401 - triton present?
    except ImportError as exc:
        return f"the GPU codec does not import: {exc}"
    return None


def make_codec(
    artifact: CodecArtifact,
    coder: str | None = None,
    device: str | torch.device = "cpu",
    *,
    batched: bool | None = None,
    exact_dtype: str = DEFAULT_EXACT_DTYPE,
    rate_control: bool = True,
    fp8_tail: bool = False,
) -> Codec:
    """The codec for ``artifact`` on ``device``.

    Args:
        artifact: the calibrated codec.
        coder: general-purpose coder over new blobs' payload (as for
            :class:`~kvtc_store.codec.KVTCCodec`; default: ``none`` for ``rans``, and
            ``deflate64k`` for blobs that hold exact tokens in ``bfloat16-planes``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        batched: the batched CUDA codec: None (default) where it runs (else the
            reference, with a log line saying why), True always (ValueError where it
            cannot), False never (the torch reference, on ``device``).
        exact_dtype, rate_control: as for :class:`~kvtc_store.codec.KVTCCodec`.
        fp8_tail: the batched codec projects each group's tail components with an fp8
            GEMM (:mod:`kvtc_store.codec.fp8_tail`; off by default).

    Returns:
        A :class:`~kvtc_store.codec.protocol.Codec`.

    Raises:
        ValueError: ``batched=True`` (or ``fp8_tail``) where the batched codec cannot
            run, or a bad ``exact_dtype``.
        ArtifactError: malformed rANS tables or groups.
    """
    device = torch.device(device)
    if batched is not False:
        why = batched_unavailable(artifact, device)
        if why is None:
            from .gpu import GpuCodec

            return GpuCodec(
                artifact,
                device,
                coder=coder,
                exact_dtype=exact_dtype,
                rate_control=rate_control,
                fp8_tail=fp8_tail,
            )
        if batched or fp8_tail:
            raise ValueError(f"batched codec: cannot run on {device}: {why}")
        if device.type == "cuda":
            log.info("codec on %s without batched kernels: %s", device, why)
    if fp8_tail:
        raise ValueError("fp8_tail: only the batched codec has an fp8 projection")
    return KVTCCodec(
        artifact, coder=coder, device=device, exact_dtype=exact_dtype, rate_control=rate_control
    )
