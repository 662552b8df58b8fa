"""The codec artifact: what calibration produces and the encoder/decoder need.

On disk it is a folder with two files:

- ``tensors.safetensors``: for each feature group ``g``, ``g{g}.mean`` and ``g{g}.scale``
  (float32, ``(p_g,)``) and ``g{g}.basis`` (``(p_g, r_g)``: the first ``r_g`` principal
  components as columns, only those the bit plan keeps), float16, or int8 with
  ``g{g}.basis_scale`` (float16, ``(ceil(p_g / 64), r_g)``: a scale per 64 rows) when the
  manifest's ``basis_dtype`` is ``"int8"``; for the ``rans`` quantiser also
  ``rans.freq`` (int32 ``(2, classes, symbols)``, the frequency tables) and ``rans.shift``,
  ``rans.cls`` (int32, one per coded component in plan order);
- ``manifest.json``: model fingerprint and name, KV shape, RoPE parameters, groups, the
  bit plan, target ratio, sink and window settings, calibration data hash, the quality
  measured at calibration, and the artifact's id and version.

The id is a hash of the tensors and the plan, so two artifacts with the same id code the
same way; the blob header names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ArtifactError, ArtifactModelMismatchError
from .rope import RopeParams

MANIFEST_FORMAT = 1
BASIS_DTYPES = ("float16", "int8")


BASIS_GROUP = 64
"""Rows (features) per int8 scale of a stored basis: one (layer, head) of ``head_dim`` 64."""


def _quantize_basis(basis: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored form of a PCA basis ``(p, r)``.

    ``"float16"``: float16, no scale. ``"int8"``: int8 with a float16 scale per
    :data:`BASIS_GROUP` rows of each column, ``(ceil(p / 64), r)``, symmetric
    (``max |x| / 127``, round to nearest), the group-wise weight quantisation of LLM.int8 /
    GPTQ-style formats applied to the basis. Principal components concentrate on a few
    heads, so a scale per whole column rounded the small entries to zero (+40% held-out
    squared error at ratio 16); per 64 rows it costs a few percent. Half the artifact size
    of float16 (issue 3's target: at most 15% of the model's parameters).
    """
    if dtype == "float16":
        return basis.to(torch.float16), None
    p, r = basis.shape
    pad = (-p) % BASIS_GROUP
    groups = (p + pad) // BASIS_GROUP  # explicit: a group may keep no component (r = 0)
    b = torch.nn.functional.pad(basis.float(), (0, 0, 0, pad)).view(groups, BASIS_GROUP, r)
    scale = (b.abs().amax(dim=1) / 127.0).to(torch.float16)  # (groups, r)
    s = scale.float().clamp_min(1e-30).unsqueeze(1)
    q = torch.round(b / s).clamp_(-127, 127).to(torch.int8).view(groups * BASIS_GROUP, r)[:p]
    return q, scale


