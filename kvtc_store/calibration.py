"""Calibration job: run the model on real text, fit KVTC artifacts, cache them.

The codec package knows tensors only; this module drives a transformers model over a
corpus (Shakespeare's comedies and histories in turn with NumPy's docstrings by default,
see :mod:`kvtc_store.texts`), feeds the KV of each
window (the *collect* half, :func:`collect`, over :func:`calibration_units`) to mergeable
statistics (:class:`~kvtc_store.codec.stats.ShardStats`), keeps the last window out as
held-out data, and fits one artifact per target ratio. Artifacts are cached under
``<cache home>/codecs/<model>/<settings>/cr<ratio>`` and reused when the model
fingerprint and the settings match.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .calibration_data import cut_windows, data_corpus_name
from .codec import CodecArtifact, PCAFit, default_groups, fit_artifacts
from .codec.stats import ShardStats
from .errors import ArtifactError, CalibrationError
from .model import ModelInfo, cache_home, kv_from_cache, lm_forward
from .samples import model_samples
from .sensitivity import run_reporter, sensitivity_window
from .texts import (
    CORPORA,
    manpages_multilingual,
    numpy_docs,
    python_docs,
    python_sources,
    shakespeare_plays,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """What a calibration run depends on (its hash names the cache folder).

    Attributes:
        windows: number of text windows whose KV feeds the statistics (default 48, about
            98k tokens: with the ``broad`` corpus, the worst validation genre's KL at
            target 16 went from 0.0217 with 24 windows to 0.0208 with 48 (H100, 16
            windows per validation genre; benchmarks/results/rate_distortion.md, issue
            17's log); earlier, 24 against 8 took kvtc 16 from KL 0.0095 to 0.0084).
        window_tokens: tokens per window (positions 0..window_tokens-1).
        layers_per_group: PCA group shape; None = all layers of K (and of V) together.
        block: bit-allocation grid, in principal components.
        n_sink: sink tokens (stored exactly, skipped by calibration).
        window: exact recent-window tokens at the end of a stored sequence.
        sample_tokens: tokens sampled for the bit allocation.
        corpus: ``"broad"`` (default: windows in turn from Shakespeare's comedies and
            histories, NumPy's docstrings, the first half of Python's reference docs and
            the model's own samples in its chat template; :data:`~kvtc_store.texts.CORPORA`),
            ``"shakespeare+numpy"`` (the default before) or ``"shakespeare"``. Chosen on
            validation texts no candidate calibrates on (Shakespeare's tragedies, 3 MB
            of GCIDE, Spanish man pages; never the evaluation genres): the worst
            genre's KL at target 16 0.0237 (shakespeare+numpy, 24 windows), 0.0217
            (broad, 24), 0.0208 (broad, 48); see benchmarks/results/rate_distortion.md.
            ``"data:<hash>"`` names the user's own data (``kvtc-store calibrate --data``,
            :mod:`kvtc_store.calibration_data`), set by :func:`calibrate` itself.
        scale_exponent: per-(layer, head) feature scaling before PCA, ``var ** (α/2)``;
            0.5 won on held-out KL against 0 (plain PCA) and 1 (unit variance), see
            benchmarks/results/experiments.md.
        quantizer: ``"rans"`` (calibrated fixed steps + rANS; default) or ``"minmax"``
            (per-token min/max + bit packing + DEFLATE, the paper's); see
            :mod:`kvtc_store.codec.steps`.
        allocation: ``"dp"`` (default) or ``"uniform"`` (ablation without the DP).
        undo_rope: de-rotate keys before PCA (False only for the ablation).
        weighting: ``"sensitivity"`` (default: each layer's keys and values weighted by
            the KL its noise causes, measured on the model, see
            :mod:`kvtc_store.sensitivity`; with the 0.1 reconstruction bias, 32% lower KL
            than ``"variance"`` without it, at equal honest ratio on held-out text) or ``"variance"`` (features of each (layer,
            head) divided by ``var ** (scale_exponent / 2)``; ``scale_exponent`` applies
            only to this one).
        quant_bias: reconstruction offset of the ``rans`` quantiser, in steps (0.1 cut the
            held-out squared error by 7% at ratio 12 against 0; see
            benchmarks/results/rate_distortion.md).
        basis_dtype: how artifacts store the PCA bases: ``"int8"`` (default; a float16
            scale per 64 rows of each component, half the size of float16 at no
            measurable KL cost, see benchmarks/results/rate_distortion.md) or
            ``"float16"``.
        max_artifact_share: cap on an artifact's stored parameters (bases, means,
            scales, rANS tables) as a share of the model's parameter count, at target
            ratios from ``artifact_cap_from_ratio`` up (``rans`` quantiser only; None: no
            cap). Default 0.15 (issue 3's size target): the bit allocation codes only the
            highest-variance components that fit. On SmolLM2 with the default corpus it
            binds at targets 16 and 20 (25.1 M and 21.8 M parameters uncapped, 19.9 M
            capped) and costs little there: target 16 went from 14.85x at KL 0.0043 to
            15.20x at 0.0059 on the 32 held-out windows of the H200 run (above 20 the
            uncapped artifact already fits); see benchmarks/results/rate_distortion.md.
        artifact_cap_from_ratio: the smallest target ratio the cap applies to (default
            16). Below it artifacts keep every component the bit plan codes: near-lossless
            ratios need more components than any useful cap holds (SmolLM2 at target 4
            codes components worth 46% of the model's parameters).
    """

    windows: int = 48
    window_tokens: int = 2048
    layers_per_group: int | None = None
    block: int = 64
    n_sink: int = 4
    window: int = 128
    sample_tokens: int = 2048
    corpus: str = "broad"
    scale_exponent: float = 0.5
    quantizer: str = "rans"
    allocation: str = "dp"
    undo_rope: bool = True
    weighting: str = "sensitivity"
    quant_bias: float = 0.1
    basis_dtype: str = "int8"
    max_artifact_share: float | None = 0.15
    artifact_cap_from_ratio: float = 16.0

    def key(self) -> str:
        """Short hash of the settings the PCA fit depends on (the quantiser and the
        allocation only change artifacts, which :func:`artifact_dir` names)."""
        d = asdict(self)
        for name in (
            "quantizer",
            "allocation",
            "quant_bias",
            "basis_dtype",
            "max_artifact_share",
            "artifact_cap_from_ratio",
        ):
            d.pop(name)
        if d["undo_rope"]:
            d.pop("undo_rope")  # keeps the keys of fits made before the setting existed
        if d["weighting"] == "variance":
            d.pop("weighting")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def settings_dir(info: ModelInfo, settings: CalibrationSettings) -> Path:
    """Cache folder of one model and calibration settings: the PCA fit and held-out KV
    (``pca-fit.safetensors``, ``holdout.safetensors``) and one artifact per ratio."""
    return cache_home() / "codecs" / f"{info.name}-{info.fingerprint[:12]}" / settings.key()


def artifact_dir(info: ModelInfo, settings: CalibrationSettings, ratio: float) -> Path:
    """Cache folder of the artifact for one model, settings and target ratio, e.g.
    ``rans-b0.1-int8-p0.15-cr16`` (``rans-uniform-...`` for the allocation ablation)."""
    alloc = "" if settings.allocation == "dp" else f"-{settings.allocation}"
    bias = f"-b{settings.quant_bias:g}" if settings.quantizer == "rans" else ""
    basis = "" if settings.basis_dtype == "float16" else f"-{settings.basis_dtype}"
    share = _artifact_cap_share(settings, ratio)
    cap = "" if share is None else f"-p{share:g}"
    name = f"{settings.quantizer}{alloc}{bias}{basis}{cap}-cr{ratio:g}"
    return settings_dir(info, settings) / name


_TEXT_SOURCES = {
    "shakespeare": shakespeare_plays,
    "numpy": numpy_docs,
    "python-docs": lambda: python_docs("first"),
    "manpages": manpages_multilingual,
    "pycode": python_sources,
}
SAMPLE_SEED = 0  # the calibration's sampling seed (held-out samples use others)


def calibration_token_ids(
    tokenizer,
    settings: CalibrationSettings,
    model=None,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Token ids of the calibration corpus, ``(n,)`` int64, at least
    ``(windows + 1) * window_tokens`` long: windows taken in turn from each source of
    :data:`CORPORA` (the last, held out, from the source whose turn it is).

    Args:
        tokenizer: the model's tokenizer.
        settings: ``corpus``, ``windows`` and ``window_tokens`` matter.
        model: needed by corpora with the ``samples`` source, unless ``cache`` holds them.
        cache: a folder where the model's samples are kept (``samples-<seed>-<n>.npy``),
            so a later calibration of the same model and settings skips the sampling.
        progress: ``progress(message)`` while the model is sampled (minutes on a CPU):
            the tokens sampled so far, after every generation step.

    Raises:
        CalibrationError: an unknown corpus, a source too short, or samples needed with
            neither a model nor a cached copy.
    """
    if settings.corpus not in CORPORA:
        raise CalibrationError(
            f"unknown calibration corpus {settings.corpus!r} (known: {', '.join(CORPORA)})"
        )
    n_windows, w = settings.windows + 1, settings.window_tokens
    sources = CORPORA[settings.corpus]
    # windows taken in turn from each source (the last, held out, from the last in turn);
    # a source named twice gives twice the windows, never the same ones
    turn = [sources[i % len(sources)] for i in range(n_windows)]
    streams = {
        name: _source_ids(name, turn.count(name) * w, tokenizer, model, cache, progress)
        for name in dict.fromkeys(sources)
    }
    out = [streams[name][turn[:i].count(name) * w :][:w] for i, name in enumerate(turn)]
    return torch.tensor([t for window in out for t in window])


def _source_ids(name: str, need: int, tokenizer, model, cache: Path | None, progress) -> list[int]:
    """The first ``need`` token ids of one calibration source."""
    if need == 0:
        return []
    if name == "samples":
        return _sample_ids(need, tokenizer, model, cache, progress)
    ids: list[int] = []
    for _, text in _TEXT_SOURCES[name]():
        ids += tokenizer(text).input_ids
        if len(ids) >= need:
            return ids[:need]
    raise CalibrationError(f"calibration source {name!r} has {len(ids)} tokens, needs {need}")


def _sampler(model):
    """The model to sample from: a CUDA copy of a small CPU model where CUDA is available
    (sampling is sequential, minutes on a few cores), else the model where it is."""
    small = sum(p.numel() for p in model.parameters()) < 2e9
    if next(model.parameters()).is_cuda or not (small and torch.cuda.is_available()):
        return model
    return copy.deepcopy(model).cuda()


def _sample_ids(need: int, tokenizer, model, cache: Path | None, progress=None) -> list[int]:
    """The model's samples (:func:`~kvtc_store.samples.model_samples`), cached in ``cache``."""
    path = None if cache is None else cache / f"samples-{SAMPLE_SEED}-{need}.npy"
    if path is not None and path.is_file():
        return np.load(path).astype(np.int64).tolist()
    if model is None:
        raise CalibrationError(
            "the calibration corpus samples the model: pass the model "
            f"(no cached samples{'' if path is None else f' in {path}'})"
        )
    say = progress or (lambda msg: None)
    say(f"sampling the model for {need:,} calibration tokens")
    ids = model_samples(
        _sampler(model),
        tokenizer,
        need,
        seed=SAMPLE_SEED,
        progress=lambda done, total: say(f"sampling the model: {done:,}/{total:,} tokens"),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, np.asarray(ids, dtype=np.int32))
        os.replace(tmp, path)
    return ids


@torch.no_grad()
def calibrate(
    model,
    tokenizer,
    info: ModelInfo,
    ratios: list[float],
    settings: CalibrationSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    token_ids: torch.Tensor | None = None,
) -> list[CodecArtifact]:
    """Calibrate artifacts for ``ratios`` on the model's KV of the calibration corpus.

    Args:
        model, tokenizer, info: from :func:`kvtc_store.model.load_model`; ``model`` may
            be None when the PCA fit of these settings is cached.
        ratios: target compression ratios against 16-bit KV.
        settings: calibration settings (defaults: 48 windows of 2,048 tokens).
        progress: ``progress(done, total, stage)`` called after each step.
        token_ids: the user's calibration data, int64 ``(n,)`` (see
            :func:`kvtc_store.calibration_data.read_token_ids`), instead of the
            settings' corpus; windows are cut at evenly spaced offsets and the settings'
            ``corpus`` becomes ``"data:<hash>"``.

    Returns:
        One artifact per ratio (not saved; see :func:`load_or_calibrate`). The
        ratio-independent PCA fit (and the model's parameter count, for the artifact
        cap) is cached in :func:`settings_dir`, so a later call for new ratios skips the
        model and the eigendecompositions.

    Raises:
        CalibrationDataError: ``token_ids`` is too short for the windows asked.
        CalibrationError: the corpus is too short or unknown, an unknown weighting or
            quantiser, a ``max_artifact_share`` that holds no block of components, or
            no model and no cached fit (or parameter count) to calibrate from.
    """
    settings = settings_for_data(settings or CalibrationSettings(), token_ids)
    say = progress or (lambda done, total, stage: None)
    t0 = time.time()
    folder = settings_dir(info, settings)
    fit, holdout = _load_fit(folder)
    steps = (0 if fit else settings.windows + 2) + len(ratios)
    done = 0
    if fit is None and model is None:
        raise CalibrationError(f"no cached PCA fit in {folder}: pass the model to calibrate")
    if token_ids is not None:
        ids = cut_windows(token_ids, settings.windows, settings.window_tokens)
    else:
        ids = calibration_token_ids(
            tokenizer, settings, model, folder, progress=lambda msg: say(0, steps, msg)
        )
    if fit is None:
        say(done, steps, f"KV of calibration window 1/{settings.windows}")

        def unit_done(unit: CalibrationUnit) -> None:
            nonlocal done
            done += unit.kind != "sensitivity"
            say(done, steps, _next_message(unit, settings))

        units = calibration_units(settings)
        stats = collect(model, ids, units, info, settings, unit_done, lambda m: say(done, steps, m))
        say(done, steps, "fitting PCA (eigendecompositions)")
        fit, holdout = fit_stats(stats, settings, folder)
        del stats
        _model_params(model, folder)
        done += 1

    def fit_progress(msg: str) -> None:
        nonlocal done
        say(done, steps, msg)
        done += 1

    data_hash = ids_hash(ids)
    caps = {_artifact_cap_share(settings, r) for r in ratios} - {None}
    n_params = _model_params(model, folder) if caps else 0
    arts = fit_artifacts_for(
        fit, holdout, info, ratios, settings, data_hash, n_params, fit_progress
    )
    say(steps, steps, "done")
    for a in arts:
        a.calibration["seconds"] = round(time.time() - t0, 1)
    return arts


@dataclass(frozen=True)
class CalibrationUnit:
    """One piece of collect work over the calibration token ids (see :func:`collect`).

    Attributes:
        kind: ``"kv"`` (a calibration window: its KV feeds the sums and the sample),
            ``"holdout"`` (the held-out window: three chunks kept for the measured
            quality) or ``"sensitivity"`` (one window of the layer-sensitivity
            measurement, :func:`~kvtc_store.sensitivity.sensitivity_window`).
        index: the window's number among units of its kind (``holdout``: ``windows``).
        start, end: the token ids it reads, ``ids[start:end]``.
    """

    kind: str
    index: int
    start: int
    end: int

    @property
    def name(self) -> str:
        """``"<kind>:<index>"``, as :class:`~kvtc_store.codec.stats.ShardStats` counts it."""
        return f"{self.kind}:{self.index}"


SENSITIVITY_WINDOWS = 2
"""Windows the layer sensitivity is averaged over (each ``2 * L`` perturbed runs)."""


def _sensitivity_span(window_tokens: int) -> tuple[int, int]:
    """``(context, continuation)`` of a sensitivity window: 1,024 tokens cached and 128
    continued; windows shorter than 1,152 tokens scale both down."""
    cont = 128 if window_tokens >= 1152 else window_tokens // 8
    return (1024 if window_tokens >= 1152 else window_tokens - cont), cont


def calibration_units(settings: CalibrationSettings) -> list[CalibrationUnit]:
    """The work of collecting statistics for ``settings`` over the token ids of
    :func:`calibration_token_ids` (or :func:`~kvtc_store.calibration_data.cut_windows`):
    ``windows`` KV units, one held-out unit (the last window) and, with the
    ``sensitivity`` weighting, :data:`SENSITIVITY_WINDOWS` sensitivity units over the
    first ``2 * (context + continuation)`` ids.

    Raises:
        CalibrationError: an unknown weighting.
    """
    w = settings.window_tokens
    units = [CalibrationUnit("kv", i, i * w, (i + 1) * w) for i in range(settings.windows)]
    units.append(
        CalibrationUnit(
            "holdout", settings.windows, settings.windows * w, (settings.windows + 1) * w
        )
    )
    if settings.weighting == "sensitivity":
        span = sum(_sensitivity_span(w))
        units += [
            CalibrationUnit("sensitivity", j, j * span, (j + 1) * span)
            for j in range(SENSITIVITY_WINDOWS)
        ]
    elif settings.weighting != "variance":
        raise CalibrationError(f"unknown weighting {settings.weighting!r}")
    return units


def new_stats(
    info: ModelInfo, settings: CalibrationSettings, device: str | torch.device = "cpu"
) -> ShardStats:
    """Empty mergeable statistics for ``info``'s model and ``settings``, accumulating on
    ``device``."""
    return ShardStats(
        info.kv_shape,
        info.rope,
        default_groups(info.kv_shape[0], settings.layers_per_group),
        n_sink=settings.n_sink,
        sample_tokens=settings.sample_tokens,
        seed=SAMPLE_SEED,
        undo_rope=settings.undo_rope,
        device=device,
    )


@torch.no_grad()
def collect(
    model,
    ids: torch.Tensor,
    units: list[CalibrationUnit],
    info: ModelInfo,
    settings: CalibrationSettings,
    unit_done: Callable[[CalibrationUnit], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ShardStats:
    """Run the model over ``units`` of the token ids: the *collect* half of calibration.

    Args:
        model: the transformers model, on any device: the sums and Gram matrices
            accumulate on the model's device (float64; a CUDA model's KV never leaves
            the GPU) and come to the host once, when the shard is done.
        ids: int64 ``(n,)``: the job's calibration token ids (every unit's ``end <= n``).
        units: the units of this shard (any subset of :func:`calibration_units`).
        info, settings: the model's geometry and the calibration settings.
        unit_done: called after each unit.
        progress: ``progress(message)`` after each sensitivity run (``"layer
            sensitivity: run k/N"``, ``N`` the ``2 * L`` runs of each of this call's
            sensitivity units).

    Returns:
        The shard's statistics on the host, with the model's parameter count (each
        tensor once).

    Raises:
        CalibrationError: an unknown unit kind, or a unit twice.
    """
    device = next(model.parameters()).device
    stats = new_stats(info, settings, device)
    context, _ = _sensitivity_span(settings.window_tokens)
    n_sens, k_sens = sum(u.kind == "sensitivity" for u in units), 0
    for u in units:
        seq = ids[u.start : u.end].to(device)
        if u.kind == "sensitivity":
            say = run_reporter(progress, k_sens, n_sens)
            k_sens += 1
            m = sensitivity_window(
                model,
                seq,
                context,
                n_sink=settings.n_sink,
                window=min(settings.window, context // 2),
                seed=u.index,
                progress=say,
            )
            stats.add_sensitivity(m, u.index)
        elif u.kind in ("kv", "holdout"):
            _, cache = lm_forward(model, seq[None], last_only=True)
            keys, values = kv_from_cache(cache)
            if u.kind == "kv":
                stats.add_window(keys, values, u.index)
            else:  # three chunks past the sinks (bf16, as cached)
                c = min(256, seq.numel() // 6)  # 256-token chunks at 256, 768, 1280 of 2,048
                stats.add_holdout(
                    [
                        (keys[:, :, s : s + c], values[:, :, s : s + c], s)
                        for s in (c, 3 * c, 5 * c)
                    ],
                    u.index,
                )
        else:
            raise CalibrationError(f"unknown calibration unit kind {u.kind!r}")
        if unit_done:
            unit_done(u)
    stats.model_params = sum(p.numel() for p in model.parameters())
    return stats.to("cpu")


def merge_stats(parts: list[ShardStats]) -> ShardStats:
    """The statistics of all ``parts`` (any order; see
    :meth:`~kvtc_store.codec.stats.ShardStats.merge`); the parts are not changed.

    Raises:
        CalibrationError: no parts, or parts that do not merge.
    """
    if not parts:
        raise CalibrationError("no calibration statistics to merge")
    out = parts[0].copy()
    for p in parts[1:]:
        out.absorb(p, take=False)
    return out


def fit_stats(
    stats: ShardStats,
    settings: CalibrationSettings,
    folder: Path | None = None,
    device: str | torch.device | None = None,
    timings: dict | None = None,
) -> tuple[PCAFit, list]:
    """The ratio-independent half of *fit*: check that ``stats`` covers every unit of
    ``settings``, weight layers by the measured sensitivity, fit PCA (eigendecompositions).

    Args:
        stats: merged statistics of all :func:`calibration_units`.
        settings: the calibration settings.
        folder: where to cache the fit and the held-out chunks (None: not cached).
        device: where the covariances are decomposed (default: CUDA when this process
            has a GPU, else the CPU; see :func:`~kvtc_store.codec.calibrate.fit_pca`).
        timings: if given, gets the stage seconds of
            :meth:`~kvtc_store.codec.calibrate.PCAFit.from_stats`.

    Returns:
        ``(fit, holdout chunks)``.

    Raises:
        CalibrationError: units are missing or foreign.
    """
    want = {u.name for u in calibration_units(settings)}
    if stats.units != want:
        missing, extra = sorted(want - stats.units), sorted(stats.units - want)
        raise CalibrationError(
            f"calibration statistics do not match the settings: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    weights = None
    if settings.weighting == "sensitivity":
        weights = stats.sensitivity()
        log.info("layer sensitivity (keys, values): %s", weights.tolist())
    fit = PCAFit.from_stats(
        stats, settings.scale_exponent, layer_weights=weights, device=device, timings=timings
    )
    holdout = stats.holdout_chunks()
    if folder is not None:
        _save_fit(folder, fit, holdout)
        if stats.model_params:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model-params.json").write_text(json.dumps({"params": stats.model_params}))
    return fit, holdout


def fit_artifacts_for(
    fit: PCAFit,
    holdout: list,
    info: ModelInfo,
    ratios: list[float],
    settings: CalibrationSettings,
    data_hash: str,
    n_params: int,
    progress: Callable[[str], None] | None = None,
    timings: dict | None = None,
    device: str | torch.device | None = None,
) -> list[CodecArtifact]:
    """The per-ratio half of *fit*: step tables and DP for each ratio (artifacts capped
    at ``max_artifact_share`` of ``n_params``, the model's parameter count, where
    :func:`_artifact_cap_share` says), measured on ``holdout``.

    Args:
        timings: if given, gets ``step_tables_s`` (the ``rans`` quantiser's tables on the
            fit's sample, once for all ratios) and ``ratios``: per ratio (``"16"``)
            ``plan_s`` (the DP) and ``measure_s`` (the held-out chunks through the codec).
        device: where the step tables are measured (default: CUDA when present; see
            :meth:`~kvtc_store.codec.calibrate.PCAFit.step_tables`).

    Returns:
        One artifact per ratio, in order (not saved).
    """
    if settings.quantizer == "rans":  # measured once for all ratios, on ``device``
        t0 = time.perf_counter()
        fit.step_tables(settings.block, 0.5, settings.quant_bias, device=device)
        if timings is not None:
            timings["step_tables_s"] = time.perf_counter() - t0
    by_cap: dict[float | None, list[float]] = {}
    for r in ratios:
        by_cap.setdefault(_artifact_cap_share(settings, r), []).append(r)
    fitted: dict[float, CodecArtifact] = {}
    for share, rs in by_cap.items():
        arts = _fit(fit, rs, info, holdout, settings, data_hash, progress, share, n_params)
        fitted.update(zip(rs, arts))
    if timings is not None:
        timings["ratios"] = {
            f"{r:g}": {
                "plan_s": fitted[r].calibration.get("plan_seconds", 0.0),
                "measure_s": fitted[r].calibration.get("measure_seconds", 0.0),
            }
            for r in ratios
        }
    return [fitted[r] for r in ratios]


def ids_hash(ids: torch.Tensor) -> str:
    """The calibration data's hash recorded in artifacts (16 hex digits)."""
    return hashlib.sha256(ids.numpy().astype("<u4").tobytes()).hexdigest()[:16]


def _next_message(unit: CalibrationUnit, settings: CalibrationSettings) -> str:
    """Progress message after ``unit``, in single-process order."""
    if unit.kind == "kv" and unit.index + 1 < settings.windows:
        return f"KV of calibration window {unit.index + 2}/{settings.windows}"
    if unit.kind == "kv":
        return "KV of the held-out window"
    return "measuring layer sensitivity"


def settings_for_data(
    settings: CalibrationSettings, token_ids: torch.Tensor | None
) -> CalibrationSettings:
    """``settings`` whose ``corpus`` names the user's data ``token_ids`` (``"data:"`` and
    their hash), as :func:`calibrate` uses them; unchanged without data."""
    if token_ids is None:
        return settings
    return replace(settings, corpus=data_corpus_name(token_ids))


def _fit(fit, ratios, info, holdout, settings, data_hash, progress, share, n_params):
    """Artifacts for ``ratios`` from a PCA fit, capped at ``share`` of ``n_params``
    stored parameters (None: no cap)."""
    return fit_artifacts(
        fit,
        ratios,
        info.fingerprint,
        info.name,
        holdout=holdout,
        block=settings.block,
        window=settings.window,
        calibration={
            "data_hash": data_hash,
            "corpus": settings.corpus,
            "settings": asdict(settings),
        },
        progress=progress,
        quantizer=settings.quantizer,
        allocation=settings.allocation,
        bias=settings.quant_bias,
        basis_dtype=settings.basis_dtype,
        # parameters counted once per tensor (tied embeddings once)
        max_artifact_params=None if share is None else share * n_params,
    )


def _model_params(model, folder: Path) -> int:
    """The model's parameter count, each tensor once (tied embeddings once), for the
    artifact cap; cached next to the PCA fit so that a calibration from the cached fit
    (``model=None``) can cap too.

    Raises:
        CalibrationError: no model and no cached count.
    """
    path = folder / "model-params.json"
    if model is not None:
        n = sum(p.numel() for p in model.parameters())
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"params": n}))
        return n
    try:
        return int(json.loads(path.read_text())["params"])
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(
            "the artifact size cap (max_artifact_share) needs the model's parameter count: "
            f"pass the model (none cached in {path}: {exc})"
        ) from exc


def _artifact_cap_share(settings: CalibrationSettings, ratio: float) -> float | None:
    """The cap's share of the model's parameters at target ``ratio``: None below
    ``artifact_cap_from_ratio``, without a cap, or with the ``minmax`` quantiser, which
    does not support one."""
    if settings.quantizer != "rans" or ratio < settings.artifact_cap_from_ratio:
        return None
    return settings.max_artifact_share


def _save_fit(folder: Path, fit: PCAFit, holdout) -> None:
    """Cache the ratio-independent part of a calibration (about 200 MB for SmolLM2)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (k, v, first) in enumerate(holdout):
        tensors[f"{i}.keys"] = k.to(torch.bfloat16).contiguous()
        tensors[f"{i}.values"] = v.to(torch.bfloat16).contiguous()
        tensors[f"{i}.first"] = torch.tensor([first])
    tmp = folder / f"holdout.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "holdout.safetensors")
    fit.save(folder / "pca-fit.safetensors")


def _load_fit(folder: Path):
    """``(fit, holdout)`` from the cache, or ``(None, [])`` when absent or unusable."""
    if not (folder / "pca-fit.safetensors").is_file():
        return None, []
    try:
        fit = PCAFit.load(folder / "pca-fit.safetensors")
        t = load_file(str(folder / "holdout.safetensors"))
    except (CalibrationError, OSError, ValueError) as exc:
        log.warning("recomputing the PCA fit: %s", exc)
        return None, []
    holdout = [
        (t[f"{i}.keys"].float(), t[f"{i}.values"].float(), int(t[f"{i}.first"]))
        for i in range(len(t) // 3)
    ]
    return fit, holdout


def load_or_calibrate(
    model,
    tokenizer,
    info: ModelInfo,
    ratios: list[float],
    settings: CalibrationSettings | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    token_ids: torch.Tensor | None = None,
) -> list[CodecArtifact]:
    """Cached artifacts for ``ratios``, calibrating (and saving) the missing ones;
    ``token_ids``: the user's calibration data, as in :func:`calibrate` (their hash names
    the cache folder)."""
    settings = settings_for_data(settings or CalibrationSettings(), token_ids)
    out: dict[float, CodecArtifact] = {}
    for r in ratios:
        path = artifact_dir(info, settings, r)
        if (path / "manifest.json").is_file():
            try:
                art = CodecArtifact.load(path)
                art.check_model(info.fingerprint, info.kv_shape)
                out[r] = art
            except ArtifactError as exc:
                log.warning("recalibrating: cached artifact unusable (%s)", exc)
    missing = [r for r in ratios if r not in out]
    if missing:
        arts = calibrate(model, tokenizer, info, missing, settings, progress, token_ids)
        for r, art in zip(missing, arts):
            art.save(artifact_dir(info, settings, r))
            out[r] = art
    return [out[r] for r in ratios]
