"""Cost of building a batch's blobs on the host: 128 blobs of about 2.1 MB (the payload
of a 256-token chunk of the Llama-3.1-8B shape at ratio 16) joined from views of one
buffer, as :meth:`GpuCodec.encode_batch <kvtc_store.codec.gpu.GpuCodec.encode_batch>`
does after its download. Measures, in ms per batch: the checksums alone (xxh64, serial
and on the host pool), the joins alone (one allocation and one copy per blob), and a
plain copy into memory that is already mapped, so that the share of first-touch page
faults in the joins shows; and what the encoder does now: each blob checksummed and
joined by a pool thread with :func:`~kvtc_store.codec.blob.join_bytes`, whose copies (and
so the page faults) run without the GIL (``checksum_and_join_bytes_pool``;
``join_bytes_serial``: the joins alone on one thread). Run it under different malloc settings (for example
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which asks for transparent huge pages on
large allocations, glibc >= 2.35) to compare.

Usage: ``python benchmarks/blob_assembly.py [--blobs 128] [--size 2100000] [--reps 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvtc_store.codec.blob import join_bytes, payload_checksum


def _thp() -> str:
    """The kernel's transparent huge page mode, or ``n/a``."""
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        return "n/a"
    with open(path) as f:
        return f.read().strip()


def _checksum_and_join(view) -> bytes:
    """What one pool thread does per blob in the encoder (``pack_blob_parts``)."""
    payload_checksum([view])
    return join_bytes([b"prefix and header", view])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blobs", type=int, default=128)
    p.add_argument("--size", type=int, default=2_100_000, help="bytes per blob")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))  # as the codec's host pool
    pool = ThreadPoolExecutor(workers)
    src = np.random.default_rng(0).integers(0, 256, a.blobs * a.size, dtype=np.uint8)
    mv = memoryview(src)
    views = [mv[i * a.size : (i + 1) * a.size] for i in range(a.blobs)]
    mapped = np.empty_like(src)
    mapped[:] = 1  # touched: no page faults in the copy below
    out: dict[str, list[float]] = {
        "xxh64_serial": [],
        "xxh64_pool": [],
        "join": [],
        "join_bytes_serial": [],
        "checksum_and_join_bytes_pool": [],
        "copy_mapped": [],
    }
    for _ in range(a.reps):
        t = time.perf_counter()
        [payload_checksum([v]) for v in views]
        out["xxh64_serial"].append(time.perf_counter() - t)
        t = time.perf_counter()
        list(pool.map(payload_checksum, [[v] for v in views]))
        out["xxh64_pool"].append(time.perf_counter() - t)
        t = time.perf_counter()
        blobs = [b"".join([b"prefix and header", v]) for v in views]
        out["join"].append(time.perf_counter() - t)
        del blobs
        t = time.perf_counter()
        blobs = [join_bytes([b"prefix and header", v]) for v in views]
        out["join_bytes_serial"].append(time.perf_counter() - t)
        del blobs
        t = time.perf_counter()
        blobs = list(pool.map(_checksum_and_join, views))
        out["checksum_and_join_bytes_pool"].append(time.perf_counter() - t)
        del blobs
        t = time.perf_counter()
        mapped[:] = src
        out["copy_mapped"].append(time.perf_counter() - t)
    res = {k: round(1e3 * float(np.median(v)), 2) for k, v in out.items()}
    res.update(
        blobs=a.blobs,
        bytes=a.blobs * a.size,
        host_workers=workers,
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        thp=_thp(),
        machine=platform.node(),
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
