"""Typed store configuration: a YAML file, environment overrides, and the tiers it builds.

A config file describes one :class:`~kvtc_store.store.TieredStore`: its tiers from the
top (fastest) to the bottom, the chunk size, the tenant salt, the write mode and the
codec. Every model forbids unknown keys, so a misspelt key is an error that names it.
docs/config.md documents every field; examples/store.yaml is a working example::

    cfg = load_config("store.yaml")     # YAML, then KVTC_STORE_* overrides, validated
    tiers = build_tiers(cfg)            # [MemoryBackend, DiskBackend, ...], top first
    codec = codec_from_config(cfg, info, model=model, tokenizer=tok)

Environment overrides: ``KVTC_STORE_<FIELD>``, ``__`` between nesting levels, a number
for a list index (``KVTC_STORE_TIERS__1__CAPACITY=2GiB``). Values are read as YAML
scalars (``512`` is an int, ``null`` is None), except for fields that take text
(tenant, paths, bucket, ...), which take the value verbatim so that a tenant ``0123`` or
``no`` stays a string. ``KVTC_STORE_HOME`` is the cache home
(:func:`kvtc_store.model.cache_home`), not a config field, and is skipped; any other
``KVTC_STORE_*`` variable that names no field is an error, like a misspelt key.

Every failure (missing file, YAML syntax, validation, a bad override) raises
:class:`~kvtc_store.errors.ConfigError`; each line of its message reads
``<file>: <field path>: <problem>``, with ``(env VAR)`` after the path when the value came
from the environment.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import typing
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import BucketNotFoundError, ConfigError, StoreError

if TYPE_CHECKING:
    from .backends import Backend
    from .codec import Codec
    from .model import ModelInfo

__all__ = [
    "ENV_PREFIX",
    "CodecConfig",
    "DiskTierConfig",
    "GPUTierConfig",
    "MemoryTierConfig",
    "MetricsConfig",
    "RegistryConfig",
    "S3TierConfig",
    "StoreConfig",
    "TierConfig",
    "artifact_from_config",
    "build_tier",
    "build_tiers",
    "codec_from_config",
    "load_config",
    "open_config_registry",
    "parse_byte_size",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "KVTC_STORE_"
"""Prefix of environment overrides."""

_RESERVED_ENV = frozenset({"KVTC_STORE_HOME"})
"""Variables with the prefix that are not config fields (the cache home)."""

# --- byte sizes ------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_byte_size(value: object) -> int:
    """A byte count from an int or a string such as ``"256MiB"``, ``"8GB"``, ``"1.5GiB"``.

    Units (case-insensitive): ``B``; ``KB MB GB TB`` (powers of 1000); ``KiB MiB GiB TiB``
    (powers of 1024). A fractional size is rounded down to whole bytes.

    Raises:
        ValueError: a negative number, an unknown unit, or a string that is not a size.
        TypeError: a bool, None, a list: anything but an int, a float or a str.
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a byte size such as 256MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte size cannot be negative, got {value}")
        return value
    if isinstance(value, float):
        value = format(value, "f")  # nan and inf are then not sizes
    if not isinstance(value, str):
        raise TypeError(f"expected a byte size such as 256MiB, got {value!r}")
    if value.strip().startswith("-"):
        raise ValueError(f"a byte size cannot be negative, got {value!r}")
    m = _SIZE_RE.fullmatch(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"not a byte size: {value!r} (expected a number and one of the units "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, e.g. 256MiB)"
        )
    try:
        return int(Decimal(m.group(1)) * _UNITS[unit])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"not a byte size: {value!r}") from exc


def _byte_size(value: object) -> int:
    try:
        return parse_byte_size(value)
    except (ValueError, TypeError) as exc:
        raise PydanticCustomError("byte_size", str(exc)) from None


def _positive(n: int) -> int:
    if n == 0:
        raise PydanticCustomError("byte_size", "a tier capacity must be more than 0 bytes")
    return n


ByteSize = Annotated[int, BeforeValidator(_byte_size), AfterValidator(_positive)]
"""A positive byte count, written as an int or a string with a unit."""
ByteCount = Annotated[int, BeforeValidator(_byte_size)]
"""A byte count (0 allowed), written as an int or a string with a unit."""

StrictInt = Annotated[int, Strict()]  # no bools, no "8"
StrictBool = Annotated[bool, Strict()]  # no "yes" strings from the environment
StrictFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]

