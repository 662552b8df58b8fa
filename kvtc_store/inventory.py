"""What a store's disk and S3 tiers hold, read where they keep it, and the operator's
actions on it: counts by tenant and codec artifact, eviction by tenant, artifact or age,
verification of every blob, and warming a tier from another.

A tenant is read off the chunk key (its tag, :func:`kvtc_store.keys.tenant_tag`), an
artifact off the blob's header (one read of its first :data:`HEADER_BYTES` bytes: a
ranged GET on S3). Memory and GPU tiers live inside a serving process and have nothing
to read here. Used by ``kvtc-store stats`` and ``kvtc-store admin`` (docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import BlobError, KVTCError, StoreError
from .keys import key_tenant_tag, tenant_tag

HEADER_BYTES = 4096
"""Bytes read from the start of each blob to learn its artifact (a header is ~300)."""

SHARED = "(shared)"
"""The label of the shared namespace's chunks (tenant ``""``)."""


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a tier.

    Attributes:
        key: the chunk key (hex).
        size: bytes it takes (allocated bytes on disk, object bytes on S3).
        mtime: seconds since the epoch: last use on disk (the LRU stamp), last write on S3.
    """

    key: str
    size: int
    mtime: float

    @property
    def tag(self) -> str:
        """The tenant tag its key ends with (``""``: the shared namespace)."""
        return key_tenant_tag(self.key)


class TierView:
    """One disk or S3 tier of a store config, opened for an operator.

    Read-only unless ``writable``: the disk tier then evicts nothing on open and refuses
    ``delete``/``put``; the S3 tier skips its open-time clean-up of stale uploads either
    way (an operator's look must not change the store).

    Args:
        tier: a disk or S3 tier config (:mod:`kvtc_store.config`).
        writable: open for ``delete``/``put`` (``kvtc-store admin ... --yes``).
        index: the tier's place in its config, for error messages (``tiers.<index>``).

    Raises:
        ConfigError: the tier cannot be opened (a disk tier whose folder is absent is
            opened as empty instead; see :attr:`absent`).
    """

    def __init__(self, tier, writable: bool = False, index: int = 0) -> None:
        from .backends import DiskBackend

        self.label: str = tier.label
        self.kind: str = tier.kind
        self.capacity: int | None = tier.capacity
        self.absent = False
        if tier.kind == "disk":
            self.where = str(tier.path)
            _check_creatable(tier.path, index)
            self.absent = not tier.path.is_dir()
            self.backend = (
                None
                if self.absent
                else DiskBackend(tier.path, tier.capacity, read_only=not writable)
            )
        else:
            from .config import build_tier

            update = {"abort_uploads_after": None}
            self.backend = build_tier(tier.model_copy(update=update), index)
            self.backend.name = tier.label
            self.where = f"s3://{tier.bucket}/{self.backend.prefix}"

    @classmethod
    def of_folder(cls, path, capacity: int, writable: bool = False) -> TierView:
        """A view of one disk tier's folder (``--disk DIR``) with the cap ``capacity``."""
        from pathlib import Path

        from .config import DiskTierConfig

        return cls(DiskTierConfig(kind="disk", path=Path(path), capacity=capacity), writable)

    def chunks(self) -> list[Chunk]:
        """Every chunk the tier holds now, by key.

        Raises:
            StoreError: an S3 listing failed.
        """
        if self.backend is None:
            return []
        return sorted((Chunk(k, n, t) for k, n, t in self.backend.inventory()), key=_by_key)

    def head(self, key: str) -> bytes | None:
        """The first :data:`HEADER_BYTES` of chunk ``key``, None if it is gone."""
        return None if self.backend is None else self.backend.read_head(key, HEADER_BYTES)

    def close(self) -> None:
        """Release the backend (its files and objects stay)."""
        if self.backend is not None:
            self.backend.close()


def _check_creatable(path, index: int) -> None:
    """A disk tier's folder that is absent must be one the store could create: a file in
    its place, or in place of a parent folder, makes the tier unreachable, not empty.

    Raises:
        ConfigError: ``tiers.<index>.path`` names such a folder.
    """
    from .errors import ConfigError

    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(
                    f"tiers.{index}.path: {path} cannot be created: {p} is not a directory"
                )
            return


def _by_key(c: Chunk) -> str:
    return c.key


def open_views(
    cfg, names: Sequence[str] | None = None, writable: bool = False, failed: list | None = None
):
    """``(views, skipped)``: a :class:`TierView` of each disk and S3 tier of the store
    config ``cfg`` (only those named in ``names`` if given), and the labels of its memory
    and GPU tiers, which hold nothing outside a serving process.

    Args:
        failed: where given, a tier that cannot be opened is appended to it as ``(tier
            config, error)`` and the others still open (a report goes on).

    Raises:
        ConfigError: a name that no tier has, or (without ``failed``) a tier that cannot
            be opened (the views opened before it are closed).
    """
    from .errors import ConfigError

    labels = [t.label for t in cfg.tiers]
    for name in names or []:
        if name not in labels:
            raise ConfigError(f"no tier named {name!r} (tiers: {', '.join(labels)})")
    views: list[TierView] = []
    skipped = []
    try:
        for i, t in enumerate(cfg.tiers):
            if names and t.label not in names:
                continue
            if t.kind in ("memory", "gpu"):
                skipped.append(t.label)
                continue
            try:
                views.append(TierView(t, writable, i))
            except KVTCError as exc:
                if failed is None:
                    raise
                failed.append((t, exc))
    except BaseException:
        for v in views:
            v.close()
        raise
    return views, skipped


def header_of(head: bytes | None):
    """The :class:`~kvtc_store.codec.blob.BlobHeader` at the start of ``head``, or None
    when it is not a readable kvtc header."""
    from .codec.blob import _read_header  # header only: the payload is not in ``head``

    if head is None:
        return None
    try:
        return _read_header(memoryview(head))[0]
    except BlobError:
        return None


def tenant_label(tag: str, names: dict[str, str]) -> str:
    """A tenant's label for a report: its name when ``names`` (tag -> name) knows it,
    :data:`SHARED` for the shared namespace, else ``#<tag>``."""
    if not tag:
        return SHARED
    return names.get(tag, f"#{tag}")


def tenant_names(tenants: Iterable[str]) -> dict[str, str]:
    """``{tag: name}`` of the tenants an operator named (the config's and ``--tenant``)."""
    return {tenant_tag(t): t for t in tenants if t}


def summarize(view: TierView, names: dict[str, str]) -> dict:
    """A tier's report: chunks, bytes, cap, use, and the same per tenant and per artifact.

    Returns:
        ``{"tier", "kind", "where", "capacity_bytes", "chunks", "used_bytes",
        "use" (share of the cap, or None), "over_cap", "by_tenant": {label: {"chunks",
        "bytes"}}, "by_artifact": {id: {"chunks", "bytes"}}}`` (``"unreadable"``: blobs
        whose header does not parse; ``"note"`` for an absent folder).

    Raises:
        StoreError: an S3 request failed.
    """
    out: dict = {"tier": view.label, "kind": view.kind, "where": view.where}
    out["capacity_bytes"] = view.capacity
    if view.absent:
        out["note"] = "absent: no such directory"
    chunks = view.chunks()
    used = sum(c.size for c in chunks)
    out.update(chunks=len(chunks), used_bytes=used)
    out["use"] = used / view.capacity if view.capacity else None
    out["over_cap"] = bool(view.capacity) and used > view.capacity
    by_tenant: dict = {}
    by_artifact: dict = {}
    for c in chunks:
        _count(by_tenant, tenant_label(c.tag, names), c.size)
        h = header_of(view.head(c.key))
        _count(by_artifact, h.artifact_id if h is not None else "unreadable", c.size)
    out["by_tenant"], out["by_artifact"] = by_tenant, by_artifact
    return out


def _count(rows: dict, name: str, size: int) -> None:
    row = rows.setdefault(name, {"chunks": 0, "bytes": 0})
    row["chunks"] += 1
    row["bytes"] += size


@dataclass(frozen=True)
class Selection:
    """Which chunks an admin action takes; every given criterion must hold.

    Attributes:
        tenants: tenant names (``""``: the shared namespace); None: any tenant.
        artifacts: codec artifact ids (``"unreadable"``: blobs whose header does not
            parse); None: any artifact.
        older_than_s: only chunks last used (disk) or written (S3) more than this many
            seconds ago; None: any age.
        keys: only these chunk keys; None: any key.
    """

    tenants: tuple[str, ...] | None = None
    artifacts: tuple[str, ...] | None = None
    older_than_s: float | None = None
    keys: frozenset[str] | None = field(default=None)

    def empty(self) -> bool:
        """True when no criterion is set (every chunk would be taken)."""
        return (self.tenants, self.artifacts, self.older_than_s, self.keys) == (None,) * 4


def select(view: TierView, sel: Selection, now: float | None = None) -> list[Chunk]:
    """The chunks of ``view`` that ``sel`` takes (headers are read only when it names
    artifacts).

    Raises:
        StoreError: an S3 request failed.
    """
    now = time.time() if now is None else now
    tags = None if sel.tenants is None else {tenant_tag(t) for t in sel.tenants}
    out = []
    for c in view.chunks():
        if sel.keys is not None and c.key not in sel.keys:
            continue
        if tags is not None and c.tag not in tags:
            continue
        if sel.older_than_s is not None and now - c.mtime <= sel.older_than_s:
            continue
        if sel.artifacts is not None:
            h = header_of(view.head(c.key))
            if (h.artifact_id if h is not None else "unreadable") not in sel.artifacts:
                continue
        out.append(c)
    return out


DELETE_BATCH = 256
"""Chunks deleted (or copied) per backend call."""


def evict(view: TierView, sel: Selection, apply: bool) -> dict:
    """Remove the chunks ``sel`` takes from one tier (only counts them unless ``apply``).

    Returns:
        ``{"tier", "where", "dry_run", "chunks", "bytes", "removed"}``.

    Raises:
        StoreError: a listing, read or delete failed (chunks deleted before it stay
            deleted; run it again).
    """
    chosen = select(view, sel)
    removed = 0
    if apply:
        for i in range(0, len(chosen), DELETE_BATCH):
            batch = [c.key for c in chosen[i : i + DELETE_BATCH]]
            view.backend.delete(batch)
            removed += len(batch)
    return {
        "tier": view.label,
        "where": view.where,
        "dry_run": not apply,
        "chunks": len(chosen),
        "bytes": sum(c.size for c in chosen),
        "removed": removed,
    }


def verify(view: TierView, remove: bool) -> dict:
    """Read every blob of a tier in full and check it: prefix, header and payload
    checksums (:func:`~kvtc_store.codec.blob.unpack_blob`) and its binding to the key it
    is stored under (the header's ``key_digest``; blobs written before the field have
    none and are bound by position only when read). A chunk gone meanwhile is skipped.

    Args:
        view: the tier.
        remove: delete the bad blobs (else only report them).

    Returns:
        ``{"tier", "where", "checked", "ok", "bad": [{"key", "error"}], "removed"}``.

    Raises:
        StoreError: a listing, read or delete failed.
    """
    from .codec.blob import chunk_digest, unpack_blob

    bad = []
    checked = 0
    chunks = view.chunks()
    for i in range(0, len(chunks), DELETE_BATCH):
        keys = [c.key for c in chunks[i : i + DELETE_BATCH]]
        for key, blob in zip(keys, view.backend.get(keys)):
            if blob is None:
                continue
            checked += 1
            try:
                header, _ = unpack_blob(blob)
            except BlobError as exc:
                bad.append({"key": key, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if header.key_digest and header.key_digest != chunk_digest(key):
                bad.append(
                    {
                        "key": key,
                        "error": "BlobMisfiledError: written for another chunk "
                        f"(key digest {header.key_digest[:12]})",
                    }
                )
    removed = 0
    if remove and bad:
        keys = [b["key"] for b in bad]
        for i in range(0, len(keys), DELETE_BATCH):
            view.backend.delete(keys[i : i + DELETE_BATCH])
        removed = len(keys)
    return {
        "tier": view.label,
        "where": view.where,
        "checked": checked,
        "ok": checked - len(bad),
        "bad": bad,
        "removed": removed,
    }


def warm(src: TierView, dst: TierView, sel: Selection, apply: bool = True) -> dict:
    """Copy the chunks ``sel`` takes from ``src`` into ``dst`` (a replica's disk from the
    shared S3 tier, say); chunks ``dst`` holds already are skipped. Each blob is checked
    (:func:`~kvtc_store.codec.blob.unpack_blob`) before it is copied: a bad one is
    counted, never spread.

    Returns:
        ``{"from", "to", "dry_run", "chunks", "copied", "present", "bad", "missing",
        "bytes"}``; ``missing``: keys of ``sel.keys`` that ``src`` does not hold.

    Raises:
        StoreError: a listing, read or write failed (``CapacityError`` when ``dst``
            cannot take a chunk).
    """
    from .codec.blob import unpack_blob

    if dst.backend is None:
        raise StoreError(f"{dst.label} tier: {dst.where} does not exist")
    chosen = select(src, sel)
    held = {c.key for c in dst.chunks()}
    todo = [c for c in chosen if c.key not in held]
    copied = bad = nbytes = 0
    for i in range(0, len(todo), DELETE_BATCH) if apply else ():
        keys = [c.key for c in todo[i : i + DELETE_BATCH]]
        items = []
        for key, blob in zip(keys, src.backend.get(keys)):
            if blob is None:
                continue
            try:
                unpack_blob(blob)
            except BlobError:
                bad += 1
                continue
            items.append((key, blob))
        dst.backend.put(items)
        copied += len(items)
        nbytes += sum(len(b) for _, b in items)
    found = {c.key for c in chosen}
    return {
        "from": src.label,
        "to": dst.label,
        "dry_run": not apply,
        "chunks": len(todo),
        "copied": copied,
        "present": len(chosen) - len(todo),
        "bad": bad,
        "missing": sorted(sel.keys - found) if sel.keys is not None else [],
        "bytes": nbytes,
    }


def describe_blob(data: bytes) -> tuple[dict, list[str]]:
    """What can be read of one blob's bytes, for ``kvtc-store inspect``.

    Returns:
        ``(fields, problems)``: ``fields`` labelled for a person (layers, KV heads, head
        dim, tokens, first position, dtype, coder, exact tokens, artifact id and version,
        model, chunk-key digest, rate-control exponent, blob bytes, bf16 bytes and the
        honest ratio = bf16 bytes of the chunk / every byte of the blob); ``problems``:
        the named errors met, empty for a sound blob. A blob whose payload fails its
        checksum still shows its (verified) header; one whose header fails shows the
        prefix and, marked unverified, whatever of the header still parses.
    """
    from .codec.blob import unpack_blob_header, verify_payload

    fields: dict = {"blob bytes": len(data)}
    try:
        header, payload = unpack_blob_header(data)
    except BlobError as exc:
        return {**fields, **_prefix_fields(data)}, [f"{type(exc).__name__}: {exc}"]
    problems = []
    try:
        verify_payload(header, payload)
    except BlobError as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    fields.update(_header_fields(header))
    fields["honest ratio"] = round(fields["bf16 bytes"] / len(data), 2)
    fields["payload checksum"] = "bad" if problems else "ok"
    return fields, problems


def _header_fields(h) -> dict:
    layers, heads, head_dim, tokens = h.shape
    bf16 = 2 * 2 * layers * heads * head_dim * tokens  # K and V, 2 bytes an element
    out = {
        "layers": layers,
        "kv heads": heads,
        "head dim": head_dim,
        "tokens": tokens,
        "first position": h.first_position,
        "dtype": h.dtype,
        "coder": h.coder,
        "exact tokens": _exact_tokens(h, tokens),
        "artifact id": h.artifact_id,
        "artifact version": h.artifact_version,
        "model fingerprint": h.model,
        "chunk-key digest": h.key_digest or "(none: written before the field)",
        "rate-control step exponent": h.step_exp,
        "sections (raw bytes)": h.sections,
        "payload bytes": h.payload_len,
        "bf16 bytes": bf16,
    }
    return out


def _exact_tokens(h, tokens: int) -> str:
    """How many of a blob's ``tokens`` are stored exactly, and why: the sink tokens
    (absolute positions below ``n_sink``) it holds and its last ``exact_tail``."""
    sinks = max(0, min(h.n_sink - h.first_position, tokens))
    tail = min(h.exact_tail, tokens)
    n = min(tokens, sinks + tail)  # the two ranges overlap only when both cover it all
    return (
        f"{n} of {tokens} ({sinks} sink tokens, at positions < {h.n_sink}; "
        f"the last {tail}), {h.exact_dtype}"
    )


def _prefix_fields(data: bytes) -> dict:
    """The fixed prefix of a blob whose header did not verify, and what of the header
    still parses (unverified); see docs/blob-format.md for the layout."""
    import msgpack

    from .codec.blob import _PREFIX, MAGIC

    out: dict = {"magic": "KVTC" if data[:4] == MAGIC else repr(bytes(data[:4]))}
    if data[:4] != MAGIC or len(data) < _PREFIX.size:
        return out
    _, version, hlen, _ = _PREFIX.unpack_from(data, 0)
    out.update({"format version": version, "header length": hlen})
    try:
        raw = msgpack.unpackb(data[_PREFIX.size : _PREFIX.size + hlen], raw=False)
    except Exception:  # noqa: BLE001 - anything msgpack raises on damaged bytes
        return out
    if isinstance(raw, dict):
        out["header (unverified)"] = {str(k): v for k, v in raw.items()}
    return out
