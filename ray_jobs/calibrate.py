"""Fleet calibration on Ray: collect on N workers, merge and fit on the driver.

::

    driver                                   workers (one Ray actor each, model loaded once)
    ------                                   -------
    connect (local | auto | ray://...)
    describe model  ─────────────────────>   load_model(spec) (GPU where one is lent)
    token ids (corpus / files / Parquet)
    ray.put(ids); units -> shards  ──────>   collect(model, ids, shard's units)
    merge each shard's statistics   <─────   ShardStats.state() through the object store
    fit: PCA, step tables, DP per ratio
    save / publish / promote; job report

The units and the statistics are those of :mod:`kvtc_store.calibration` (the single-process
``kvtc-store calibrate`` runs the same ``collect`` over all units in one shard), so any
number of workers gives the artifact one process gives on the same windows, within the
tolerance :mod:`kvtc_store.codec.stats` states. Actors are restarted by Ray when their
process dies (``max_restarts``) and the shard in flight is retried
(``max_task_retries``): a shard's statistics depend on its units only, so a retried shard
gives the same statistics.

Fault injection for tests: when the driver's environment sets ``KVTC_FLEET_KILL_ONCE``
to a file path, the first worker that starts a shard while that file exists deletes it
and kills its own process (SIGKILL), a real crash Ray must recover from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kvtc_store.calibration import (
    CalibrationSettings,
    CalibrationUnit,
    calibration_units,
    collect,
    fit_artifacts_for,
    fit_stats,
    ids_hash,
    settings_for_data,
)
from kvtc_store.calibration_data import cut_windows
from kvtc_store.codec import CodecArtifact
from kvtc_store.codec.rope import RopeParams
from kvtc_store.codec.stats import ShardStats
from kvtc_store.errors import CalibrationDataError, FleetError, GateRefusedError
from kvtc_store.model import ModelInfo

log = logging.getLogger(__name__)

KILL_ENV = "KVTC_FLEET_KILL_ONCE"
OBJECT_STORE_BYTES = 200 * 1024 * 1024
"""Object store of a local cluster (``--address local``) by default: 200 MB, enough for
the statistics of SmolLM2-sized models (a shard of the Llama-3.1-8B shape's all-layer
groups carries 17 GB: pass ``object_store_bytes``); a real cluster sizes its own."""


@dataclass
class ShardRecord:
    """One shard of the job: its units, the worker (process id, node) that finished it,
    seconds inside ``collect``, the bytes of statistics it returned, and the attempt."""

    shard: int
    units: list[str]
    pid: int
    node: str
    seconds: float
    stats_bytes: int
    peak_gpu_bytes: int


@dataclass
class FleetCalibrationReport:
    """What a fleet calibration did, for the job's JSON and Markdown report.

    Times are seconds of wall clock on the driver: ``connect_s`` (Ray up, actors
    started, models loaded), ``ids_s`` (token ids), ``collect_s`` (first shard sent to
    last statistics merged, merging included), ``merge_s`` (of which: merging),
    ``fit_s`` (PCA, step tables, DP, held-out measurement), ``total_s``.
    ``gate_s`` (quality gate and publishing, after ``total_s`` was first taken; then
    ``total_s`` includes it). ``fit_stages`` splits ``fit_s`` (seconds): ``device`` (where
    the eigendecompositions ran), ``covariance_s``, ``eigh_s`` (sums over groups),
    ``sample_s`` (the token sample), ``step_tables_s`` and, per ratio, ``plan_s`` (the
    DP) and ``measure_s`` (held-out chunks through the codec). ``object_store_bytes`` sums the statistics each worker (by pid) returned;
    ``peak_gpu_bytes`` is each worker's peak CUDA memory (0 on the CPU). ``restarts``
    counts worker processes that died and were replaced (distinct pids beyond
    ``workers``).
    """

    model: str
    fingerprint: str
    address: str
    workers: int
    devices: list[str]
    settings: dict
    shards: list[ShardRecord] = field(default_factory=list)
    connect_s: float = 0.0
    ids_s: float = 0.0
    collect_s: float = 0.0
    merge_s: float = 0.0
    fit_s: float = 0.0
    total_s: float = 0.0
    object_store_bytes: dict[str, int] = field(default_factory=dict)
    peak_gpu_bytes: dict[str, int] = field(default_factory=dict)
    fit_stages: dict = field(default_factory=dict)
    restarts: int = 0
    artifacts: list[dict] = field(default_factory=list)
    gate_s: float = 0.0
    gate: dict | None = None

    def to_json(self) -> str:
        """The report as JSON (every field)."""
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self) -> str:
        """The report as Markdown: stage times, artifacts, then one row per shard."""
        lines = [
            f"# Fleet calibration of {self.model}",
            "",
            (
                f"- model fingerprint `{self.fingerprint[:16]}`, Ray at `{self.address}`, "
                f"{self.workers} worker(s) on {', '.join(sorted(set(self.devices)))}; "
                f"{self.restarts} worker restart(s)"
            ),
            (
                f"- seconds: connect {self.connect_s:.1f}, token ids {self.ids_s:.1f}, "
                f"collect {self.collect_s:.1f} (merge {self.merge_s:.2f}), fit "
                f"{self.fit_s:.1f}, total {self.total_s:.1f}"
            ),
            f"- fit stages: {_stage_line(self.fit_stages)}",
            "",
            "| ratio | honest ratio | relative error | artifact |",
            "|---:|---:|---:|---|",
        ]
        for a in self.artifacts:
            lines.append(
                f"| {a['ratio']:g} | {a['honest_ratio']:.2f} | {a['measured_nmse']:.4f} "
                f"| {a.get('id') or a.get('path') or ''} |"
            )
        lines += ["", "| shard | units | worker pid | seconds | statistics bytes |"]
        lines.append("|---:|---|---:|---:|---:|")
        for s in self.shards:
            lines.append(
                f"| {s.shard} | {' '.join(s.units)} | {s.pid} | {s.seconds:.2f} "
                f"| {s.stats_bytes:,} |"
            )
        return "\n".join(lines) + "\n"


def _stage_line(stages: dict) -> str:
    """``fit_stages`` on one line: the device, then seconds per stage and per ratio."""
    parts = [f"on {stages.get('device', '?')}"]
    parts += [f"{k[:-2]} {v:.1f}" for k, v in stages.items() if k.endswith("_s")]
    for r, d in stages.get("ratios", {}).items():
        parts.append(f"ratio {r}: DP {d['plan_s']:.1f}, held-out {d['measure_s']:.1f}")
    return ", ".join(parts)


def _ray():
    """The ``ray`` module, or a named error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise FleetError('fleet jobs need Ray: pip install "kvtc-store[ray]"') from exc
    return ray


