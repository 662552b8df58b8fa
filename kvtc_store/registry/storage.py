"""Where a codec registry keeps its files: a folder or an S3 prefix, behind four calls.

The registry (:mod:`kvtc_store.registry.registry`) needs only these, on ``/``-separated
keys relative to the registry's root:

- :meth:`read` -> ``(bytes, etag)`` or None;
- :meth:`write`: replace a key's bytes atomically (a reader sees the old or the new
  bytes, never a part);
- :meth:`create`: write a key only if it does not exist (False if it did);
- :meth:`replace`: write a key only if its etag is still ``etag`` (compare-and-swap;
  :class:`~kvtc_store.errors.RegistryConflictError` otherwise);
- :meth:`children`: the names one level below a prefix.

Why each is atomic:

- **Folder**: every write goes to a temp file in the target's folder, is fsynced, then
  renamed (``write``) or hard-linked (``create``: ``link`` fails if the name exists) onto
  the target name, and the folder is fsynced. ``replace`` holds an exclusive ``flock``
  on ``<folder>/.lock`` while it re-reads, compares and renames, so two writers never
  both pass the check. The etag of a file is the SHA-256 of its bytes.
- **S3**: ``PutObject`` is atomic per object; ``create`` sends ``IfNoneMatch="*"`` and
  ``replace`` sends ``IfMatch=<etag>``, and the server answers 412 PreconditionFailed
  to a stale writer (AWS S3 since 2024; moto's server, tested here).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import RegistryConflictError, RegistryError, RegistryUnavailableError

__all__ = ["FolderStorage", "S3Storage", "Storage"]

LOCK_TIMEOUT = 10.0
"""Seconds a folder ``replace`` waits for the pointer's lock before giving up."""


