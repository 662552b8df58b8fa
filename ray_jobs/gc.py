"""GC job: drop stored chunks past a TTL or of artifacts no pointer names, then the
registry's artifacts nothing uses (decisions: :mod:`kvtc_store.gc`).

The driver lists the keys of every disk and S3 tier of the given stores' YAML files; a
Ray Dataset of ``(config, tier, key)`` rows goes through ``map_batches`` with an actor
class (:class:`GcScan`) that reads each chunk's header (its first 4 KiB: the artifact
id), size and age (disk: mtime, the tier's last-access clock; S3: ``LastModified``). The
driver plans; with ``apply`` it deletes the chunks (batched deletes), then re-checks each
artifact's pointers just before deleting it. A dry run (the default) deletes nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvtc_store.errors import ConfigError, FleetError, KVTCError
from kvtc_store.gc import GcPlan, StoredChunk, plan_gc

from .calibrate import _ray, connect
from .reencode import _open_tier, _stored_tiers, tier_keys

HEADER_BYTES = 4096
"""Bytes read from a chunk to learn its artifact (a header is about 300)."""


def _artifact_of(head: bytes) -> str:
    """The artifact id a blob's header names, ``""`` when it does not parse."""
    from kvtc_store.codec.blob import _read_header
    from kvtc_store.errors import BlobError

    try:
        return _read_header(memoryview(head))[0].artifact_id
    except BlobError:
        return ""


class GcScan:
    """Ray Data actor: ``{"config", "tier", "key"}`` rows -> the chunk's artifact, bytes
    and age (see the module doc); a chunk gone meanwhile is left out."""

    def __init__(self):
        self.tiers: dict = {}

    def _tier(self, config: str, label: str):
        if (config, label) not in self.tiers:
            from kvtc_store.config import load_config

            tier = _stored_tiers(load_config(config), [label])[label]
            self.tiers[config, label] = (tier.kind, _open_tier(tier))
        return self.tiers[config, label]

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {c: [] for c in ("tier", "key", "artifact_id", "bytes", "age_s")}
        now = time.time()
        for config, label, key in zip(batch["config"], batch["tier"], batch["key"]):
            kind, backend = self._tier(str(config), str(label))
            try:
                head, size, when = _read_chunk(kind, backend, str(key))
            except FileNotFoundError:
                continue  # dropped meanwhile
            out["tier"].append(f"{config}#{label}")
            out["key"].append(str(key))
            out["artifact_id"].append(_artifact_of(head))
            out["bytes"].append(size)
            out["age_s"].append(max(0.0, now - when))
        return out


def _read_chunk(kind: str, backend, key: str) -> tuple[bytes, int, float]:
    """``(first bytes, size, last access (disk) or write (S3) time)`` of one chunk.

    Raises:
        FileNotFoundError: the chunk is gone.
    """
    if kind == "disk":
        path = backend._path(key)
        st = path.stat()
        with open(path, "rb") as f:
            return f.read(HEADER_BYTES), st.st_size, st.st_mtime
    from botocore.exceptions import ClientError

    try:
        resp = backend._client.get_object(
            Bucket=backend.bucket, Key=backend.object_key(key), Range=f"bytes=0-{HEADER_BYTES - 1}"
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise FileNotFoundError(key) from exc
        raise
    size = int(resp["ContentRange"].rsplit("/", 1)[1])
    return resp["Body"].read(), size, resp["LastModified"].timestamp()


def gc_fleet(
    configs: list[str | os.PathLike],
    *,
    ttl: dict[str, float] | None = None,
    apply: bool = False,
    address: str = "local",
    workers: int = 1,
    batch_size: int = 256,
) -> GcPlan:
    """Plan (and with ``apply`` carry out) garbage collection over stores sharing one
    registry.

    Args:
        configs: the stores' YAML files; all name the same ``codec.registry`` and model.
        ttl: seconds per tier label (a label in several configs applies to each).
        apply: delete; False (default): a dry run that only reports.
        address, workers, batch_size: Ray cluster, scanning actors, keys per batch.

    Returns:
        The plan, ``applied`` when deleted; tier names in it are ``<config>#<label>``.

    Raises:
        ConfigError: a config is invalid or names no registry, or the configs name
            different registries or models.
        FleetError: Ray failed.
    """
    from kvtc_store.config import load_config, open_config_registry

    ray = _ray()
    cfgs = {str(Path(c).resolve()): load_config(c) for c in configs}
    regs = {(str(c.codec.registry), c.codec.model) for c in cfgs.values()}
    if len(regs) != 1:
        raise ConfigError(f"GC needs stores of one registry and model; these name {regs}")
    reg = open_config_registry(next(iter(cfgs.values())).codec)
    model = next(iter(cfgs.values())).codec.model or reg.only_model()
    rows = [
        {"config": path, "tier": label, "key": k}
        for path, cfg in cfgs.items()
        for label, tier in _stored_tiers(cfg, None).items()
        for k in tier_keys(tier)
    ]
    started = connect(address, num_cpus=max(workers, 1) if address == "local" else None)
    try:
        scanned = []
        if rows:
            ds = ray.data.from_items(rows).map_batches(
                GcScan, batch_size=batch_size, concurrency=workers, num_cpus=1
            )
            try:
                scanned = ds.take_all()
            except Exception as exc:  # Ray Data wraps worker failures in several types
                raise FleetError(f"GC scan failed: {exc}") from exc
    finally:
        if started:
            ray.shutdown()
    chunks = [StoredChunk(**r) for r in scanned]
    ttl_by = {
        f"{path}#{label}": (ttl or {}).get(label)
        for path, cfg in cfgs.items()
        for label in _stored_tiers(cfg, None)
    }
    plan = plan_gc(chunks, ttl_by, reg.pinned(model), set(reg.artifact_ids(model)))
    if apply:
        _apply(plan, cfgs, reg, model)
    return plan


def _apply(plan: GcPlan, cfgs: dict, reg, model: str) -> None:
    """Delete the plan's chunks (per tier, batched), then its artifacts (each re-checked
    against the pointers just before); failures go to ``plan.errors``."""
    by_tier: dict[str, list[str]] = {}
    for tier, key, _ in plan.drop_chunks:
        by_tier.setdefault(tier, []).append(key)
    for name, keys in by_tier.items():
        path, label = name.rsplit("#", 1)
        backend = _open_tier(_stored_tiers(cfgs[path], [label])[label])
        try:
            for i in range(0, len(keys), 1000):
                backend.delete(keys[i : i + 1000])
        except KVTCError as exc:
            plan.errors.append(f"{name}: {exc}")
        finally:
            backend.close()
    for aid in list(plan.drop_artifacts):
        try:
            reg.delete_artifact(model, aid)
        except KVTCError as exc:  # promoted meanwhile, or the registry failed
            plan.errors.append(f"artifact {aid}: {exc}")
            plan.drop_artifacts.remove(aid)
            plan.kept_artifacts[aid] = "pinned since"
    plan.applied = True
