"""S3 tier: one object per chunk in any S3-compatible object store, shared by replicas.

Layout in ``bucket``::

    <prefix>3f/3fa9...c1.kvtc      one complete chunk (two-character fan-out: key[:2])

Keys are content addresses and blobs are immutable, so any number of replicas
(processes, hosts, engines) can read and write one bucket and prefix with no
coordination: a chunk is written whole or not at all (S3 ``PutObject`` and
``CompleteMultipartUpload`` are atomic), and two writers of one key write the
same bytes. Different prefixes in one bucket never see each other's chunks.

Uploads go through boto3's own transfer layer: one s3transfer
``TransferManager`` per backend (configured by a
:class:`~boto3.s3.transfer.TransferConfig`) takes a whole batch at once and runs
``max_concurrency`` uploads in parallel, multipart above
:data:`MULTIPART_THRESHOLD` bytes. Downloads and existence checks of a batch run
over a thread pool of ``max_concurrency`` workers, one ``GetObject`` (or
``HeadObject``) per chunk. Requests are retried per botocore's ``standard`` mode. The endpoint is addressed path-style
(``http://host:port/bucket/key``), which every S3-compatible server accepts.
Credentials come from boto3's usual chain (environment, shared files, instance
role); the backend never handles them.

Unlike the memory and disk tiers, the S3 tier does not evict: an object store
is unbounded (``capacity_bytes=None``), and old chunks are removed by bucket
lifecycle rules or the GC job. With a ``capacity_bytes`` set, a ``put`` that
would take the prefix past it raises :class:`~kvtc_store.errors.CapacityError`.

Failures (endpoint unreachable, timeouts, HTTP errors other than 404) raise
:class:`~kvtc_store.errors.StoreError` naming the bucket and object and are
counted in :attr:`TierUsage.errors <kvtc_store.backends.TierUsage>`; the
tiered store turns a failed ``get`` into a miss. A missing object is a miss
(``None`` / ``False``), never an error.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import boto3
import botocore.config
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from s3transfer.exceptions import RetriesExceededError
from s3transfer.manager import TransferManager

from kvtc_store.errors import BucketNotFoundError, CapacityError, ConfigError, StoreError

from .base import Backend, TierUsage, check_capacity, validate_items, validate_key, validate_keys

__all__ = ["S3Backend", "make_client"]

logger = logging.getLogger(__name__)

CHUNK_SUFFIX = ".kvtc"
MULTIPART_THRESHOLD = 8 * 1024 * 1024
"""Values of at least this many bytes are uploaded in parts of this size."""
DELETE_BATCH = 1000
"""Most keys one ``DeleteObjects`` request may name (an S3 limit)."""

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_BUCKET_MISSING_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})
_FAILURES = (BotoCoreError, ClientError, Boto3Error, RetriesExceededError, OSError)
"""What a request to the endpoint may raise: botocore, boto3 and s3transfer errors."""

_STREAM_ERRORS = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError)
"""Errors of reading a response body that has started: the read is tried again."""

_T = TypeVar("_T")
_R = TypeVar("_R")


def make_client(
    endpoint_url: str | None = None,
    region_name: str | None = None,
    *,
    connect_timeout: float = 2.0,
    read_timeout: float = 10.0,
    max_attempts: int = 3,
    max_pool_connections: int = 16,
) -> Any:
    """A boto3 S3 client as every kvtc-store S3 user builds it (the S3 tier and the codec
    registry): path-style addressing, botocore's ``standard`` retries with
    ``max_attempts`` attempts in all (first try included), and deadlines of
    ``connect_timeout`` and ``read_timeout`` seconds per attempt. Credentials come from
    boto3's usual chain. Nothing is sent to the endpoint here.
    """
    config = botocore.config.Config(
        s3={"addressing_style": "path"},
        # total_max_attempts counts the first try; "max_attempts" would not
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: BaseException, codes: frozenset[str] = _NOT_FOUND_CODES) -> bool:
    """True when ``exc`` is an S3 answer saying the object (or, with
    ``_BUCKET_MISSING_CODES``, the bucket) does not exist. A missing bucket is never a
    missing object: ``NoSuchBucket`` on an object request is a failure, not a miss."""
    if not isinstance(exc, ClientError):
        return False
    code = _error_code(exc)
    if code == "NoSuchBucket" and codes is _NOT_FOUND_CODES:
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in codes or status == 404


class S3Backend(Backend):
    """Object-store tier: one S3 object per chunk, under ``prefix`` in ``bucket``.

    Every call is batched and runs its requests concurrently (at most
    ``max_concurrency`` at once). No call reaches the endpoint at construction
    unless ``create_bucket`` is set. Thread-safe: boto3 clients are, and the
    counters are guarded by a lock.

    Contract differences from the local tiers (see :class:`Backend`):

    - No eviction: ``capacity_bytes=None`` (the default) is unbounded; with a
      cap, a ``put`` whose new chunks would take the prefix past it raises
      :class:`~kvtc_store.errors.CapacityError` and stores nothing. Checking
      the cap lists the whole prefix, once per ``put``; and other replicas may
      write between the check and the upload, so the cap is best effort.
    - Without a cap, ``put`` does not ask whether a key is stored: it uploads
      and the object is overwritten with the same bytes (blobs are immutable
      and content-addressed), and ``bytes_written`` counts every upload. With a
      cap, keys found by the listing are skipped, as on the local tiers.
    - ``get`` has no recency to update; ``usage`` lists the prefix, so it sees
      every replica's chunks and costs one request per 1,000 objects.
    - Endpoint failures raise :class:`~kvtc_store.errors.StoreError` (see the
      module docstring) and count in ``errors``, ``exists`` included.

    Args:
        bucket: Bucket name.
        prefix: Key prefix of this store's objects; a ``/`` is appended when
            missing, so prefixes ``a`` and ``ab`` never overlap. ``""`` puts
            chunks at the bucket's top level.
        endpoint_url: S3-compatible endpoint (``http://127.0.0.1:9000``); ``None``
            for AWS S3.
        region_name: Region; ``None`` for boto3's default chain.
        capacity_bytes: Byte cap of the chunks under ``prefix``, or ``None``
            for no cap.
        client: A ready boto3 S3 client to use instead of building one; the
            endpoint, region, timeout and retry arguments are then ignored.
        max_concurrency: Requests in flight at once per batch, and parts in
            flight at once per multipart transfer.
        create_bucket: Create ``bucket`` at construction if it does not exist.
        check_bucket: Ask the endpoint at construction whether ``bucket`` exists
            (``HeadBucket``, waited for at most ``deadline_s`` seconds): a missing or
            misspelt bucket is then :class:`~kvtc_store.errors.BucketNotFoundError`; an
            endpoint that fails or does not answer is logged (naming the bucket) and
            the backend opens (its calls fail, counted, until it answers).
        connect_timeout: Seconds to wait for a TCP connection, per attempt.
        read_timeout: Seconds to wait for a response to a request, per attempt.
        max_attempts: Attempts per request (first try included), botocore's
            ``standard`` retry mode with exponential backoff.

    Raises:
        ConfigError: an argument is invalid.
        BucketNotFoundError: ``check_bucket`` and the endpoint says there is no such
            bucket.
        StoreError: ``create_bucket`` was asked and the bucket cannot be created.
    """

    name = "s3"
    remote = True
    deadline_s = 5.0
    bucket_problem: str | None = None
    """Why the last :meth:`check_bucket` got no answer (text), or None."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "kvtc/",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        capacity_bytes: int | None = None,
        client: Any = None,
        max_concurrency: int = 8,
        create_bucket: bool = False,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        check_bucket: bool = False,
    ) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise ConfigError(f"bucket must be a non-empty str, got {bucket!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a str, got {prefix!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ConfigError(f"max_concurrency must be an int, got {max_concurrency!r}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        for field, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{field} must be a number > 0, got {value!r}")
        self.bucket = bucket
        self.prefix = prefix if prefix == "" or prefix.endswith("/") else prefix + "/"
        self.capacity_bytes = None if capacity_bytes is None else check_capacity(capacity_bytes)
        self.max_concurrency = max_concurrency
        if client is None:
            client = make_client(
                endpoint_url,
                region_name,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
                # batch workers plus the part workers of one multipart transfer
                max_pool_connections=2 * max_concurrency,
            )
        self._client = client
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._chunk_re = re.compile(
            re.escape(self.prefix) + r"([0-9a-f]{2})/([0-9a-f]{2,128})" + re.escape(CHUNK_SUFFIX)
        )
        self.max_attempts = max_attempts
        self._pool: ThreadPoolExecutor | None = None
        self._tm: TransferManager | None = None
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._bytes_written = 0
        self._bytes_read = 0
        self._listed = (0, 0)  # (used_bytes, n_items) of the last successful listing
        if create_bucket:
            self._create_bucket(region_name)
        elif check_bucket:
            self.check_bucket()

    # --- public API ------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The S3 object key of chunk ``key``: ``<prefix><key[:2]>/<key>.kvtc``."""
        return f"{self.prefix}{key[:2]}/{key}{CHUNK_SUFFIX}"

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Say which keys have an object now (one ``HeadObject`` each, concurrently).

        No hit or miss counters move; a failed request counts in ``errors``.

        Raises:
            ValueError: a key is malformed.
            TypeError: ``keys`` is a single string, not a sequence.
            StoreError: a request failed for a reason other than "not found".
        """
        keys = validate_keys(keys)
        return self._run_batch("exists", self._on_pool(self._head), keys, keys)

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Download each key's object, or ``None`` when there is none, concurrently.

        Raises:
            ValueError: a key is malformed.
            StoreError: a request failed for a reason other than "not found";
                nothing is returned and only ``errors`` moves.
        """
        keys = validate_keys(keys)
        out = self._run_batch("get", self._on_pool(self._download), keys, keys)
        with self._lock:
            for value in out:
                if value is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._bytes_read += len(value)
        return out

    def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Upload each chunk as one object, concurrently (multipart when large).

        Without a cap every item is uploaded (an existing object is overwritten
        with the same bytes). With a cap, the prefix is listed first: stored keys
        are skipped, and if the new chunks would exceed the cap nothing is
        uploaded. If an upload fails, chunks uploaded earlier stay stored.

        Raises:
            ValueError: a key is malformed.
            TypeError: a value is not bytes-like.
            CapacityError: a value is larger than ``capacity_bytes``, or the new
                chunks would take the prefix past it; nothing is stored.
            StoreError: the listing or an upload failed.
        """
        items = validate_items(items)
        unique = list(dict(items).items())  # one upload per key; later values win
        if self.capacity_bytes is not None:
            for key, value in unique:
                if len(value) > self.capacity_bytes:
                    raise CapacityError(
                        f"{self.name} tier: chunk {key} is {len(value)} B, "
                        f"larger than the tier's capacity of {self.capacity_bytes} B"
                    )
            stored = self._list("put")
            unique = [(k, v) for k, v in unique if k not in stored]
            used = sum(stored.values())
            new = sum(len(v) for _, v in unique)
            if used + new > self.capacity_bytes:
                raise CapacityError(
                    f"{self.name} tier: s3://{self.bucket}/{self.prefix} holds {used} B; "
                    f"{len(unique)} new chunks of {new} B would exceed its capacity "
                    f"of {self.capacity_bytes} B"
                )
        self._run_batch("put", self._submit_upload, unique, [k for k, _ in unique])
        with self._lock:
            self._bytes_written += sum(len(v) for _, v in unique)

    def replace(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Overwrite stored chunks with new bytes under the same keys (re-encode jobs),
        each with one ``PutObject``: S3 makes it visible whole, so a reader gets the old
        object or the new one. A key not stored (``HeadObject``) is left alone.

        Returns:
            For each item, whether it replaced a stored chunk.

        Raises:
            ValueError, TypeError: as :meth:`put`.
            StoreError: a request failed (that chunk keeps its old bytes).
        """
        items = validate_items(items)
        done = []
        for key, value in items:
            try:
                if not self._head(key):
                    done.append(False)
                    continue
                self._client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=value)
            except _FAILURES as exc:
                self._count_errors(1)
                raise StoreError(f"{self.name} tier: cannot replace chunk {key}: {exc}") from exc
            with self._lock:
                self._bytes_written += len(value)
            done.append(True)
        return done

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the keys' objects (``DeleteObjects``, 1,000 keys per request).

        Missing keys are ignored.

        Raises:
            ValueError: a key is malformed.
            StoreError: a request failed or S3 refused to delete an object.
        """
        keys = list(dict.fromkeys(validate_keys(keys)))
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            objects = [{"Key": self.object_key(k)} for k in batch]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except _FAILURES as e:
                self._count_errors(len(batch))
                raise StoreError(
                    f"{self.name} tier: delete of {len(batch)} objects from "
                    f"s3://{self.bucket}/{self.prefix} failed: {e}"
                ) from e
            failed = [err for err in response.get("Errors", []) if err.get("Code") != "NoSuchKey"]
            if failed:
                self._count_errors(len(failed))
                first = failed[0]
                raise StoreError(
                    f"{self.name} tier: cannot delete s3://{self.bucket}/{first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')} "
                    f"({len(failed)} objects not deleted)"
                )

    def usage(self) -> TierUsage:
        """Return the chunks under the prefix (one paginated listing) and the counters.

        ``used_bytes`` and ``n_items`` count every chunk object under the prefix,
        whichever replica wrote it; ``evictions`` is always 0 (this tier does not
        evict). If the listing fails, the failure is logged and counted in
        ``errors`` and the occupancy of the last listing that succeeded (0 before
        any) is reported, so the counters stay readable while the endpoint is down.
        """
        try:
            self.list_chunks()
        except StoreError as e:
            logger.warning("%s tier: usage shows the last known occupancy: %s", self.name, e)
        return self.snapshot()

    def list_chunks(self) -> dict[str, int]:
        """Every chunk under the prefix, whichever replica wrote it: key -> bytes.

        One paginated listing (a request per 1,000 objects); other objects under the
        prefix are skipped.

        Raises:
            StoreError: the listing failed (counted in ``errors``).
        """
        stored = self._list("list")
        with self._lock:
            self._listed = (sum(stored.values()), len(stored))
        return stored

    def inventory(self) -> list[tuple[str, int, float]]:
        """Every chunk under the prefix: ``(key, bytes, last write)``, the last write in
        seconds since the epoch (the object's ``LastModified``). One paginated listing.

        Raises:
            StoreError: the listing failed (counted in ``errors``).
        """
        times: dict[str, float] = {}
        stored = self._list("inventory", times)
        return [(k, n, times[k]) for k, n in stored.items()]

    def read_head(self, key: str, nbytes: int) -> bytes | None:
        """The first ``nbytes`` bytes of chunk ``key`` (one ranged GET: a blob's header
        without its payload), or None when there is no such chunk.

        Raises:
            ValueError: a malformed key.
            StoreError: the request failed (counted in ``errors``).
        """
        validate_key(key)
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=self.object_key(key), Range=f"bytes=0-{nbytes - 1}"
            )
            return resp["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            self._count_errors(1)
            raise StoreError(f"{self.name} tier: head of {key}: {e}") from e
        except _FAILURES as e:
            self._count_errors(1)
            raise StoreError(f"{self.name} tier: head of {key}: {e}") from e

    def snapshot(self) -> TierUsage:
        """The counters and the occupancy of the last listing, with no request sent."""
        with self._lock:
            used, n_items = self._listed
            return TierUsage(
                used_bytes=used,
                capacity_bytes=self.capacity_bytes,
                n_items=n_items,
                hits=self._hits,
                misses=self._misses,
                evictions=0,
                bytes_written=self._bytes_written,
                bytes_read=self._bytes_read,
                errors=self._errors,
            )

    def close(self, wait: bool = True) -> None:
        """Stop the transfer manager and the batch thread pool and close the client's connections.

        ``wait=False`` (see :meth:`Backend.close`): the pool stops without joining its
        threads and the transfer manager is left to stop its idle threads when it is
        collected (its ``shutdown`` joins them). A closed backend must not be used again.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            tm, self._tm = self._tm, None
        if tm is not None and wait:
            tm.shutdown()
        if pool is not None:
            pool.shutdown(wait=wait)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def check_bucket(self, timeout: float | None = None) -> bool:
        """Whether the bucket exists, asked with one ``HeadBucket`` waited for at most
        ``timeout`` seconds (default: :attr:`deadline_s`).

        Returns:
            True if it exists; False if the endpoint failed or did not answer in time
            (logged with the bucket's name, counted in ``errors``, and kept as text in
            :attr:`bucket_problem`, e.g. ``NoCredentialsError: Unable to locate
            credentials`` or ``no answer within 5 s``).

        Raises:
            BucketNotFoundError: the endpoint says there is no such bucket (404).
        """
        timeout = self.deadline_s if timeout is None else timeout
        self.bucket_problem = None
        job = self._executor().submit(self._client.head_bucket, Bucket=self.bucket)
        try:
            job.result(timeout=timeout)
            return True
        except ClientError as e:
            if _is_not_found(e, _BUCKET_MISSING_CODES):
                raise BucketNotFoundError(
                    f"{self.name} tier: bucket {self.bucket!r} does not exist at "
                    f"{self._client.meta.endpoint_url} (missing or misspelt)"
                ) from e
            problem: BaseException = e
        except FutureTimeout:
            problem = TimeoutError(f"no answer within {timeout:g} s")
        except _FAILURES as e:
            problem = e
        self._count_errors(1)
        if not isinstance(problem, TimeoutError):
            problem = f"{type(problem).__name__}: {problem}"
        self.bucket_problem = str(problem)
        logger.warning("%s tier: cannot check bucket %r: %s", self.name, self.bucket, problem)
        return False

    def abort_stale_uploads(self, older_than_s: float = 86_400.0) -> int:
        """Abort the multipart uploads under this tier's prefix begun more than
        ``older_than_s`` seconds ago (a writer that crashed mid-upload leaves its parts
        stored, and billed, until the upload is aborted). A failed upload of this
        process is aborted by boto3's transfer layer already; this cleans up after the
        ones that died. The bucket lifecycle rule ``AbortIncompleteMultipartUpload``
        does the same server-side (docs/config.md).

        Returns:
            How many uploads were aborted.

        Raises:
            StoreError: listing the uploads failed (counted in ``errors``); an abort that
                fails is logged and counted, and the others go on.
        """
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        stale = []
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                stale += [u for u in page.get("Uploads", []) if u["Initiated"] <= cutoff]
        except _FAILURES as e:
            self._count_errors(1)
            raise StoreError(
                f"{self.name} tier: listing multipart uploads of "
                f"s3://{self.bucket}/{self.prefix} failed: {e}"
            ) from e
        aborted = 0
        for u in stale:
            try:
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                )
                aborted += 1
            except _FAILURES as e:
                self._count_errors(1)
                logger.warning("%s tier: cannot abort upload of %s: %s", self.name, u["Key"], e)
        if aborted:
            logger.info("%s tier: aborted %d stale multipart uploads", self.name, aborted)
        return aborted

    # --- requests (one key each; run on the pool) ------------------------------------

    def _head(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def _download(self, key: str) -> bytes | None:
        """One ``GetObject``; the body is read whole and its length checked.

        boto3's ``download_fileobj`` sends a ``HeadObject`` before each ``GetObject``;
        on chunk-sized objects that halved the throughput of a batch (measured on the
        loopback moto server), so a chunk is one request. A body cut off mid-stream
        is read again, up to ``max_attempts`` times in all (as s3transfer does).
        """
        for attempt in range(1, self.max_attempts + 1):
            try:  # the request itself: botocore retries it
                response = self._client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            except ClientError as e:
                if _is_not_found(e):
                    return None
                raise
            body = response["Body"]
            try:  # the body: read again from the start if it is cut off
                data = body.read()
            except _STREAM_ERRORS:
                if attempt == self.max_attempts:
                    raise
                logger.debug("%s tier: body of %s cut off, reading it again", self.name, key)
                continue
            finally:
                body.close()
            expected = response.get("ContentLength")
            if expected is None or len(data) == expected:
                return data
            if attempt == self.max_attempts:
                raise IncompleteReadError(actual_bytes=len(data), expected_bytes=expected)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- internals -------------------------------------------------------------------

    def _run_batch(
        self, op: str, submit: Callable[[_T], Future], args: list[_T], keys: list[str]
    ) -> list[Any]:
        """Submit every request at once; results in order, or StoreError.

        Every request runs to completion (none is abandoned half-way); each failed
        one counts in ``errors`` and the first failure (in batch order) is raised.
        """
        if not args:
            return []
        futures = [submit(a) for a in args]
        outcomes: list[tuple[bool, Any]] = []
        for f in futures:
            try:
                outcomes.append((True, f.result()))
            except _FAILURES as e:
                outcomes.append((False, e))
        failures = [(k, exc) for k, (ok, exc) in zip(keys, outcomes) if not ok]
        if failures:
            self._count_errors(len(failures))
            key, exc = failures[0]
            more = f" (and {len(failures) - 1} more of {len(args)})" if len(failures) > 1 else ""
            raise StoreError(
                f"{self.name} tier: {op} of s3://{self.bucket}/{self.object_key(key)} "
                f"failed{more}: {exc}"
            ) from exc
        return [value for _, value in outcomes]

    def _on_pool(self, fn: Callable[[_T], _R]) -> Callable[[_T], Future]:
        """``submit(arg)``: run ``fn(arg)`` on the batch thread pool."""
        return lambda arg: self._executor().submit(fn, arg)

    def _submit_upload(self, item: tuple[str, bytes]) -> Future:
        """Hand one upload to the shared transfer manager (multipart when large)."""
        key, value = item
        return self._transfers().upload(io.BytesIO(value), self.bucket, self.object_key(key))

    def _transfers(self) -> TransferManager:
        with self._lock:
            if self._tm is None:
                self._tm = TransferManager(self._client, self._transfer)
            return self._tm

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="kvtc-s3"
                )
            return self._pool

    def _count_errors(self, n: int) -> None:
        with self._lock:
            self._errors += n

    def _list(self, op: str, times: dict[str, float] | None = None) -> dict[str, int]:
        """Every chunk under the prefix: key -> size in bytes. Non-chunk objects are skipped;
        ``times``, when given, receives each chunk's ``LastModified`` (seconds since the
        epoch)."""
        found: dict[str, int] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    m = self._chunk_re.fullmatch(obj["Key"])
                    if m is not None and m.group(2)[:2] == m.group(1):
                        found[m.group(2)] = int(obj["Size"])
                        if times is not None:
                            times[m.group(2)] = obj["LastModified"].timestamp()
        except _FAILURES as e:
            self._count_errors(1)
            raise StoreError(
                f"{self.name} tier: {op}: listing s3://{self.bucket}/{self.prefix} failed: {e}"
            ) from e
        return found

    def _create_bucket(self, region_name: str | None) -> None:
        """Create the bucket unless it exists (already owned by us counts as existing)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if not _is_not_found(e, _BUCKET_MISSING_CODES):
                raise StoreError(f"{self.name} tier: bucket {self.bucket}: {e}") from e
        except _FAILURES as e:
            raise StoreError(f"{self.name} tier: bucket {self.bucket}: {e}") from e
        region = region_name or self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code != "BucketAlreadyOwnedByYou":  # created meanwhile by another replica
                raise StoreError(
                    f"{self.name} tier: cannot create bucket {self.bucket}: {e}"
                ) from e
        except _FAILURES as e:
            raise StoreError(f"{self.name} tier: cannot create bucket {self.bucket}: {e}") from e
        logger.info("%s tier: created bucket %s", self.name, self.bucket)
