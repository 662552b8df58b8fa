"""Throughput of each storage tier beside its raw medium, prefix lookup, and a load test.

Three parts, in one run:

1. **Tier vs raw medium.** For each tier, batched ``put`` and ``get`` of the same bytes
   as the raw medium does them, in the same run, alternating which goes first:

   - ``memory`` (MemoryBackend) vs a memory copy of each blob (``bytes(bytearray(b))``
     in, ``bytes(...)`` out);
   - ``disk`` (DiskBackend: temp file, fsync, rename, fsync of the folder) vs
     ``write`` + ``fsync`` and ``read`` of one file per blob in the same folder (reads of
     both come from the page cache: the blobs were just written);
   - ``s3`` (S3Backend, 8 requests in flight) vs boto3 ``put_object`` / ``get_object``
     of the same objects on 8 threads, to the same moto server;
   - ``gpu`` (GPUBackend, CUDA only) vs a host-to-device copy of each blob and back.

   Payloads: real SmolLM2-135M chunks (256 tokens of Python's reference docs encoded by
   the KVTC codec at target ratio 16, the cached calibration; each batch repeats the
   real blobs under distinct keys) and 1 MB random blobs. GB/s = payload bytes / wall
   time of one batched call, median of the rounds.
2. **Prefix lookup** of a 32k-token prompt (128 chunks of 256 tokens, all in the CPU
   tier of a memory + disk + S3 store): ``TieredStore.lookup`` wall time, key hashing
   included.
3. **Load test.** 8 threads for 60 s against the store's tier stack (the memory, disk
   and S3 tiers below the codec: ``TieredStore``'s own write-down queues, promotion and
   pending map): each operation is a put of 4 new chunk-sized blobs (25%) or a get of 8
   random acknowledged ones (75%). Every blob's key is the SHA-256 of its bytes, so a
   wrong byte anywhere is caught; a get that misses an acknowledged chunk counts as
   lost (the S3 tier keeps everything). After the run the store is flushed and every
   acknowledged chunk is read back from the bottom tier.

The script starts its own moto server on 127.0.0.1 and stops it by PID.

Usage: ``python benchmarks/tiers.py [--rounds 3] [--load-seconds 60] [--tiers
memory,disk,s3,gpu] [--blobs DIR]``; writes ``benchmarks/results/tiers.md`` and
``tiers.json``. ``--blobs DIR`` reads (or, the first time, writes) the real chunks
there, so a machine without the model (the GPU host) can use them.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kvtc_store.backends import Backend, DiskBackend, MemoryBackend

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20
BATCH = 64  # blobs per batched call
TARGET = 0.85  # a tier within 15% of its raw medium on batched 1 MB transfers


# --- payloads ------------------------------------------------------------------------------


def real_chunks(blob_dir: Path | None) -> tuple[list[bytes], dict]:
    """Blobs of real SmolLM2 KV: 8 chunks of 256 tokens of Python's reference docs,
    encoded with the cached ratio-16 codec; read from ``blob_dir`` if saved there."""
    if blob_dir is not None and (blob_dir / "meta.json").is_file():
        meta = json.loads((blob_dir / "meta.json").read_text())
        return [(blob_dir / f"{i}.kvtc").read_bytes() for i in range(meta["chunks"])], meta
    from kvtc_store.calibration import load_or_calibrate
    from kvtc_store.codec import KVTCCodec
    from kvtc_store.demo import document_ids
    from kvtc_store.model import kv_from_cache, lm_forward, load_model

    model, tok, info = load_model()
    (art,) = load_or_calibrate(model, tok, info, [16.0])
    ids, _ = document_ids(tok, 2048)
    with torch.no_grad():
        _, cache = lm_forward(model, ids[None], last_only=True)
    keys, values = kv_from_cache(cache)
    blobs = KVTCCodec(art).encode_sequence(keys, values, chunk_tokens=256)
    meta = {
        "chunks": len(blobs),
        "artifact_id": art.artifact_id,
        "model": info.name,
        "bf16_bytes_per_chunk": 256 * info.kv_bytes_per_token_bf16,
        "blob_bytes": [len(b) for b in blobs],
    }
    if blob_dir is not None:
        blob_dir.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(blobs):
            (blob_dir / f"{i}.kvtc").write_bytes(b)
        (blob_dir / "meta.json").write_text(json.dumps(meta))
    return blobs, meta


def batch_of(blobs: list[bytes], tag: str) -> list[tuple[str, bytes]]:
    """``BATCH`` items cycling over ``blobs`` under distinct keys (unique per ``tag``)."""
    return [
        (hashlib.sha256(f"{tag}/{i}".encode()).hexdigest(), blobs[i % len(blobs)])
        for i in range(BATCH)
    ]


# --- the tier/raw pairs --------------------------------------------------------------------


class Pair:
    """A tier and its raw medium, each with ``put(items)`` / ``get(keys)`` and cleanup."""

    name: str
    tier: Backend

    def raw_put(self, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    def raw_get(self, keys: list[str]) -> list[bytes]:
        raise NotImplementedError

    def clear(self, keys: list[str]) -> None:
        """Drop what a round stored, tier and raw, so rounds do not pile up."""
        self.tier.delete(keys)

    def sync(self) -> None:
        """Wait for asynchronous device work (GPU) before the clock stops."""


class MemoryPair(Pair):
    name = "memory"

    def __init__(self) -> None:
        self.tier = MemoryBackend(4 << 30)
        self.raw: dict[str, bytes] = {}

    def raw_put(self, items):
        for k, v in items:
            self.raw[k] = bytes(bytearray(v))

    def raw_get(self, keys):
        return [bytes(bytearray(self.raw[k])) for k in keys]

    def clear(self, keys):
        super().clear(keys)
        self.raw.clear()


class DiskPair(Pair):
    name = "disk"

    def __init__(self, root: Path) -> None:
        self.tier = DiskBackend(root / "tier", 8 << 30)
        self.raw_dir = root / "raw"
        self.raw_dir.mkdir(parents=True, exist_ok=True)

    def raw_put(self, items):
        for k, v in items:
            fd = os.open(self.raw_dir / k, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(v)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    def raw_get(self, keys):
        return [(self.raw_dir / k).read_bytes() for k in keys]

    def clear(self, keys):
        super().clear(keys)
        for k in keys:
            (self.raw_dir / k).unlink(missing_ok=True)


class S3Pair(Pair):
    name = "s3"

    def __init__(self, endpoint: str, concurrency: int = 8) -> None:
        from kvtc_store.backends.s3 import S3Backend

        self.bucket = f"kvtc-bench-{uuid.uuid4().hex[:12]}"
        self.tier = S3Backend(
            self.bucket,
            endpoint_url=endpoint,
            region_name="us-east-1",
            max_concurrency=concurrency,
            create_bucket=True,
        )
        self.client = self.tier._client  # the same connection settings for the raw calls
        self.pool = ThreadPoolExecutor(concurrency)

    def raw_put(self, items):
        def one(kv):
            self.client.put_object(Bucket=self.bucket, Key=f"raw/{kv[0]}", Body=kv[1])

        list(self.pool.map(one, items))

    def raw_get(self, keys):
        def one(k):
            return self.client.get_object(Bucket=self.bucket, Key=f"raw/{k}")["Body"].read()

        return list(self.pool.map(one, keys))

    def clear(self, keys):
        super().clear(keys)
        self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": f"raw/{k}"} for k in keys]}
        )


class GPUPair(Pair):
    name = "gpu"

    def __init__(self) -> None:
        from kvtc_store.backends.gpu import GPUBackend

        self.tier = GPUBackend(8 << 30, device="cuda")
        self.raw: dict[str, torch.Tensor] = {}

    def raw_put(self, items):
        for k, v in items:
            self.raw[k] = torch.from_numpy(np.frombuffer(v, dtype=np.uint8).copy()).to("cuda")

    def raw_get(self, keys):
        return [self.raw[k].cpu().numpy().tobytes() for k in keys]

    def clear(self, keys):
        super().clear(keys)
        self.raw.clear()

    def sync(self):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def measure(pair: Pair, blobs: list[bytes], rounds: int, label: str) -> dict:
    """Median GB/s of batched put and get, tier and raw, over ``rounds`` rounds, and the
    median of each round's tier/raw ratio (tier and raw run back to back in a round,
    so the ratio is robust to the load of a shared machine drifting between rounds)."""
    samples: dict[str, list[float]] = {k: [] for k in ("put", "get", "raw_put", "raw_get")}
    for r in range(rounds + 1):  # round 0 warms up (connections, allocators)
        items = batch_of(blobs, f"{label}/{r}")
        keys = [k for k, _ in items]
        nbytes = sum(len(v) for _, v in items)
        order = ("tier", "raw") if r % 2 else ("raw", "tier")
        for which in order:
            put, get = (
                (pair.tier.put, pair.tier.get) if which == "tier" else (pair.raw_put, pair.raw_get)
            )
            t_put, _ = timed(partial(put, items), pair.sync)
            t_get, got = timed(partial(get, keys), pair.sync)
            if list(got) != [v for _, v in items]:
                raise SystemExit(f"{pair.name} ({which}) returned wrong bytes")
            if r:
                prefix = "" if which == "tier" else "raw_"
                samples[prefix + "put"].append(nbytes / t_put / 1e9)
                samples[prefix + "get"].append(nbytes / t_get / 1e9)
        pair.clear(keys)
    ratio = {
        op: statistics.median(t / r for t, r in zip(samples[op], samples[f"raw_{op}"]))
        for op in ("put", "get")
    }
    return {
        "put_gbps": round(statistics.median(samples["put"]), 4),
        "get_gbps": round(statistics.median(samples["get"]), 4),
        "raw_put_gbps": round(statistics.median(samples["raw_put"]), 4),
        "raw_get_gbps": round(statistics.median(samples["raw_get"]), 4),
        "put_vs_raw": round(ratio["put"], 3),
        "get_vs_raw": round(ratio["get"], 3),
        "batch_blobs": BATCH,
        "batch_bytes": sum(len(v) for _, v in batch_of(blobs, "size")),
        "rounds": rounds,
    }


# --- lookup --------------------------------------------------------------------------------


def lookup_128(endpoint: str | None, root: Path, blob: bytes) -> dict:
    """Wall time of ``TieredStore.lookup`` over a 32k-token prompt held in the CPU tier."""
    from kvtc_store.keys import ChunkNamespace
    from kvtc_store.store import TieredStore

    tiers: list[Backend] = [MemoryBackend(1 << 30), DiskBackend(root / "lookup", 1 << 30)]
    if endpoint is not None:
        from kvtc_store.backends.s3 import S3Backend

        tiers.append(
            S3Backend(
                f"kvtc-lookup-{uuid.uuid4().hex[:8]}",
                endpoint_url=endpoint,
                region_name="us-east-1",
                create_bucket=True,
            )
        )
    ns = ChunkNamespace("b42ec3a7db38" * 5, "L30-H3-D64-bfloat16-tp0of1", "bench")
    store = TieredStore(tiers, codec=None, namespace=ns)  # lookup never touches the codec
    tokens = torch.randint(0, 49152, (128 * 256,))
    keys = store.keys_for(tokens)
    tiers[0].put([(k, blob) for k in keys])
    assert store.lookup(tokens) == 128 * 256
    times = []
    for _ in range(500):
        t0 = time.perf_counter()
        n = store.lookup(tokens)
        times.append((time.perf_counter() - t0) * 1e3)
        assert n == 128 * 256
    store.close()
    return {
        "median_ms": round(statistics.median(times), 4),
        "p99_ms": round(float(np.percentile(times, 99)), 4),
        "calls": len(times),
    }


# --- load test -----------------------------------------------------------------------------


def load_test(endpoint: str, root: Path, sizes: list[int], seconds: float, threads: int) -> dict:
    """8 threads of mixed put/get against the tier stack; lost and wrong chunks counted."""
    from kvtc_store.backends.s3 import S3Backend
    from kvtc_store.tierstack import TierStack

    s3 = S3Backend(
        f"kvtc-load-{uuid.uuid4().hex[:8]}",
        endpoint_url=endpoint,
        region_name="us-east-1",
        create_bucket=True,
    )
    stack = TierStack(
        [MemoryBackend(64 * MB), DiskBackend(root / "load", 256 * MB), s3],
        queue_chunks=256,
    )
    bases = [os.urandom(max(sizes)) for _ in range(16)]
    acked: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**12))
    stats = {"put": [], "get": [], "lost": 0, "wrong": 0, "puts": 0, "gets": 0, "chunks_read": 0}
    deadline = time.monotonic() + seconds

    def blob() -> tuple[str, bytes]:
        with lock:
            n = next(counter)
        size = sizes[n % len(sizes)]
        value = n.to_bytes(8, "little") + bases[n % len(bases)][: size - 8]
        return hashlib.sha256(value).hexdigest(), value

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        put_lat, get_lat = [], []
        lost = wrong = puts = gets = read = 0
        while time.monotonic() < deadline:
            with lock:
                have = len(acked)
            if have < 8 or rng.random() < 0.25:
                items = [blob() for _ in range(4)]
                t0 = time.perf_counter()
                stack.put(items)
                put_lat.append(time.perf_counter() - t0)
                with lock:
                    acked.extend(k for k, _ in items)
                puts += 1
            else:
                with lock:
                    keys = [acked[rng.randrange(have)] for _ in range(8)]
                t0 = time.perf_counter()
                got = stack.get(keys).blobs
                get_lat.append(time.perf_counter() - t0)
                for k, v in zip(keys, got):
                    if v is None:
                        lost += 1
                    elif hashlib.sha256(v).hexdigest() != k:
                        wrong += 1
                gets += 1
                read += len(keys)
        with lock:
            stats["put"] += put_lat
            stats["get"] += get_lat
            stats["lost"] += lost
            stats["wrong"] += wrong
            stats["puts"] += puts
            stats["gets"] += gets
            stats["chunks_read"] += read

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - t0
    t_flush = time.monotonic()
    assert stack.flush(timeout=600), "write-down did not finish"
    flush_s = time.monotonic() - t_flush
    # every acknowledged chunk, read back from the bottom tier (S3 keeps everything)
    lost_after = wrong_after = 0
    for i in range(0, len(acked), 256):
        keys = acked[i : i + 256]
        for k, v in zip(keys, s3.get(keys)):
            if v is None:
                lost_after += 1
            elif hashlib.sha256(v).hexdigest() != k:
                wrong_after += 1
    failures = stack.failures()
    usage = {t.name: t.usage() for t in stack.tiers}
    stack.close()
    all_lat = np.array(stats["put"] + stats["get"]) * 1e3
    pct = {
        name: {
            "p50_ms": round(float(np.percentile(np.array(lat) * 1e3, 50)), 3),
            "p99_ms": round(float(np.percentile(np.array(lat) * 1e3, 99)), 3),
        }
        for name, lat in (("put", stats["put"]), ("get", stats["get"]))
    }
    return {
        "threads": threads,
        "seconds": round(elapsed, 1),
        "ops": stats["puts"] + stats["gets"],
        "puts": stats["puts"],
        "gets": stats["gets"],
        "chunks_put": len(acked),
        "chunks_read": stats["chunks_read"],
        "lost_chunks": stats["lost"] + lost_after,
        "lost_during_run": stats["lost"],
        "lost_after_flush": lost_after,
        "wrong_chunks": stats["wrong"] + wrong_after,
        "p50_ms": round(float(np.percentile(all_lat, 50)), 3),
        "p99_ms": round(float(np.percentile(all_lat, 99)), 3),
        "by_op": pct,
        "flush_seconds": round(flush_s, 2),
        "tier_failures": {f"{t}/{op}": n for (t, op), n in failures.items()},
        "evictions": {name: u.evictions for name, u in usage.items()},
        "blob_bytes": sizes,
    }


# --- moto ----------------------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen, str]:
    """``moto_server`` on a free port of 127.0.0.1; stopped by the caller, by PID."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--load-seconds", type=float, default=60.0)
    p.add_argument("--load-threads", type=int, default=8)
    p.add_argument("--tiers", default="memory,disk,s3,gpu")
    p.add_argument("--blobs", type=Path, default=None, help="folder of the real chunks")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    wanted = args.tiers.split(",")
    if "gpu" in wanted and not torch.cuda.is_available():
        wanted.remove("gpu")
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    t_start = time.time()
    load_before = os.getloadavg()
    chunks, chunk_meta = real_chunks(args.blobs)
    payloads = {
        "smollm2_chunks": chunks,
        "1mb_blobs": [os.urandom(MB) for _ in range(8)],
    }
    root = Path(tempfile.mkdtemp(prefix="kvtc-tiers-", dir=args.dir))
    moto = None
    try:
        endpoint = None
        if "s3" in wanted:
            moto, endpoint = start_moto()
        makers = {
            "memory": MemoryPair,
            "disk": lambda: DiskPair(root / "disk"),
            "s3": lambda: S3Pair(endpoint),
            "gpu": GPUPair,
        }
        tiers: dict[str, dict] = {}
        for name in wanted:
            pair = makers[name]()
            by_payload = {
                label: measure(pair, blobs, args.rounds, f"{name}/{label}")
                for label, blobs in payloads.items()
            }
            pair.tier.close()
            # the top-level figures are the batched large transfers (1 MB blobs)
            tiers[name] = {**by_payload["1mb_blobs"], "by_payload": by_payload}
            print(f"{name}: {json.dumps(by_payload)}", file=sys.stderr, flush=True)
        lookup = lookup_128(endpoint, root, chunks[1])
        print(f"lookup: {lookup}", file=sys.stderr, flush=True)
        load = None
        if endpoint is not None and args.load_seconds > 0:
            load = load_test(
                endpoint, root, [len(c) for c in chunks], args.load_seconds, args.load_threads
            )
            print(f"load: {load}", file=sys.stderr, flush=True)
    finally:
        if moto is not None:
            moto.terminate()  # by PID: the process this script started
            try:
                moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                moto.kill()
                moto.wait()
        shutil.rmtree(root, ignore_errors=True)

    cmd = "python benchmarks/tiers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    gpu = torch.cuda.get_device_name() if "gpu" in tiers else "none"
    result = {
        "command": cmd.strip(),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'}), "
            f"GPU {gpu}, torch {torch.__version__}, Python {platform.python_version()}; "
            f"load average {load_before[0]:.1f} at the start (a shared machine)"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t_start, 1),
        "real_chunks": chunk_meta,
        "target_fraction_of_raw": TARGET,
        **tiers,
        "lookup_128_chunks_ms": lookup["median_ms"],
        "lookup_128_chunks": lookup,
    }
    if load is not None:
        result.update(
            load_test_lost_chunks=load["lost_chunks"],
            load_test_wrong_chunks=load["wrong_chunks"],
            load_test_p50_ms=load["p50_ms"],
            load_test_p99_ms=load["p99_ms"],
            load_test=load,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(wanted) != {"gpu"} else "_gpu"
    (args.out / f"tiers{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = report(result, list(tiers))
    (args.out / f"tiers{suffix}.md").write_text(md)
    print(md)
    return 0


def report(r: dict, tiers: list[str]) -> str:
    """The Markdown twin of the JSON."""
    lines = [
        "# Tier throughput beside the raw media, prefix lookup, load test",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}; run time {r['seconds']} s",
        (
            f"- real chunks: {r['real_chunks']['chunks']} SmolLM2 chunks of 256 tokens "
            f"({r['real_chunks']['bf16_bytes_per_chunk'] / 1e6:.1f} MB of bf16 KV each) encoded "
            f"at target ratio 16: {min(r['real_chunks']['blob_bytes']) / 1e3:.0f}-"
            f"{max(r['real_chunks']['blob_bytes']) / 1e3:.0f} kB per blob"
        ),
        (
            f"- one batched call carries {BATCH} blobs; GB/s: the median over the rounds; "
            "tier / raw: the median of each round's ratio (tier and raw back to back)"
        ),
        "",
        (
            "| tier | payload | put GB/s | raw put GB/s | put / raw | get GB/s | raw get GB/s "
            "| get / raw |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in tiers:
        for label, m in r[name]["by_payload"].items():
            lines.append(
                f"| {name} | {label} ({m['batch_bytes'] / 1e6:.1f} MB) | {m['put_gbps']:.3f} | "
                f"{m['raw_put_gbps']:.3f} | {m['put_vs_raw']:.2f} | "
                f"{m['get_gbps']:.3f} | {m['raw_get_gbps']:.3f} | {m['get_vs_raw']:.2f} |"
            )
    lines += ["", "Target: within 15% of the raw medium on batched 1 MB transfers:", ""]
    for name in tiers:
        m = r[name]
        for op in ("put", "get"):
            frac = m[f"{op}_vs_raw"]
            verdict = "met" if frac >= TARGET else "**missed**"
            lines.append(f"- {name} {op}: {frac:.2f} of raw: {verdict}")
    lk = r["lookup_128_chunks"]
    lines += [
        "",
        (
            f"Prefix lookup of 32,768 tokens (128 chunks, all in the CPU tier): median "
            f"{lk['median_ms']:.3f} ms, p99 {lk['p99_ms']:.3f} ms over {lk['calls']} calls "
            f"(target < 1 ms: {'met' if lk['median_ms'] < 1 else '**missed**'})."
        ),
    ]
    if "load_test" in r:
        lt = r["load_test"]
        lines += [
            "",
            (
                f"Load test: {lt['threads']} threads, {lt['seconds']} s, {lt['ops']} operations "
                f"({lt['puts']} puts of 4 chunks, {lt['gets']} gets of 8), {lt['chunks_put']} "
                f"chunks put, {lt['chunks_read']} read; lost chunks {lt['lost_chunks']} "
                f"(during the run {lt['lost_during_run']}, after the flush "
                f"{lt['lost_after_flush']}), wrong chunks {lt['wrong_chunks']}; latency p50 "
                f"{lt['p50_ms']:.1f} ms, p99 {lt['p99_ms']:.1f} ms (put p50 "
                f"{lt['by_op']['put']['p50_ms']:.1f} / p99 {lt['by_op']['put']['p99_ms']:.1f} ms, "
                f"get p50 {lt['by_op']['get']['p50_ms']:.1f} / p99 "
                f"{lt['by_op']['get']['p99_ms']:.1f} ms); flush after the run "
                f"{lt['flush_seconds']} s; evictions {lt['evictions']}; tier failures "
                f"{lt['tier_failures'] or 'none'}."
            ),
        ]
    lines += ["", "Notes:", ""]
    notes = {
        "memory": (
            "memory: the tier keeps and returns references to the immutable blobs (no byte "
            "is copied), so its GB/s is per-blob bookkeeping; the raw medium copies every "
            "byte in and out."
        ),
        "disk": (
            "disk: the raw medium writes one file at a time (write + fsync) and reads them "
            "back; the tier writes a batch's files on 8 threads (temp file, fsync, rename, "
            "fsync of the folder each), so their fsyncs overlap, and reads on 8 threads. "
            "Reads of both come from the page cache (the files were just written)."
        ),
        "s3": (
            "s3: both sides keep 8 requests in flight over the same client settings; the "
            "moto server (Python, on the same cores) is the bottleneck of both."
        ),
        "gpu": (
            "gpu: the raw medium copies each blob to the device and back on its own; the "
            "tier packs a batch into one pinned buffer, one copy each way."
        ),
    }
    lines += [f"- {notes[name]}" for name in tiers if name in notes]
    if "load_test" in r:
        lines.append(
            "- load test: the tiers are a 64 MB memory tier, a 256 MB disk tier and S3, "
            "so most gets reach S3 through moto while the write-down uploads compete for "
            "it; a put's tail is back-pressure (its S3 queue full). Lost: an acknowledged "
            "chunk that a get or the final read-back did not find; wrong: bytes whose "
            "SHA-256 is not their key."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
