"""A codec that follows a registry profile: encodes with its ``current`` artifact and
decodes a blob with whichever artifact its header names.

:class:`VersionedCodec` has the interface the store and the connectors use of
:class:`~kvtc_store.codec.Codec` protocol (``encode_batch``, ``decode_batch``,
``artifact``, ``device``, ``encode``,
``encode_sequence``, ``decode``, ``decode_prefix``, ``read_header``, ``check_header``),
so a :class:`~kvtc_store.store.TieredStore` needs no change to serve several versions:

- ``encode*`` use the profile's current artifact;
- ``decode_prefix`` reads each blob's header (``artifact_id``) and decodes each run of
  blobs of one artifact with that artifact's codec, fetched from the registry on first
  use (checked by checksum) and kept in a bounded cache (in memory, and its files in a
  local folder, so a restarted process need not fetch it again);
- a blob whose artifact the registry does not hold raises
  :class:`~kvtc_store.errors.UnknownArtifactError` (a :class:`CodecMismatchError`: the
  store keeps the blob and counts a miss);
- :meth:`refresh` re-reads the pointer (every ``refresh_seconds`` in a background
  thread, or on demand); chunks already stored are untouched, since the chunk key holds
  no codec version. An unreachable registry leaves the codec serving with the
  artifacts it has (counted in ``refresh_failures``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..codec import ChunkBatch, ChunkKV, Codec, CodecArtifact, DecodedBatch, make_codec
from ..codec.exact import DEFAULT_EXACT_DTYPE
from ..codec.format import DTYPES, BlobHeader, unpack_blob, unpack_blob_header
from ..errors import (
    ArtifactError,
    ArtifactNotFoundError,
    BlobError,
    CodecMismatchError,
    RegistryError,
    RegistryUnavailableError,
    UnknownArtifactError,
)
from .registry import CodecRegistry

log = logging.getLogger(__name__)

__all__ = ["VersionedCodec"]

RETRY_UNKNOWN_SECONDS = 30.0
"""An artifact the registry did not hold (or could not be asked for) is not asked for
again for this long: a run of misses costs one request, not one per get."""


class VersionedCodec:
    """KVTC codecs of one model, as a registry profile names them.

    Args:
        registry: the codec registry.
        model: the model's fingerprint (its folder in the registry).
        kv_shape: ``(layers, kv_heads, head_dim)`` of the model; artifacts of another
            shape are refused.
        profile: the profile whose ``current`` artifact encodes.
        coder, device, exact_dtype, rate_control: as for
            :func:`~kvtc_store.codec.make_codec` (every version's codec takes them).
        gpu_kernels: ``make_codec``'s ``batched`` (None: the batched CUDA codec where it
            runs).
        cache_dir: local folder for fetched artifacts (and the last pointer seen);
            default ``$KVTC_STORE_HOME/registry-cache``.
        max_artifacts: artifacts kept (codecs in memory, folders in ``cache_dir``); the
            current one is never dropped.
        refresh_seconds: re-read the pointer this often in a background thread (0: only
            when :meth:`refresh` is called).

    Attributes:
        hits: chunks decoded, by artifact id.
        unknown_misses: blobs whose artifact the registry did not hold.
        refresh_failures: pointer reads that failed (registry unreachable, garbage).

    Raises:
        RegistryError: the profile has no current artifact.
        RegistryUnavailableError: the registry cannot be reached and no pointer was
            cached by an earlier run.
        ArtifactError: the current artifact does not check out (or is for another model).
    """

    def __init__(
        self,
        registry: CodecRegistry,
        model: str,
        kv_shape: tuple[int, int, int],
        profile: str = "default",
        *,
        coder: str | None = None,
        device: str = "cpu",
        gpu_kernels: bool | None = None,
        exact_dtype: str = DEFAULT_EXACT_DTYPE,
        rate_control: bool = True,
        cache_dir: str | os.PathLike | None = None,
        max_artifacts: int = 4,
        refresh_seconds: float = 60.0,
    ) -> None:
        from ..model import cache_home

        if max_artifacts < 1:
            raise ValueError(f"max_artifacts must be >= 1, got {max_artifacts}")
        self.registry = registry
        self.model = model
        self.kv_shape = tuple(kv_shape)
        self.profile = profile
        self._coder, self._device, self._gpu_kernels = coder, device, gpu_kernels
        self._options = {"exact_dtype": exact_dtype, "rate_control": rate_control}
        self.cache_dir = Path(cache_dir or cache_home() / "registry-cache") / model
        self.max_artifacts = max_artifacts
        self._lock = threading.RLock()
        self._codecs: OrderedDict[str, Codec] = OrderedDict()
        self._unknown: dict[str, float] = {}  # id -> monotonic time it was not found
        self.hits: dict[str, int] = {}
        self.unknown_misses = 0
        self.refresh_failures = 0
        self._current: Codec | None = None
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if refresh_seconds > 0:
            self._thread = threading.Thread(
                target=self._refresh_loop, args=(refresh_seconds,), daemon=True,
                name=f"kvtc-registry-{profile}",
            )  # fmt: skip
            self._thread.start()

    # --- versions --------------------------------------------------------------------------

    @property
    def current_id(self) -> str:
        """Id of the artifact new chunks are encoded with."""
        return self._current.artifact.artifact_id

    @property
    def artifact(self) -> CodecArtifact:
        """The current artifact (what encodes)."""
        return self._current.artifact

    @property
    def device(self) -> torch.device:
        """Where the codecs run."""
        return self._current.device

    @property
    def coder(self):
        """The current codec's payload coder."""
        return self._current.coder

    def counters(self) -> tuple[dict[str, int], int, int]:
        """A consistent snapshot of ``(hits by artifact id, unknown_misses,
        refresh_failures)``."""
        with self._lock:
            return dict(self.hits), self.unknown_misses, self.refresh_failures

    def cached_ids(self) -> list[str]:
        """Ids of the artifacts held in memory, least recently used first."""
        with self._lock:
            return list(self._codecs)

    def refresh(self) -> str:
        """Re-read the profile's pointer; switch encoding to its artifact if it moved.

        Returns:
            The current artifact id after the refresh.

        Raises:
            As the constructor, but only while no artifact is current yet; afterwards a
            failure is logged and counted in ``refresh_failures``, and the codec keeps
            serving with what it has.
        """
        pointer = self.cache_dir / f"current-{self.profile}.json"
        try:
            move = self.registry.current(self.model, self.profile)
            if move is None:
                raise RegistryError(
                    f"registry {self.registry.url}: profile {self.profile} of model "
                    f"{self.model[:12]} has no current artifact (promote one)"
                )
            aid = move.artifact_id
            if self._current is None or aid != self.current_id:
                codec = self._codec(aid)
                with self._lock:
                    self._current = codec
                log.info("codec profile %s: now encoding with %s", self.profile, aid)
                pointer.parent.mkdir(parents=True, exist_ok=True)
                tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
                tmp.write_text(json.dumps({"artifact_id": aid}))
                os.replace(tmp, pointer)
        except (RegistryError, ArtifactError, OSError) as exc:
            if self._current is None:
                if isinstance(exc, RegistryUnavailableError) and pointer.is_file():
                    aid = json.loads(pointer.read_text())["artifact_id"]
                    log.warning("%s; encoding with the last artifact seen, %s", exc, aid)
                    self._current = self._load_cached(aid) or self._codec(aid)
                    return aid
                raise
            with self._lock:
                self.refresh_failures += 1
            log.warning("codec profile %s: refresh failed, keeping %s: %s",
                        self.profile, self.current_id, exc)  # fmt: skip
        return self.current_id

    def _refresh_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the thread must live on
                log.warning("codec refresh: %s", exc)

    def _load_cached(self, aid: str) -> Codec | None:
        """The codec of ``aid`` from the local folder, if it is there and checks out."""
        folder = self.cache_dir / aid
        if not (folder / "manifest.json").is_file():
            return None
        try:
            art = CodecArtifact.load(folder)  # checks the content id
            art.check_model(self.model, self.kv_shape)
        except ArtifactError as exc:
            log.warning("cached artifact %s dropped: %s", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return self._remember(aid, art)

    def _remember(self, aid: str, art: CodecArtifact) -> Codec:
        codec = make_codec(art, coder=self._coder, device=self._device,
                           batched=self._gpu_kernels, **self._options)  # fmt: skip
        with self._lock:
            self._codecs[aid] = codec
            self._codecs.move_to_end(aid)
            keep = {aid} | ({self._current.artifact.artifact_id} if self._current else set())
            while len(self._codecs) > self.max_artifacts:
                old = next(k for k in self._codecs if k not in keep)
                del self._codecs[old]
        self._prune_folder(keep)
        return codec

    def _prune_folder(self, keep: set[str]) -> None:
        """Drop the least recently fetched artifact folders beyond ``max_artifacts``."""
        try:
            folders = [p for p in self.cache_dir.iterdir() if p.is_dir() and p.name[0] != "."]
        except OSError:
            return
        folders.sort(key=lambda p: p.stat().st_mtime)
        for p in folders[: max(0, len(folders) - self.max_artifacts)]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _codec(self, aid: str) -> Codec:
        """The codec of artifact ``aid``: memory, then the local folder, then the registry.

        Raises:
            ArtifactNotFoundError: the registry does not hold it.
            RegistryUnavailableError: not cached and the registry cannot be reached.
            ArtifactError: it does not check out (checksum, model, shape).
        """
        with self._lock:
            codec = self._codecs.get(aid)
            if codec is not None:
                self._codecs.move_to_end(aid)
                return codec
        codec = self._load_cached(aid)
        if codec is not None:
            return codec
        art = self.registry.pull(self.model, aid, self.cache_dir / aid)
        art.check_model(self.model, self.kv_shape)
        return self._remember(aid, art)

    def codec_for(self, header: BlobHeader) -> Codec:
        """The codec that wrote a blob, by its header.

        Raises:
            CodecMismatchError: the blob is for another model.
            UnknownArtifactError: the registry does not hold its artifact (or cannot be
                asked now); asked again after :data:`RETRY_UNKNOWN_SECONDS`.
        """
        if header.model != self.model:
            raise CodecMismatchError(
                f"blob is for model {header.model[:12]}, this store for {self.model[:12]}"
            )
        aid = header.artifact_id
        with self._lock:
            codec = self._codecs.get(aid)
            seen = self._unknown.get(aid)
        if codec is not None:
            return codec
        if seen is not None and time.monotonic() - seen < RETRY_UNKNOWN_SECONDS:
            raise UnknownArtifactError(f"blob names codec artifact {aid}, not in the registry")
        try:
            return self._codec(aid)
        except (ArtifactNotFoundError, RegistryUnavailableError, ArtifactError) as exc:
            with self._lock:
                self._unknown[aid] = time.monotonic()
            raise UnknownArtifactError(f"blob names codec artifact {aid}: {exc}") from exc

    # --- the codec interface ---------------------------------------------------------------

    def encode_batch(self, chunks: ChunkBatch) -> list[bytes]:
        """:meth:`Codec.encode_batch <kvtc_store.codec.Codec.encode_batch>` with the
        current artifact."""
        return self._current.encode_batch(chunks)

    def decode_batch(
        self, blobs, out: ChunkKV | None = None, *, dtype=None, expect=None
    ) -> DecodedBatch:
        """:meth:`Codec.decode_batch <kvtc_store.codec.Codec.decode_batch>`, each run of
        blobs of one artifact with that artifact's codec, into its chunks of ``out`` (a
        new dense batch on the current codec's device by default; the runs then must
        share a dtype). The error is an :class:`UnknownArtifactError` for a blob of an
        artifact the registry lacks."""
        blobs = list(blobs)
        firsts: list[int] = []
        i = 0
        while i < len(blobs):
            run = self._next_run(blobs, i)
            if isinstance(run, BlobError):
                return self._batch(out, blobs, firsts, run, dtype)
            j, header, codec = run
            if out is None:
                layers, heads, dim = codec.artifact.kv_shape
                shape = (len(blobs), layers, heads, header.shape[3], dim)
                dt = dtype or DTYPES.get(header.dtype, torch.float32)
                out = ChunkKV.dense(*(torch.empty(shape, dtype=dt, device=self.device)
                                      for _ in "kv"))  # fmt: skip
            part = None if expect is None else list(expect[i:j])
            got = codec.decode_batch(blobs[i:j], out.select(range(i, j)), expect=part)
            with self._lock:
                self.hits[header.artifact_id] = self.hits.get(header.artifact_id, 0) + got.count
            firsts += got.first_positions
            if got.error is not None:
                return self._batch(out, blobs, firsts, got.error, dtype)
            i = j
        return self._batch(out, blobs, firsts, None, dtype)

    def _batch(self, out, blobs, firsts, error, dtype) -> DecodedBatch:
        if out is None:  # nothing decoded: an empty destination
            layers, heads, dim = self._current.artifact.kv_shape
            shape = (len(blobs), layers, heads, 0, dim)
            empty = torch.empty(shape, dtype=dtype or torch.bfloat16, device=self.device)
            out = ChunkKV.dense(empty, empty)
        return DecodedBatch(out, firsts, len(firsts), error)

    def _next_run(self, blobs, i: int):
        """``(end, header, codec)`` of the run of blobs from ``i`` of one artifact, or the
        error of blob ``i`` (a damaged header, or an :class:`UnknownArtifactError`,
        counted in ``unknown_misses``)."""
        try:
            header = unpack_blob_header(blobs[i])[0]
            codec = self.codec_for(header)
        except UnknownArtifactError as exc:
            with self._lock:
                self.unknown_misses += 1
            return exc
        except BlobError as exc:
            return exc
        return self._run_end(blobs, i, header.artifact_id), header, codec

    @staticmethod
    def _run_end(blobs, i: int, artifact_id: str) -> int:
        """The end of the run of blobs from ``i`` whose headers name ``artifact_id``."""
        j = i + 1
        while j < len(blobs):
            try:
                if unpack_blob_header(blobs[j])[0].artifact_id != artifact_id:
                    break
            except BlobError:
                break  # that blob's codec call reports it
            j += 1
        return j

    def encode(self, *args, **kwargs) -> bytes:
        """:meth:`KVTCCodec.encode <kvtc_store.codec.KVTCCodec.encode>` with the current
        artifact."""
        return self._current.encode(*args, **kwargs)

    def encode_sequence(self, *args, **kwargs) -> list[bytes]:
        """:meth:`KVTCCodec.encode_sequence <kvtc_store.codec.KVTCCodec.encode_sequence>`
        with the current artifact."""
        return self._current.encode_sequence(*args, **kwargs)

    def check_header(self, header: BlobHeader) -> None:
        """Raise unless the registry holds the blob's artifact (see :meth:`codec_for`)."""
        self.codec_for(header).check_header(header)

    def read_header(self, blob: bytes) -> BlobHeader:
        """Parse and verify a blob and check that its artifact is available.

        Raises:
            BlobError subclasses; UnknownArtifactError, CodecMismatchError.
        """
        header, _ = unpack_blob(blob)
        self.check_header(header)
        return header

    def decode(self, blob: bytes, device=None, dtype=None):
        """Decode one blob with the artifact it names (raises as :meth:`read_header`)."""
        chunks, error = self.decode_prefix([blob], device, dtype)
        if error is not None:
            raise error
        return chunks[0]

    def decode_prefix(self, blobs: list[bytes], device=None, dtype=None, expect=None):
        """Decode consecutive blobs, each with the artifact its header names, up to the
        first that fails; one batch per run of blobs of one artifact. ``expect``: the
        chunk each blob must be bound to, as for :meth:`KVTCCodec.decode_prefix
        <kvtc_store.codec.KVTCCodec.decode_prefix>`.

        Returns:
            ``(chunks, error)`` as :meth:`KVTCCodec.decode_prefix
            <kvtc_store.codec.KVTCCodec.decode_prefix>`; the error is an
            :class:`UnknownArtifactError` for a blob of an artifact the registry lacks.
        """
        out = []
        i = 0
        while i < len(blobs):
            run = self._next_run(blobs, i)
            if isinstance(run, BlobError):
                return out, run
            j, header, codec = run
            part = None if expect is None else list(expect[i:j])
            chunks, error = codec.decode_prefix(blobs[i:j], device, dtype, expect=part)
            with self._lock:
                self.hits[header.artifact_id] = self.hits.get(header.artifact_id, 0) + len(chunks)
            out += chunks
            if error is not None:
                return out, error
            i = j
        return out, None

    # --- metrics and life cycle ------------------------------------------------------------

    def register_metrics(self, registry) -> None:
        """Add this codec's metrics to a Prometheus registry
        (:class:`~kvtc_store.metrics.VersionMetrics`)."""
        from ..metrics import VersionMetrics

        registry.register(VersionMetrics(self))

    def close(self) -> None:
        """Stop the refresh thread. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