def _dequantize_basis(basis: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 basis ``(p, r)`` a stored basis (and its group scales) stands for."""
    if scale is None:
        return basis.float()
    p = basis.shape[0]
    s = scale.float().repeat_interleave(BASIS_GROUP, dim=0)[:p]
    return basis.float() * s


@dataclass(frozen=True)
class FeatureGroup:
    """A set of features that share one PCA basis.

    Attributes:
        kind: ``"k"`` for keys, ``"v"`` for values.
        layer_start, layer_end: layers ``[layer_start, layer_end)``; the group's features
            are all KV heads and channels of those layers, layer-major:
            ``p = (layer_end - layer_start) * kv_heads * head_dim``.
    """

    kind: str
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class PlanRange:
    """Components ``[start, end)`` of group ``group``: coded at ``bits`` bits per value
    with per-token min/max (quantiser ``minmax``), or at quantisation step ``step`` in
    the scaled coefficient space (quantiser ``rans``; then ``bits`` is 0)."""

    group: int
    start: int
    end: int
    bits: int
    step: float = 0.0


QUANTIZERS = ("minmax", "rans")


@dataclass
class CodecArtifact:
    """A calibrated KVTC codec for one model and one target ratio.

    Attributes:
        model_fingerprint: hex id of the model (architecture + weights sample).
        model_name: human-readable model name.
        kv_shape: ``(layers, kv_heads, head_dim)``.
        rope: the model's RoPE parameters (keys are de-rotated before projection).
        groups: the feature groups, keys' groups first.
        means: per group, float32 ``(p_g,)``.
        bases: per group, float32 ``(p_g, r_g)`` with orthonormal columns.
        scales: per group, float32 ``(p_g,)``: features are divided by these before the
            projection (per-layer, per-head sensitivity weights; ones = plain PCA).
        plan: the kept ranges in group then component order.
        quantizer: ``"rans"`` (calibrated fixed steps, entropy-coded with rANS over
            calibrated tables) or ``"minmax"`` (per-token min/max, bit-packed: the paper's).
        rans_freq, rans_shift, rans_cls: the rANS tables and each coded component's
            shift and table class (see :mod:`kvtc_store.codec.rans`); empty for minmax.
        rans_interleave: rANS lanes per token (components coded side by side).
        quant_rounding, quant_bias: dead zone and reconstruction offset of the fixed-step
            quantiser (:func:`~kvtc_store.codec.quant.quantize_step`).
        undo_rope: keys are de-rotated before the projection (False only for ablations).
        basis_dtype: how the bases are stored: ``"float16"`` or ``"int8"`` (a scale per
            64 rows of a component; half the size). ``bases`` always holds the stored values.
        target_ratio: compression ratio against 16-bit KV the budget was set for.
        n_sink: tokens at absolute positions below this are stored exactly.
        window: tokens at the end of a stored sequence that are stored exactly.
        calibration: facts about the calibration data (hash, tokens, texts, seconds).
        quality: errors predicted by the DP and measured on held-out tokens.
        version: registry version (1 until a registry assigns one).
    """

    model_fingerprint: str
    model_name: str
    kv_shape: tuple[int, int, int]
    rope: RopeParams
    groups: list[FeatureGroup]
    means: list[torch.Tensor]
    bases: list[torch.Tensor]
    plan: list[PlanRange]
    target_ratio: float
    scales: list[torch.Tensor] = field(default_factory=list)
    n_sink: int = 4
    window: int = 128
    calibration: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    version: int = 1
    artifact_id: str = ""
    quantizer: str = "minmax"
    rans_freq: torch.Tensor | None = None
    rans_shift: torch.Tensor | None = None
    rans_cls: torch.Tensor | None = None
    rans_interleave: int = 4
    quant_rounding: float = 0.5
    quant_bias: float = 0.0
    undo_rope: bool = True
    basis_dtype: str = "float16"

    def __post_init__(self) -> None:
        # The bases are stored in float16 or int8; use the stored values everywhere so that
        # a freshly calibrated artifact and a loaded one code identically.
        if self.basis_dtype not in BASIS_DTYPES:
            raise ArtifactError(f"unknown basis dtype {self.basis_dtype!r} (have {BASIS_DTYPES})")
        self.bases = [_dequantize_basis(*_quantize_basis(b, self.basis_dtype)) for b in self.bases]
        self.means = [m.float() for m in self.means]
        if not self.scales:
            self.scales = [torch.ones_like(m) for m in self.means]
        self.scales = [s.float() for s in self.scales]
        if self.quantizer not in QUANTIZERS:
            raise ArtifactError(f"unknown quantiser {self.quantizer!r} (have {QUANTIZERS})")
        if self.quantizer == "rans" and self.rans_freq is None:
            raise ArtifactError("a rans artifact needs its tables")
        if not self.artifact_id:
            self.artifact_id = self._content_id()

    def _content_id(self) -> str:
        h = hashlib.sha256()
        h.update(self.model_fingerprint.encode())
        settings = {
            "kv_shape": list(self.kv_shape),
            "rope": self.rope.to_dict(),
            "n_sink": self.n_sink,
        }
        if self.quantizer != "minmax" or not self.undo_rope:
            settings.update(quantizer=self.quantizer, undo_rope=self.undo_rope)
        if self.basis_dtype != "float16":
            settings["basis_dtype"] = self.basis_dtype
        if self.quantizer == "rans":
            settings["rans_interleave"] = self.rans_interleave
            if (self.quant_rounding, self.quant_bias) != (0.5, 0.0):
                settings.update(rounding=self.quant_rounding, bias=self.quant_bias)
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(json.dumps([asdict(r) for r in self.plan]).encode())
        h.update(json.dumps([asdict(g) for g in self.groups]).encode())
        for m, b, s in zip(self.means, self.bases, self.scales):
            h.update(m.contiguous().numpy().tobytes())
            h.update(s.contiguous().numpy().tobytes())
            for t in _quantize_basis(b, self.basis_dtype):
                if t is not None:
                    h.update(t.contiguous().numpy().tobytes())
        for t in (self.rans_freq, self.rans_shift, self.rans_cls):
            if t is not None:
                h.update(t.to(torch.int32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def stored_params(self) -> int:
        """Parameters (tensor elements) the artifact stores: means, scales, the kept
        components' basis columns with their int8 scales, and the rANS tables; the
        figure issue 3 caps at 15% of the model's parameter count."""
        n = sum(m.numel() + s.numel() for m, s in zip(self.means, self.scales))
        for b in self.bases:
            n += sum(t.numel() for t in _quantize_basis(b, self.basis_dtype) if t is not None)
        for t in (self.rans_freq, self.rans_shift, self.rans_cls):
            if t is not None:
                n += t.numel()
        return n

    def features_per_token(self) -> int:
        """p: features per token over keys and values, ``2 * L * H * D``."""
        layers, heads, dim = self.kv_shape
        return 2 * layers * heads * dim

    def plan_bits_per_token(self) -> int:
        """Bits per compressed token the plan spends, scales included (``minmax``); for
        ``rans`` the calibration estimate of the entropy-coded size (``quality``)."""
        from .quant import SCALE_BITS

        if self.quantizer == "rans":
            return round(self.quality.get("estimated_bits_per_token", 0))
        return sum((r.end - r.start) * r.bits + SCALE_BITS for r in self.plan)

    def coded_components(self) -> int:
        """Number of components the plan codes (over all groups)."""
        return sum(r.end - r.start for r in self.plan)

    def check_model(self, fingerprint: str, kv_shape: tuple[int, int, int]) -> None:
        """Raise ArtifactModelMismatchError unless this artifact is for that model."""
        if tuple(kv_shape) != tuple(self.kv_shape):
            raise ArtifactModelMismatchError(
                f"codec artifact {self.artifact_id} is for KV shape {tuple(self.kv_shape)}, "
                f"the model has {tuple(kv_shape)}"
            )
        if fingerprint != self.model_fingerprint:
            raise ArtifactModelMismatchError(
                f"codec artifact {self.artifact_id} was calibrated for model "
                f"{self.model_name} ({self.model_fingerprint[:12]}), not {fingerprint[:12]}"
            )

    def manifest(self) -> dict:
        """The JSON manifest (everything but the tensors)."""
        return {
            "format": MANIFEST_FORMAT,
            "artifact_id": self.artifact_id,
            "version": self.version,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "kv_shape": list(self.kv_shape),
            "rope": self.rope.to_dict(),
            "groups": [asdict(g) for g in self.groups],
            "ranks": [int(b.shape[1]) for b in self.bases],
            "plan": [asdict(r) for r in self.plan],
            "target_ratio": self.target_ratio,
            "bits_per_token": self.plan_bits_per_token(),
            "n_sink": self.n_sink,
            "window": self.window,
            "quantizer": self.quantizer,
            "rans_interleave": self.rans_interleave,
            "quant_rounding": self.quant_rounding,
            "quant_bias": self.quant_bias,
            "undo_rope": self.undo_rope,
            "basis_dtype": self.basis_dtype,
            "calibration": self.calibration,
            "quality": self.quality,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder (atomically: a temp folder renamed into place).

        Returns:
            The folder's path.
        """
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for g, (m, b, s) in enumerate(zip(self.means, self.bases, self.scales)):
            tensors[f"g{g}.mean"] = m.float().contiguous()
            tensors[f"g{g}.scale"] = s.float().contiguous()
            basis, scale = _quantize_basis(b, self.basis_dtype)
            tensors[f"g{g}.basis"] = basis.contiguous()
            if scale is not None:
                tensors[f"g{g}.basis_scale"] = scale.contiguous()
        for name in ("freq", "shift", "cls"):
            t = getattr(self, f"rans_{name}")
            if t is not None:
                tensors[f"rans.{name}"] = t.to(torch.int32).contiguous()
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=1))
        # safetensors writes its file owner-only (0600); give it the mode of any file
        # written here (0666 less the umask), so a server under another user can read
        # the artifact it is pointed at
        os.chmod(tmp / "tensors.safetensors", (tmp / "manifest.json").stat().st_mode & 0o777)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodecArtifact:
        """Read an artifact folder written by :meth:`save`.

        Raises:
            ArtifactError: the folder, a file or a field is missing or malformed.
        """
        path = Path(path)
        try:
            man = json.loads((path / "manifest.json").read_text())
            tensors = load_file(str(path / "tensors.safetensors"))
        except FileNotFoundError as exc:
            raise ArtifactError(f"codec artifact at {path} is missing {exc.filename}") from exc
        except Exception as exc:
            raise ArtifactError(f"codec artifact at {path} does not parse: {exc}") from exc
        try:
            if man["format"] != MANIFEST_FORMAT:
                raise ArtifactError(f"artifact manifest format {man['format']} is unknown")
            groups = [FeatureGroup(**g) for g in man["groups"]]
            art = cls(
                model_fingerprint=man["model_fingerprint"],
                model_name=man["model_name"],
                kv_shape=tuple(man["kv_shape"]),
                rope=RopeParams.from_dict(man["rope"]),
                groups=groups,
                means=[tensors[f"g{g}.mean"].float() for g in range(len(groups))],
                bases=[
                    _dequantize_basis(tensors[f"g{g}.basis"], tensors.get(f"g{g}.basis_scale"))
                    for g in range(len(groups))
                ],
                basis_dtype=man.get("basis_dtype", "float16"),
                scales=[tensors[f"g{g}.scale"].float() for g in range(len(groups))],
                plan=[PlanRange(**r) for r in man["plan"]],
                quantizer=man.get("quantizer", "minmax"),
                undo_rope=man.get("undo_rope", True),
                rans_freq=tensors.get("rans.freq"),
                rans_shift=tensors.get("rans.shift"),
                rans_cls=tensors.get("rans.cls"),
                rans_interleave=man.get("rans_interleave", 4),
                quant_rounding=man.get("quant_rounding", 0.5),
                quant_bias=man.get("quant_bias", 0.0),
                target_ratio=man["target_ratio"],
                n_sink=man["n_sink"],
                window=man["window"],
                calibration=man["calibration"],
                quality=man["quality"],
                version=man["version"],
                artifact_id=man["artifact_id"],
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"codec artifact at {path} is malformed: {exc!r}") from exc
        if art._content_id() != art.artifact_id:
            raise ArtifactError(f"codec artifact at {path} does not match its id (altered?)")
        return art
