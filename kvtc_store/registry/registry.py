"""The codec registry: immutable artifacts, a ``current`` pointer per profile, history.

Layout under the registry's root (a folder or an S3 prefix; see docs/registry.md)::

    <model fingerprint>/artifacts/<artifact id>/tensors.safetensors
    <model fingerprint>/artifacts/<artifact id>/manifest.json      written last
    <model fingerprint>/artifacts/<artifact id>/reports/<name>     gate reports (fleet jobs)
    <model fingerprint>/profiles/<profile>/current.json            the pointer
    <model fingerprint>/profiles/<profile>/history/<seq>.json      one record per move

An artifact is visible once its ``manifest.json`` exists. Publishing writes the tensors,
reads them back and checks their SHA-256, then creates the manifest (create-if-absent),
which carries that checksum: a publisher killed before the manifest leaves nothing
visible, and an id that exists already is left alone (ids are content hashes).

A pointer move is compare-and-swap on ``current.json``: read it (with its etag), write
the new record only if the etag is unchanged (create-if-absent for the first move). The
record holds the move itself (seq, from, to, who, when, why); the history record of a
move is created after the swap, and a mover first writes the record of the move before
it if a crash left it out, so the history stays complete and append-only.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..codec.artifact import CodecArtifact
from ..errors import (
    ArtifactChecksumError,
    ArtifactError,
    ArtifactInUseError,
    ArtifactModelMismatchError,
    ArtifactNotFoundError,
    RegistryConflictError,
    RegistryError,
    RegistryPointerError,
)
from .storage import FolderStorage, S3Storage, Storage

__all__ = ["CodecRegistry", "Move", "default_actor", "open_registry"]

TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
POINTER_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Profiles, model fingerprints and artifact ids: one path segment, no dots first."""


