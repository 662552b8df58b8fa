"""The codec on CUDA: same blob format both ways, every output element written.

Skipped without CUDA (CI has none); run on the lent H200 and recorded in
``benchmarks/results/gpu_codec_tests.md``. Set ``KVTC_GPU_TEST_DATA`` to a folder holding
``artifact/`` (a saved SmolLM2 codec) and ``chunk.safetensors`` (``keys``/``values``
``(30, 3, 256, 64)`` bf16 of real text at ``first_position`` 256) to add real KV.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvtc_store.codec import CodecArtifact, KVTCCodec, make_codec
from kvtc_store.codec.quant import pack_bits, unpack_bits
from tests.test_codec import arts, make_chunk  # noqa: F401 - synthetic artifact fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _real_cases():
    root = os.environ.get("KVTC_GPU_TEST_DATA")
    if not root:
        return []
    from safetensors.torch import load_file

    t = load_file(str(Path(root) / "chunk.safetensors"))
    return [(CodecArtifact.load(Path(root) / "artifact"), t["keys"].float(), t["values"].float())]


def _cases(arts):  # noqa: F811
    k, v = make_chunk(256, 300, seed=5)
    return [(arts["all", 8.0], k, v, 300), (arts["layer", 4.0], k, v, 300)] + [
        (a, k2, v2, 256) for a, k2, v2 in _real_cases()
    ]


@pytest.mark.parametrize("bits", range(1, 9))
def test_cuda_bit_packing_matches_cpu(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (12_345,), generator=g, dtype=torch.uint8)
    cpu = pack_bits(codes, bits)
    gpu = pack_bits(codes.cuda(), bits)
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(unpack_bits(gpu, bits, codes.numel()).cpu(), codes)


def test_blobs_cross_devices(arts):  # noqa: F811
    """A GPU-written blob decodes on the CPU and a CPU-written one on the GPU; the same blob
    decodes to the same values on both (float tolerance); both devices' blobs carry the
    same header (the rANS stream's length within 0.5%) and reconstruct the chunk equally
    well."""
    for art, k, v, first in _cases(arts):
        cpu, gpu = KVTCCodec(art), make_codec(art, device="cuda")
        blob_c = cpu.encode(k, v, first)
        blob_g = gpu.encode(k.cuda(), v.cuda(), first)
        hc, hg = cpu.read_header(blob_c), cpu.read_header(blob_g)
        assert (hg.shape, hg.coder, hg.first_position) == (hc.shape, hc.coder, hc.first_position)
        # the devices' float arithmetic may round a few coefficients to the other symbol:
        # the rANS stream's length may differ by a few bytes, nothing else
        assert {s: n for s, n in hg.sections.items() if s != "stream"} == {
            s: n for s, n in hc.sections.items() if s != "stream"
        }
        stream_c, stream_g = hc.sections.get("stream", 0), hg.sections.get("stream", 0)
        assert abs(stream_g - stream_c) <= 0.005 * stream_c + 8
        for blob in (blob_c, blob_g):
            on_cpu = cpu.decode(blob)
            on_gpu = gpu.decode(blob)
            assert on_gpu.keys.device.type == "cuda"
            scale = k.abs().max().item()
            assert (on_gpu.keys.cpu() - on_cpu.keys).abs().max().item() < 1e-3 * scale
            assert (on_gpu.values.cpu() - on_cpu.values).abs().max().item() < 1e-3 * scale
        err_c = ((cpu.decode(blob_c).keys - k) ** 2).sum().item()
        err_g = ((cpu.decode(blob_g).keys - k) ** 2).sum().item()
        assert err_g < 1.05 * err_c + 1e-9


def test_gpu_decode_writes_every_element(arts):  # noqa: F811
    """Poison the CUDA caching allocator with NaN, then decode: no NaN may survive."""
    for art, k, v, first in _cases(arts):
        gpu = make_codec(art, device="cuda")
        blob = gpu.encode(k.cuda(), v.cuda(), first, exact_tail=64)
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        del poison  # its memory returns to the cache, NaN-filled, for decode's torch.empty
        for dtype in (torch.float32, torch.bfloat16):
            dec = gpu.decode(blob, dtype=dtype)
            assert not dec.keys.isnan().any() and not dec.values.isnan().any()
            assert torch.equal(
                dec.keys[:, :, -64:].cpu(), k[:, :, -64:].to(torch.bfloat16).to(dtype)
            )
