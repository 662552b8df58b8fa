"""Calibration: PCA per feature group and bit allocation, from real KV tensors.

1. :class:`CalibrationStats` accumulates, per feature group, the token count, the sum and
   the Gram matrix (float64) of the features: keys with RoPE undone at each token's
   position, values as they are; tokens at positions below ``n_sink`` are skipped (their
   outlier statistics would bend the basis; they are stored exactly anyway). It also
   keeps a uniform random sample of tokens for the bit allocation.
2. :func:`fit_artifacts` fits PCA (eigendecomposition of the covariance, components by
   decreasing variance), then for each target ratio runs the dynamic programme of
   :mod:`~kvtc_store.codec.dp` over ranges of ``block`` components, and measures the
   resulting codec on held-out chunks.

Error model of the DP (paper §3.2): dropping a range costs the measured energy of its
coefficients; coding it at ``b`` bits with per-token min/max costs ``n * Δ_t² / 12`` per
token, with ``Δ_t = (max_t - min_t) / (2^b - 1)`` taken from the sampled calibration
coefficients. Errors are summed squared errors over the sample; the budget is
``16 * p / CR`` bits per token, ``p`` counting keys and values, scales included.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CalibrationError
from .artifact import CodecArtifact, FeatureGroup, PlanRange
from .dp import allocate_bits
from .features import group_slices, to_token_major
from .quant import SCALE_BITS
from .rope import RopeParams, undo_rope
from .steps import StepTables, plan_steps

log = logging.getLogger(__name__)


class CalibrationStats:
    """Sufficient statistics of KV features, per feature group.

    Args:
        kv_shape: ``(layers, kv_heads, head_dim)``.
        rope: the model's RoPE parameters.
        groups: feature groups (see :func:`~kvtc_store.codec.features.default_groups`).
        n_sink: skip tokens at absolute positions below this.
        sample_tokens: size of the token sample kept for the bit allocation.
        seed: seed of the sampler.
        undo_rope: de-rotate keys before fitting (False only for the ablation that keeps
            RoPE on keys).
        lazy: allocate the sums and Gram matrices at the first :meth:`add` (None before).
        device: where the sums and Gram matrices live and the features are computed
            (``"cpu"`` or the model's CUDA device: each window's KV then never leaves the
            GPU, and only the sample's rows are copied to the host). The arithmetic is
            the same on every device: float32 features, a float32 Gram product per
            window, accumulated in float64. See :meth:`to`.

    Memory: ``8 * p_g²`` bytes per group for the Gram matrix (265 MB for SmolLM2's
    all-layer groups, p_g = 5,760; 8.6 GB for the Llama-3.1-8B shape's, p_g = 32,768),
    plus ``4 * p * sample_tokens`` for the sample (on the host).
    """

    def __init__(
        self,
        kv_shape: tuple[int, int, int],
        rope: RopeParams,
        groups: list[FeatureGroup],
        n_sink: int = 4,
        sample_tokens: int = 2048,
        seed: int = 0,
        undo_rope: bool = True,
        lazy: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.kv_shape = tuple(kv_shape)
        self.rope = rope
        self.undo_rope = undo_rope
        self.groups = groups
        self.n_sink = n_sink
        self.sample_tokens = sample_tokens
        self.seed = seed
        _layers, heads, dim = self.kv_shape
        self.slices = group_slices(groups, heads, dim)
        self.count = 0
        self.sums: list[torch.Tensor] | None = None
        self.grams: list[torch.Tensor] | None = None
        if not lazy:
            self._allocate()
        self._sample: list[torch.Tensor] = []  # token-major [k | v] rows
        self._seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def _allocate(self) -> None:
        sizes = [sl.stop - sl.start for _, sl in self.slices]
        dev = self.device
        self.sums = [torch.zeros(p, dtype=torch.float64, device=dev) for p in sizes]
        self.grams = [torch.zeros(p, p, dtype=torch.float64, device=dev) for p in sizes]

    def to(self, device: str | torch.device) -> CalibrationStats:
        """Move the sums and Gram matrices to ``device`` (in place; returns ``self``).
        Collection on a GPU ends with ``to("cpu")``: one copy per shard."""
        self.device = torch.device(device)
        if self.sums is not None:
            self.sums = [s.to(self.device) for s in self.sums]
            self.grams = [g.to(self.device) for g in self.grams]
        return self

    def features(self, keys, values, first_position: int = 0, skip_sinks: bool = True):
        """Token-major K (RoPE undone) and V features, ``(T', L*H*D)`` each, float32, on
        the device of ``keys``."""
        tokens = keys.shape[2]
        pos = torch.arange(first_position, first_position + tokens, device=keys.device)
        keep = pos >= self.n_sink if skip_sinks else torch.ones_like(pos, dtype=torch.bool)
        k = keys[:, :, keep].float()
        if self.undo_rope:
            k = undo_rope(k, pos[keep], self.rope)
        return to_token_major(k), to_token_major(values[:, :, keep].float())

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, first_position: int = 0) -> None:
        """Add the tokens of one sequence.

        Args:
            keys: ``(L, H, T, D)`` as cached (RoPE applied), on any device (moved to the
                statistics' device).
            values: ``(L, H, T, D)``.
            first_position: absolute position of token 0.
        """
        dev = self.device
        kf, vf = self.features(keys.to(dev), values.to(dev), first_position)
        if self.sums is None:
            self._allocate()
        feats = {"k": kf, "v": vf}
        for g, (kind, sl) in enumerate(self.slices):
            x = feats[kind][:, sl]
            self.sums[g] += x.sum(0, dtype=torch.float64)
            self.grams[g] += x.T @ x  # float32 product, added in float64 (no float64 copy)
        self.count += kf.shape[0]
        self._reservoir(torch.cat([kf, vf], dim=1))

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Uniform sample of ``sample_tokens`` rows over everything seen (Algorithm R)."""
        for row in rows.cpu():
            self._seen += 1
            if len(self._sample) < self.sample_tokens:
                self._sample.append(row.clone())
            else:
                j = int(torch.randint(self._seen, (1,), generator=self._gen))
                if j < self.sample_tokens:
                    self._sample[j] = row.clone()

    def sample(self) -> dict[str, torch.Tensor]:
        """The sampled tokens' features: ``{"k": (N, L*H*D), "v": (N, L*H*D)}``."""
        if not self._sample:
            raise CalibrationError("no calibration tokens were added")
        rows = torch.stack(self._sample)
        half = rows.shape[1] // 2
        return {"k": rows[:, :half], "v": rows[:, half:]}


@dataclass
class PCA:
    """Principal components of one group: mean ``(p,)``, feature scales ``(p,)``,
    eigenvalues ``(p,)`` (descending), components ``(p, p)`` as columns, all float32.
    Coefficients are ``((x - mean) / scale) @ components``."""

    mean: torch.Tensor
    scale: torch.Tensor
    eigenvalues: torch.Tensor
    components: torch.Tensor


def fit_device(device: str | torch.device | None = None) -> torch.device:
    """Where :func:`fit_pca` runs: ``device``, or by default the first CUDA device when
    one is present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_pca(
    stats: CalibrationStats,
    scale_exponent: float = 0.0,
    head_dim: int = 0,
    layer_weights: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    eigh_dtype: torch.dtype = torch.float32,
    timings: dict | None = None,
) -> list[PCA]:
    """Eigendecomposition of each group's (scaled) covariance (``torch.linalg.eigh``).

    The covariance is formed in float64 from the float64 sums, on ``device`` (one group
    at a time: the Llama-3.1-8B shape's all-layer groups are 32,768 features, 8.6 GB in
    float64), then decomposed in ``eigh_dtype``, by default float32 on every device
    (LAPACK ``syevd`` on the CPU, cuSOLVER ``syevd`` on CUDA). Why float32: it is what
    the CPU path always did, it should take about half float64's time on the GPU
    (cuSOLVER's reduction to tridiagonal form is bound by memory bandwidth; the check
    below times both), and it is exact enough where it matters. The bases are stored at float16 precision or coarser (:class:`PCAFit`
    rounds them to float16; artifacts keep float16, or int8 with a scale per 64 rows).
    float32 ``eigh`` is backward stable to ~1e-7 of the covariance's norm, so components
    whose eigenvalues stand clear of that noise agree with float64's to 1e-4 relative
    (tests/test_fleet_stats.py: those above 1e-3 of the largest); components further
    down the spectrum (each with under 1e-3 of the largest component's variance) are
    resolved only as a subspace. The float64 sums also make shards and one process agree to
    float64 rounding before the cast, as :mod:`kvtc_store.codec.stats` states.
    ``eigh_dtype=torch.float64`` is there to check a given model
    (``benchmarks/fleet_calibration.py --check-eigh-f64`` compares both on one
    group of the Llama-3.1-8B shape).

    Args:
        stats: accumulated statistics (on any device; each group's sums are copied to
            ``device``, never changed).
        scale_exponent: ``α`` in ``scale = var_head ** (α / 2)``, where ``var_head`` is the
            mean variance of the features of one (layer, KV head); 0 = plain PCA on raw
            features (large-variance layers dominate the error), 1 = every head's features
            normalised to unit variance (each head gets the same relative error).
        head_dim: channels per head (features per scale block); default from stats.
        layer_weights: float ``(2, L)`` error weights of keys' and values' layers (e.g.
            :func:`kvtc_store.sensitivity.measure_sensitivity`); when given, a layer's
            features are divided by ``w ** -0.5`` (normalised to geometric mean 1)
            instead of the variance scaling, so squared error in the scaled space is
            the weighted error.
        device: where the covariance and the eigendecomposition are computed (see
            :func:`fit_device`: CUDA when present, else the CPU).
        eigh_dtype: ``torch.float32`` (default) or ``torch.float64``.
        timings: if given, gets ``device`` and the seconds ``covariance_s`` (the sums
            copied to ``device``, the covariance formed and scaled) and ``eigh_s``
            (decompositions, sorting, signs), summed over groups.

    Returns:
        One :class:`PCA` per group, float32 tensors on the host.

    Raises:
        CalibrationError: fewer than 2 tokens.
    """
    if stats.count < 2:
        raise CalibrationError(f"calibration needs tokens; got {stats.count}")
    dev = fit_device(device)
    dim = head_dim or stats.kv_shape[2]
    _, heads, _ = stats.kv_shape
    if layer_weights is not None:
        w = layer_weights.double().clamp_min(1e-30)
        per_layer = w.log().sub(w.log().mean()).mul(-0.5).exp()  # w^-1/2, geometric mean 1
    clock = _Clock(dev, timings)
    out = []
    for (kind, _), group, s, gram in zip(stats.slices, stats.groups, stats.sums, stats.grams):
        clock.start()
        mean = s.to(dev) / stats.count
        cov = gram.to(dev) / stats.count  # a new tensor: the statistics stay as they are
        cov.addr_(mean, mean, alpha=-1.0)  # - mean mean^T, in place (no second p x p)
        if layer_weights is not None:
            row = per_layer[0 if kind == "k" else 1, group.layer_start : group.layer_end]
            scale = row.repeat_interleave(heads * dim).to(dev)
        else:
            var = cov.diagonal().clamp_min(1e-12).reshape(-1, dim).mean(1)
            scale = (var ** (scale_exponent / 2)).repeat_interleave(dim)
        cov.div_(scale[:, None]).div_(scale[None, :])
        low = cov.to(eigh_dtype)
        del cov
        clock.stop("covariance_s")
        try:
            evals, evecs = torch.linalg.eigh(low)
        except RuntimeError as exc:  # torch.linalg.LinAlgError too (a subclass)
            if low.dtype == torch.float64:
                raise
            # cuSOLVER's float32 syevd fails on some ill-conditioned matrices where float64
            # succeeds (pytorch/pytorch#105359)
            log.warning("float32 eigh failed (%s); retrying in float64", exc)
            if timings is not None:
                timings["eigh_float64_retries"] = timings.get("eigh_float64_retries", 0) + 1
            evals, evecs = torch.linalg.eigh(low.double())
        del low
        order = torch.argsort(evals, descending=True)
        evecs = _canonical_signs(evecs[:, order])
        out.append(
            PCA(
                mean.float().cpu(),
                scale.float().cpu(),
                evals[order].clamp_min(0).float().cpu(),
                evecs.float().cpu(),
            )
        )
        del evecs
        clock.stop("eigh_s")
    return out


class _Clock:
    """Seconds of stages on ``device`` (synchronised on CUDA), summed into ``timings``
    under the stage's name; does nothing when ``timings`` is None."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings, self.t = device, timings, 0.0
        if timings is not None:
            timings["device"] = str(device)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        if self.timings is not None:
            self.t = self._now()

    def stop(self, stage: str) -> None:
        """Add the seconds since the last start or stop to ``stage``."""
        if self.timings is not None:
            now = self._now()
            self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
            self.t = now


def _canonical_signs(vecs: torch.Tensor) -> torch.Tensor:
    """Columns of ``vecs`` with signs fixed (each column's largest-magnitude entry
    positive): ``eigh`` may return either sign, and statistics merged in another order
    must give the same basis."""
    idx = vecs.abs().argmax(0)
    sign = torch.sign(vecs[idx, torch.arange(vecs.shape[1], device=vecs.device)])
    return (vecs * torch.where(sign == 0, 1.0, sign)).contiguous()


@dataclass
class PCAFit:
    """Everything the bit allocation needs, independent of the target ratio: per-group PCA
    and the sampled calibration features. Fitting it is the expensive part of calibration
    (the model's KV, the Gram matrices, the eigendecompositions), so calibration jobs cache
    it and derive artifacts for new ratios in seconds.

    Components and the sample are kept at float16 precision (the artifact stores bases in
    float16 too), so a fit read back from disk plans exactly as the fresh one.
    """

    kv_shape: tuple[int, int, int]
    rope: RopeParams
    groups: list[FeatureGroup]
    n_sink: int
    count: int
    scale_exponent: float
    pcas: list[PCA]
    sample: list[torch.Tensor]
    undo_rope: bool = True

    @classmethod
    def from_stats(
        cls,
        stats: CalibrationStats,
        scale_exponent: float = 0.0,
        layer_weights: torch.Tensor | None = None,
        device: str | torch.device | None = None,
        eigh_dtype: torch.dtype = torch.float32,
        timings: dict | None = None,
    ) -> PCAFit:
        """Fit PCA on ``stats`` (see :func:`fit_pca`, which runs on ``device`` in
        ``eigh_dtype`` and fills ``timings``) and take its token sample (``sample_s`` in
        ``timings``)."""
        pcas = fit_pca(
            stats,
            scale_exponent,
            layer_weights=layer_weights,
            device=device,
            eigh_dtype=eigh_dtype,
            timings=timings,
        )
        t0 = time.perf_counter()
        for p in pcas:
            p.components = p.components.half().float()
        feats = stats.sample()
        sample = [feats[kind][:, sl].half().float() for kind, sl in stats.slices]
        if timings is not None:
            timings["sample_s"] = time.perf_counter() - t0
        return cls(
            stats.kv_shape,
            stats.rope,
            stats.groups,
            stats.n_sink,
            stats.count,
            scale_exponent,
            pcas,
            sample,
            stats.undo_rope,
        )

    def step_tables(
        self,
        block: int = 64,
        rounding: float = 0.5,
        bias: float = 0.0,
        device: str | torch.device | None = None,
    ) -> StepTables:
        """Error and bit tables of the fixed-step quantiser on this fit's sample (computed
        once per setting and kept; ratio-independent), measured on ``device`` (see
        :func:`fit_device`: CUDA when present). Where the GPU fails, they are measured on
        the CPU instead (a warning says so)."""
        cache = self.__dict__.setdefault("_step_tables", {})
        key = (block, rounding, bias)
        if key not in cache:
            dev = fit_device(device)
            try:
                cache[key] = StepTables(self.coefficients(dev), block, rounding, bias)
            except RuntimeError as exc:
                if dev.type == "cpu":
                    raise
                log.warning("step tables on %s failed (%s); measuring them on the CPU", dev, exc)
                cache[key] = StepTables(self.coefficients(), block, rounding, bias)
        return cache[key]

    def coefficients(self, device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """The sample's scaled principal-component coefficients, per group ``(N, p_g)``,
        computed on ``device``."""
        return [
            ((x.to(device) - p.mean.to(device)) / p.scale.to(device)) @ p.components.to(device)
            for x, p in zip(self.sample, self.pcas)
        ]

    def save(self, path) -> None:
        """Write ``path`` (safetensors; settings in its metadata), atomically."""
        import json
        import os
        from dataclasses import asdict

        from safetensors.torch import save_file

        tensors = {}
        for g, (p, x) in enumerate(zip(self.pcas, self.sample)):
            tensors[f"g{g}.mean"] = p.mean.contiguous()
            tensors[f"g{g}.scale"] = p.scale.contiguous()
            tensors[f"g{g}.eigenvalues"] = p.eigenvalues.contiguous()
            tensors[f"g{g}.components"] = p.components.half().contiguous()
            tensors[f"g{g}.sample"] = x.half().contiguous()
        meta = {
            "kv_shape": list(self.kv_shape),
            "rope": self.rope.to_dict(),
            "groups": [asdict(g) for g in self.groups],
            "n_sink": self.n_sink,
            "count": self.count,
            "scale_exponent": self.scale_exponent,
            "undo_rope": self.undo_rope,
        }
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"fit": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> PCAFit:
        """Read a fit written by :meth:`save`.

        Raises:
            CalibrationError: the file is missing or malformed.
        """
        import json

        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["fit"])
                groups = [FeatureGroup(**g) for g in meta["groups"]]
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
            pcas = [
                PCA(
                    t[f"g{g}.mean"],
                    t[f"g{g}.scale"],
                    t[f"g{g}.eigenvalues"],
                    t[f"g{g}.components"].float(),
                )
                for g in range(len(groups))
            ]
            sample = [t[f"g{g}.sample"].float() for g in range(len(groups))]
            return cls(
                tuple(meta["kv_shape"]),
                RopeParams.from_dict(meta["rope"]),
                groups,
                meta["n_sink"],
                meta["count"],
                meta["scale_exponent"],
                pcas,
                sample,
                meta.get("undo_rope", True),
            )
        except Exception as exc:
            raise CalibrationError(f"cached PCA fit at {path} is unusable: {exc}") from exc


def _error_tables(coeffs: list[torch.Tensor], block: int, max_bits: int, unit: int):
    """DP tables over all groups' blocks: error ``(n+1, n+1, max_bits+1)`` and cost."""
    seg_bounds, blocks = [], []  # blocks: (group, comp_start, comp_end)
    for g, c in enumerate(coeffs):
        start = len(blocks)
        p = c.shape[1]
        blocks += [(g, s, min(s + block, p)) for s in range(0, p, block)]
        seg_bounds.append((start, len(blocks)))
    n = len(blocks)
    widths = max_bits + 1
    err = np.full((n + 1, n + 1, widths), np.inf)
    cost = np.zeros((n + 1, n + 1, widths), dtype=np.int64)
    levels = np.array([0.0] + [(1 << b) - 1 for b in range(1, widths)])
    for g, (s0, s1) in enumerate(seg_bounds):
        c = coeffs[g].double()
        nb = s1 - s0
        bl = [blocks[s0 + k] for k in range(nb)]
        bmax = torch.stack([c[:, a:b].amax(1) for _, a, b in bl], dim=1)
        bmin = torch.stack([c[:, a:b].amin(1) for _, a, b in bl], dim=1)
        energy = np.concatenate(
            [[0.0], np.cumsum([float((c[:, a:b] ** 2).sum()) for _, a, b in bl])]
        )
        lens = np.concatenate([[0], np.cumsum([b - a for _, a, b in bl])])
        for j in range(nb):
            rng2 = ((bmax[:, j:].cummax(1).values - bmin[:, j:].cummin(1).values) ** 2).sum(0)
            rng2 = rng2.numpy()
            for m in range(nb - j):
                i = j + m + 1
                count = lens[i] - lens[j]
                jj, ii = s0 + j, s0 + i
                err[jj, ii, 0] = energy[i] - energy[j]
                err[jj, ii, 1:] = count * rng2[m] / (12.0 * levels[1:] ** 2)
                cost[jj, ii, 1:] = -(-(count * np.arange(1, widths) + SCALE_BITS) // unit)
    return err, cost, seg_bounds, blocks


def plan_bits(
    pcas: list[PCA],
    sample: list[torch.Tensor],
    target_ratio: float,
    block: int = 64,
    max_bits: int = 8,
    uniform: bool = False,
) -> tuple[list[PlanRange], dict]:
    """Bit plan for one target ratio (quantiser ``minmax``).

    Args:
        pcas: per group PCA.
        sample: per group sampled features ``(N, p_g)`` float32.
        target_ratio: CR against 16-bit KV; budget ``16 * p / CR`` bits per token.
        block: range boundaries fall on multiples of this many components.
        max_bits: widest code (8).
        uniform: the ablation without bit allocation: one width for every kept range
            (the best single width; the ranges are still chosen by the DP).

    Returns:
        ``(plan, info)``: kept ranges, and the predicted error (``predicted_mse`` per
        token, ``predicted_nmse`` relative to the total variance) and budget.
    """
    coeffs = [((x - p.mean) / p.scale) @ p.components for x, p in zip(sample, pcas)]
    unit = math.gcd(block, SCALE_BITS)
    err, cost, segs, blocks = _error_tables(coeffs, block, max_bits, unit)
    p_total = sum(p.mean.numel() for p in pcas)
    budget_bits = 16 * p_total / target_ratio
    budget = int(budget_bits // unit)
    if uniform:
        best = None
        for b in range(1, max_bits + 1):
            e = err.copy()
            e[:, :, [w for w in range(1, max_bits + 1) if w != b]] = np.inf
            cand = allocate_bits(e, cost, budget, segs)
            if best is None or cand[0] < best[0]:
                best = cand
        total, ranges = best
    else:
        total, ranges = allocate_bits(err, cost, budget, segs)
    plan = []
    for r in ranges:
        if r.bits == 0:
            continue
        g, a, _ = blocks[r.start]
        _, _, b = blocks[r.end - 1]
        plan.append(PlanRange(g, a, b, r.bits))
    n = coeffs[0].shape[0]
    energy = sum(float((c.double() ** 2).sum()) for c in coeffs)
    info = {
        "budget_bits_per_token": budget * unit,
        "predicted_mse": total / n,
        "predicted_nmse": total / energy,
    }
    return plan, info


def fit_artifacts(
    stats: CalibrationStats | PCAFit,
    target_ratios: list[float],
    model_fingerprint: str,
    model_name: str,
    holdout: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None,
    block: int = 64,
    window: int = 128,
    calibration: dict | None = None,
    progress=None,
    scale_exponent: float = 0.0,
    quantizer: str = "rans",
    allocation: str = "dp",
    rounding: float = 0.5,
    bias: float = 0.0,
    basis_dtype: str = "float16",
    max_artifact_params: float | None = None,
) -> list[CodecArtifact]:
    """Fit PCA once and a bit plan per target ratio; measure each codec on held-out KV.

    Args:
        stats: accumulated statistics, or a :class:`PCAFit` already made from them
            (then ``scale_exponent`` is the fit's own).
        target_ratios: e.g. ``[8, 16]``.
        model_fingerprint, model_name: identify the model (see ``kvtc_store.model``).
        holdout: chunks ``(keys, values, first_position)`` not in ``stats``, for the
            measured error.
        block: DP grid in components.
        window: exact recent-window tokens recorded in the artifact.
        calibration: facts to record (data hash, texts, token count).
        progress: optional callable ``progress(message)``.
        scale_exponent: per-head feature scaling before PCA (see :func:`fit_pca`).
        quantizer: ``"rans"`` (calibrated steps + rANS, :mod:`~kvtc_store.codec.steps`)
            or ``"minmax"`` (per-token min/max + bit packing, the paper's).
        allocation: ``"dp"``, or ``"uniform"`` (ablation: one width/step for the top
            components).
        rounding, bias: dead zone and reconstruction offset of the ``rans`` quantiser
            (:func:`~kvtc_store.codec.quant.quantize_step`).
        basis_dtype: storage of the bases in the artifact, ``"float16"`` or ``"int8"``.
        max_artifact_params: cap on the parameters (tensor elements) an artifact stores:
            means, scales, rANS tables and the kept components' basis columns with their
            int8 scales (:meth:`CodecArtifact.stored_params`); the ``rans`` allocation
            codes only components that fit (:func:`~kvtc_store.codec.steps.plan_steps`).
            None: no cap. Issue 3 asks for at most 15% of the model's parameters.

    Returns:
        One artifact per ratio, in order.

    Raises:
        CalibrationError: the cap leaves no room for a single block of components, or
            is set with the ``minmax`` quantiser (not supported).
    """
    say = progress or (lambda m: log.info(m))
    t0 = time.time()
    if isinstance(stats, PCAFit):
        fit = stats
    else:
        say("fitting PCA")
        fit = PCAFit.from_stats(stats, scale_exponent)
    pcas, sample = fit.pcas, fit.sample
    arts = []
    p_total = sum(p.mean.numel() for p in pcas)
    for cr in target_ratios:
        say(f"bit allocation for ratio {cr}")
        t_plan = time.time()
        rans = {}
        if quantizer == "rans":
            tables = fit.step_tables(block, rounding, bias)
            per_component, basis_cap = _basis_cap(pcas, tables, basis_dtype, max_artifact_params)
            plan, shift, cls, info = plan_steps(
                tables, cr, p_total, allocation, per_component, basis_cap
            )
            rans = {
                "quant_rounding": rounding,
                "quant_bias": bias,
                "rans_freq": torch.from_numpy(tables.tables),
                "rans_shift": torch.from_numpy(shift),
                "rans_cls": torch.from_numpy(cls),
                "rans_interleave": info["rans_interleave"],
            }
        elif quantizer == "minmax":
            if max_artifact_params is not None:
                raise CalibrationError("an artifact size cap needs the rans quantiser")
            plan, info = plan_bits(pcas, sample, cr, block=block, uniform=allocation == "uniform")
        else:
            raise CalibrationError(f"unknown quantiser {quantizer!r}")
        ranks = [max([r.end for r in plan if r.group == g], default=0) for g in range(len(pcas))]
        art = CodecArtifact(
            model_fingerprint=model_fingerprint,
            model_name=model_name,
            kv_shape=fit.kv_shape,
            rope=fit.rope,
            groups=fit.groups,
            means=[p.mean for p in pcas],
            scales=[p.scale for p in pcas],
            bases=[p.components[:, :r] for p, r in zip(pcas, ranks)],
            plan=plan,
            target_ratio=float(cr),
            n_sink=fit.n_sink,
            window=window,
            calibration={
                **(calibration or {}),
                "tokens": fit.count,
                "block": block,
                "scale_exponent": fit.scale_exponent,
                "allocation": allocation,
            },
            quality=info,
            quantizer=quantizer,
            undo_rope=fit.undo_rope,
            basis_dtype=basis_dtype,
            **rans,
        )
        art.calibration["plan_seconds"] = round(time.time() - t_plan, 2)
        if holdout:
            t_measure = time.time()
            art.quality.update(measure_error(art, holdout))
            art.calibration["measure_seconds"] = round(time.time() - t_measure, 2)
        arts.append(art)
    for a in arts:
        a.calibration["fit_seconds"] = round(time.time() - t0, 1)
    return arts


def _basis_cap(pcas, tables, basis_dtype: str, max_params: float | None):
    """``(parameters per kept component of each group, cap on all kept components)`` for
    :func:`~kvtc_store.codec.steps.plan_steps`, from a cap on the whole artifact: what
    every artifact stores whatever it keeps (means, scales, rANS frequency tables) comes
    off first. A kept component stores its basis column (``p_g`` values), the column's
    int8 scales (one per :data:`~kvtc_store.codec.artifact.BASIS_GROUP` rows) and its
    rANS shift and class."""
    if max_params is None:
        return None, None
    from .artifact import BASIS_GROUP

    fixed = sum(p.mean.numel() + p.scale.numel() for p in pcas) + tables.tables.size
    per_component = [
        p.mean.numel() + (-(-p.mean.numel() // BASIS_GROUP) if basis_dtype == "int8" else 0) + 2
        for p in pcas
    ]
    return per_component, max_params - fixed


@torch.no_grad()
def measure_error(art: CodecArtifact, chunks) -> dict:
    """Round-trip ``chunks`` through the codec; squared error over compressed tokens.

    Returns:
        ``measured_mse`` (sum over features, mean over tokens), ``measured_weighted_mse``
        (the same in the DP's units: features divided by the artifact's scales, so it
        compares with ``predicted_mse``), ``measured_nmse`` (relative to the chunks'
        centred energy), ``measured_nmse_k``/``_v``, and ``honest_ratio`` (bf16 bytes /
        blob bytes over the chunks).
    """
    from .codec import KVTCCodec  # local: codec imports this package's modules

    codec = KVTCCodec(art)
    stats = CalibrationStats(  # for its features only: no sums (lazy)
        art.kv_shape, art.rope, art.groups, n_sink=art.n_sink, undo_rope=art.undo_rope, lazy=True
    )
    means = {
        kind: torch.cat([m for (kd, _), m in zip(stats.slices, art.means) if kd == kind])
        for kind in ("k", "v")
    }
    scales = {
        kind: torch.cat([s for (kd, _), s in zip(stats.slices, art.scales) if kd == kind])
        for kind in ("k", "v")
    }
    err = {"k": 0.0, "v": 0.0}
    weighted = 0.0
    energy = {"k": 0.0, "v": 0.0}
    tokens = 0
    raw_bytes = blob_bytes = 0
    for keys, values, first in chunks:
        blob = codec.encode(keys, values, first)
        dec = codec.decode(blob, dtype=torch.float32)
        ref = stats.features(keys, values, first)
        got = stats.features(dec.keys, dec.values, first)
        for kind, r, g_ in zip(("k", "v"), ref, got):
            err[kind] += float(((r - g_) ** 2).sum())
            weighted += float((((r - g_) / scales[kind]) ** 2).sum())
            energy[kind] += float(((r - means[kind]) ** 2).sum())
        tokens += ref[0].shape[0]
        raw_bytes += keys.numel() * 2 * 2
        blob_bytes += len(blob)
    total_e = energy["k"] + energy["v"]
    return {
        "measured_mse": (err["k"] + err["v"]) / max(tokens, 1),
        "measured_weighted_mse": weighted / max(tokens, 1),
        "measured_nmse": (err["k"] + err["v"]) / total_e if total_e else 0.0,
        "measured_nmse_k": err["k"] / energy["k"] if energy["k"] else 0.0,
        "measured_nmse_v": err["v"] / energy["v"] if energy["v"] else 0.0,
        "honest_ratio": raw_bytes / max(blob_bytes, 1),
        "holdout_tokens": tokens,
    }