class Storage:
    """The registry's view of a folder or an S3 prefix (see the module docstring)."""

    url: str
    """Where it is: a folder path or ``s3://bucket/prefix``."""

    def read(self, key: str) -> tuple[bytes, str] | None:
        """The bytes at ``key`` and their etag, or None when there is none.

        Raises:
            RegistryUnavailableError: the storage cannot be reached.
        """
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` atomically, replacing what was there."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` at ``key`` if nothing is there; False (and nothing written) if
        something is."""
        raise NotImplementedError

    def replace(self, key: str, data: bytes, etag: str) -> None:
        """Store ``data`` at ``key`` if its etag is still ``etag``.

        Raises:
            RegistryConflictError: the key changed (or vanished) since ``etag`` was read.
        """
        raise NotImplementedError

    def children(self, prefix: str) -> list[str]:
        """Sorted names one level below ``prefix`` (a key ending in ``/``), files and
        folders alike; names starting with ``.`` (temp files, locks) are left out."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing there: no error). Only garbage collection deletes.

        Raises:
            RegistryError, RegistryUnavailableError: the storage failed.
        """
        raise NotImplementedError


# --- folder ---------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FolderStorage(Storage):
    """A registry in a local or shared folder (NFS and the like must honour ``flock``
    and ``link``; local file systems do).

    Args:
        root: the registry's folder.
        create: make ``root`` if it is missing (publishers); otherwise a missing root is
            :class:`~kvtc_store.errors.RegistryUnavailableError` (an unmounted share).
    """

    def __init__(self, root: str | os.PathLike, create: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RegistryUnavailableError(
                    f"registry {self.url}: cannot create: {exc}"
                ) from exc

    def _path(self, key: str) -> Path:
        return self.root / key

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise RegistryUnavailableError(f"registry {self.url}: no such folder")

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            self._check_root()
            return None
        except OSError as exc:
            raise RegistryUnavailableError(
                f"registry {self.url}: cannot read {key}: {exc}"
            ) from exc
        return data, _etag(data)

    def _temp(self, path: Path, data: bytes) -> Path:
        """``data`` in a fsynced temp file beside ``path`` (its folder made if missing)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.replace(self._temp(path, data), path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise RegistryError(f"registry {self.url}: cannot write {key}: {exc}") from exc

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._temp(path, data)
            try:
                os.link(tmp, path)  # fails if the name exists: create-if-absent, atomic
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
            _fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise RegistryError(f"registry {self.url}: cannot create {key}: {exc}") from exc

    @contextmanager
    def _locked(self, folder: Path):
        """An exclusive ``flock`` on ``folder/.lock``, waited for up to LOCK_TIMEOUT s."""
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise RegistryConflictError(
                            f"registry {self.url}: {folder / '.lock'} held for "
                            f"{LOCK_TIMEOUT:.0f} s by another writer; retry"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def replace(self, key: str, data: bytes, etag: str) -> None:
        path = self._path(key)
        with self._locked(path.parent):
            now = self.read(key)
            if now is None or now[1] != etag:
                raise RegistryConflictError(
                    f"registry {self.url}: {key} was changed by another writer; retry"
                )
            self.write(key, data)

    def children(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self._path(prefix))
        except FileNotFoundError:
            self._check_root()
            return []
        except OSError as exc:
            raise RegistryUnavailableError(f"registry {self.url}: cannot list {prefix}: {exc}")
        return sorted(n for n in names if not n.startswith("."))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RegistryError(f"registry {self.url}: cannot delete {key}: {exc}") from exc
        for folder in (path.parent, path.parent.parent):  # empty folders of the artifact
            try:
                folder.rmdir()
            except OSError:
                break
        _fsync_dir(path.parent.parent)


# --- S3 ---------------------------------------------------------------------------------------

_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class S3Storage(Storage):
    """A registry under ``prefix`` in an S3 bucket (any S3-compatible endpoint that
    honours conditional writes).

    The client is built as the S3 tier builds its own
    (:func:`kvtc_store.backends.s3.make_client`: path-style, standard retries, the same
    deadlines), so every request has a deadline.

    Args:
        bucket, prefix: where the registry lives (``prefix`` gets a trailing ``/``).
        endpoint_url, region_name, connect_timeout, read_timeout, max_attempts: as for
            :class:`~kvtc_store.backends.s3.S3Backend`.
        client: a ready boto3 client instead (the other connection arguments ignored).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        client: Any = None,
    ) -> None:
        from ..backends.s3 import make_client

        self.bucket = bucket
        self.prefix = prefix if prefix == "" or prefix.endswith("/") else prefix + "/"
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client = client or make_client(
            endpoint_url,
            region_name,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )

    def _fail(self, op: str, key: str, exc: Exception) -> RegistryError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket",):
                return RegistryUnavailableError(f"registry {self.url}: no such bucket")
            if code.startswith("5"):
                return RegistryUnavailableError(f"registry {self.url}: {op} {key}: {exc}")
            return RegistryError(f"registry {self.url}: {op} {key}: {exc}")
        return RegistryUnavailableError(f"registry {self.url}: {op} {key}: {exc}")

    def _call(self, op: str, key: str, fn, **kw):
        """``fn(Bucket=..., Key=..., **kw)``; endpoint failures as registry errors, a 412
        (or 409 conditional conflict) as :class:`RegistryConflictError`."""
        from botocore.exceptions import ClientError

        from ..backends.s3 import _FAILURES

        try:
            return fn(Bucket=self.bucket, Key=self.prefix + key, **kw)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _CONFLICT_CODES or status in ("412", "409"):
                raise RegistryConflictError(
                    f"registry {self.url}: {key} was changed by another writer; retry"
                ) from exc
            if code in ("NoSuchKey", "404") or (status == "404" and code != "NoSuchBucket"):
                return None
            raise self._fail(op, key, exc) from exc
        except _FAILURES as exc:
            raise self._fail(op, key, exc) from exc

    def read(self, key: str) -> tuple[bytes, str] | None:
        from ..backends.s3 import _FAILURES

        resp = self._call("get", key, self._client.get_object)
        if resp is None:
            return None
        try:
            data = resp["Body"].read()
        except _FAILURES as exc:
            raise self._fail("get", key, exc) from exc
        return data, resp["ETag"]

    def write(self, key: str, data: bytes) -> None:
        self._call("put", key, self._client.put_object, Body=data)

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._call("put", key, self._client.put_object, Body=data, IfNoneMatch="*")
        except RegistryConflictError:
            return False
        return True

    def replace(self, key: str, data: bytes, etag: str) -> None:
        self._call("put", key, self._client.put_object, Body=data, IfMatch=etag)

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object)

    def children(self, prefix: str) -> list[str]:
        from ..backends.s3 import _FAILURES

        base = self.prefix + prefix
        names: set[str] = set()
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    names.add(cp["Prefix"][len(base) :].rstrip("/"))
                for obj in page.get("Contents", []):
                    names.add(obj["Key"][len(base) :])
        except _FAILURES as exc:
            raise self._fail("list", prefix, exc) from exc
        return sorted(n for n in names if n and not n.startswith("."))
