"""How much each layer's keys and values matter to the model's predictions.

The codec's allocation minimises a weighted squared error of the KV features; the
weights decide which layers get bits. This module measures them on the model itself:
Gaussian noise of a known energy is added to the keys (or values) of one layer of a
cached context, the model continues from that cache, and the mean KL divergence of its
next-token distributions from the exact continuation, per unit of injected squared
error, is that layer's weight. To first order the KL of a perturbation spread over
layers is the weighted sum, so a DP that minimises ``Σ w_l · err_l`` minimises the KL
(the sensitivity-weighted allocation suggested in issue 3; compare the paper's per-head
scaling, KVTC §3.1).

Noise is added only where the codec is lossy: not on sink tokens (positions < ``n_sink``)
and not on the last ``window`` tokens (both stored exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .evaluate import continuation_logits
from .model import kv_from_cache, lm_forward


@torch.no_grad()
def measure_sensitivity(
    model,
    ids: torch.Tensor,
    windows: int = 2,
    context: int = 1024,
    continuation: int = 128,
    noise: float = 0.05,
    n_sink: int = 4,
    window: int = 128,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Per-layer KL sensitivity of keys and values: the mean of
    :func:`sensitivity_window` over ``windows`` consecutive spans of ``ids`` (window
    ``w`` seeded with ``seed + w``, so each window's measurement is the same wherever it
    runs: fleet calibration measures windows on different workers and adds them up).

    Args:
        model: a transformers causal LM.
        ids: int64 ``(n,)`` token ids, at least ``windows * (context + continuation)``.
        windows: text windows averaged over.
        context, continuation: tokens cached, and tokens the model continues over.
        noise: injected noise variance relative to the layer's mean feature variance.
        n_sink, window: the exact tokens at the start and end of the context (no noise).
        seed: noise seed of the first window.
        progress: optional ``progress(message)`` after each perturbed run of the model
            (``2 * L`` runs per window).

    Returns:
        float64 ``(2, L)``: row 0 keys, row 1 values; mean KL (nats per continuation
        position) per unit of squared error per token (summed over the layer's
        ``H * D`` features), injected on the lossy tokens.

    Raises:
        ValueError: ``ids`` is too short.
    """
    span = context + continuation
    if ids.numel() < windows * span:
        raise ValueError(f"need {windows * span} token ids, got {ids.numel()}")
    total = None
    for w in range(windows):
        say = run_reporter(progress, w, windows)
        m = sensitivity_window(
            model, ids[w * span : (w + 1) * span], context, noise, n_sink, window, seed + w, say
        )
        total = m if total is None else total + m
    return total / windows


def run_reporter(
    progress: Callable[[str], None] | None, window: int, windows: int
) -> Callable[[int, int], None] | None:
    """:func:`sensitivity_window`'s ``progress(done, runs)`` for window ``window`` (from
    0) of ``windows``, as one count over them all: ``progress("layer sensitivity: run
    k/N")`` with ``N = windows * runs`` (None without ``progress``)."""
    if progress is None:
        return None

    def say(done: int, runs: int) -> None:
        progress(f"layer sensitivity: run {window * runs + done}/{windows * runs}")

    return say


@torch.no_grad()
def sensitivity_window(
    model,
    seq: torch.Tensor,
    context: int,
    noise: float = 0.05,
    n_sink: int = 4,
    window: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """One window's sensitivity measurement (see :func:`measure_sensitivity`).

    Args:
        model: a transformers causal LM.
        seq: int64 ``(context + continuation,)`` token ids: the first ``context`` are
            cached, the model continues over the rest.
        context, noise, n_sink, window: as :func:`measure_sensitivity`.
        seed: seed of this window's noise.
        progress: optional ``progress(done, runs)`` after each of the ``2 * L`` runs.

    Returns:
        float64 ``(2, L)``, as :func:`measure_sensitivity` for one window.
    """
    gen = torch.Generator().manual_seed(seed)
    lossy = slice(n_sink, max(n_sink, context - window))
    _, cache = lm_forward(model, seq[None, :context], last_only=True)
    keys, values = (t.float().cpu() for t in kv_from_cache(cache))
    cont = seq[context:]
    lp = F.log_softmax(continuation_logits(model, keys, values, cont), dim=-1)
    n_layers, heads, _, dim = keys.shape
    out = torch.zeros(2, n_layers, dtype=torch.float64)
    for row, base in enumerate((keys, values)):
        for layer in range(n_layers):
            x = base[layer, :, lossy]
            var = float(x.var(dim=1).mean())
            noisy = base.clone()
            noisy[layer, :, lossy] += (noise * var) ** 0.5 * torch.randn(x.shape, generator=gen)
            k, v = (noisy, values) if row == 0 else (keys, noisy)
            lq = F.log_softmax(continuation_logits(model, k, v, cont), dim=-1)
            kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
            out[row, layer] = kl / (noise * var * heads * dim)
            if progress:
                progress(row * n_layers + layer + 1, 2 * n_layers)
    return out
