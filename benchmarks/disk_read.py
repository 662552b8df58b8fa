"""How fast this machine's disk gives back files the size of blobs, cold (issue 6's disk
TTFT target reads 270 MB of blobs for a 32k prefix: 128 files of about 2.1 MB; the run
recorded in benchmarks/results/disk_read_h200.json used files of 2.1 MiB, 282 MB in all,
its ``file_bytes``).

For each number of reader threads, the same files are written once (random bytes), their
pages dropped from the page cache before each pass (``gpu_codec.drop_page_cache``: fsync,
``posix_fadvise(DONTNEED)``), then read whole, each file by one thread of a pool: with
buffered ``read`` (as :class:`~backends.disk.DiskBackend` reads) and with ``O_DIRECT``
into page-aligned buffers (no page cache, the request sizes the device sees are the
reads'). Prints and writes GB/s (10^9 bytes per second), median of ``--reps`` passes.

    python3 benchmarks/disk_read.py [--files 128] [--mb 2.1] [--dir DIR] [--out FILE.json]

Raises nothing of its own; a file system that refuses ``O_DIRECT`` gets a note instead of
those rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_codec import drop_page_cache, pick_disk_dir  # a sibling script, not a package

ALIGN = 4096  # O_DIRECT offset, length and buffer alignment (the logical block size or more)


def read_buffered(path: Path, size: int, buf: mmap.mmap) -> int:
    """Read ``path`` whole with plain ``read`` calls (page cache in between); bytes read."""
    with open(path, "rb", buffering=0) as f:
        return f.readinto(memoryview(buf)[:size])


def read_direct(path: Path, size: int, buf: mmap.mmap) -> int:
    """Read ``path`` whole with ``O_DIRECT`` into the page-aligned ``buf``; bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.readv(fd, [memoryview(buf)[: -(-size // ALIGN) * ALIGN]])
    finally:
        os.close(fd)


def one_pass(paths: list[Path], size: int, threads: int, reader) -> float:
    """Seconds to read every file once, cold, on ``threads`` threads (each reads into a
    page-aligned buffer of its own, allocated and touched before the clock starts)."""
    local = threading.local()

    def alloc():
        local.buf = mmap.mmap(-1, -(-size // ALIGN) * ALIGN)
        local.buf.write(bytes(len(local.buf)))  # fault the pages in now

    def setup(_):
        alloc()
        time.sleep(0.05)  # so that every thread of the pool takes one of these tasks

    def read(p):
        if not hasattr(local, "buf"):  # a thread that took no setup task
            alloc()
        return reader(p, size, local.buf)

    err = drop_page_cache(paths)
    if err:
        raise OSError(err)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(setup, range(threads)))
        t0 = time.perf_counter()
        got = list(pool.map(read, paths))
        dt = time.perf_counter() - t0
    assert all(g >= size for g in got), got
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--mb", type=float, default=2.1, help="size of each file, 10^6 bytes")
    ap.add_argument("--threads", default="1,8,16,32,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: as gpu_codec.py)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    size = -(-int(args.mb * 1e6) // ALIGN) * ALIGN
    base = pick_disk_dir(Path(args.dir) if args.dir else None, args.files * size)
    root = Path(tempfile.mkdtemp(prefix="kvtc-disk-", dir=base))
    paths = [root / f"{i:04d}.blob" for i in range(args.files)]
    for p in paths:
        p.write_bytes(os.urandom(size))
    res = {
        "command": "python3 " + " ".join(sys.argv),
        "host": platform.node(),
        "date": datetime.date.today().isoformat(),
        "dir": str(root),
        "files": args.files,
        "file_bytes": size,
        "gbps": {},
    }
    try:
        for mode, reader in (("buffered", read_buffered), ("o_direct", read_direct)):
            for t in (int(x) for x in args.threads.split(",")):
                try:
                    secs = [one_pass(paths, size, t, reader) for _ in range(args.reps)]
                except OSError as exc:
                    res["gbps"][mode] = f"not measured: {exc}"
                    break
                res["gbps"].setdefault(mode, {})[t] = round(
                    args.files * size / statistics.median(secs) / 1e9, 2
                )
                print(mode, t, res["gbps"][mode][t], "GB/s", flush=True)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
        root.rmdir()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
