"""Garbage collection of stored chunks and registry artifacts (issue 19): the decisions.

Given what is stored (:class:`StoredChunk` rows: tier, key, the artifact its header names,
bytes, age) and what the registry's pointers name, :func:`plan_gc` decides:

1. a chunk older than its tier's TTL is dropped (``ttl``). Age is since the last access
   on a disk tier (the disk tier sets a chunk file's mtime on every read: its LRU clock)
   and since the write on an S3 tier (S3 keeps no access time: ``LastModified``);
2. a chunk whose artifact no pointer names is dropped (``unreachable``): no store encodes
   with it, and a profile can only return to it by a promotion, which re-encoding or
   recomputing serves as well. Pointers name each profile's current artifact and the one
   its rollback returns to (:meth:`~kvtc_store.registry.CodecRegistry.pinned`);
3. an artifact of the registry that no pointer names and no kept chunk uses is dropped.

Never dropped: an artifact a pointer names, an artifact a kept chunk uses (from any tier
scanned: give GC every store that shares the registry), a chunk whose header does not
parse (``unreadable``: counted, left to the store's own checks).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class StoredChunk:
    """One stored chunk as GC sees it: ``artifact_id`` ``""`` when the header does not
    parse; ``bytes`` its size; ``age_s`` seconds since its last access (disk) or write
    (S3)."""

    tier: str
    key: str
    artifact_id: str
    bytes: int
    age_s: float


@dataclass
class GcPlan:
    """What GC drops (or would drop, in a dry run), and why.

    Attributes:
        drop_chunks: ``(tier, key, reason)`` with reason ``ttl`` or ``unreachable``.
        drop_artifacts: ids of artifacts to delete from the registry.
        kept_artifacts: ids kept, with why (``pinned``, ``used``).
        tiers: per tier: chunks scanned, kept, dropped by reason, bytes dropped,
            unreadable.
        applied: whether the drops were carried out.
        errors: failures while applying (the rest was applied).
    """

    drop_chunks: list[tuple[str, str, str]] = field(default_factory=list)
    drop_artifacts: list[str] = field(default_factory=list)
    kept_artifacts: dict[str, str] = field(default_factory=dict)
    tiers: dict[str, dict] = field(default_factory=dict)
    applied: bool = False
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Every field, as JSON."""
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self) -> str:
        """Per tier counts, then the artifacts dropped and kept."""
        verb = "dropped" if self.applied else "would drop (dry run; --apply to delete)"
        lines = [
            f"# Garbage collection: {verb}",
            "",
            "| tier | chunks | kept | ttl | unreachable | unreadable | MB dropped |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in self.tiers.items():
            lines.append(
                f"| {name} | {t['chunks']} | {t['kept']} | {t['ttl']} | {t['unreachable']} "
                f"| {t['unreadable']} | {t['bytes_dropped'] / 1e6:.3f} |"
            )
        lines += ["", f"Artifacts dropped: {', '.join(self.drop_artifacts) or 'none'}"]
        kept = ", ".join(f"{a} ({why})" for a, why in sorted(self.kept_artifacts.items()))
        lines.append(f"Artifacts kept: {kept or 'none'}")
        lines += [f"Error: {e}" for e in self.errors]
        return "\n".join(lines) + "\n"


def plan_gc(
    chunks: list[StoredChunk],
    ttl_s: dict[str, float | None],
    pinned: set[str],
    artifacts: set[str],
) -> GcPlan:
    """Decide what to drop (see the module doc).

    Args:
        chunks: every chunk of the scanned tiers.
        ttl_s: per tier label, its TTL in seconds (None or absent: no TTL).
        pinned: artifacts named by a pointer (never dropped; their chunks only by TTL).
        artifacts: the registry's artifacts (those GC may drop).
    """
    plan = GcPlan()
    used: set[str] = set()
    stats: dict[str, Counter] = {}
    for c in chunks:
        st = stats.setdefault(c.tier, Counter())
        st["chunks"] += 1
        ttl = ttl_s.get(c.tier)
        if not c.artifact_id:
            st["unreadable"] += 1
            st["kept"] += 1
            continue
        reason = (
            "ttl"
            if ttl is not None and c.age_s > ttl
            else "unreachable"
            if c.artifact_id not in pinned
            else ""
        )
        if reason:
            plan.drop_chunks.append((c.tier, c.key, reason))
            st[reason] += 1
            st["bytes_dropped"] += c.bytes
        else:
            used.add(c.artifact_id)
            st["kept"] += 1
    keys = ("chunks", "kept", "ttl", "unreachable", "unreadable", "bytes_dropped")
    plan.tiers = {t: {k: int(st.get(k, 0)) for k in keys} for t, st in stats.items()}
    for aid in sorted(artifacts):
        if aid in pinned:
            plan.kept_artifacts[aid] = "pinned"
        elif aid in used:
            plan.kept_artifacts[aid] = "used"
        else:
            plan.drop_artifacts.append(aid)
    return plan


def parse_duration(text: str) -> float:
    """Seconds of ``"90"``, ``"90s"``, ``"15m"``, ``"12h"`` or ``"7d"``.

    Raises:
        ValueError: not such a duration, or negative.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    value = float(t[:-1] if scale else t) * (scale or 1)
    if not value >= 0:
        raise ValueError(f"{text!r} is not a duration")
    return value