# --- models ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TierBase(_Model):
    """Fields every tier has."""

    name: str | None = Field(None, min_length=1)
    """Name in logs, stats and ``usage()``; default: the kind. Unique within a store."""
    eviction: Literal["lru"] = "lru"
    """Eviction policy; ``"s3fifo"`` is offered by memory and gpu tiers only."""
    deadline: StrictFloat | None = Field(None, gt=0)
    """Most seconds the store waits for one call to this tier before it counts as failed
    (a miss for reads); default: 5 for disk and s3 tiers, none for the in-process gpu and
    memory tiers (they never wait on I/O)."""

    @property
    def label(self) -> str:
        """The tier's name: ``name`` if set, else its kind."""
        return self.name or self.kind  # type: ignore[attr-defined]


class GPUTierConfig(_TierBase):
    """GPU tier: blobs in device memory (:class:`~kvtc_store.backends.GPUBackend`)."""

    kind: Literal["gpu"]
    capacity: ByteSize
    device: str = Field("cuda", pattern=r"^cuda(:[0-9]+)?$")
    """A CUDA device: ``cuda`` (the current one) or ``cuda:N``."""
    eviction: Literal["lru", "s3fifo"] = "lru"  # type: ignore[assignment]
    optional: StrictBool = False
    """Without CUDA: False (default) refuses the config; True skips the tier with a
    logged warning (one config for GPU and CPU-only hosts)."""


class MemoryTierConfig(_TierBase):
    """Host-memory tier (:class:`~kvtc_store.backends.MemoryBackend`)."""

    kind: Literal["memory"]
    capacity: ByteSize
    eviction: Literal["lru", "s3fifo"] = "lru"  # type: ignore[assignment]
    """``lru``, or ``s3fifo`` (scan-resistant S3-FIFO, Yang et al., SOSP 2023)."""
    pinned: StrictBool = False
    """Keep the blobs in page-locked host memory, which the GPU decoder copies from by
    DMA without a staging copy (:mod:`kvtc_store.backends.pinned`; no gain with the CPU
    codec). Needs CUDA: ``build_tiers`` / ``from_config`` refuse True on a host without
    it (``KVTC_STORE_TIERS__<N>__PINNED=false`` turns it off there)."""


class DiskTierConfig(_TierBase):
    """Local-disk tier (:class:`~kvtc_store.backends.DiskBackend`)."""

    kind: Literal["disk"]
    path: UserPath
    capacity: ByteSize


class S3TierConfig(_TierBase):
    """S3 (or S3-compatible) tier (``kvtc_store.backends.s3.S3Backend``, needs boto3)."""

    kind: Literal["s3"]
    bucket: str = Field(min_length=1)
    prefix: str = "kvtc/"
    endpoint_url: str | None = None
    region: str | None = None
    capacity: ByteSize | None = None
    """None: no cap (the bucket's lifecycle rules decide)."""
    max_concurrency: StrictInt = Field(8, ge=1)
    """Requests in flight at once per batch."""
    connect_timeout: StrictFloat = Field(2.0, gt=0)
    read_timeout: StrictFloat = Field(10.0, gt=0)
    max_attempts: StrictInt = Field(3, ge=1)
    abort_uploads_after: StrictFloat | None = Field(86_400.0, gt=0)
    """At open, abort this tier's multipart uploads (under ``prefix``) begun more than
    this many seconds ago: parts a crashed writer left; null: leave them (a bucket
    lifecycle rule ``AbortIncompleteMultipartUpload`` does it server-side)."""
    check_bucket: StrictBool = True
    """Ask the endpoint whether the bucket exists when the tier opens (within the tier's
    deadline): a missing or misspelt bucket is a ``BucketNotFoundError`` then, not a
    silent miss later; an endpoint that does not answer is logged and the tier opens."""


TierConfig = Annotated[
    GPUTierConfig | MemoryTierConfig | DiskTierConfig | S3TierConfig,
    Field(discriminator="kind"),
]
"""One tier; ``kind`` picks the variant."""

_TIER_MODELS: dict[str, type[_TierBase]] = {
    "gpu": GPUTierConfig,
    "memory": MemoryTierConfig,
    "disk": DiskTierConfig,
    "s3": S3TierConfig,
}

_CALIBRATION_FIELDS = (
    "target_ratio",
    "layers_per_group",
    "calibration_windows",
    "calibration_corpus",
    "specialists",
    "max_artifact_share",
    "quantizer",
)

CorpusName = Literal["broad", "broad-ml", "manpages", "pycode", "shakespeare+numpy", "shakespeare"]
"""A built-in calibration corpus (:data:`kvtc_store.texts.CORPORA`)."""


