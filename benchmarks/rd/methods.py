"""Which methods a run compares, by name, and how each is built.

- ``kvtc``: ours, one row per target ratio (artifacts from
  :func:`kvtc_store.calibration.load_or_calibrate`).
- Ablations of ours, one row per ablation ratio: ``kvtc-nocoder`` (the same artifacts and
  symbols, bit-packed at fixed width per component instead of rANS-coded:
  :class:`~.kvtc.KVTCFixedWidth`; for a ``minmax`` artifact, no DEFLATE pass), and others that calibrate under other
  :class:`~kvtc_store.calibration.CalibrationSettings` fields: ``kvtc-uniform``
  (``allocation="uniform"``: uniform bits on the top components, no DP),
  ``kvtc-rope`` (``undo_rope=False``: RoPE kept on keys), ``kvtc-perlayer``
  (``layers_per_group=1``: per-layer PCA instead of all layers in one group),
  ``kvtc-minmax`` (``quantizer="minmax"``: the paper's per-token min/max, bit packing and
  DEFLATE instead of calibrated steps and rANS), ``kvtc-variance``
  (``weighting="variance"``: per-head variance scaling instead of the layers' measured
  KL sensitivity), ``kvtc-nocap`` (``max_artifact_share=None``: no cap on the artifact's
  size, which by default holds 15% of the model's parameters from target 16 up),
  ``kvtc-shakespeare`` (``corpus="shakespeare"``: calibration windows from Shakespeare's
  plays only, without NumPy's docstrings), ``kvtc-broad`` (``corpus="broad"``), and
  ``kvtc-s+n`` (``corpus="shakespeare+numpy"``). Codec ablations use ours' artifacts with
  other :class:`~kvtc_store.codec.KVTCCodec` options (:data:`CODEC_ABLATIONS`):
  ``kvtc-norate`` (no rate control: the calibrated steps), ``kvtc-fp8exact`` (exact
  tokens in float8 instead of bfloat16), ``kvtc-fp8exact-w64`` / ``-w32`` (float8 and a
  recent window of 64 / 32 tokens instead of the artifact's), ``kvtc-bf16exact``
  (bfloat16 exact tokens, where ours stores them otherwise).
  Rows kept in results/quality.json from before the defaults changed carry their own
  names (``kvtc-shakespeare-nocap``, ``kvtc-cal8``, ``kvtc-cap15-cal8``; see the
  experiment log of results/rate_distortion.md).
  An ablation
  whose settings field does not exist in the installed kvtc_store is skipped with a
  message, not faked.
- Baselines: ``bf16`` (storage floor), ``fp8``, ``fp8-token``, ``int8``, ``int4-g64``,
  ``kivi-2``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from kvtc_store.calibration import CalibrationSettings
from kvtc_store.codec import CodecArtifact, make_codec

from .base import KVMethod
from .bf16 import BF16
from .fp8 import fp8_cast, fp8_per_token
from .int_group import int4_group64, int8_per_token
from .kivi import KIVI
from .kvtc import KVTC, KVTCFixedWidth, KVTCMixture

log = logging.getLogger(__name__)

BASELINES: dict[str, Callable[[], KVMethod]] = {
    "bf16": BF16,
    "fp8": fp8_cast,
    "fp8-token": fp8_per_token,
    "int8": int8_per_token,
    "int4-g64": int4_group64,
    "kivi-2": KIVI,
}
# ablation name -> (CalibrationSettings field, value)
SETTINGS_ABLATIONS: dict[str, tuple[str, object]] = {
    "kvtc-uniform": ("allocation", "uniform"),
    "kvtc-rope": ("undo_rope", False),
    "kvtc-perlayer": ("layers_per_group", 1),
    "kvtc-minmax": ("quantizer", "minmax"),
    "kvtc-variance": ("weighting", "variance"),
    "kvtc-nocap": ("max_artifact_share", None),
    "kvtc-shakespeare": ("corpus", "shakespeare"),
    "kvtc-broad": ("corpus", "broad"),
    "kvtc-s+n": ("corpus", "shakespeare+numpy"),
}
# ablation name -> KVTCCodec options and exact window (None: the artifact's), ours' artifacts
CODEC_ABLATIONS: dict[str, tuple[dict, int | None]] = {
    "kvtc-norate": ({"rate_control": False}, None),
    "kvtc-fp8exact": ({"exact_dtype": "float8_e4m3fn"}, None),
    "kvtc-fp8exact-w64": ({"exact_dtype": "float8_e4m3fn"}, 64),
    "kvtc-fp8exact-w32": ({"exact_dtype": "float8_e4m3fn"}, 32),
    "kvtc-bf16exact": ({"exact_dtype": "bfloat16"}, None),
    "kvtc-fp8tail": ({"fp8_tail": True}, None),  # the batched codec only (CUDA)
}
# ablation name -> the specialists' corpora: ours' artifacts plus theirs, chosen per chunk
MIXTURE_ABLATIONS: dict[str, tuple[str, ...]] = {
    "kvtc-mix-ml": ("manpages",),
    "kvtc-mix-code": ("pycode",),
    "kvtc-mix-3": ("manpages", "pycode"),
}
ABLATIONS = ("kvtc-nocoder", *SETTINGS_ABLATIONS, *CODEC_ABLATIONS, *MIXTURE_ABLATIONS)
ALL_METHODS = ("kvtc", *ABLATIONS, *BASELINES)
DEFAULT_RATIOS = (4, 6, 8, 12, 16, 20, 24, 32, 48, 64)
DEFAULT_ABLATION_RATIOS = (12, 20)  # where issue 3's two quality targets sit

Calibrator = Callable[[CalibrationSettings, list[float]], list[CodecArtifact]]


def ablation_settings(base: CalibrationSettings, name: str) -> CalibrationSettings | str:
    """Settings of a settings ablation, or the reason it cannot run (a missing field)."""
    fld, value = SETTINGS_ABLATIONS[name]
    have = {f.name for f in dataclasses.fields(CalibrationSettings)}
    if fld not in have:
        return (
            f"{name} skipped: CalibrationSettings has no field {fld!r} in this kvtc_store "
            f"(needs {fld}={value!r}; fields: {', '.join(sorted(have))})"
        )
    if getattr(base, fld) == value:
        return f"{name} skipped: the base settings already have {fld}={value!r}"
    return dataclasses.replace(base, **{fld: value})


def build_methods(
    names: list[str],
    ratios: list[float],
    ablation_ratios: list[float],
    settings: CalibrationSettings,
    calibrate: Calibrator,
    device: str,
    gpu_kernels: bool | None = None,
    codec_options: dict | None = None,
    exact_window: int | None = None,
) -> tuple[list[KVMethod], list[str]]:
    """The methods to run, in report order, and messages for those skipped.

    Args:
        names: method names from :data:`ALL_METHODS`.
        ratios: target ratios of ``kvtc``.
        ablation_ratios: target ratios of the ablations.
        settings: calibration settings of ours (ablations change one field).
        calibrate: ``calibrate(settings, ratios) -> artifacts`` (cached calibration).
        device: where the codecs run (``"cpu"`` or ``"cuda"``).
        gpu_kernels: ``make_codec``'s choice of the batched GPU codec (``batched``; None:
            where it runs; False: the float32 torch reference on ``device`` too).
        codec_options: ``KVTCCodec`` options of ours and every ablation (``exact_dtype``,
            ``rate_control``); a codec ablation overrides its own.
        exact_window: recent-window tokens ours keeps exact (None: the artifact's).

    Raises:
        ValueError: an unknown method name.
    """
    unknown = sorted(set(names) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(ALL_METHODS)}")
    out: list[KVMethod] = []
    skipped: list[str] = []

    base_options = dict(codec_options or {})

    def codec_of(art, coder="deflate", options=None):
        opts = {**base_options, **(options or {})}
        return make_codec(art, coder=coder, device=device, batched=gpu_kernels, **opts)

    def kvtc_rows(name, kind, arts, rs, coder="deflate", cls=KVTC, options=None, window=None):
        window = exact_window if window is None else window
        for r, a in zip(rs, arts):
            codec = codec_of(a, coder, options)
            out.append(
                cls(name=name, target_ratio=float(r), kind=kind, codec=codec, exact_window=window)
            )

    if "kvtc" in names:
        kvtc_rows("kvtc", "ours", calibrate(settings, list(ratios)), ratios)
    if "kvtc-nocoder" in names:
        arts = calibrate(settings, list(ablation_ratios))
        cls = KVTCFixedWidth if settings.quantizer == "rans" else KVTC
        kvtc_rows("kvtc-nocoder", "ablation", arts, ablation_ratios, coder="none", cls=cls)
    for name in SETTINGS_ABLATIONS:
        if name not in names:
            continue
        s = ablation_settings(settings, name)
        if isinstance(s, str):
            log.warning("%s", s)
            skipped.append(s)
            continue
        kvtc_rows(name, "ablation", calibrate(s, list(ablation_ratios)), ablation_ratios)
    for name, (options, window) in CODEC_ABLATIONS.items():
        if name in names:
            arts = calibrate(settings, list(ablation_ratios))
            kvtc_rows(name, "ablation", arts, ablation_ratios, options=options, window=window)
    for name, corpora in MIXTURE_ABLATIONS.items():
        if name not in names:
            continue
        rs = list(ablation_ratios)
        specs = [calibrate(dataclasses.replace(settings, corpus=c), rs) for c in corpora]
        for i, (r, a) in enumerate(zip(rs, calibrate(settings, rs))):
            out.append(KVTCMixture(name=name, target_ratio=float(r), kind="ablation",
                                   codec=codec_of(a), others=[codec_of(s[i]) for s in specs],
                                   exact_window=exact_window))  # fmt: skip
    for name, make in BASELINES.items():
        if name in names:
            out.append(make())
    return out, skipped
