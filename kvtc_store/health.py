"""Health answers for orchestrators (Kubernetes probes; docs/operations.md).

Two views of one question, "can this store serve?":

- :meth:`kvtc_store.tierstack.TierStack.health`: inside a serving process, from its live
  tiers: each tier's circuit-breaker state, write-down queue depth and capacity use. The
  metrics port serves it at ``/healthz`` (:meth:`kvtc_store.metrics.StoreMetrics.serve`).
- :func:`config_health`: from another process (``kvtc-store health --config``): opens
  each tier of a store config as the store would and asks it one cheap question within
  the tier's deadline (a disk folder that exists, or can be created, and takes a file; an S3 bucket that
  answers ``HeadBucket``). No breaker or queue lives there: those are per process.

Both return ``{"ok": bool, "tiers": [{"tier", "kind", "reachable", ...}]}``; ``ok`` is
False when a tier the store needs is unreachable or its breaker is open.
"""

from __future__ import annotations

DEFAULT_DEADLINE_S = 5.0
"""Seconds a probe of a disk or S3 tier may take when its config sets no deadline."""


def config_health(cfg) -> dict:
    """Probe each tier of a store config (:class:`~kvtc_store.config.StoreConfig`) once.

    Memory tiers are reachable by construction; a GPU tier is reachable where CUDA is
    (an ``optional`` one without CUDA is reported left out, not unhealthy); a disk tier
    when its folder exists (or can be created) and is writable, with its use from one
    scan; an S3 tier when its bucket answers ``HeadBucket`` within the tier's deadline
    (default :data:`DEFAULT_DEADLINE_S`), with its use from one listing when it has a cap.

    The codec is checked too: a ``codec.artifact`` must load (manifest, tensors and their
    checksums), a ``codec.registry`` profile must name a current artifact that verifies;
    a config with neither calibrates on first open, which needs no check here.

    Returns:
        ``{"ok", "tiers": [{"tier", "kind", "reachable", "detail", "used_bytes",
        "capacity_bytes", "use"}], "codec": {"kind", "ok", "detail"}}``.
    """
    rows = [_probe(t, i) for i, t in enumerate(cfg.tiers)]
    codec = _probe_codec(cfg.codec)
    ok = all(r["reachable"] or r.get("optional") for r in rows) and codec["ok"]
    return {"ok": ok, "tiers": rows, "codec": codec}


def _probe_codec(c) -> dict:
    from .config import artifact_from_config
    from .errors import KVTCError

    if c.artifact is None and c.registry is None:
        return {"kind": "calibrated", "ok": True, "detail": "calibrated on first open"}
    kind = "artifact" if c.artifact is not None else "registry"
    try:
        art = artifact_from_config(c)
    except KVTCError as exc:
        return {"kind": kind, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}
    detail = f"{art.artifact_id} for {art.model_name}, target ratio {art.target_ratio:g}"
    return {"kind": kind, "ok": True, "detail": detail}


def _probe(tier, i: int) -> dict:
    from .errors import KVTCError

    row: dict = {"tier": tier.label, "kind": tier.kind, "reachable": False, "detail": ""}
    row.update(used_bytes=None, capacity_bytes=tier.capacity, use=None)
    try:
        if tier.kind == "memory":
            row.update(reachable=True, detail="not checked: held by each serving process")
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
    if path.exists() and not path.is_dir():
        row["detail"] = f"{path} is not a directory"
        return
    if not path.exists():  # the store creates it on open: so does the probe, then undoes it
        made = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True)
            _write_probe(path)
        except OSError as exc:
            row["detail"] = f"{path} cannot be created: {exc.strerror or exc}"
            return
        finally:
            for p in made:  # deepest first; only the folders the probe made, if empty
                try:
                    p.rmdir()
                except OSError:
                    break
        row.update(reachable=True, used_bytes=0, detail=f"{path} (created on first open)")
        return
    try:
        _write_probe(path)
    except OSError as exc:
        row["detail"] = f"{path} is not writable: {exc.strerror or exc}"
        return
    disk = DiskBackend(path, tier.capacity, read_only=True)
    try:
        row.update(reachable=True, used_bytes=disk.usage().used_bytes, detail=str(path))
    finally:
        disk.close()


def _write_probe(folder) -> None:
    """Create and delete one file in ``folder``: a real write, which ``os.access`` is not
    (root passes it on a read-only mount or ``/proc``). Raises ``OSError``."""
    import tempfile

    with tempfile.NamedTemporaryFile(dir=folder, prefix=".kvtc-health-"):
        pass


def _probe_s3(tier, i: int, row: dict) -> None:
    from .config import build_tier
    from .errors import BucketNotFoundError

    deadline = tier.deadline or DEFAULT_DEADLINE_S
    # One attempt whose socket timeouts end by the deadline: closing the backend waits for
    # its call, so a hung endpoint must not hold the probe past the deadline (the store's
    # own read_timeout x max_attempts would: 30 s by default).
    update = {"abort_uploads_after": None, "check_bucket": False, "max_attempts": 1}
    update |= {"connect_timeout": deadline, "read_timeout": deadline}
    backend = build_tier(tier.model_copy(update=update), i)
    try:
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