def _corpus_list(value: object) -> object:
    """``specialists`` as a list: null is none, a text is a comma-separated list (so
    ``KVTC_STORE_CODEC__SPECIALISTS=manpages`` works as ``[manpages]``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return value


class RegistryConfig(_Model):
    """Where a codec registry lives (docs/registry.md). In YAML either a mapping or just
    the URL: ``registry: s3://bucket/prefix`` is ``registry: {url: s3://bucket/prefix}``."""

    url: str = Field(min_length=1)
    """A folder (relative paths are relative to the config file) or ``s3://bucket/prefix``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (``http://127.0.0.1:9000``); None for AWS S3."""
    region: str | None = None
    connect_timeout: StrictFloat = Field(2.0, gt=0)
    read_timeout: StrictFloat = Field(10.0, gt=0)
    max_attempts: StrictInt = Field(3, ge=1)


def _registry_shorthand(value: object) -> object:
    return {"url": value} if isinstance(value, str) else value


class CodecConfig(_Model):
    """The KVTC codec: a saved artifact, a registry profile, or calibration settings for
    calibrate-on-demand.

    Give one of ``artifact``, ``registry`` or the calibration fields.
    """

    artifact: UserPath | None = None
    """Folder of a saved codec artifact (``manifest.json`` + ``tensors.safetensors``)."""
    registry: Annotated[RegistryConfig | None, BeforeValidator(_registry_shorthand)] = None
    """A codec registry: encode with ``profile``'s current artifact, decode every artifact
    the registry holds (docs/registry.md)."""
    profile: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """With ``registry``: the profile whose ``current`` artifact encodes."""
    model: str | None = Field(None, min_length=1)
    """With ``registry``: the model fingerprint in the registry; default: the served
    model's (engines: the registry's only model)."""
    refresh_seconds: StrictFloat = Field(60.0, ge=0)
    """With ``registry``: re-read the profile's pointer this often (0: only on demand,
    ``store.codec.refresh()``)."""
    cache_artifacts: StrictInt = Field(4, ge=1)
    """With ``registry``: artifacts kept in memory and in ``cache_dir``."""
    cache_dir: UserPath | None = None
    """With ``registry``: local folder of fetched artifacts; default
    ``$KVTC_STORE_HOME/registry-cache``."""
    target_ratio: StrictFloat = Field(16.0, gt=1)
    layers_per_group: StrictInt | None = Field(None, ge=1)
    calibration_windows: StrictInt = Field(48, ge=1)
    calibration_corpus: CorpusName = "broad"
    """Calibration text: ``broad`` (default: Shakespeare's comedies and histories,
    NumPy's docstrings, Python's reference docs and the model's own samples in turn),
    ``shakespeare+numpy`` (the default before) or the plays only (see docs/config.md)."""
    specialists: Annotated[list[CorpusName], BeforeValidator(_corpus_list)] = Field(
        default_factory=list
    )
    """Calibrate-on-demand: more calibrations, one per corpus named, with the same ratio,
    windows and model; each chunk is stored with whichever calibration reconstructs it
    best (:class:`~kvtc_store.codec.MixtureCodec`). Empty by default: each adds an
    encode and a decode per chunk to every put, and an artifact's memory
    (docs/calibration.md)."""
    max_artifact_share: float | None = Field(0.15, gt=0, le=1)
    """Cap on the artifact's stored parameters as a share of the model's, at target ratios
    of 16 and more (null: no cap)."""
    quantizer: Literal["rans", "minmax"] = "rans"
    """``rans``: calibrated steps + rANS (default); ``minmax``: per-token min/max (paper)."""
    coder: Literal["deflate", "deflate64k", "none"] | None = None
    """General-purpose pass over blob payloads; default: none for rans (but deflate64k
    for blobs that hold exact tokens in ``bfloat16-planes``), deflate for minmax; a name
    applies to every blob. ``deflate`` writes ``deflate64k`` (DEFLATE in 64 KiB pieces;
    older single-stream ``deflate`` blobs still decode)."""
    device: str = Field("cpu", min_length=1)
    exact_dtype: Literal["bfloat16-planes", "bfloat16", "float8_e4m3fn"] = "bfloat16-planes"
    """How new blobs store their exact tokens (sinks, recent window): ``bfloat16-planes``
    (the cached bfloat16 values bit for bit, in byte planes that the blob's DEFLATE
    shrinks about 1.4x), ``bfloat16`` as cached, or ``float8_e4m3fn`` (half the bytes, a
    float16 scale per vector, lossy). Blobs of any of them decode."""
    rate_control: StrictBool = True
    """Scale each chunk's quantisation steps so that its blob lands on the target ratio
    (``rans`` only); false: the calibrated steps, the ratio following the content."""

    @model_validator(mode="after")
    def _artifact_or_calibration(self) -> CodecConfig:
        both = [
            f
            for f in _CALIBRATION_FIELDS
            if f in self.model_fields_set and (f != "specialists" or self.specialists)
        ]
        if self.calibration_corpus in self.specialists:
            raise ValueError(
                f"specialists: {self.calibration_corpus!r} is the calibration_corpus already"
            )
        twice = sorted({c for c in self.specialists if self.specialists.count(c) > 1})
        if twice:
            raise ValueError(f"specialists: {', '.join(twice)} named twice")
        if self.artifact is not None and self.registry is not None:
            raise ValueError("give either artifact or registry, not both")
        source = "artifact" if self.artifact is not None else "registry"
        if (self.artifact is not None or self.registry is not None) and both:
            raise ValueError(
                f"give either {source} or calibration settings, not both "
                f"({source} is set, and so is {', '.join(both)})"
            )
        return self

    def calibration_settings(self, corpus: str | None = None):
        """The :class:`~kvtc_store.calibration.CalibrationSettings` of calibrate-on-demand
        for ``corpus`` (default ``calibration_corpus``; a specialist's is the same but
        for the corpus)."""
        from .calibration import CalibrationSettings

        return CalibrationSettings(
            windows=self.calibration_windows,
            layers_per_group=self.layers_per_group,
            corpus=corpus or self.calibration_corpus,
            max_artifact_share=self.max_artifact_share,
            quantizer=self.quantizer,
        )


