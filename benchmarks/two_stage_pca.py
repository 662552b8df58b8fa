"""Could a two-stage projection cut the all-layer PCA's FLOPs at the same quality?
(issue 6: the all-layer projection caps the GPU decode near 90 GB/s on the H200.)

Two-stage: each layer's features first projected on that layer's own top ``k1`` principal
components (cheap: ``2 * d * k1`` FLOPs a layer and token, ``d`` features a layer), then
the all-layer PCA run on those ``L * k1`` coefficients; the decode's GEMM shrinks by
``d / k1``. What it gives up is measured here from a cached all-layer PCA fit (its
components and eigenvalues give the full covariance ``C``): the energy the per-layer
truncation drops, and the reverse water-filling distortion and rate (Cover & Thomas,
§10.3.3: ``D = sum min(lambda_i, theta)``, ``R = sum max(0, log2(lambda_i / theta) / 2)``
bits) of the plain all-layer spectrum against the two-stage one (eigenvalues of
``B^T C B``, ``B`` the block-diagonal per-layer bases) plus the dropped energy, at the
same rate: the all-layer spectrum at water level ``theta = level * 100 * mean
eigenvalue``, the two-stage one at the level that spends the same bits (bisection).
Distortion as a share of the total variance; CPU, seconds. Only as good as the fit's
spectrum: SmolLM2's here (the 8B benchmark codec has random bases, nothing to measure).

    python3 benchmarks/two_stage_pca.py FIT [FIT ...]

FIT: a ``pca-fit.safetensors`` of an all-layer calibration (``$KVTC_STORE_HOME/codecs/
<model>/<settings>/``).
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors import safe_open


def water_fill(ev: torch.Tensor, theta: float) -> tuple[float, float, int]:
    """Distortion, rate (bits a token) and components coded at water level ``theta``."""
    ev = ev.clamp(min=1e-30)
    dist = torch.minimum(ev, torch.tensor(theta, dtype=ev.dtype)).sum().item()
    rate = (0.5 * torch.log2(ev / theta)).clamp(min=0).sum().item()
    return dist, rate, int((ev > theta).sum())


def at_rate(ev: torch.Tensor, bits: float) -> tuple[float, float, int]:
    """:func:`water_fill` at the water level that spends ``bits`` (bisection in log)."""
    lo, hi = 1e-12 * ev.max().item(), ev.max().item()
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if water_fill(ev, mid)[1] > bits else (lo, mid)
    return water_fill(ev, hi)


def compare(comp: torch.Tensor, lam: torch.Tensor, layers: int, shares=(1.0, 0.75, 0.5)):
    """Rows of (k1 share, dropped energy share, level, all-layer D/R/r, two-stage D/R/r at
    the all-layer row's rate)."""
    lam = lam.double().clamp(min=0)
    cov = (comp.double() * lam) @ comp.double().T
    total = lam.sum().item()
    d = cov.shape[0] // layers
    rows = []
    for share in shares:
        k1 = round(d * share)
        bases, dropped = [], 0.0
        for i in range(layers):
            e, u = torch.linalg.eigh(cov[i * d : (i + 1) * d, i * d : (i + 1) * d])
            bases.append(u.flip(1)[:, :k1])
            dropped += e.flip(0)[k1:].clamp(min=0).sum().item()
        b = torch.block_diag(*bases)
        ev = torch.linalg.eigvalsh(b.T @ cov @ b).flip(0).clamp(min=0)
        for level in (3e-3, 1e-3, 3e-4):
            theta = level * total / len(lam) * 100
            da, ra, na = water_fill(lam, theta)
            d2, r2, n2 = at_rate(ev, ra)
            rows.append((share, dropped / total, level, da / total, ra, na,
                         (d2 + dropped) / total, r2, n2))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fits", nargs="+")
    args = ap.parse_args()
    for path in args.fits:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["fit"])
            layers = meta["kv_shape"][0]
            print(f"# {path}: kv_shape {meta['kv_shape']}, {meta['count']} tokens")
            print("| kind | k1/d | dropped | level | all-layer D | R | r | two-stage D | R | r |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for g, group in enumerate(meta["groups"]):
                if (group["layer_start"], group["layer_end"]) != (0, layers):
                    continue  # not an all-layer group
                comp, lam = f.get_tensor(f"g{g}.components"), f.get_tensor(f"g{g}.eigenvalues")
                for s, drop, lv, da, ra, na, d2, r2, n2 in compare(comp, lam, layers):
                    print(f"| {group['kind']} | {s:.2f} | {drop:.4f} | {lv:g} | {da:.4f} | "
                          f"{ra:.0f} | {na} | {d2:.4f} | {r2:.0f} | {n2} |")  # fmt: skip


if __name__ == "__main__":
    main()
