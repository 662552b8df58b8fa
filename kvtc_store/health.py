"""Health answers for orchestrators (Kubernetes probes; docs/operations.md).

Two views of one question, "can this store serve?":

- :meth:`kvtc_store.tierstack.TierStack.health`: inside a serving process, from its live
  tiers: each tier's circuit-breaker state, write-down queue depth and capacity use. The
  metrics port serves it at ``/healthz`` (:meth:`kvtc_store.metrics.StoreMetrics.serve`).
- :func:`config_health`: from another process (``kvtc-store health --config``): opens
  each tier of a store config as the store would and asks it one cheap question within
  the tier's deadline (a disk folder that exists and is writable; an S3 bucket that
  answers ``HeadBucket``). No breaker or queue lives there: those are per process.

Both return ``{"ok": bool, "tiers": [{"tier", "kind", "reachable", ...}]}``; ``ok`` is
False when a tier the store needs is unreachable or its breaker is open.
"""

from __future__ import annotations

import os

DEFAULT_DEADLINE_S = 5.0
"""Seconds a probe of a disk or S3 tier may take when its config sets no deadline."""


def config_health(cfg) -> dict:
    """Probe each tier of a store config (:class:`~kvtc_store.config.StoreConfig`) once.

    Memory tiers are reachable by construction; a GPU tier is reachable where CUDA is
    (an ``optional`` one without CUDA is reported left out, not unhealthy); a disk tier
    when its folder exists (or can be created) and is writable, with its use from one
    scan; an S3 tier when its bucket answers ``HeadBucket`` within the tier's deadline
    (default :data:`DEFAULT_DEADLINE_S`), with its use from one listing when it has a cap.

    Returns:
        ``{"ok", "tiers": [{"tier", "kind", "reachable", "detail", "used_bytes",
        "capacity_bytes", "use"}]}``.
    """
    rows = [_probe(t, i) for i, t in enumerate(cfg.tiers)]
    return {"ok": all(r["reachable"] or r.get("optional") for r in rows), "tiers": rows}


def _probe(tier, i: int) -> dict:
    from .errors import KVTCError

    row: dict = {"tier": tier.label, "kind": tier.kind, "reachable": False, "detail": ""}
    row.update(used_bytes=None, capacity_bytes=tier.capacity, use=None)
    try:
        if tier.kind == "memory":
            row.update(reachable=True, detail="in each serving process")
        elif tier.kind == "gpu":
            _probe_gpu(tier, row)
        elif tier.kind == "disk":
            _probe_disk(tier, row)
        else:
            _probe_s3(tier, i, row)
    except KVTCError as exc:
        row["detail"] = f"{type(exc).__name__}: {exc}"
    if row["used_bytes"] is not None and tier.capacity:
        row["use"] = row["used_bytes"] / tier.capacity
    return row


def _probe_gpu(tier, row: dict) -> None:
    import torch

    if torch.cuda.is_available():
        row.update(reachable=True, detail=f"{torch.cuda.device_count()} CUDA devices")
    elif tier.optional:
        row.update(optional=True, detail="no CUDA here: left out (optional)")
    else:
        row["detail"] = "no CUDA here, and the tier is not optional"


def _probe_disk(tier, row: dict) -> None:
    from .backends import DiskBackend

    path = tier.path
    parent = path if path.exists() else path.parent
    if path.exists() and not path.is_dir():
        row["detail"] = f"{path} is not a directory"
        return
    if not os.access(parent, os.W_OK | os.X_OK):
        row["detail"] = f"{parent} is not writable"
        return
    if not path.exists():
        row.update(reachable=True, used_bytes=0, detail=f"{path} (created on first open)")
        return
    disk = DiskBackend(path, tier.capacity, read_only=True)
    try:
        row.update(reachable=True, used_bytes=disk.usage().used_bytes, detail=str(path))
    finally:
        disk.close()


def _probe_s3(tier, i: int, row: dict) -> None:
    from .config import build_tier
    from .errors import BucketNotFoundError

    update = {"abort_uploads_after": None, "check_bucket": False}
    backend = build_tier(tier.model_copy(update=update), i)
    try:
        deadline = tier.deadline or DEFAULT_DEADLINE_S
        where = f"s3://{tier.bucket}/{backend.prefix}"
        try:
            answered = backend.check_bucket(deadline)
        except BucketNotFoundError as exc:
            raise BucketNotFoundError(f"tiers.{i}.bucket: {exc}") from exc
        if not answered:
            row["detail"] = f"{where}: {backend.bucket_problem}"
            return
        row.update(reachable=True, detail=where)
        if tier.capacity:
            row["used_bytes"] = sum(backend.list_chunks().values())
    finally:
        backend.close()