class MetricsConfig(_Model):
    """Prometheus metrics endpoint of the store."""

    port: StrictInt | None = Field(None, ge=0, le=65535)
    """Serve ``/metrics`` over HTTP on this port (0: any free port); None: no server
    (the metrics are still kept, in ``store.metrics``)."""
    addr: str = Field("127.0.0.1", min_length=1)
    """Address the server listens on."""


class BreakerConfig(_Model):
    """Circuit breaker of every tier (:mod:`kvtc_store.guard`): after ``failures``
    consecutive failed or timed-out calls a tier is skipped for ``backoff`` seconds, then
    probed with one call; each failed probe doubles the back-off, up to ``max_backoff``."""

    failures: StrictInt = Field(3, ge=1)
    backoff: StrictFloat = Field(1.0, gt=0)
    max_backoff: StrictFloat = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> BreakerConfig:
        if self.max_backoff < self.backoff:
            raise ValueError(f"max_backoff {self.max_backoff} is below backoff {self.backoff}")
        return self

    def settings(self):
        """The :class:`~kvtc_store.guard.BreakerSettings` this config names."""
        from .guard import BreakerSettings

        return BreakerSettings(self.failures, self.backoff, self.max_backoff)


class StoreConfig(_Model):
    """One tiered store: tiers from the top (fastest) down, chunking, tenant, write-down,
    prefetch, metrics, codec."""

    tiers: list[TierConfig] = Field(min_length=1)
    chunk_tokens: StrictInt = Field(256, gt=0)
    tenant: str = ""
    write_mode: Literal["write-through", "write-back"] = "write-through"
    write_queue_chunks: StrictInt = Field(256, ge=1)
    prefetch_buffer: ByteCount = 256 * 2**20
    prefetch_threads: StrictInt = Field(4, ge=1)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)

    @field_validator("chunk_tokens")
    @classmethod
    def _multiple_of_16(cls, n: int) -> int:
        if n % 16:
            raise ValueError(f"must be a multiple of 16, got {n}")
        return n

    @field_validator("tiers")
    @classmethod
    def _unique_names(cls, tiers: list[_TierBase]) -> list[_TierBase]:
        seen: set[str] = set()
        for t in tiers:
            if t.label in seen:
                raise ValueError(f"two tiers are named {t.label!r}; give them distinct `name`s")
            seen.add(t.label)
        return tiers


# --- loading -----------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> StoreConfig:
    """Read a YAML config file, apply ``KVTC_STORE_*`` overrides, validate.

    Relative paths in the file (``tiers[].path``, ``codec.artifact``) are relative to the
    file's folder; relative paths from the environment are relative to the working
    directory. ``~`` is expanded in both.

    Args:
        path: the YAML file.
        env: environment to read overrides from (default ``os.environ``).

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, or a value (from the
            file or the environment) is invalid; the message names the file and the field.
    """
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{src}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read config file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{src}: YAML syntax error at {where}{problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping, got {type(data).__name__}")
    _anchor_paths(data, Path(path).absolute().parent)
    origins = _apply_env(data, os.environ if env is None else env, src)
    try:
        return StoreConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, src, origins)) from None


