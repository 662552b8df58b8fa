"""The codec on CUDA: Triton kernels for the rANS coder and the transform's fused steps.

Needs ``triton`` and a CUDA device (the ``gpu`` extra); nothing here is imported by the
CPU path. Streams and blobs are the same format as the CPU reference
(:mod:`kvtc_store.codec.rans`, :mod:`kvtc_store.codec.format`), byte for byte for the
entropy coder; the two implementations of :class:`~kvtc_store.codec.protocol.Codec`
import nothing from each other (:func:`kvtc_store.codec.make_codec` picks one).

- :mod:`.rans_triton`: batched interleaved-rANS encode and decode of many chunks
  (:func:`encode_symbols_gpu`, :func:`decode_symbols_gpu`).
- :mod:`.codec_gpu`: :class:`GpuCodec`, encode and decode of a batch of chunks end to
  end on the GPU (RoPE, mean/scale, cuBLAS projection, quantisation, rANS).
- :mod:`.nvcomp_coder`: :class:`NvcompCoder`, batched RAW Deflate (zlib-compatible) and
  ANS with nvCOMP (``nvidia-nvcomp-cu13``, also in the ``gpu`` extra).
"""

from ..protocol import DecodedBatch
from .codec_gpu import GpuCodec
from .nvcomp_coder import NvcompCoder, nvcomp_available
from .rans_triton import DeviceTables, decode_symbols_gpu, encode_symbols_gpu

__all__ = [
    "DecodedBatch",
    "DeviceTables",
    "GpuCodec",
    "NvcompCoder",
    "decode_symbols_gpu",
    "encode_symbols_gpu",
    "nvcomp_available",
]