def gpu_share(have: float, workers: int, asked: float | None) -> float:
    """GPUs each calibration actor asks Ray for.

    Ray places a fractional GPU request on one GPU, so ``k`` actors asking ``1 / k`` share
    each GPU and the cluster's ``int(have)`` GPUs hold ``int(have) * k`` of them; an
    actor asking ``g >= 1`` takes ``g`` whole GPUs. (Three actors asking 2/3 each on two
    GPUs: the third waits forever, checked on a local Ray.)

    Args:
        have: the cluster's GPUs (``ray.cluster_resources()["GPU"]``, 0 without).
        workers: actors.
        asked: the caller's ``gpus_per_worker``; None: one each where the cluster has a
            GPU per worker; else the GPUs shared, ``1 / ceil(workers / int(have))`` each
            (two actors on a one-GPU machine get 0.5 and both models load on it; three
            on two GPUs get 0.5: two on one GPU, one on the other); 0 (CPU actors)
            without a GPU.

    Raises:
        FleetError: the ``workers`` actors asking ``asked`` do not all fit on the
            cluster's GPUs (some would wait for a GPU forever, and the job with them).
    """
    gpus = int(have + 1e-9)
    if asked is None:
        return 0.0 if gpus < 1 else 1.0 / math.ceil(workers / gpus)
    fits = gpus // math.ceil(asked - 1e-9) if asked >= 1 else gpus * int(1 / asked + 1e-9)
    if fits < workers:
        raise FleetError(
            f"{asked:g} GPU(s) per worker x {workers} worker(s) asked; the Ray cluster's "
            f"{have:g} GPU(s) hold {fits} such actors: use fewer workers, or share a GPU "
            f"(--gpus-per-worker {gpu_share(have, workers, None):g})"
            if gpus
            else f"{asked:g} GPU(s) per worker asked; the Ray cluster has no GPU (leave "
            "--gpus-per-worker out for CPU workers)"
        )
    return asked