def _anchor_paths(data: dict, base: Path) -> None:
    """Make relative paths in the file's data relative to the file's folder."""

    def anchor(d: object, key: str) -> None:
        if isinstance(d, dict) and isinstance(d.get(key), str):
            p = Path(d[key]).expanduser()
            d[key] = str(p if p.is_absolute() else base / p)

    tiers = data.get("tiers")
    for tier in tiers if isinstance(tiers, list) else []:
        anchor(tier, "path")
    codec = data.get("codec")
    anchor(codec, "artifact")
    anchor(codec, "cache_dir")
    registry = codec.get("registry") if isinstance(codec, dict) else None
    if isinstance(registry, str) and not registry.startswith("s3://"):
        anchor(codec, "registry")
    elif isinstance(registry, dict) and not str(registry.get("url", "")).startswith("s3://"):
        anchor(registry, "url")


def _apply_env(data: dict, env: Mapping[str, str], src: str) -> dict[tuple, str]:
    """Merge ``KVTC_STORE_*`` overrides into ``data``; return {field path: variable}."""
    origins: dict[tuple, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _RESERVED_ENV:
            continue
        raw = env[var]
        path = tuple(
            int(s) if s.isdigit() else s.lower() for s in var[len(ENV_PREFIX) :].split("__")
        )
        where = f"{src}: {_dotted(path)} (env {var})"
        if any(s == "" for s in path):
            raise ConfigError(f"{where}: empty field name in the variable")
        if _takes_text(data, path):
            value: Any = None if raw in ("", "~", "null") and _nullable(data, path) else raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: value {raw!r} is not a YAML scalar: {exc}") from exc
        node: Any = data
        for i, seg in enumerate(path):
            last = i == len(path) - 1
            if isinstance(seg, int):
                if not isinstance(node, list):
                    raise ConfigError(f"{where}: {_dotted(path[:i]) or 'the top'} is not a list")
                if seg >= len(node):
                    raise ConfigError(
                        f"{where}: no list item {seg} ({_dotted(path[:i])} has {len(node)})"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(f"{where}: {_dotted(path[:i])} is not a mapping")
            elif not last and node.get(seg) is None:
                if (i, seg) not in _SECTIONS:
                    raise ConfigError(f"{where}: {_dotted(path[: i + 1])} is not a mapping")
                node[seg] = _SECTIONS[i, seg]()
            if last:
                node[seg] = value
            else:
                node = node[seg]
        origins[path] = var
    return origins


_SECTIONS = {(0, "codec"): dict, (0, "metrics"): dict, (0, "tiers"): list, (1, "registry"): dict}
"""Containers an override may create when the file leaves them out: (depth, key) -> type."""


def _field_model(data: dict, path: tuple) -> type[BaseModel] | None:
    """The model whose field ``path`` names (for the three fixed nesting shapes)."""
    if len(path) == 1:
        return StoreConfig
    if len(path) == 2 and path[0] == "codec":
        return CodecConfig
    if len(path) == 2 and path[0] == "metrics":
        return MetricsConfig
    if len(path) == 3 and path[:2] == ("codec", "registry"):
        return RegistryConfig
    if len(path) == 3 and path[0] == "tiers" and isinstance(path[1], int):
        tiers = data.get("tiers")
        if isinstance(tiers, list) and path[1] < len(tiers) and isinstance(tiers[path[1]], dict):
            return _TIER_MODELS.get(tiers[path[1]].get("kind"))
    return None


def _annotation(data: dict, path: tuple) -> Any:
    model = _field_model(data, path)
    field = model.model_fields.get(path[-1]) if model is not None else None
    return field.annotation if field is not None else None


def _takes_text(data: dict, path: tuple) -> bool:
    """Whether the field takes text (str, a path or string literals)."""
    ann = _annotation(data, path)
    args = typing.get_args(ann) or (ann,)
    return any(a in (str, Path) or isinstance(a, str) for a in args)


def _nullable(data: dict, path: tuple) -> bool:
    return type(None) in typing.get_args(_annotation(data, path))


def _dotted(path: tuple) -> str:
    return ".".join(str(s) for s in path)


_ALL_FIELDS = sorted(
    {
        f
        for m in (StoreConfig, CodecConfig, MetricsConfig, RegistryConfig, *_TIER_MODELS.values())
        for f in m.model_fields
    }
)


_NO_INPUT = ("missing", "extra_forbidden", "value_error", "byte_size")
"""Error types whose message needs no "(got ...)": none given, or already in the message."""


def _format_errors(exc: ValidationError, src: str, origins: dict[tuple, str]) -> str:
    """One ``<file>: <field path>[ (env VAR)]: <problem>`` line per validation error; a
    required field reported missing because its key is misspelt is told once, as the
    unknown key with its suggestion."""
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = list(err["loc"])
        # A discriminated union puts the tag in the path: tiers.1.disk.capacity.
        if len(loc) >= 3 and loc[0] == "tiers" and loc[2] in _TIER_MODELS:
            del loc[2]
        err["loc"] = tuple(loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _ALL_FIELDS, n=1)
            err["suggestion"] = close[0] if close else None
    misspelt = {e["loc"][:-1] + (e["suggestion"],) for e in errors if e.get("suggestion")}
    lines = []
    for err in errors:
        loc = list(err["loc"])
        kind, inp = err["type"], err.get("input")
        if kind == "missing" and err["loc"] in misspelt:
            continue
        msg = err["msg"]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")
            msg = f"kind must be one of {', '.join(_TIER_MODELS)}"
            inp = inp.get("kind") if isinstance(inp, dict) else inp
        elif kind == "extra_forbidden":
            close = err["suggestion"]
            msg = "unknown key" + (f" (did you mean {close!r}?)" if close else "")
        elif kind == "value_error":
            msg = str(err["ctx"]["error"])
            # a model's own check names the field first ("specialists: ..."): into the path
            head, sep, rest = msg.partition(": ")
            if sep and head in _ALL_FIELDS:
                loc.append(head)
                msg = rest
        path = tuple(loc)
        var = next((v for p, v in origins.items() if path[: len(p)] == p), None)
        if var is None and kind == "value_error":  # a check across fields: those from env
            named = [v for p, v in origins.items() if p[: len(path)] == path and p[-1] in msg]
            var = ", ".join(named) or None
        where = f"{_dotted(path) or '(top level)'}" + (f" (env {var})" if var else "")
        got = ""
        if kind not in _NO_INPUT and not isinstance(inp, (dict, list)):
            got = f" (got {inp!r})"
        if kind == "string_type" and isinstance(inp, (bool, int, float)):
            got += "; quote text that YAML would read as a number or a boolean"
        lines.append(f"{src}: {where}: {msg}{got}")
    return "\n".join(lines)


# --- building ----------------------------------------------------------------------------


def build_tiers(cfg: StoreConfig) -> list[Backend]:
    """Open the configured tiers, top first; each backend's ``name`` is the tier's label.

    A GPU tier marked ``optional`` is left out, with a logged warning, where CUDA is not
    available.

    Raises:
        ConfigError: a tier cannot be opened (a disk path that cannot be created, an S3
            tier without boto3, a GPU tier or a pinned memory tier without CUDA); tiers
            opened before it are closed again.
    """
    built: list[Backend] = []
    try:
        for i, tier in enumerate(cfg.tiers):
            try:
                backend = build_tier(tier, i)
            except ConfigError as exc:
                if not getattr(tier, "optional", False):
                    raise
                log.warning("optional tier %s left out: %s", tier.label, exc)
                continue
            backend.name = tier.label
            if tier.deadline is not None:
                backend.deadline_s = tier.deadline
            built.append(backend)
    except BaseException:
        for backend in built:
            backend.close()
        raise
    return built


def build_tier(tier: _TierBase, i: int = 0) -> Backend:
    """Open one configured tier (``i``: its index, for error messages).

    Raises:
        ConfigError: as :func:`build_tiers`, naming ``tiers.<i>``.
    """
    from .backends import DiskBackend, MemoryBackend

    if isinstance(tier, GPUTierConfig):
        from .backends.gpu import GPUBackend

        try:
            return GPUBackend(tier.capacity, device=tier.device, policy=tier.eviction)
        except ConfigError as exc:
            advice = (
                ""
                if tier.optional
                else "; remove the tier, set `optional: true` on it (left out with a warning "
                "where there is no CUDA), or run on a machine with a GPU"
            )
            raise ConfigError(f"tiers.{i}: {exc}{advice}") from exc
    if isinstance(tier, MemoryTierConfig):
        if tier.pinned:
            from .backends.pinned import check_pinning

            try:
                check_pinning()
            except ConfigError as exc:
                raise ConfigError(f"tiers.{i}.pinned: {exc}") from exc
        return MemoryBackend(tier.capacity, policy=tier.eviction, pinned=tier.pinned)
    if isinstance(tier, DiskTierConfig):
        try:
            return DiskBackend(tier.path, tier.capacity)
        except ConfigError as exc:
            raise ConfigError(f"tiers.{i}.path: {exc}") from exc
    if isinstance(tier, S3TierConfig):
        try:
            from .backends.s3 import S3Backend
        except ImportError as exc:
            if (exc.name or "").split(".")[0] in ("boto3", "botocore"):
                raise ConfigError(
                    f"tiers.{i}: an s3 tier needs boto3 "
                    f"(pip install boto3, or the kvtc-store[s3] extra): {exc}"
                ) from exc
            raise ConfigError(f"tiers.{i}: the s3 backend cannot be imported: {exc}") from exc
        try:
            backend = S3Backend(
                tier.bucket,
                prefix=tier.prefix,
                endpoint_url=tier.endpoint_url,
                region_name=tier.region,
                capacity_bytes=tier.capacity,
                max_concurrency=tier.max_concurrency,
                connect_timeout=tier.connect_timeout,
                read_timeout=tier.read_timeout,
                max_attempts=tier.max_attempts,
            )
            if (not tier.check_bucket or backend.check_bucket(tier.deadline)) and (
                tier.abort_uploads_after is not None
            ):
                _abort_stale_uploads(backend, tier.abort_uploads_after)
        except BucketNotFoundError as exc:
            backend.close()
            raise BucketNotFoundError(f"tiers.{i}.bucket: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"tiers.{i}: {exc}") from exc
        return backend
    raise ConfigError(f"tiers.{i}: unknown tier kind {type(tier).__name__}")  # pragma: no cover


def _abort_stale_uploads(backend, older_than_s: float) -> None:
    """Abort an S3 tier's stale multipart uploads at open; a failure is logged (the tier
    still opens)."""
    try:
        backend.abort_stale_uploads(older_than_s)
    except StoreError as exc:
        log.warning("tier %s: stale multipart uploads not cleaned: %s", backend.name, exc)


def codec_from_config(
    cfg: StoreConfig | CodecConfig,
    model_info: ModelInfo | None = None,
    *,
    model=None,
    tokenizer=None,
    progress=None,
) -> Codec:
    """The codec a config asks for.

    - ``codec.artifact`` set: load that artifact (checked against ``model_info`` if given).
    - ``codec.registry`` set: a :class:`~kvtc_store.registry.VersionedCodec` following
      ``codec.profile`` for ``codec.model`` (default: ``model_info``'s fingerprint).
    - otherwise calibrate-on-demand for ``model_info`` at ``target_ratio`` with
      ``calibration_windows``, ``calibration_corpus``, ``max_artifact_share`` and
      ``layers_per_group``: the artifact cached by an earlier
      calibration with those settings is reused; if there is none, ``model`` and
      ``tokenizer`` (from :func:`kvtc_store.model.load_model`) are run to calibrate one
      (minutes on a CPU) and it is saved to the cache. With ``specialists``, one more
      artifact per corpus named, the same way, and the codecs in a
      :class:`~kvtc_store.codec.MixtureCodec` (the default corpus's first).

    Args:
        cfg: the store config (or its ``codec`` part).
        model_info: the served model; required without an artifact.
        model, tokenizer: needed only to calibrate when nothing is cached.
        progress: ``progress(done, total, stage)`` during calibration.

    Raises:
        ArtifactError: the artifact is missing or malformed;
            ArtifactModelMismatchError if it was calibrated for another model.
        RegistryError: the registry holds no current artifact for the profile, or
            (RegistryUnavailableError) cannot be reached and nothing is cached.
        ConfigError: no artifact, and neither a cached one nor a model to calibrate; or
            ``codec.device`` cannot be used.
        CalibrationError: calibration cannot run.
    """
    from .codec import CodecArtifact, MixtureCodec, make_codec

    c = cfg.codec if isinstance(cfg, StoreConfig) else cfg
    if c.registry is not None:
        return _versioned_codec(c, model_info)
    if c.artifact is not None:
        art = CodecArtifact.load(c.artifact)
        if model_info is not None:
            art.check_model(model_info.fingerprint, model_info.kv_shape)
        arts = [art]
    else:
        if model_info is None:
            raise ConfigError(
                "codec: no artifact is set, so the codec is calibrated for the served "
                "model: pass model_info (or set codec.artifact)"
            )
        corpora = [c.calibration_corpus, *c.specialists]
        if model is not None and tokenizer is not None:
            from .calibration import artifact_dir
            from .texts import check_fetched_texts

            for corpus in corpora:  # before minutes of sampling the model
                settings = c.calibration_settings(corpus)
                if not (
                    artifact_dir(model_info, settings, c.target_ratio) / "manifest.json"
                ).is_file():
                    check_fetched_texts(corpus)
        arts = [
            _calibrated_artifact(c, corpus, model_info, model, tokenizer, progress)
            for corpus in corpora
        ]
    try:
        codecs = [
            make_codec(
                a,
                coder=c.coder,
                device=c.device,
                exact_dtype=c.exact_dtype,
                rate_control=c.rate_control,
            )
            for a in arts
        ]
    except (RuntimeError, AssertionError) as exc:  # torch: bad device string, no CUDA
        raise ConfigError(f"codec.device: cannot use device {c.device!r}: {exc}") from exc
    return codecs[0] if len(codecs) == 1 else MixtureCodec(codecs)


def _calibrated_artifact(c: CodecConfig, corpus: str, model_info: ModelInfo, model, tokenizer,
                         progress):  # fmt: skip
    """Calibrate-on-demand's artifact for ``corpus``: cached, or calibrated when a model
    and tokenizer are given (see :func:`codec_from_config`)."""
    from .calibration import artifact_dir, load_or_calibrate
    from .codec import CodecArtifact

    settings = c.calibration_settings(corpus)
    cached = artifact_dir(model_info, settings, c.target_ratio)
    if model is not None and tokenizer is not None:
        return load_or_calibrate(
            model, tokenizer, model_info, [c.target_ratio], settings, progress
        )[0]
    if not (cached / "manifest.json").is_file():
        if corpus == c.calibration_corpus:
            how = (
                f"run `kvtc-store calibrate --corpus {corpus} --ratio {c.target_ratio:g}`, "
                "or set codec.artifact"
            )
        else:  # a specialist: codec.artifact cannot stand beside specialists
            how = (
                f"run `kvtc-store calibrate --corpus {c.calibration_corpus} --specialist "
                f"{corpus} --ratio {c.target_ratio:g}`"
            )
        raise ConfigError(
            f"codec: no artifact is set and none is cached at {cached} for "
            f"{model_info.name} at ratio {c.target_ratio:g} (corpus {corpus}); pass model "
            f"and tokenizer to calibrate one, or {how}"
        )
    art = CodecArtifact.load(cached)
    art.check_model(model_info.fingerprint, model_info.kv_shape)
    return art


def open_config_registry(c: CodecConfig):
    """The :class:`~kvtc_store.registry.CodecRegistry` ``codec.registry`` names.

    Raises:
        ConfigError: ``codec.registry`` is not set.
    """
    from .registry import open_registry

    r = c.registry
    if r is None:
        raise ConfigError("codec.registry: not set")
    return open_registry(
        r.url,
        endpoint_url=r.endpoint_url,
        region=r.region,
        connect_timeout=r.connect_timeout,
        read_timeout=r.read_timeout,
        max_attempts=r.max_attempts,
    )


def artifact_from_config(c: CodecConfig):
    """The codec artifact a config names without calibrating: ``codec.artifact``, or the
    current artifact of ``codec.profile`` in ``codec.registry`` (for ``codec.model``,
    default the registry's only model), fetched and checked. What a serving engine,
    which knows its model's shape but not its fingerprint, identifies the model by.

    Raises:
        ConfigError: neither ``codec.artifact`` nor ``codec.registry`` is set.
        ArtifactError: the artifact is missing, malformed or corrupt.
        RegistryError: the profile has no current artifact, the registry holds several
            models and ``codec.model`` is unset, or it cannot be reached.
    """
    from .codec import CodecArtifact
    from .errors import RegistryError

    if c.artifact is not None:
        return CodecArtifact.load(c.artifact)
    if c.registry is None:
        raise ConfigError("codec: set artifact or registry (a serving engine cannot calibrate)")
    reg = open_config_registry(c)
    model = c.model or reg.only_model()
    move = reg.current(model, c.profile)
    if move is None:
        raise RegistryError(
            f"registry {reg.url}: profile {c.profile} of model {model[:12]} has no current "
            "artifact (promote one)"
        )
    return reg.verify(model, move.artifact_id)


def _versioned_codec(c: CodecConfig, model_info: ModelInfo | None):
    """The versioned codec of ``codec.registry`` (see :func:`codec_from_config`)."""
    from .registry import VersionedCodec

    if model_info is None:
        raise ConfigError("codec.registry: pass model_info (the served model's KV shape)")
    model = c.model or model_info.fingerprint
    if model != model_info.fingerprint:
        raise ConfigError(
            f"codec.model: {model[:12]} is not the served model {model_info.name} "
            f"({model_info.fingerprint[:12]})"
        )
    try:
        return VersionedCodec(
            open_config_registry(c),
            model,
            model_info.kv_shape,
            c.profile,
            coder=c.coder,
            device=c.device,
            exact_dtype=c.exact_dtype,
            rate_control=c.rate_control,
            cache_dir=c.cache_dir,
            max_artifacts=c.cache_artifacts,
            refresh_seconds=c.refresh_seconds,
        )
    except (RuntimeError, AssertionError) as exc:  # torch: bad device string, no CUDA
        raise ConfigError(f"codec.device: cannot use device {c.device!r}: {exc}") from exc
