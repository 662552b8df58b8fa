"""Reliability benchmark (issue 20): a mutation fuzzer and a fault soak.

Fuzz (``--fuzz-seconds``, split evenly over the targets; a direct mutation fuzzer, not
coverage-guided): every input must return, raise one of the named errors
(:class:`~kvtc_store.errors.KVTCError`, or ``ValueError``/``TypeError`` for a malformed
argument to an engine-facing call) or be a counted miss. Anything else is a crash; an
input that takes longer than ``--hang-seconds`` is a hang. Targets:

- ``blob``: blobs of the tiny real codec (tests/tiny_codec.py), with bytes flipped,
  inserted, cut, or header fields replaced under a valid header checksum; decoded with
  ``decode_prefix(expect=...)``.
- ``rans``: the rANS decoder (:class:`~kvtc_store.codec.rans.RansTables`) on corrupt
  streams (flipped, cut, extended, random).
- ``config``: the YAML config loader on mutated config text.
- ``engine``: a store's ``lookup``/``get``/``put``/``prefetch`` with malformed arguments
  (wrong types, shapes, negative or huge starts).

Soak (``--soak-seconds``): 8 threads put, get, lookup and prefetch over overlapping
prefixes on a store of memory + disk + S3 (moto's server on loopback behind a TCP proxy
this benchmark controls), through phases that inject: an S3 pause, an S3 kill (the proxy
closed and reopened on its port), a silent S3 (the proxy holds every request), a
corrupted S3 object, a misfiled disk blob, a full disk (a small tmpfs under the disk tier
where this process may mount one; otherwise the phase is skipped and the JSON says so),
and a second process writing to the disk folder. Every chunk served is compared with the
reference KV of its tokens (a wrong chunk differs by ~100% and a right one by the codec's
error); chunks S3 acknowledged (flush reported no failure) must still be there at the end
unless the benchmark itself damaged them (lost chunks). Right after damaging a chunk (a
corrupted S3 object, a misfiled disk blob) the benchmark reads it through a fresh replica
of that tier alone (an empty memory tier in front), so the damaged copy itself is what
is read. The disk folder's allocated bytes are sampled for the cap; every call's latency
is checked against its deadline budget (the worst call is kept); the process's open file
descriptors (by kind) and threads are sampled per phase.

Results: ``--out`` JSON (keys: fuzz_inputs, fuzz_crashes, fuzz_hangs, fuzz_inputs_per_s,
soak_seconds, soak_wrong_chunks, soak_lost_chunks, deadline_s,
soak_max_block_over_deadline_s, disk_cap_max_overshoot_bytes, p50_ms, p99_ms, and per
phase the process's open file descriptors and threads, start and peak, ...) and a
Markdown summary beside it (``.md``).

    python benchmarks/reliability.py --fuzz-seconds 230 --fuzz-inputs 1000000 \\
        --soak-seconds 600 --out benchmarks/results/reliability.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack
import numpy as np
import torch
import xxhash

from kvtc_store.backends import DiskBackend, MemoryBackend, S3Backend
from kvtc_store.codec import apply_rope
from kvtc_store.codec.blob import _PREFIX, FORMAT_VERSION, MAGIC, ChunkBinding
from kvtc_store.codec.rans import RansTables, laplace_tables
from kvtc_store.config import load_config
from kvtc_store.errors import KVTCError
from kvtc_store.guard import BreakerSettings
from kvtc_store.store import TieredStore
from tests.s3_server import SlowProxy
from tests.tiny_codec import CHUNK, tiny_artifact, tiny_codec, tiny_namespace

ENGINE_ERRORS = (KVTCError, ValueError, TypeError, IndexError)
"""What a malformed argument to an engine-facing call may raise (named, not a crash)."""


class Hang(Exception):
    """An input ran past the hang limit (raised by SIGALRM in the fuzzing thread)."""


# --- fuzz ------------------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation: flips, a cut, an insertion, a splice of random bytes."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(len(b) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(b) + 1)
        b[at:at] = os.urandom(rng.randint(1, 16))
    elif kind == 3 and b:
        at = rng.randrange(len(b))
        b[at : at + 8] = os.urandom(8)
    else:
        b = bytearray(os.urandom(rng.randint(0, 64))) if rng.random() < 0.1 else b
    return bytes(b)


def _relabel(blob: bytes, rng: random.Random) -> bytes:
    """The blob with one header field replaced by a random value of a random type, the
    header checksum recomputed (so the parse gets past it)."""
    hlen = _PREFIX.unpack_from(blob, 0)[2]
    header = msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + hlen], raw=False)
    field = rng.choice(sorted(header))
    header[field] = rng.choice(
        [-1, 0, 2**40, rng.randint(-5, 300), "x", "", [1, 2], [], {}, None, 1.5, [1, 1, 1, 1]]
    )
    if rng.random() < 0.3:
        header[rng.choice(["shape", "sections"])] = rng.choice([[1, 1, 16, 0], {"stream": -1}])
    hb = msgpack.packb(header, use_bin_type=True)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb), xxhash.xxh64_intdigest(hb))
    return prefix + hb + blob[_PREFIX.size + hlen :]


def _repay(blob: bytes, rng: random.Random) -> bytes:
    """The blob with its payload mutated and the payload checksum recomputed (reaches the
    coder and the section parsers)."""
    hlen = _PREFIX.unpack_from(blob, 0)[2]
    header = msgpack.unpackb(blob[_PREFIX.size : _PREFIX.size + hlen], raw=False)
    payload = _mutate(blob[_PREFIX.size + hlen :], rng)
    header["payload_len"], header["payload_xxh64"] = len(payload), xxhash.xxh64_intdigest(payload)
    hb = msgpack.packb(header, use_bin_type=True)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hb), xxhash.xxh64_intdigest(hb)) + hb + payload


def _fuzz_targets(rng: random.Random):
    """``{name: one_input()}``: each call runs one fuzz input and raises only on a crash."""
    codec = tiny_codec()
    keys = [f"{i:064x}" for i in range(3)]
    kv = [torch.randn(1, 1, 3 * CHUNK, 16) for _ in range(2)]
    blobs = codec.encode_sequence(*kv, 0, CHUNK, chunk_keys=keys)
    expect = [ChunkBinding(k, i * CHUNK, CHUNK) for i, k in enumerate(keys)]

    def blob_input() -> None:
        i = rng.randrange(len(blobs))
        how = rng.randrange(3)
        bad = (_mutate, _relabel, _repay)[how](blobs[i], rng)
        _, error = codec.decode_prefix([bad], expect=[expect[i]])
        assert error is None or isinstance(error, KVTCError)

    q = np.clip(np.round(np.random.default_rng(0).laplace(0, 3, (12, 40))), -300, 300)
    coder = RansTables(laplace_tables(), np.zeros(12, np.int64), np.zeros(12, np.int64), 4)
    (stream,) = coder.encode(q.astype(np.int32), [40])

    def rans_input() -> None:
        bad = _mutate(stream, rng) if rng.random() < 0.95 else os.urandom(rng.randint(0, 512))
        try:
            coder.decode([bad], [rng.choice([40, 40, 40, 1, 0, 41])])
        except KVTCError:
            pass

    base_cfg = (
        b"chunk_tokens: 32\ntenant: acme\nwrite_mode: write-through\n"
        b"tiers:\n  - {kind: memory, capacity: 1MiB}\n"
        b"  - {kind: disk, path: /tmp/kvtc-fuzz-never-opened, capacity: 2GiB, deadline: 2}\n"
        b"  - {kind: s3, bucket: b, endpoint_url: 'http://127.0.0.1:9', check_bucket: false}\n"
        b"breaker: {failures: 3, backoff: 1.0}\ncodec: {target_ratio: 16}\n"
    )
    cfg_dir = Path(tempfile.mkdtemp(prefix="kvtc-fuzz-cfg-"))
    atexit.register(shutil.rmtree, cfg_dir, True)  # the closures below outlive this call

    def config_input() -> None:
        path = cfg_dir / "store.yaml"
        path.write_bytes(_mutate(base_cfg, rng))
        try:
            load_config(path, env={})
        except KVTCError:
            pass

    store = TieredStore([MemoryBackend(1 << 20)], codec, tiny_namespace(), chunk_tokens=CHUNK)
    tokens = torch.arange(3 * CHUNK)
    store.put(tokens, *kv)
    odd = [
        None, "text", 3.5, -1, 2**63, [], [1, "a"], torch.zeros(0), torch.zeros(2, 2),
        torch.full((CHUNK,), -5), torch.arange(5 * CHUNK), np.arange(CHUNK), tokens.float(),
    ]  # fmt: skip

    def engine_input() -> None:
        op = rng.randrange(4)
        t = rng.choice(odd + [tokens])
        try:
            if op == 0:
                store.lookup(t, start=rng.choice([0, -1, 7, 10**9]))
            elif op == 1:
                store.get(t, n_tokens=rng.choice([None, -1, 0, 10**9]), start=rng.choice([0, -3]))
            elif op == 2:
                shape = rng.choice([(1, 1, CHUNK, 16), (1, 1, 1, 16), (2, 2), (1, 1, CHUNK, 15)])
                store.put(t, torch.randn(shape), torch.randn(shape), start=rng.choice([0, 5, -16]))
            else:
                store.prefetch(t, n_tokens=rng.choice([None, -1])).result(timeout=10)
        except ENGINE_ERRORS:
            pass

    return {
        "blob": blob_input,
        "rans": rans_input,
        "config": config_input,
        "engine": engine_input,
    }


def fuzz(
    seconds: float, hang_s: float = 5.0, seed: int = 0, min_inputs: int = 0, min_total: int = 0
) -> dict:
    """Run every target for ``seconds / targets`` (and at least ``min_inputs`` inputs
    each), then more rounds of the same split until ``min_total`` inputs in all ran;
    counts of inputs, crashes (first few kept) and hangs per target."""
    out = _fuzz_round(seconds, hang_s, seed, min_inputs)
    while out["fuzz_inputs"] < min_total:
        more = (min_total - out["fuzz_inputs"]) / max(out["fuzz_inputs_per_s"], 1) * 1.1 + 1
        extra = _fuzz_round(more, hang_s, seed + len(out["rounds"]), 0)
        for name, t in extra["targets"].items():
            mine = out["targets"][name]
            for k in ("inputs", "crashes", "hangs", "seconds"):
                mine[k] = round(mine[k] + t[k], 2)
            mine["inputs_per_s"] = round(mine["inputs"] / mine["seconds"], 1)
        out["crash_examples"] = (out["crash_examples"] + extra["crash_examples"])[:10]
        out["rounds"].append(round(more, 1))
        _fuzz_totals(out)
    return out


def _fuzz_totals(out: dict) -> None:
    t = out["targets"].values()
    out["fuzz_inputs"] = sum(x["inputs"] for x in t)
    out["fuzz_crashes"] = sum(x["crashes"] for x in t)
    out["fuzz_hangs"] = sum(x["hangs"] for x in t)
    out["fuzz_seconds"] = round(sum(x["seconds"] for x in t), 1)
    out["fuzz_inputs_per_s"] = round(out["fuzz_inputs"] / max(out["fuzz_seconds"], 1e-9))


def _fuzz_round(seconds: float, hang_s: float, seed: int, min_inputs: int) -> dict:
    """One round of :func:`fuzz` (fresh targets seeded by ``seed``)."""
    rng = random.Random(seed)
    targets = _fuzz_targets(rng)
    logging.disable(logging.WARNING)  # a corrupt blob logs; a million of them flood

    def on_alarm(*_):
        raise Hang()

    use_alarm = threading.current_thread() is threading.main_thread()
    if use_alarm:
        old = signal.signal(signal.SIGALRM, on_alarm)
    out: dict = {"targets": {}, "crash_examples": [], "rounds": [round(seconds, 1)]}
    try:
        for name, one in targets.items():
            n = crashes = hangs = 0
            t0 = time.perf_counter()
            end = t0 + seconds / len(targets)
            while time.perf_counter() < end or n < min_inputs:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, hang_s)
                started = time.perf_counter()
                try:
                    one()
                except Hang:
                    hangs += 1
                except Exception as exc:  # noqa: BLE001 - a crash: counted and kept
                    crashes += 1
                    if len(out["crash_examples"]) < 10:
                        out["crash_examples"].append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                if not use_alarm and time.perf_counter() - started > hang_s:
                    hangs += 1
                n += 1
            dt = time.perf_counter() - t0
            out["targets"][name] = {
                "inputs": n,
                "crashes": crashes,
                "hangs": hangs,
                "seconds": round(dt, 2),
                "inputs_per_s": round(n / dt, 1),
            }
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
        logging.disable(logging.NOTSET)
    _fuzz_totals(out)
    return out


# --- soak ------------------------------------------------------------------------------------

DIM, N_KEEP = 16, 4  # the tiny codec keeps 4 of 16 channels: KV in that subspace decodes well


def reference_kv(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic KV ``(1, 1, T, 16)`` of a prompt, in the subspace the tiny codec keeps
    (keys with RoPE applied at each position): equal prefixes give equal KV, a chunk of
    other tokens differs by ~100%."""
    g = torch.Generator().manual_seed(12345)
    table = torch.randn(50_000, 2, N_KEEP, generator=g)
    rows = table[tokens % 50_000]  # (T, 2, 4)
    k = torch.zeros(len(tokens), DIM)
    v = torch.zeros(len(tokens), DIM)
    k[:, :N_KEEP], v[:, :N_KEEP] = rows[:, 0], rows[:, 1]
    pos = torch.arange(len(tokens))
    k = apply_rope(k[None, None], pos, tiny_artifact().rope)
    return k, v[None, None]