def connect(
    address: str = "local", num_cpus: int | None = None, object_store_bytes: int | None = None
) -> bool:
    """Connect this process to Ray; True when it started a local cluster (the caller
    shuts it down), False when it joined one (or one was already connected).

    Args:
        address: ``"local"`` (a cluster inside this process: ``num_cpus`` cores, a 200 MB
            object store, no dashboard), ``"auto"`` (the cluster ``ray start`` runs on
            this machine, or ``RAY_ADDRESS``), or ``"ray://host:10001"`` (Ray Client) /
            ``"host:6379"``.
        num_cpus: cores of a local cluster (default: all).
        object_store_bytes: object store of a local cluster (default
            :data:`OBJECT_STORE_BYTES`); ignored when joining one.

    Raises:
        FleetError: Ray is not installed or the cluster is unreachable.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_bytes or OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
            )
            return True
        ray.init(address=address, log_to_driver=False)
        return False
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FleetError(f"cannot connect to Ray at {address!r}: {exc}") from exc


class CalibrationWorker:
    """The body of a calibration actor: loads the model once, then collects statistics
    for shards of units (see :func:`kvtc_store.calibration.collect`).

    Args:
        model_spec: what :func:`kvtc_store.model.load_model` takes (folder, GGUF, hub id;
            None: SmolLM2).
        settings: the calibration settings, as a dict (:func:`dataclasses.asdict`).
        threads: torch's CPU threads in this worker (0: leave torch's default; on a GPU,
            the GPU's share of the host's cores: a GPU actor asks Ray for no CPU, so Ray
            sets its OMP_NUM_THREADS to 1, and its CPU work, loading the model and the
            sensitivity runs' noise, would get one core).
        dtype: the weights' dtype, a torch name (``"bfloat16"``); None: float32, as
            ``kvtc-store calibrate`` (the model fingerprint hashes the loaded k/v
            projection weights, so a float32 checkpoint loaded in bf16 names another
            model; a bf16 checkpoint gives the same fingerprint either way).
    """

    def __init__(
        self, model_spec: str | None, settings: dict, threads: int = 0, dtype: str | None = None
    ):
        from kvtc_store.model import load_model

        if not threads and torch.cuda.is_available():
            threads = max(1, (os.cpu_count() or 1) // torch.cuda.device_count())
        if threads:
            torch.set_num_threads(threads)
        self.settings = CalibrationSettings(**settings)
        self.model, self.tokenizer, self.info = load_model(
            model_spec, dtype=_torch_dtype(dtype or "float32")
        )
        self.device = "cpu"
        if torch.cuda.is_available():
            self.model = self.model.cuda()
            self.device = torch.cuda.get_device_name()

    def describe(self) -> dict:
        """The model's identity and geometry, the worker's device and process id."""
        i = self.info
        return {
            "name": i.name,
            "fingerprint": i.fingerprint,
            "kv_shape": list(i.kv_shape),
            "rope": i.rope.to_dict(),
            "device": self.device,
            "pid": os.getpid(),
            "vocab": self.model.get_input_embeddings().num_embeddings,
        }

    def corpus_ids(self) -> np.ndarray:
        """Token ids of the settings' built-in corpus, int64 ``(n,)`` (sampling the model
        where the corpus asks; cached in the worker's cache home)."""
        from kvtc_store.calibration import calibration_token_ids, settings_dir

        ids = calibration_token_ids(
            self.tokenizer, self.settings, self.model, settings_dir(self.info, self.settings)
        )
        return ids.numpy()

    def data_ids(self, paths: list[str]) -> np.ndarray:
        """Token ids of the user's files (text tokenized here), int64 ``(n,)``; see
        :func:`kvtc_store.calibration_data.read_token_ids`."""
        from kvtc_store.calibration_data import read_token_ids

        vocab = self.model.get_input_embeddings().num_embeddings
        return read_token_ids(paths, self.tokenizer, vocab).numpy()

    def score(self, windows: list[np.ndarray], artifacts: list[dict]) -> list[dict]:
        """Quality-gate scores (:func:`kvtc_store.quality_gate.score_artifact`) of each
        artifact (as :func:`artifact_files`) on the token-id ``windows``."""
        from kvtc_store.quality_gate import score_artifact

        wins = [torch.from_numpy(np.array(w, dtype=np.int64)) for w in windows]
        arts = [artifact_from_files(f) for f in artifacts]
        return [asdict(score_artifact(self.model, a, wins)) for a in arts]

    def collect(self, ids: np.ndarray, units: list[dict], settings: dict) -> dict:
        """Statistics of one shard: ``{"state": ShardStats.state(), "seconds", "pid",
        "node", "peak_gpu_bytes"}``."""
        flag = os.environ.get(KILL_ENV)
        if flag and os.path.exists(flag):
            os.unlink(flag)
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stats = collect(
            self.model,
            torch.from_numpy(ids),
            [CalibrationUnit(**u) for u in units],
            self.info,
            CalibrationSettings(**settings),
        )
        import ray

        return {
            "state": stats.state(),
            "seconds": time.perf_counter() - t0,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id()[:12],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        }


