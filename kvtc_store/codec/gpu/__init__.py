"""The codec on CUDA: Triton kernels for the rANS coder and the transform's fused steps.

Needs ``triton`` and a CUDA device (the ``gpu`` extra); nothing here is imported by the
CPU path. Streams and blobs are the same format as the CPU reference
(:mod:`kvtc_store.codec.rans`, :class:`~kvtc_store.codec.KVTCCodec`), byte for byte for
the entropy coder.

- :mod:`.rans_triton`: batched interleaved-rANS encode and decode of many chunks
  (:func:`encode_symbols_gpu`, :func:`decode_symbols_gpu`).
- :mod:`.codec_gpu`: :class:`GpuCodec`, encode and decode of a batch of chunks end to
  end on the GPU (RoPE, mean/scale, cuBLAS projection, quantisation, rANS).
"""

from .codec_gpu import DecodedBatch, GpuCodec
from .rans_triton import DeviceTables, decode_symbols_gpu, encode_symbols_gpu

__all__ = [
    "DecodedBatch",
    "DeviceTables",
    "GpuCodec",
    "decode_symbols_gpu",
    "encode_symbols_gpu",
]