_SECOND_WRITER = """
import hashlib, os, sys, time
from kvtc_store.backends import DiskBackend
tier = DiskBackend(sys.argv[1], int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
i = 0
while time.monotonic() < end:
    tier.put([(hashlib.sha256(f"other-{i}-{j}".encode()).hexdigest(), os.urandom(3000)) for j in range(4)])
    i += 1
tier.close()
"""


def _tcp_ports() -> dict[str, tuple[int, int]]:
    """``{socket inode: (local port, remote port)}`` of this host's TCP sockets (Linux)."""
    out = {}
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    return out


def open_fds(ports: dict[str, int] | None = None) -> dict[str, int]:
    """This process's open file descriptors by kind (Linux ``/proc/self/fd``): ``total``,
    ``file``, ``pipe``, ``anon`` and ``socket``; with ``ports`` (``{label: port}``) TCP
    sockets whose local or remote port is a labelled one are also counted as
    ``tcp:<label>:in`` (accepted there) or ``tcp:<label>:out`` (connected to it)."""
    kinds: dict[str, int] = {"total": 0}
    tcp = _tcp_ports() if ports else {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds["total"] += 1
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kind = {"anon_inode": "anon"}.get(kind, kind)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "socket" and ports:
            local, remote = tcp.get(target[8:-1], (-1, -1))
            for label, port in ports.items():
                side = "in" if local == port else "out" if remote == port else None
                if side:
                    kinds[f"tcp:{label}:{side}"] = kinds.get(f"tcp:{label}:{side}", 0) + 1
    return kinds


def os_threads() -> int:
    """This process's OS threads (``Threads:`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def _chunk(object_key: str) -> str:
    """The chunk key of an S3 object key (``<prefix><xx>/<key>.kvtc``)."""
    return object_key.rsplit("/", 1)[-1].removesuffix(".kvtc")


class _Soak:
    """The soak's store, workload, fault phases and measurements."""

    PHASES = (
        "normal", "s3_pause", "s3_kill", "s3_silent", "corrupt_object", "misfiled_blob",
        "full_disk", "second_process",
    )  # fmt: skip

    def __init__(self, work: Path, s3_url: str, seconds: float, threads: int, seed: int):
        self.work, self.seconds, self.threads = work, seconds, threads
        self.rng = random.Random(seed)
        self.s3_url = s3_url
        self.bucket = f"kvtc-soak-{seed}"
        self.proxy = SlowProxy(s3_url)
        self.deadlines = {"disk": 2.0, "s3": 1.0}
        self.disk_cap = 4 << 20
        self.disk_dir = work / "disk"
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.mounted = self._mount_small_fs(work / "fullfs")
        self.lock = threading.Lock()
        self.latencies: dict[tuple[str, str], list[float]] = {}
        self.over_deadline = 0.0
        self.worst: dict = {}  # the call furthest beyond its budget (or nearest to it)
        self.tokens_of: dict[str, torch.Tensor] = {}  # chunk key -> the tokens through it
        self.damaged_reads = 0
        self.damaged_dropped = 0  # damaged copies the replicas dropped as misses
        self.wrong = self.served = 0
        self.acked: set[str] = set()
        self.damaged: set[str] = set()
        self.phase = "normal"
        self.cap_peak = 0
        self.notes: list[str] = []
        self.resources: list[dict] = []  # per phase: open fds and threads, start and peak
        self._raw_client = None
        self.file_peak = 0  # the largest chunk file's allocated bytes seen
        # overlapping prefixes: sequences are paths through a small tree of chunk blocks
        self.blocks = [torch.randint(0, 50_000, (CHUNK,), generator=torch.Generator().manual_seed(b)) for b in range(64)]  # fmt: skip

    # - faults

    def _mount_small_fs(self, where: Path) -> bool:
        where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        )
        return r.returncode == 0

    def _raw(self):
        """The benchmark's own S3 client (straight to moto), made once."""
        if self._raw_client is None:
            import boto3
            import botocore.config

            self._raw_client = boto3.client(
                "s3",
                endpoint_url=self.s3_url,
                region_name="us-east-1",
                config=botocore.config.Config(s3={"addressing_style": "path"}),
            )
        return self._raw_client

    def _replica(self, kind: str) -> TieredStore:
        """A fresh replica over one shared tier (``disk`` or ``s3``) behind an empty
        memory tier: what it serves comes from that tier's copy."""
        tier = self._disk(self.disk_dir) if kind == "disk" else self._s3()
        return TieredStore(
            [MemoryBackend(1 << 20), tier], tiny_codec(), tiny_namespace(), chunk_tokens=CHUNK
        )

    def _s3(self) -> S3Backend:
        s3 = S3Backend(
            self.bucket, endpoint_url=self.proxy.url, region_name="us-east-1", read_timeout=2,
            max_attempts=1, connect_timeout=1,
        )  # fmt: skip
        s3.deadline_s = self.deadlines["s3"]
        return s3

    def _disk(self, disk_dir: Path) -> DiskBackend:
        disk = DiskBackend(disk_dir, self.disk_cap)
        disk.deadline_s = self.deadlines["disk"]
        return disk

    def _store(self, disk_dir: Path) -> TieredStore:
        return TieredStore(
            [MemoryBackend(1 << 20), self._disk(disk_dir), self._s3()], tiny_codec(),
            tiny_namespace(), chunk_tokens=CHUNK,
            breaker=BreakerSettings(failures=3, backoff_s=0.5, max_backoff_s=4.0),
        )  # fmt: skip

    # - workload

    def _sequence(self, rng: random.Random) -> torch.Tensor:
        n = rng.randint(1, 6)
        path = [rng.randrange(4)] + [rng.randrange(64) for _ in range(n - 1)]
        return torch.cat([self.blocks[b] for b in path])

    def _record(self, op: str, dt: float, budget: float, cpu: float) -> None:
        """One call's wall time ``dt`` (s) against ``budget`` (s); ``cpu``: the calling
        thread's own CPU seconds in it (decoding; a starved host stretches it)."""
        with self.lock:
            self.latencies.setdefault((op, self.phase), []).append(dt)
            over = dt - budget * 1.1
            if not self.worst or over > self.worst["wall_s"] - self.worst["budget_s"] * 1.1:
                self.worst = {"op": op, "phase": self.phase, "wall_s": round(dt, 3),
                              "budget_s": budget, "thread_cpu_s": round(cpu, 3)}  # fmt: skip
            self.over_deadline = max(self.over_deadline, over)

    def _check(self, tokens: torch.Tensor, got) -> None:
        if got is None:
            return
        k, v = got
        n = k.shape[2]
        rk, rv = reference_kv(tokens[:n])
        for c in range(n // CHUNK):
            s = slice(c * CHUNK, (c + 1) * CHUNK)
            err = (v[:, :, s] - rv[:, :, s]).norm() / rv[:, :, s].norm()
            kerr = (k[:, :, s] - rk[:, :, s]).norm() / rk[:, :, s].norm()
            with self.lock:
                self.served += 1
                if max(err, kerr) > 0.5:
                    self.wrong += 1

    def _worker(self, store: TieredStore, i: int, end: float) -> None:
        rng = random.Random(i)
        read_budget = sum(self.deadlines.values())  # a read may wait on disk, then S3
        while time.monotonic() < end:
            tokens = self._sequence(rng)
            op = rng.choice(["put", "get", "get", "lookup", "prefetch"])
            if op == "put":
                kv = reference_kv(tokens)
                keys = store.keys_for(tokens)
                with self.lock:
                    for c, key in enumerate(keys):
                        self.tokens_of.setdefault(key, tokens[: (c + 1) * CHUNK])
            t0, c0 = time.monotonic(), time.thread_time()
            got = None
            try:
                if op == "put":
                    store.put(tokens, *kv)
                elif op == "get":
                    got = store.get(tokens)
                elif op == "lookup":
                    store.lookup(tokens)
                else:
                    store.prefetch(tokens).result()
            except KVTCError as exc:  # a put whose top tier failed: named, counted
                with self.lock:
                    self.notes.append(f"{op}: {type(exc).__name__}")
            # put waits on back-pressure: its budget is a write-down batch's deadline
            self._record(op, time.monotonic() - t0, read_budget, time.thread_time() - c0)
            self._check(tokens, got)  # the soak's own check of what get served: not timed

    def _ports(self) -> dict[str, int]:
        return {"proxy": int(self.proxy.url.rsplit(":", 1)[1]), "moto": int(self.s3_url.rsplit(":", 1)[1])}  # fmt: skip

    def _resources_sample(self) -> None:
        """Fold the open fds and threads now into the current phase's record."""
        fds, threads = open_fds(self._ports()), os_threads()
        with self.lock:
            rec = self.resources[-1] if self.resources else None
            if rec is None:
                return
            if fds["total"] > rec["fds_peak"]:
                rec["fds_peak"], rec["fds_peak_kinds"] = fds["total"], fds
            rec["threads_peak"] = max(rec["threads_peak"], threads)

    def _phase_start(self, phase: str) -> None:
        fds, threads = open_fds(self._ports()), os_threads()
        with self.lock:
            if self.resources:  # progress, one line per phase (the JSON has them all)
                print(json.dumps(self.resources[-1]), file=sys.stderr, flush=True)
            self.phase = phase
            self.resources.append({
                "phase": phase, "t_s": round(time.monotonic() - self.t_start, 1),
                "fds_start": fds["total"], "threads_start": threads,
                "fds_peak": fds["total"], "fds_peak_kinds": fds, "threads_peak": threads,
            })  # fmt: skip

    def _sampler(self, end: float) -> None:
        last = 0.0
        while time.monotonic() < end:
            if time.monotonic() - last > 0.5:
                self._resources_sample()
                last = time.monotonic()
            total = 0
            for p in self.disk_dir.rglob("*.kvtc"):
                try:
                    size = p.stat().st_blocks * 512
                except FileNotFoundError:
                    continue
                total += size
                self.file_peak = max(self.file_peak, size)
            self.cap_peak = max(self.cap_peak, total)
            time.sleep(0.05)

    # - phases

    def _inject(self, phase: str, store: TieredStore, length: float) -> None:
        self._phase_start(phase)
        raw = self._raw()
        for page in raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            self.acked |= {_chunk(o["Key"]) for o in page.get("Contents", [])}
        if phase in ("s3_pause", "s3_silent"):
            self.proxy.hold()
            time.sleep(length * (0.5 if phase == "s3_pause" else 0.9))
            self.proxy.release()
        elif phase == "s3_kill":
            port = int(self.proxy.url.rsplit(":", 1)[1])
            self.proxy.close()
            time.sleep(length / 2)
            self.proxy = SlowProxy(self.s3_url, port=port)
        elif phase == "corrupt_object":
            listed = raw.list_objects_v2(Bucket=self.bucket).get("Contents", [])
            with self.lock:  # chunks whose tokens this run knows: they can be read back
                listed = [o for o in listed if _chunk(o["Key"]) in self.tokens_of]
            listed = self.rng.sample(listed, min(3, len(listed)))
            for obj in listed:
                data = bytearray(raw.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read())
                data[len(data) // 2] ^= 0xFF
                raw.put_object(Bucket=self.bucket, Key=obj["Key"], Body=bytes(data))
                self.damaged.add(_chunk(obj["Key"]))
            self._read_damaged("s3", [_chunk(o["Key"]) for o in listed])
        elif phase == "misfiled_blob":
            files = sorted(self.disk_dir.rglob("*.kvtc"))
            with self.lock:
                files = [f for f in files if f.name.removesuffix(".kvtc") in self.tokens_of]
            if len(files) >= 2:
                a, b = self.rng.sample(files, 2)
                try:
                    shutil.copyfile(a, b)
                except FileNotFoundError:
                    pass
                self._read_damaged("disk", [b.name.removesuffix(".kvtc")])
        elif phase == "full_disk":
            if not self.mounted:
                self.notes.append("full_disk skipped: cannot mount a tmpfs here")
            else:
                full = self._store(self.work / "fullfs")
                seq = self._sequence(self.rng)
                for _ in range(40):  # 512 KiB fills in a few puts: ENOSPC evicts and retries
                    tokens = torch.cat([seq, torch.randint(0, 50_000, (8 * CHUNK,))])
                    full.put(tokens, *reference_kv(tokens))
                full.close(timeout=5)
        elif phase == "second_process":
            proc = subprocess.Popen(
                [sys.executable, "-c", _SECOND_WRITER, str(self.disk_dir), str(self.disk_cap), str(length * 0.8)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            proc.wait(timeout=length * 3 + 30)
        time.sleep(max(0.0, length * 0.1))

    def _read_damaged(self, kind: str, keys: list[str]) -> None:
        """Read the chunks just damaged in tier ``kind`` through a fresh replica of that
        tier, checked like every read: a damaged copy must be a counted miss (dropped),
        never served."""
        with self.lock:
            seqs = [self.tokens_of[k] for k in keys if k in self.tokens_of]
        replica = self._replica(kind)
        try:
            for tokens in seqs[:8]:
                self._check(tokens, replica.get(tokens))
                self.damaged_reads += 1
            st = replica.stats
            self.damaged_dropped += st.corrupt_dropped + st.misfiled_dropped
        finally:
            replica.close(timeout=5)

    def run(self) -> dict:
        raw = self._raw()
        raw.create_bucket(Bucket=self.bucket)
        store = self._store(self.disk_dir)
        self.t_start = time.monotonic()
        end = self.t_start + self.seconds
        workers = [
            threading.Thread(target=self._worker, args=(store, i, end)) for i in range(self.threads)
        ] + [threading.Thread(target=self._sampler, args=(end,))]
        for w in workers:
            w.start()
        length = self.seconds / len(self.PHASES)
        while time.monotonic() < end - length / 2:
            for phase in self.PHASES:
                if time.monotonic() >= end - length / 2:
                    break
                t0 = time.monotonic()
                self._inject(phase, store, length)
                time.sleep(max(0.0, length - (time.monotonic() - t0)))
        for w in workers:
            w.join()
        self._phase_start("final")
        flushed = store.flush(timeout=60)
        store.close(timeout=10)
        self.proxy.close()
        self._phase_start("closed")
        listed = set()
        for page in raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            listed |= {_chunk(o["Key"]) for o in page.get("Contents", [])}
        s3_written = store.tiers[2].snapshot().bytes_written
        batch_chunks = store._stack.write_down.batch_chunks
        lost = {k for k in self.acked - self.damaged if k not in listed}
        raw.close()
        if self.mounted:
            subprocess.run(["umount", str(self.work / "fullfs")], check=False)
        lat = {f"{op}/{ph}": v for (op, ph), v in self.latencies.items()}
        every = [x for v in lat.values() for x in v]
        pct = {k: {"n": len(v), "p50_ms": round(1e3 * float(np.percentile(v, 50)), 2),
                   "p99_ms": round(1e3 * float(np.percentile(v, 99)), 2)} for k, v in sorted(lat.items())}  # fmt: skip
        return {
            "soak_seconds": round(self.seconds, 1),
            "soak_threads": self.threads,
            "soak_chunks_served": self.served,
            "soak_wrong_chunks": self.wrong,
            "soak_lost_chunks": len(lost),
            "soak_s3_bytes_written": s3_written,
            "soak_s3_objects_at_end": len(listed),
            "deadline_s": max(self.deadlines.values()),
            "soak_max_block_over_deadline_s": round(max(0.0, self.over_deadline), 3),
            "soak_worst_call": self.worst,
            "soak_damaged_chunks_read": self.damaged_reads,
            "soak_damaged_chunks_dropped": self.damaged_dropped,
            "disk_cap_bytes": self.disk_cap,
            "disk_cap_max_overshoot_bytes": max(0, self.cap_peak - self.disk_cap),
            # one write-down batch: its chunks times the largest chunk file seen
            "disk_one_batch_bytes": batch_chunks * self.file_peak,
            "p50_ms": round(1e3 * float(np.percentile(every, 50)), 2) if every else None,
            "p99_ms": round(1e3 * float(np.percentile(every, 99)), 2) if every else None,
            "latency_by_op_and_phase": pct,
            "store_stats": {k: v for k, v in vars(store.stats).items() if k != "chunks_hit"},
            "soak_final_flush": {"complete": flushed.complete, "failed": flushed.failed_chunks},
            "notes": sorted(set(self.notes)),
            "resources_by_phase": self.resources,
            "fds_max": max(r["fds_peak"] for r in self.resources),
            "threads_max": max(r["threads_peak"] for r in self.resources),
        }


def soak(seconds: float, threads: int = 8, seed: int = 0) -> dict:
    """The fault soak on a fresh moto server (in this process) and a temp folder."""
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    work = Path(tempfile.mkdtemp(prefix="kvtc-soak-"))
    logging.disable(logging.WARNING)
    try:
        return _Soak(work, f"http://{host}:{port}", seconds, threads, seed).run()
    finally:
        logging.disable(logging.NOTSET)
        server.stop()
        # the full-disk phase's tmpfs: unmounted by the run, unless a file on it was still
        # open then (umount: busy) or the run raised first; lazily here, so no mount and
        # no folder outlives the soak
        if os.path.ismount(work / "fullfs"):
            subprocess.run(["umount", "-l", str(work / "fullfs")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def render_md(r: dict) -> str:
    """The results as Markdown: targets against the figures, fuzz per target, latency
    and open descriptors/threads per phase (``--out x.json`` writes it to ``x.md``)."""
    over = r["soak_max_block_over_deadline_s"]
    cap_over, batch = r["disk_cap_max_overshoot_bytes"], r.get("disk_one_batch_bytes")
    rows = [
        ("fuzz inputs (>= 1,000,000)", f"{r['fuzz_inputs']:,} at {r['fuzz_inputs_per_s']:,}/s"),
        ("fuzz crashes / hangs (0 / 0)", f"{r['fuzz_crashes']} / {r['fuzz_hangs']}"),
        ("soak (8 threads, >= 600 s)", f"{r['soak_threads']} threads, {r['soak_seconds']} s"),
        ("wrong chunks (0)", f"{r['soak_wrong_chunks']} of {r['soak_chunks_served']:,} served"),
        ("lost acknowledged chunks (0)", str(r["soak_lost_chunks"])),
        ("worst call beyond its deadline + 10% (0 s)", f"{over} s (longest deadline {r['deadline_s']} s)"),
        ("disk cap overshoot (<= one batch)", f"{cap_over:,} B (one batch: {batch:,} B; cap {r['disk_cap_bytes']:,} B)"),
        ("p50 / p99 latency, all calls", f"{r['p50_ms']} ms / {r['p99_ms']} ms"),
        ("open fds / threads, peak", f"{r['fds_max']} / {r['threads_max']}"),
    ]  # fmt: skip
    out = [
        "# Reliability benchmark (issue 20)",
        "",
        f"`{r['command']}` on {r['machine']}, {r['date']} ({r['wall_seconds']} s wall).",
        "",
        "| target | measured |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        "## Fuzz, per target",
        "",
        "| target | inputs | inputs/s | crashes | hangs |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {t['inputs']:,} | {t['inputs_per_s']:,} | {t['crashes']} | {t['hangs']} |"
            for n, t in r["targets"].items()
        ],
        "",
        "## Soak latency per operation and phase (ms)",
        "",
        "| op/phase | calls | p50 | p99 |",
        "|---|---|---|---|",
        *[
            f"| {k} | {v['n']:,} | {v['p50_ms']} | {v['p99_ms']} |"
            for k, v in r["latency_by_op_and_phase"].items()
        ],
        "",
        "## Open file descriptors and threads per phase (start, peak)",
        "",
        "| phase | at s | fds | threads | sockets at the peak |",
        "|---|---|---|---|---|",
        *[
            f"| {x['phase']} | {x['t_s']} | {x['fds_start']}, {x['fds_peak']} | "
            f"{x['threads_start']}, {x['threads_peak']} | {x['fds_peak_kinds'].get('socket', 0)} |"
            for x in r["resources_by_phase"]
        ],
        "",
        f"Final flush: {r['soak_final_flush']}. Notes: {r['notes'] or 'none'}.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fuzz-seconds", type=float, default=600.0)
    p.add_argument("--fuzz-inputs", type=int, default=0, help="run on until this many in all")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--hang-seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    t0 = time.time()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result.update(fuzz(a.fuzz_seconds, a.hang_seconds, a.seed, min_total=a.fuzz_inputs))
    result.update(soak(a.soak_seconds, a.threads, a.seed))
    result["wall_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")
        a.out.with_suffix(".md").write_text(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