@dataclass
class PublishPlan:
    """Where and how a fleet job publishes.

    Attributes:
        registry: a :class:`~kvtc_store.registry.CodecRegistry`.
        profile: promote the (one) artifact to this profile after the quality gate;
            None: publish every artifact, no gate, no promotion.
        force: publish and promote even when the gate refuses (the report says so).
        gate_data: held-out files for the gate (as ``--data``), never calibrated on;
            the calibration's held-out window is always used too.
        gate_windows: windows cut from ``gate_data`` (of the calibration's window length).
        threshold: KL increase the gate allows at the same honest ratio (0.10 = +10%).
        reason: recorded with the promotion.
    """

    registry: object
    profile: str | None = None
    force: bool = False
    gate_data: list[str] | None = None
    gate_windows: int = 4
    threshold: float = 0.10
    reason: str = "fleet calibration"


def artifact_files(art: CodecArtifact) -> dict[str, bytes]:
    """An artifact's files (``manifest.json``, ``tensors.safetensors``) as bytes, to
    ship through the object store without pickling it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvtc-art-") as tmp:
        folder = art.save(Path(tmp) / "a")
        return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def artifact_from_files(files: dict[str, bytes]) -> CodecArtifact:
    """The artifact of :func:`artifact_files` (checked as :meth:`CodecArtifact.load`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvtc-art-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        return CodecArtifact.load(tmp)


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"bfloat16"``, ``"float16"``, ``"float32"``).

    Raises:
        FleetError: another name.
    """
    if name not in ("bfloat16", "float16", "float32"):
        raise FleetError(f"unknown model dtype {name!r} (bfloat16, float16 or float32)")
    return getattr(torch, name)


def _gate_windows(ray, actor, plan: PublishPlan, ids: torch.Tensor, settings) -> list:
    """The gate's windows: the calibration's held-out window, then up to
    ``plan.gate_windows`` windows of ``plan.gate_data``."""
    w = settings.window_tokens
    out = [ids[settings.windows * w : (settings.windows + 1) * w]]
    if plan.gate_data:
        extra = torch.from_numpy(np.array(_get(ray, [actor.data_ids.remote(plan.gate_data)])[0]))
        n = min(plan.gate_windows, extra.numel() // w)
        if n < 1:
            raise CalibrationDataError(
                f"the gate data hold {extra.numel():,} tokens, less than one window of {w:,}"
            )
        out += [extra[i * w : (i + 1) * w] for i in range(n)]
    return out


def _gate_and_publish(ray, actor, plan: PublishPlan, arts, report, ids, settings) -> None:
    """Gate (with a profile), publish, store the gate's report beside the candidate,
    promote; see :func:`calibrate_fleet`."""
    import tempfile
    from datetime import datetime, timezone

    from kvtc_store.quality_gate import GateScores, gate_report

    reg = plan.registry
    if plan.profile is None:
        for a, row in zip(arts, report.artifacts):
            row["id"], _ = reg.publish(a)
        return
    if len(arts) != 1:
        raise FleetError("a profile is promoted to one artifact: calibrate one ratio")
    cand = arts[0]
    model = cand.model_fingerprint
    cur_move = reg.current(model, plan.profile)
    shipped = [artifact_files(cand)]
    if cur_move is not None:
        with tempfile.TemporaryDirectory(prefix="kvtc-current-") as tmp:
            shipped.append(artifact_files(reg.pull(model, cur_move.artifact_id, Path(tmp) / "a")))
    windows = _gate_windows(ray, actor, plan, ids, settings)
    scored = _get(ray, [actor.score.remote([w.numpy() for w in windows], shipped)])[0]
    scores = [GateScores(**s) for s in scored]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        gate = gate_report(
            plan.profile,
            scores[0],
            scores[1] if len(scores) > 1 else None,
            windows,
            threshold=plan.threshold,
            force=plan.force,
        )
    except GateRefusedError as exc:
        report.gate = json.loads(exc.report.to_json())
        _store_gate(reg, model, cand.artifact_id, stamp, exc.report)
        exc.job_report = report
        raise
    report.gate = json.loads(gate.to_json())
    aid, _ = reg.publish(cand)
    report.artifacts[0]["id"] = aid
    _store_gate(reg, model, aid, stamp, gate)
    reg.promote(model, aid, plan.profile, reason=f"{plan.reason} (gate: {gate.verdict})")


def _store_gate(reg, model: str, artifact_id: str, stamp: str, gate) -> None:
    """The gate's report, JSON and Markdown, beside the artifact in the registry."""
    reg.write_report(model, artifact_id, f"gate-{stamp}.json", gate.to_json().encode())
    reg.write_report(model, artifact_id, f"gate-{stamp}.md", gate.to_markdown().encode())