def default_actor() -> str:
    """``user@host:pid``, who a move is recorded as made by when the caller names no one."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"{kind} {name!r} is not a valid name ([A-Za-z0-9._-], 1-128)")
    return name


@dataclass(frozen=True)
class Move:
    """One move of a profile's ``current`` pointer (the pointer holds the latest).

    Attributes:
        model: model fingerprint.
        profile: the profile (``default``, ``ratio16``, ...).
        seq: 1 for the first move of the profile, then +1 per move.
        artifact_id: the id the pointer names after the move.
        previous: the id it named before (None for the first move).
        action: ``"promote"`` or ``"rollback"``.
        by: who moved it (``user@host:pid`` by default).
        at: when, ISO 8601 UTC.
        reason: why (free text).
        etag: the pointer's etag when read (empty for history records).
    """

    model: str
    profile: str
    seq: int
    artifact_id: str
    previous: str | None
    action: str
    by: str
    at: str
    reason: str = ""
    etag: str = ""

    def record(self) -> bytes:
        """The JSON the registry stores for this move."""
        d = asdict(self)
        d.pop("etag")
        return json.dumps({"format": POINTER_FORMAT, **d}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, where: str, etag: str = "") -> Move:
        """Read a stored record.

        Raises:
            RegistryPointerError: not a record the registry writes (``where`` names it).
        """
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.pop("format") != POINTER_FORMAT:
                raise ValueError("not a format-1 record")
            move = cls(**d, etag=etag)
            for name in ("model", "profile", "artifact_id"):
                _check_name(name, getattr(move, name))
            if type(move.seq) is not int or move.seq < 1:
                raise ValueError(f"seq {move.seq!r}")
            if move.action not in ("promote", "rollback"):
                raise ValueError(f"action {move.action!r}")
        except (ValueError, TypeError, KeyError, RegistryError) as exc:
            raise RegistryPointerError(
                f"{where} is not a pointer record the registry writes ({exc}); "
                "promote with force=True (CLI: --force) to overwrite it"
            ) from exc
        return move


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CodecRegistry:
    """Codec artifacts of any number of models, and per (model, profile) a ``current``
    pointer with its history, in a folder or an S3 prefix.

    Thread-safe and safe across processes and hosts: every write is atomic, and pointer
    moves are compare-and-swap (:mod:`~kvtc_store.registry.storage`).

    Args:
        storage: where the registry lives (:func:`open_registry` builds it from a URL).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @property
    def url(self) -> str:
        """The registry's folder or ``s3://bucket/prefix/``."""
        return self.storage.url

    # --- keys ------------------------------------------------------------------------------

    @staticmethod
    def _art_key(model: str, artifact_id: str, name: str) -> str:
        return f"{_check_name('model', model)}/artifacts/{_check_name('id', artifact_id)}/{name}"

    @staticmethod
    def _profile_key(model: str, profile: str, name: str) -> str:
        return f"{_check_name('model', model)}/profiles/{_check_name('profile', profile)}/{name}"

    # --- artifacts -------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Fingerprints of the models the registry has a folder for."""
        return [m for m in self.storage.children("") if _NAME.fullmatch(m)]

    def find_model(self, artifact_id: str) -> str:
        """The model whose artifacts hold ``artifact_id``.

        Raises:
            ArtifactNotFoundError: no model holds it.
        """
        for model in self.models():
            if self.storage.read(self._art_key(model, artifact_id, MANIFEST)) is not None:
                return model
        raise ArtifactNotFoundError(f"registry {self.url}: no artifact {artifact_id}")

    def only_model(self) -> str:
        """The registry's one model.

        Raises:
            RegistryError: it holds none, or several (name one).
        """
        models = self.models()
        if len(models) != 1:
            raise RegistryError(
                f"registry {self.url} holds {len(models)} models ({', '.join(models) or 'none'})"
                "; name the model fingerprint"
            )
        return models[0]

    def artifact_ids(self, model: str) -> list[str]:
        """Ids of the artifacts published for ``model`` (those whose manifest exists)."""
        ids = self.storage.children(f"{_check_name('model', model)}/artifacts/")
        return [
            i
            for i in ids
            if _NAME.fullmatch(i)
            and self.storage.read(self._art_key(model, i, MANIFEST)) is not None
        ]

    def manifest(self, model: str, artifact_id: str) -> dict:
        """The published manifest of an artifact (the artifact's own manifest plus
        ``files``: each file's ``sha256`` and ``bytes``, and ``published``: who, when).

        Raises:
            ArtifactNotFoundError: not published.
            ArtifactError: the manifest does not parse.
            ArtifactModelMismatchError: the manifest is for another model or id.
        """
        got = self.storage.read(self._art_key(model, artifact_id, MANIFEST))
        if got is None:
            raise ArtifactNotFoundError(
                f"registry {self.url}: no artifact {artifact_id} for model {model[:12]}"
            )
        try:
            man = json.loads(got[0])
            files = man["files"]
            _ = (files[TENSORS]["sha256"], files[TENSORS]["bytes"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(
                f"registry {self.url}: manifest of {artifact_id} is malformed: {exc!r}"
            ) from exc
        if man.get("model_fingerprint") != model:
            raise ArtifactModelMismatchError(
                f"registry {self.url}: artifact {artifact_id} under model {model[:12]} was "
                f"calibrated for model {str(man.get('model_fingerprint'))[:12]}"
            )
        if man.get("artifact_id") != artifact_id:
            raise ArtifactChecksumError(
                f"registry {self.url}: the manifest under {artifact_id} names "
                f"{man.get('artifact_id')!r}"
            )
        return man

    def publish(
        self, artifact: CodecArtifact | str | os.PathLike, *, by: str | None = None
    ) -> tuple[str, bool]:
        """Publish an artifact (an object, or a folder from :meth:`CodecArtifact.save`).

        The tensors are written and read back and their SHA-256 checked before the
        manifest (which records it) is created: a half-uploaded artifact is never
        visible. Publishing an id that exists is a no-op.

        Returns:
            ``(artifact id, created)``: created is False when the id was there already.

        Raises:
            ArtifactError: the folder is not a valid artifact.
            ArtifactChecksumError: the tensors read back differ from those written.
            RegistryError, RegistryUnavailableError: the storage failed.
        """
        with tempfile.TemporaryDirectory(prefix="kvtc-publish-") as tmp:
            if isinstance(artifact, CodecArtifact):
                folder = artifact.save(Path(tmp) / "a")
            else:
                folder = Path(artifact)
                artifact = CodecArtifact.load(folder)  # checks the files and the id
            tensors = (folder / TENSORS).read_bytes()
            man = json.loads((folder / MANIFEST).read_text())
        model, aid = artifact.model_fingerprint, artifact.artifact_id
        mkey = self._art_key(model, aid, MANIFEST)
        if self.storage.read(mkey) is not None:
            return aid, False
        digest = _sha256(tensors)
        man["files"] = {TENSORS: {"sha256": digest, "bytes": len(tensors)}}
        man["published"] = {"by": by or default_actor(), "at": _now()}
        tkey = self._art_key(model, aid, TENSORS)
        self.storage.write(tkey, tensors)
        back = self.storage.read(tkey)
        if back is None or _sha256(back[0]) != digest:
            raise ArtifactChecksumError(
                f"registry {self.url}: {tkey} read back differs from what was written; "
                "not published"
            )
        created = self.storage.create(mkey, json.dumps(man, indent=1).encode())
        return aid, created

    def write_report(self, model: str, artifact_id: str, name: str, data: bytes) -> str:
        """Store a report (``name``, e.g. ``gate-<time>.json``) beside an artifact, under
        ``<model>/artifacts/<id>/reports/``; the artifact need not be published (a
        candidate the quality gate refused has its report there and no manifest).

        Returns:
            The report's key.

        Raises:
            RegistryError: a bad name, or the storage failed.
        """
        key = self._art_key(model, artifact_id, f"reports/{_check_name('report', name)}")
        self.storage.write(key, data)
        return key

    def reports(self, model: str, artifact_id: str) -> dict[str, bytes]:
        """The reports stored beside an artifact, by name."""
        prefix = self._art_key(model, artifact_id, "reports/")
        out = {}
        for name in self.storage.children(prefix):
            got = self.storage.read(prefix + name)
            if got is not None:
                out[name] = got[0]
        return out

    def pinned(self, model: str) -> set[str]:
        """Artifacts the pointers of ``model``'s profiles name: each profile's current
        artifact and the one a rollback returns to (the current move's ``previous``)."""
        out: set[str] = set()
        for profile in self.profiles(model):
            cur = self.current(model, profile)
            if cur is not None:
                out |= {cur.artifact_id} | ({cur.previous} if cur.previous else set())
        return out

    def delete_artifact(self, model: str, artifact_id: str) -> None:
        """Delete a published artifact (garbage collection): the manifest first (the
        artifact is gone from then on), then its tensors and reports.

        Raises:
            ArtifactInUseError: a pointer names it (:meth:`pinned`, read just before).
            RegistryError: the storage failed (a manifest-less remainder is invisible).
        """
        if artifact_id in self.pinned(model):
            raise ArtifactInUseError(
                f"registry {self.url}: artifact {artifact_id} is named by a profile pointer"
            )
        self.storage.delete(self._art_key(model, artifact_id, MANIFEST))
        self.storage.delete(self._art_key(model, artifact_id, TENSORS))
        for name in self.reports(model, artifact_id):
            self.storage.delete(self._art_key(model, artifact_id, f"reports/{name}"))

    def pull(self, model: str, artifact_id: str, dest: str | os.PathLike) -> CodecArtifact:
        """Download an artifact into the folder ``dest`` (made atomically: a temp folder
        renamed into place) after checking it, and load it.

        Raises:
            ArtifactNotFoundError: not published.
            ArtifactChecksumError: the tensors are missing, truncated or corrupt (their
                size or SHA-256 differs from the manifest's), or the manifest names
                another id.
            ArtifactModelMismatchError: the artifact is for another model than ``model``.
            ArtifactError: the files do not make a valid artifact (id check failed).
        """
        man = self.manifest(model, artifact_id)
        want = man["files"][TENSORS]
        got = self.storage.read(self._art_key(model, artifact_id, TENSORS))
        if got is None:
            raise ArtifactChecksumError(
                f"registry {self.url}: artifact {artifact_id} has a manifest but no tensors"
            )
        data = got[0]
        if len(data) != want["bytes"] or _sha256(data) != want["sha256"]:
            raise ArtifactChecksumError(
                f"registry {self.url}: tensors of {artifact_id} are {len(data)} bytes with "
                f"SHA-256 {_sha256(data)[:16]}..., the manifest says {want['bytes']} bytes, "
                f"{str(want['sha256'])[:16]}... (corrupt or truncated)"
            )
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True)
        try:
            (tmp / TENSORS).write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps(man, indent=1))
            art = CodecArtifact.load(tmp)
            if art.model_fingerprint != model:  # pragma: no cover - manifest() checked it
                raise ArtifactModelMismatchError(f"artifact {artifact_id} is not for {model}")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return art

    def verify(self, model: str, artifact_id: str) -> CodecArtifact:
        """Fetch and check an artifact (as :meth:`pull`, into a temp folder)."""
        with tempfile.TemporaryDirectory(prefix="kvtc-verify-") as tmp:
            return self.pull(model, artifact_id, Path(tmp) / artifact_id)

    # --- pointers --------------------------------------------------------------------------

    def profiles(self, model: str) -> list[str]:
        """Profiles of ``model`` that have a pointer folder."""
        return [p for p in self.storage.children(f"{_check_name('model', model)}/profiles/")]

    def current(self, model: str, profile: str) -> Move | None:
        """The profile's pointer (its latest move, with the pointer's etag), or None.

        Raises:
            RegistryPointerError: the pointer is garbage.
            RegistryUnavailableError: the registry cannot be reached.
        """
        key = self._profile_key(model, profile, "current.json")
        got = self.storage.read(key)
        if got is None:
            return None
        move = Move.parse(got[0], f"registry {self.url}: {key}", got[1])
        if move.model != model or move.profile != profile:
            raise RegistryPointerError(
                f"registry {self.url}: {key} names model {move.model[:12]}, profile {move.profile}"
            )
        return move

    def promote(
        self,
        model: str,
        artifact_id: str,
        profile: str,
        *,
        expect: str | None = None,
        by: str | None = None,
        reason: str = "",
        force: bool = False,
    ) -> Move:
        """Point ``profile`` at ``artifact_id`` (compare-and-swap).

        Args:
            model: model fingerprint.
            artifact_id: a published artifact of that model (fetched and checked first).
            profile: the profile to move.
            expect: move only if the pointer names this id now (a canary's guard).
            by, reason: recorded with the move.
            force: overwrite a pointer that is garbage (its history is kept).

        Returns:
            The move made.

        Raises:
            ArtifactNotFoundError: ``artifact_id`` is not published for ``model``.
            ArtifactChecksumError, ArtifactModelMismatchError: it does not check out.
            RegistryConflictError: another writer moved the pointer first, or it does not
                name ``expect``; nothing changed: retry.
            RegistryPointerError: the pointer is garbage (and ``force`` is off).
        """
        self.verify(model, artifact_id)
        return self._move(
            model, profile, lambda cur: artifact_id, "promote", by, reason, expect, force
        )

    def rollback(
        self, model: str, profile: str, *, by: str | None = None, reason: str = ""
    ) -> Move:
        """Point ``profile`` back at the artifact it named before the current one took
        over (rollbacks stack: a second rollback goes one promotion further back).

        Raises:
            RegistryError: nothing to roll back to.
            RegistryConflictError, RegistryPointerError: as :meth:`promote`.
        """

        def target(cur: Move | None) -> str:
            stack: list[str] = []
            for m in self.history(model, profile):
                if m.action == "rollback" and stack:
                    stack.pop()
                else:
                    stack.append(m.artifact_id)
            if len(stack) < 2:
                raise RegistryError(
                    f"registry {self.url}: profile {profile} of {model[:12]} has no earlier "
                    "artifact to roll back to"
                )
            return stack[-2]

        return self._move(model, profile, target, "rollback", by, reason, None, False)

    def _move(
        self,
        model: str,
        profile: str,
        choose: Callable[[Move | None], str],
        action: str,
        by: str | None,
        reason: str,
        expect: str | None,
        force: bool,
    ) -> Move:
        """Compare-and-swap the pointer to ``choose(current)``; record the move."""
        key = self._profile_key(model, profile, "current.json")
        got = self.storage.read(key)
        cur: Move | None = None
        if got is not None:
            try:
                cur = Move.parse(got[0], f"registry {self.url}: {key}", got[1])
            except RegistryPointerError:
                if not force:
                    raise
        if expect is not None and (cur is None or cur.artifact_id != expect):
            raise RegistryConflictError(
                f"registry {self.url}: profile {profile} names "
                f"{cur.artifact_id if cur else 'nothing'}, not {expect}"
            )
        if cur is not None:
            self._record(cur)  # the previous move's record, if a crash left it out
        target = choose(cur)
        seq = cur.seq + 1 if cur is not None else self._next_seq(model, profile)
        move = Move(
            model,
            profile,
            seq,
            target,
            cur.artifact_id if cur else None,
            action,
            by or default_actor(),
            _now(),
            reason,
        )
        if got is None:
            if not self.storage.create(key, move.record()):
                raise RegistryConflictError(
                    f"registry {self.url}: profile {profile} was created by another writer; retry"
                )
        else:
            self.storage.replace(key, move.record(), got[1])
        self._record(move)
        return move

    def _next_seq(self, model: str, profile: str) -> int:
        """The seq after the history's last (a forced overwrite of a garbage pointer)."""
        names = self.storage.children(self._profile_key(model, profile, "history/"))
        seqs = [int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()]
        return max(seqs, default=0) + 1

    def _record(self, move: Move) -> None:
        key = self._profile_key(move.model, move.profile, f"history/{move.seq:010d}.json")
        self.storage.create(key, move.record())

    def history(self, model: str, profile: str | None = None) -> list[Move]:
        """Every move of ``profile`` (all profiles when None), oldest first (by seq per
        profile; by time across profiles). The pointer's latest move is included even if
        its history record was not yet written.

        Raises:
            RegistryPointerError: a history record is garbage.
        """
        out: list[Move] = []
        for p in [profile] if profile is not None else self.profiles(model):
            moves: dict[int, Move] = {}
            prefix = self._profile_key(model, p, "history/")
            for name in self.storage.children(prefix):
                got = self.storage.read(prefix + name)
                if got is not None:
                    m = Move.parse(got[0], f"registry {self.url}: {prefix}{name}")
                    moves[m.seq] = m
            try:
                cur = self.current(model, p)
            except RegistryPointerError:
                cur = None
            if cur is not None and cur.seq not in moves:
                moves[cur.seq] = Move(**{**asdict(cur), "etag": ""})
            out += [moves[s] for s in sorted(moves)]
        if profile is None:
            out.sort(key=lambda m: m.at)
        return out


def open_registry(
    url: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout: float = 2.0,
    read_timeout: float = 10.0,
    max_attempts: int = 3,
    create: bool = False,
) -> CodecRegistry:
    """The registry at ``url``: a folder path, or ``s3://bucket/prefix``.

    Args:
        endpoint_url, region, connect_timeout, read_timeout, max_attempts: S3 settings,
            as the S3 tier's (ignored for a folder).
        create: make a missing folder (publishers).

    Raises:
        RegistryError: a malformed ``s3://`` URL.
    """
    text = str(url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise RegistryError(f"registry URL {text!r} names no bucket (s3://bucket/prefix)")
        return CodecRegistry(
            S3Storage(
                bucket,
                prefix,
                endpoint_url=endpoint_url,
                region_name=region,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
        )
    return CodecRegistry(FolderStorage(text, create=create))
