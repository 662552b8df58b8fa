"""Every named error of kvtc-store, in one module.

All errors derive from :class:`KVTCError`, so a caller can catch the whole family.
A decoding error never leaves partial output behind: the function that raises it
returns nothing.
"""

from __future__ import annotations


class KVTCError(Exception):
    """Base class of every error kvtc-store raises on purpose."""


# --- blobs -----------------------------------------------------------------------------


class BlobError(KVTCError):
    """A compressed chunk (blob) cannot be decoded."""


class BlobTruncatedError(BlobError):
    """The blob is shorter than its header says (cut off in transfer or on disk)."""


class BlobCorruptError(BlobError):
    """The blob's checksum does not match its bytes, or its header is malformed."""


class BlobFormatError(BlobError):
    """The bytes are not a kvtc blob (wrong magic) or use an unknown format version or coder."""


class BlobMisfiledError(BlobError):
    """The blob is intact but was written for another chunk: its header's key digest,
    first position or token count is not the one of the key it was fetched under (a blob
    copied or misfiled under another chunk's name)."""


class CodecMismatchError(BlobError):
    """The blob was written by another codec artifact or for another model than the decoder's."""


# --- codec artifacts and models ---------------------------------------------------------


class ArtifactError(KVTCError):
    """A codec artifact is missing, incomplete or malformed."""


class ArtifactModelMismatchError(ArtifactError):
    """The codec artifact was calibrated for another model (fingerprint or KV shape differ)."""


class MixtureError(ArtifactError):
    """Codecs given to a per-chunk mixture (:class:`~kvtc_store.codec.MixtureCodec`) do
    not fit together: none, one artifact twice, or members of another model, KV shape,
    target ratio or device; the message names the member."""


class ChunkLayoutError(KVTCError):
    """An engine handed a chunk whose tensor layout is not the one the connector expects
    (another KV format, or another model's layers, heads or head dim)."""


class ModelNotFoundError(KVTCError):
    """The model's weights cannot be found (package not installed, or path missing)."""


class CalibrationError(KVTCError):
    """Calibration cannot run: too few tokens, or no feasible bit plan for the budget."""


class CalibrationDataError(CalibrationError):
    """Calibration data given by the user cannot be used: a file is missing, empty, of an
    unknown kind or malformed, holds token ids outside the model's vocabulary, or is too
    short for the windows asked (the message names the file and says how many tokens
    are needed)."""


class UnsupportedModelError(KVTCError):
    """The model's KV cache is of a kind the codec cannot code faithfully: multi-head
    latent attention (MLA), sliding-window or hybrid (attention + state-space) layers, an
    encoder-decoder or non-causal model, or a RoPE whose angles are not a function of the
    position alone (``dynamic``, ``longrope``); the message says which and why."""


# --- store -------------------------------------------------------------------------------


class StoreError(KVTCError):
    """A tier failed to store or fetch a chunk."""


class CapacityError(StoreError):
    """A chunk cannot fit in a tier (larger than its byte capacity, or the disk is full)."""


class ConfigError(KVTCError):
    """A configuration value is invalid; the message names the field."""


class UsageError(ConfigError):
    """A command's arguments parse but ask for nothing sensible (``admin evict`` with no
    selector, an ``--out`` folder that is not an artifact's); the message names the
    argument. Exit status 2, as argparse's own errors."""


class BucketNotFoundError(ConfigError):
    """The S3 tier's bucket does not exist at its endpoint (missing or misspelt); the
    message names the bucket."""


# --- GPU -----------------------------------------------------------------------------------


class NvcompUnavailableError(KVTCError):
    """nvCOMP cannot run here: the ``gpu`` extra's ``nvidia-nvcomp-cu13`` (module
    ``nvidia.nvcomp``) is not importable, or there is no CUDA device; the message says
    which."""


# --- serving engines -------------------------------------------------------------------


class KVLayoutError(KVTCError):
    """A serving engine's paged KV cache is laid out in a way the connector cannot read
    (an attention backend, dtype or cache shape it does not know); the message says which
    and what is supported."""


# --- codec registry --------------------------------------------------------------------


class RegistryError(KVTCError):
    """The codec registry (a folder or an S3 prefix of codec versions) refused or failed
    a request; the message names the registry and the key."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached (S3 endpoint down or timing out, folder missing or
    unreadable). A store keeps serving with the artifacts it has cached."""


class RegistryConflictError(RegistryError):
    """A compare-and-swap lost: another writer moved the pointer (or took the lock) first.
    Nothing was changed; read the pointer again and retry."""


class RegistryPointerError(RegistryError):
    """A profile's ``current`` pointer or a history record is not what the registry
    writes (edited by hand into garbage, or another format)."""


class ArtifactNotFoundError(RegistryError):
    """The registry holds no published artifact with that id (for that model)."""


class ArtifactChecksumError(ArtifactError):
    """A codec artifact's files do not match the checksums in its manifest (corrupt or
    truncated in storage or in transfer)."""


class UnknownArtifactError(CodecMismatchError):
    """A blob names a codec artifact the registry does not hold: a counted miss (the
    blob is kept), never a decode with another codec."""


class GateRefusedError(KVTCError):
    """A candidate codec scored worse than its profile's current one at the quality gate
    (:mod:`kvtc_store.quality_gate`); nothing was published or promoted (``--force``
    overrides). ``report`` holds the gate's report."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class FleetError(CalibrationError):
    """A fleet job could not run: Ray is missing or unreachable, or a worker kept failing
    past its retries (``kvtc_store.ray_jobs``)."""


class ArtifactInUseError(RegistryError):
    """An artifact a profile's pointer names (its current one, or the one a rollback
    returns to) cannot be deleted."""