def shard_units(units: list[CalibrationUnit], per_shard: int) -> list[list[CalibrationUnit]]:
    """Shards of at most ``per_shard`` KV units; each sensitivity unit (``2 * L`` runs
    of the model, the longest) and the held-out unit alone, the sensitivity ones
    first so they start early."""
    kv = [u for u in units if u.kind == "kv"]
    shards = [[u] for u in units if u.kind == "sensitivity"]
    shards += [kv[i : i + per_shard] for i in range(0, len(kv), per_shard)]
    return shards + [[u] for u in units if u.kind == "holdout"]


def _token_ids(actor, data: list[str] | None) -> tuple[torch.Tensor | None, object]:
    """``(user data ids or None, ref of the corpus ids or None)``: Parquet files are read
    with Ray Data on the driver; other files (text needs the tokenizer) by a worker."""
    ray = _ray()
    if not data:
        return None, actor.corpus_ids.remote()
    parquet = [p for p in data if str(p).endswith(".parquet") or _parquet_dir(p)]
    others = [p for p in data if p not in parquet]
    parts = [read_parquet_ids(parquet)] if parquet else []
    if others:
        parts.append(torch.from_numpy(np.array(_get(ray, [actor.data_ids.remote(others)])[0])))
    return torch.cat(parts), None


def _parquet_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.rglob("*.parquet"))


def read_parquet_ids(paths: list[str], column: str = "input_ids") -> torch.Tensor:
    """Token ids of Parquet files (local paths or ``s3://``), read with Ray Data in file
    order: each row's ``column`` (a list of ints) is one document; documents are joined.

    Returns:
        int64 ``(n,)``.

    Raises:
        CalibrationDataError: no such column, or no ids.
    """
    ray = _ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(paths)
    if column not in ds.schema().names:
        raise CalibrationDataError(f"{paths}: no column {column!r} (has {ds.schema().names})")
    docs = [
        np.asarray(row, dtype=np.int64)
        for batch in ds.iter_batches(batch_format="numpy")
        for row in batch[column]
    ]
    if not docs:
        raise CalibrationDataError(f"{paths}: no token ids")
    return torch.from_numpy(np.concatenate(docs))


