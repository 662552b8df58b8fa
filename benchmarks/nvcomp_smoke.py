"""Smoke test of nvCOMP on this GPU, before the codec's GPU tests: run it first.

    PYTHONPATH=. python benchmarks/nvcomp_smoke.py

Prints the nvCOMP version, then checks, each reported OK or FAIL: nvCOMP's RAW Deflate
through its own API (a 3 MB buffer, one stream that ``zlib.decompress(data, -15)``
reads); then :class:`kvtc_store.codec.gpu.NvcompCoder`: RAW Deflate written on the GPU
inflates with zlib, zlib (levels 1, 9) and ISA-L streams inflate on the GPU, ANS round
trips, a batch of 128 buffers of unequal sizes with an empty one. It also reports, without
failing, rough throughputs and then (last: nvCOMP promises nothing on such input) what
nvCOMP does with corrupt or truncated streams. Exits 1 if any check fails.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
import zlib

import numpy as np
import torch

FAILED: list[str] = []


def check(name: str):
    def run(fn):
        try:
            fn()
            print(f"OK    {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every check
            FAILED.append(name)
            print(f"FAIL  {name}", flush=True)
            traceback.print_exc()
        return fn

    return run


def sample(n: int, seed: int) -> bytes:
    """Compressible bytes like a blob payload: bf16 of Gaussian values and some zeros."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n + 1) // 2).astype(np.float32))
    b = x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()[:n]
    b = bytearray(b)
    b[: n // 8] = bytes(n // 8)
    return bytes(b)


def main() -> int:
    from nvidia import nvcomp

    logging.basicConfig(level=logging.WARNING)  # the wrapper's fallbacks, if any, at DEBUG:
    logging.getLogger("kvtc_store.codec.gpu.nvcomp_coder").setLevel(logging.DEBUG)

    print("nvcomp", nvcomp.__version__, "cuda", nvcomp.__cuda_version__, "torch", torch.__version__)
    print("device", torch.cuda.get_device_name(0))

    @check("nvCOMP API: RAW Deflate of 3 MB, one stream zlib inflates")
    def _():
        data = sample(3 << 20, 1)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
        codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW)
        comp = codec.encode(nvcomp.as_array(t))
        raw = bytes(comp.cpu())
        print(f"      {len(data)} -> {len(raw)} bytes")
        assert zlib.decompress(raw, -15) == data

    from kvtc_store.codec.gpu.nvcomp_coder import EMPTY_DEFLATE, NvcompCoder
    from kvtc_store.errors import BlobCorruptError

    deflate, ans = NvcompCoder("deflate"), NvcompCoder("ans")
    sizes = [0, 1, 100, 65536, 65537, 1 << 20, (2 << 20) + 7]
    bufs = [sample(n, i) for i, n in enumerate(sizes)]

    @check("GPU RAW Deflate -> zlib.decompress(-15), sizes incl. 0 and > 64 KiB")
    def _():
        comp = deflate.compress_host(bufs)
        assert comp[0] == EMPTY_DEFLATE
        for c, b in zip(comp, bufs):
            assert zlib.decompress(c, -15) == b, len(b)
        print(f"      ratio {sum(sizes) / sum(map(len, comp)):.3f}")

    @check("zlib levels 1 and 9 -> GPU inflate")
    def _():
        for level in (1, 9):
            streams = []
            for b in bufs:
                c = zlib.compressobj(level, zlib.DEFLATED, -15)
                streams.append(c.compress(b) + c.flush())
            assert deflate.decompress_host(streams, sizes) == bufs, level

    @check("ISA-L -> GPU inflate")
    def _():
        from isal import isal_zlib

        streams = [isal_zlib.compress(b, 1, wbits=-15) for b in bufs]
        assert deflate.decompress_host(streams, sizes) == bufs

    @check("ANS round trip")
    def _():
        comp = ans.compress_host(bufs)
        assert comp[0] == b""
        assert ans.decompress_host(comp, sizes) == bufs
        print(f"      ratio {sum(sizes) / sum(map(len, comp)):.3f}")

    @check("batch of 128 unequal sizes, one empty, both formats")
    def _():
        rng = np.random.default_rng(5)
        lens = [int(x) for x in rng.integers(1, 200_000, 128)]
        lens[17] = 0
        many = [sample(n, i) for i, n in enumerate(lens)]
        for coder in (deflate, ans):
            comp = coder.compress_host(many)
            assert coder.decompress_host(comp, lens) == many, coder.algorithm
        c = deflate.compress_host(many)
        assert [zlib.decompress(x, -15) for x in c] == many

    @check("device tensors in, device tensors out (decompress into given buffers)")
    def _():
        src = deflate.to_device(bufs)
        comp = deflate.compress(src)
        out = deflate._alloc(sizes)[1]
        got = deflate.decompress(comp, sizes, out=out)
        assert all(g is o for g, o in zip(got, out))
        assert all(torch.equal(g, s) for g, s in zip(got, src))

    @check("deflate64k pieces: one compress_spans and one decompress_spans, zlib reads them")
    def _():
        from kvtc_store.codec.entropy import (
            PIECE_SIZE,
            get_coder,
            piece_raw_sizes,
            read_piece_table,
        )

        src, at = deflate.to_device_packed(bufs)
        raws = [piece_raw_sizes(n) for n in sizes]
        offs = np.concatenate([a + PIECE_SIZE * np.arange(len(r)) for a, r in zip(at, raws)])
        lens = np.concatenate(raws)
        out, out_at, comp = deflate.compress_spans(src, offs, lens)
        host = out.cpu().numpy()
        joined = b"".join(zlib.decompress(host[o : o + n].tobytes(), -15)
                          for o, n in zip(out_at, comp))  # fmt: skip
        assert joined == b"".join(bufs)
        cpu = [get_coder("deflate64k").encode(b) for b in bufs]  # ISA-L pieces, the other way
        src2, at2 = deflate.to_device_packed(cpu)
        tables = [read_piece_table(c, n) for c, n in zip(cpu, sizes)]
        so = np.concatenate([a + t[0] for a, t in zip(at2, tables)])
        ss = np.concatenate([t[1] for t in tables])
        dst = torch.empty_like(src)
        deflate.decompress_spans(src2, so, ss, dst, offs, lens)
        assert all(torch.equal(dst[a : a + n], src[a : a + n]) for a, n in zip(at, sizes))
        assert deflate._carved, "nvCOMP refused a batch carved out of one buffer (views used)"
        print(f"      {len(lens)} pieces, ratio {sum(sizes) / sum(comp):.3f}")

    def corrupt_report():
        good = zlib.compress(bufs[5], 1)[2:-4]  # raw deflate of 1 MiB, zlib-written
        cases = {
            "truncated": good[: len(good) // 2],
            "byte flipped": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
            "garbage": sample(5000, 99),
        }
        for name, bad in cases.items():
            try:
                out = deflate.decompress_host([bad], [sizes[5]])
                what = "equal" if out[0] == bufs[5] else "wrong bytes, no error"
            except BlobCorruptError as exc:
                what = f"BlobCorruptError: {exc}"
            except Exception as exc:  # noqa: BLE001
                what = f"{type(exc).__name__}: {exc}"
            print(f"INFO  corrupt deflate ({name}): {what}", flush=True)
        torch.cuda.synchronize()

    big = [sample(2 << 20, i) for i in range(128)]
    for coder in (deflate, ans):
        try:
            dev = coder.to_device(big)
            comp = coder.compress(dev)
            lens = [len(b) for b in big]
            for name, fn in (
                ("compress", lambda c=coder, d=dev: c.compress(d)),
                ("decompress", lambda c=coder, x=comp, n=lens: c.decompress(x, n)),
            ):
                fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                gbps = 3 * sum(lens) / (time.perf_counter() - t) / 1e9
                print(f"INFO  {coder.algorithm} {name} 128 x 2 MiB: {gbps:.2f} GB/s", flush=True)
        except Exception:  # noqa: BLE001 - a report, not a check
            traceback.print_exc()

    try:  # deflate64k: the same 128 x 2 MiB cut into 64 KiB pieces, one call each way
        from kvtc_store.codec.entropy import PIECE_SIZE, piece_raw_sizes

        src, at = deflate.to_device_packed(big)
        raws = [piece_raw_sizes(len(b)) for b in big]
        offs = np.concatenate([a + PIECE_SIZE * np.arange(len(r)) for a, r in zip(at, raws)])
        lens = np.concatenate(raws)
        out, out_at, comp = deflate.compress_spans(src, offs, lens)
        dst = torch.empty_like(src)
        for name, fn in (
            ("compress", lambda: deflate.compress_spans(src, offs, lens)),
            ("decompress", lambda: deflate.decompress_spans(out, out_at, comp, dst, offs, lens)),
        ):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            gbps = 3 * sum(map(len, big)) / (time.perf_counter() - t) / 1e9
            print(f"INFO  deflate64k {name} 128 x 2 MiB ({len(lens)} pieces): {gbps:.2f} GB/s")
    except Exception:  # noqa: BLE001 - a report, not a check
        traceback.print_exc()

    try:
        corrupt_report()
    except Exception:  # noqa: BLE001 - a report, not a check
        traceback.print_exc()

    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
