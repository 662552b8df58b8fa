"""Re-encode job: move the chunks of a store's disk and S3 tiers from one codec artifact
to another, in place, with Ray Data over their keys.

The driver lists the keys of each disk and S3 tier the store's YAML names; a Ray Dataset
of ``(tier, key)`` rows goes through ``map_batches`` with an actor class
(:class:`ReencodeBatch`: each actor opens the tiers and fetches both artifacts from the
store's registry once) that re-encodes each batch with
:func:`kvtc_store.reencode.reencode_keys` and returns one row per key. Guarantees (see
:mod:`kvtc_store.reencode`): every chunk is its old blob or its new one at any moment (an
atomic rename on disk, one PUT on S3), a crash loses nothing, a rerun skips what is done.
Ray restarts a dead actor and retries its batch (3 times each).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvtc_store.errors import ConfigError, FleetError

from .calibrate import KILL_ENV, _ray, connect


@dataclass
class ReencodeReport:
    """What a re-encode job did: per tier its chunks by status (``reencoded``, ``done``,
    ``other``, ``missing``, ``error``), bytes of the re-encoded chunks before and after,
    the first errors (key and message), and the job's seconds."""

    from_id: str
    to_id: str
    tiers: dict[str, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        """Every field, as JSON."""
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self) -> str:
        """One row per tier."""
        lines = [
            f"# Re-encode {self.from_id} -> {self.to_id} ({self.seconds:.1f} s)",
            "",
            "| tier | chunks | reencoded | done | other | missing | error | MB before | MB after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in self.tiers.items():
            lines.append(
                f"| {name} | {t['chunks']} | {t['reencoded']} | {t['done']} | {t['other']} "
                f"| {t['missing']} | {t['error']} | {t['bytes_before'] / 1e6:.3f} "
                f"| {t['bytes_after'] / 1e6:.3f} |"
            )
        return "\n".join(lines) + "\n"


def _stored_tiers(cfg, only: list[str] | None):
    """The config's disk and S3 tiers (by label), those named in ``only`` if given.

    Raises:
        ConfigError: a tier in ``only`` is not a disk or S3 tier of the config.
    """
    tiers = {t.label: t for t in cfg.tiers if t.kind in ("disk", "s3")}
    if only:
        unknown = sorted(set(only) - set(tiers))
        if unknown:
            raise ConfigError(f"no disk or S3 tier named {unknown} (have {sorted(tiers)})")
        tiers = {k: v for k, v in tiers.items() if k in only}
    return tiers


def _open_tier(tier):
    """A backend that can ``get`` and ``replace`` on the tier (S3: no upload cleanup)."""
    from kvtc_store.backends import DiskBackend
    from kvtc_store.config import build_tier

    if tier.kind == "disk":
        return DiskBackend(tier.path, tier.capacity)
    return build_tier(tier.model_copy(update={"abort_uploads_after": None}))


def tier_keys(tier) -> list[str]:
    """Keys of the chunks stored in one disk or S3 tier, sorted."""
    if tier.kind == "disk":
        from kvtc_store.backends.disk import CHUNK_SUFFIX

        root = Path(tier.path)
        return sorted(p.name[: -len(CHUNK_SUFFIX)] for p in root.glob(f"*/*{CHUNK_SUFFIX}"))
    backend = _open_tier(tier)
    try:
        return sorted(backend.list_chunks())
    finally:
        backend.close()


def resolve_artifacts(cfg, from_id: str, to_id: str) -> tuple[object, str, str, str]:
    """``(registry, model fingerprint, old id, new id)``: ``to_id`` ``"current"`` is the
    config's profile's current artifact.

    Raises:
        ConfigError: the config names no registry.
        RegistryError: an id is not published, or the profile has no current artifact.
    """
    from kvtc_store.config import open_config_registry
    from kvtc_store.errors import RegistryError

    reg = open_config_registry(cfg.codec)
    model = cfg.codec.model or reg.find_model(from_id)
    if to_id == "current":
        move = reg.current(model, cfg.codec.profile)
        if move is None:
            raise RegistryError(
                f"profile {cfg.codec.profile} of model {model[:12]} has no artifact"
            )
        to_id = move.artifact_id
    for aid in (from_id, to_id):
        reg.manifest(model, aid)  # published, for this model
    return reg, model, from_id, to_id


class ReencodeBatch:
    """Ray Data actor: re-encodes batches of ``{"tier", "key"}`` rows (see the module
    doc); constructed once per actor with the config path and the two artifact ids."""

    def __init__(self, config: str, from_id: str, to_id: str):
        from kvtc_store.codec import KVTCCodec
        from kvtc_store.config import load_config

        cfg = load_config(config)
        reg, model, old, new = resolve_artifacts(cfg, from_id, to_id)
        # the artifacts load into memory (safetensors load_file), so their files go at
        # once: an actor Ray kills at the job's end runs no finalizer to remove them
        with tempfile.TemporaryDirectory(prefix="kvtc-reencode-") as tmp:
            self.old = KVTCCodec(reg.pull(model, old, Path(tmp) / "old"))
            self.new = KVTCCodec(reg.pull(model, new, Path(tmp) / "new"))
        self.tiers = {name: _open_tier(t) for name, t in _stored_tiers(cfg, None).items()}

    def __call__(self, batch: dict) -> dict:
        from kvtc_store.reencode import reencode_keys

        rows = list(zip(batch["tier"], batch["key"]))
        flag = os.environ.get(KILL_ENV)
        crash = bool(flag) and os.path.exists(flag)
        if crash:  # test hook: die for real after half the batch (see calibrate.py)
            rows = rows[: max(1, len(rows) // 2)]
        results = []
        for tier in dict.fromkeys(t for t, _ in rows):
            keys = [str(k) for t, k in rows if t == tier]
            results += reencode_keys(self.tiers[str(tier)], str(tier), keys, self.old, self.new)
        if crash:
            os.unlink(flag)
            os.kill(os.getpid(), signal.SIGKILL)
        cols = ("tier", "key", "status", "bytes_before", "bytes_after", "error")
        return {c: [getattr(r, c) for r in results] for c in cols}


def reencode_fleet(
    config: str | os.PathLike,
    from_id: str,
    to_id: str = "current",
    *,
    tiers: list[str] | None = None,
    address: str = "local",
    workers: int = 1,
    batch_size: int = 64,
) -> ReencodeReport:
    """Re-encode the chunks of ``from_id`` in the config's disk and S3 tiers with
    ``to_id`` (``"current"``: the config's profile's current artifact).

    Args:
        config: the store's YAML (its tiers, and ``codec.registry`` for the artifacts).
        from_id, to_id: artifact ids in the registry.
        tiers: labels of the tiers to do (default: every disk and S3 tier).
        address: Ray cluster (:func:`kvtc_store.ray_jobs.calibrate.connect`).
        workers: actors re-encoding at once (one CPU each).
        batch_size: keys per batch.

    Returns:
        The job's report (chunks that failed are in it; they keep their old bytes).

    Raises:
        ConfigError: the config is invalid, names no registry, or no such tier.
        RegistryError: an artifact is not published.
        FleetError: Ray failed, or a batch failed past its retries.
    """
    from kvtc_store.config import load_config

    ray = _ray()
    t0 = time.perf_counter()
    cfg = load_config(config)
    _, _, old, new = resolve_artifacts(cfg, from_id, to_id)
    chosen = _stored_tiers(cfg, tiers)
    rows = [{"tier": name, "key": k} for name, t in chosen.items() for k in tier_keys(t)]
    report = ReencodeReport(old, new)
    started = connect(address, num_cpus=max(workers, 1) if address == "local" else None)
    try:
        results = []
        if rows:
            env = {KILL_ENV: os.environ[KILL_ENV]} if os.environ.get(KILL_ENV) else {}
            ds = ray.data.from_items(rows).map_batches(
                ReencodeBatch,
                fn_constructor_args=(str(Path(config).resolve()), old, new),
                batch_size=batch_size,
                concurrency=workers,
                num_cpus=1,
                max_restarts=3,
                max_task_retries=3,
                runtime_env={"env_vars": env} if env else None,
            )
            try:
                results = ds.take_all()
            except Exception as exc:  # Ray Data wraps worker failures in several types
                raise FleetError(f"re-encode job failed: {exc}") from exc
    finally:
        if started:
            ray.shutdown()
    for name in chosen:
        mine = [r for r in results if r["tier"] == name]
        counts = Counter(r["status"] for r in mine)
        done = [r for r in mine if r["status"] == "reencoded"]
        report.tiers[name] = {
            "chunks": len(mine),
            **{s: counts.get(s, 0) for s in ("reencoded", "done", "other", "missing", "error")},
            "bytes_before": sum(int(r["bytes_before"]) for r in done),
            "bytes_after": sum(int(r["bytes_after"]) for r in done),
        }
    report.errors = [
        {"tier": r["tier"], "key": r["key"], "error": r["error"]}
        for r in results
        if r["status"] == "error"
    ][:20]
    report.seconds = time.perf_counter() - t0
    return report