def calibrate_fleet(
    model: str | None,
    ratios: list[float],
    settings: CalibrationSettings | None = None,
    *,
    address: str = "local",
    workers: int = 1,
    data: list[str] | None = None,
    shard_windows: int = 4,
    max_retries: int = 3,
    progress: Callable[[int, int], None] | None = None,
    publish: PublishPlan | None = None,
    gpus_per_worker: float | None = None,
    model_dtype: str | None = None,
    fit_device: str | None = None,
    object_store_bytes: int | None = None,
) -> tuple[list[CodecArtifact], FleetCalibrationReport]:
    """Calibrate artifacts for ``ratios`` on Ray workers.

    Args:
        model: a model folder, GGUF file or hub id (None: SmolLM2), as
            ``kvtc-store calibrate`` takes; every worker must be able to load it.
        ratios: target ratios against 16-bit KV.
        settings: calibration settings (default: the library's).
        address: Ray cluster (see :func:`connect`).
        workers: actors, one per GPU where the cluster has GPUs, else one CPU each.
        data: the user's data files or folders (text, ``.jsonl``, ``.npy`` read by a
            worker, so their paths must be visible to it; ``.parquet`` through Ray
            Data); None: the settings' built-in corpus.
        shard_windows: calibration windows per shard.
        max_retries: restarts of a dead worker, and retries of its shard in flight.
        progress: ``progress(shards_done, shards)`` after each shard.
        publish: publish the artifacts to a registry; with a profile, after the quality
            gate (:mod:`kvtc_store.quality_gate`), and promote.
        gpus_per_worker: GPUs each actor asks Ray for (:func:`gpu_share`); None: 1 where
            the cluster has a GPU per worker, its GPUs shared where it has fewer (whole
            actors per GPU), else 0 (CPU actors). A fraction shares a GPU among actors (0.5: two actors,
            two models, on one GPU; each actor's statistics live on that GPU until its
            shard is done, so the models and Gram matrices must fit together).
        model_dtype: the workers' weights dtype (``"bfloat16"`` for large models on a
            GPU); None: float32 (see :class:`CalibrationWorker`).
        fit_device: where the driver decomposes the covariances (default: CUDA when the
            driver has a GPU, else the CPU; see :func:`kvtc_store.calibration.fit_stats`).
            Without a publish plan the workers are released before the fit, so their
            models leave the GPU first.
        object_store_bytes: object store of a local cluster (default 200 MB; at least
            one shard's statistics: 17 GB for the Llama-3.1-8B shape).

    Returns:
        ``(artifacts in ratio order (not saved), report)``.

    Raises:
        FleetError: Ray is missing or unreachable, a shard failed past its retries, or
            ``workers`` actors asking ``gpus_per_worker`` do not fit the cluster's GPUs.
        GateRefusedError: the gate refused the candidate (its report is stored beside
            it in the registry; nothing published or promoted).
        CalibrationDataError, CalibrationError: as single-process calibration.
    """
    ray = _ray()
    settings = settings or CalibrationSettings()
    t0 = time.perf_counter()
    started = connect(
        address, num_cpus=max(workers, os.cpu_count() or 1), object_store_bytes=object_store_bytes
    )
    try:
        resources = ray.cluster_resources()
        gpus_per_worker = gpu_share(resources.get("GPU", 0), workers, gpus_per_worker)
        # a CPU worker gets its share of the cluster's cores: Ray sets an actor's
        # OMP_NUM_THREADS to its num_cpus, so one core each would idle the rest
        threads = 0 if gpus_per_worker else max(1, int(resources.get("CPU", 1)) // workers)
        env = {KILL_ENV: os.environ[KILL_ENV]} if os.environ.get(KILL_ENV) else {}
        actor_cls = ray.remote(CalibrationWorker).options(
            num_gpus=gpus_per_worker,
            num_cpus=threads,
            max_restarts=max_retries,
            max_task_retries=max_retries,
            runtime_env={"env_vars": env} if env else None,
        )
        actors = [
            actor_cls.remote(model, asdict(settings), threads, model_dtype) for _ in range(workers)
        ]
        described = _get(ray, [a.describe.remote() for a in actors])
        d0 = described[0]
        info = ModelInfo(
            d0["name"], d0["fingerprint"], tuple(d0["kv_shape"]), RopeParams.from_dict(d0["rope"])
        )
        report = FleetCalibrationReport(
            info.name, info.fingerprint, address, workers, [d["device"] for d in described], {}
        )
        report.connect_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        user_ids, corpus_ref = _token_ids(actors[0], data)
        if user_ids is not None:
            settings = settings_for_data(settings, user_ids)
            ids = cut_windows(user_ids, settings.windows, settings.window_tokens)
        else:
            ids = torch.from_numpy(np.array(_get(ray, [corpus_ref])[0]))
        report.settings = asdict(settings)
        report.ids_s = time.perf_counter() - t1
        merged, records, merge_s, collect_s = _run_shards(
            ray, actors, ids, settings, shard_windows, progress
        )
        report.shards, report.merge_s, report.collect_s = records, merge_s, collect_s
        for r in records:
            report.object_store_bytes[str(r.pid)] = (
                report.object_store_bytes.get(str(r.pid), 0) + r.stats_bytes
            )
            report.peak_gpu_bytes[str(r.pid)] = max(
                report.peak_gpu_bytes.get(str(r.pid), 0), r.peak_gpu_bytes
            )
        report.restarts = max(
            0, len({r.pid for r in records} | {d["pid"] for d in described}) - workers
        )
        fit_params = merged.model_params
        if publish is None:  # the models leave the GPU before the fit takes it
            for a in actors:
                ray.kill(a)
            actors = []
        t2 = time.perf_counter()
        stages = report.fit_stages
        fit, holdout = fit_stats(merged, settings, device=fit_device, timings=stages)
        del merged
        arts = fit_artifacts_for(
            fit,
            holdout,
            info,
            ratios,
            settings,
            ids_hash(ids),
            fit_params,
            timings=stages,
            device=fit_device,
        )
        report.fit_s = time.perf_counter() - t2
        report.total_s = time.perf_counter() - t0
        for r, a in zip(ratios, arts):
            a.calibration["seconds"] = round(report.total_s, 1)
            a.calibration["fleet"] = {"workers": workers, "shards": len(records)}
            report.artifacts.append(
                {
                    "ratio": r,
                    "honest_ratio": a.quality.get("honest_ratio", 0.0),
                    "measured_nmse": a.quality.get("measured_nmse", 0.0),
                }
            )
        if publish is not None:
            t3 = time.perf_counter()
            _gate_and_publish(ray, actors[0], publish, arts, report, ids, settings)
            report.gate_s = time.perf_counter() - t3
            report.total_s = time.perf_counter() - t0
        return arts, report
    finally:
        if started:
            ray.shutdown()


def _get(ray, refs: list, timeout: float | None = None) -> list:
    """``ray.get`` with Ray's failures as :class:`FleetError`."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayError as exc:
        raise FleetError(f"a fleet worker failed: {exc}") from exc


def _run_shards(ray, actors, ids, settings, shard_windows, progress):
    """Send the shards to the actors (one in flight each), merge statistics as they
    come; returns ``(merged, records, merge seconds, collect seconds)``."""
    t0 = time.perf_counter()
    shards = shard_units(calibration_units(settings), max(1, shard_windows))
    ids_ref = ray.put(ids.numpy())
    settings_d = asdict(settings)
    todo = list(enumerate(shards))
    in_flight: dict = {}  # ref -> (shard index, actor)
    idle = list(actors)
    merged: ShardStats | None = None
    records: list[ShardRecord] = []
    merge_s = 0.0
    while todo or in_flight:
        while todo and idle:
            i, units = todo.pop(0)
            actor = idle.pop(0)
            ref = actor.collect.remote(ids_ref, [asdict(u) for u in units], settings_d)
            in_flight[ref] = (i, actor, units)
        done, _ = ray.wait(list(in_flight), num_returns=1)
        i, actor, units = in_flight.pop(done[0])
        out = _get(ray, done)[0]
        t = time.perf_counter()
        part = ShardStats.from_state(out["state"])
        merged = part if merged is None else merged.absorb(part)
        merge_s += time.perf_counter() - t
        records.append(
            ShardRecord(
                i,
                [u.name for u in units],
                out["pid"],
                out["node"],
                round(out["seconds"], 3),
                part.nbytes(),
                out["peak_gpu_bytes"],
            )
        )
        idle.append(actor)
        if progress:
            progress(len(records), len(shards))
    records.sort(key=lambda r: r.shard)
    return merged, records, merge_s, time.perf_counter() - t0


def with_settings(settings: CalibrationSettings, **changes) -> CalibrationSettings:
    """``settings`` with ``changes`` (None values ignored)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
