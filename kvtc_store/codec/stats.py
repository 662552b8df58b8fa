"""Mergeable calibration statistics: what one shard of calibration windows contributes.

Fleet calibration (issue 19) splits calibration into *collect* (the model over token
windows, on any number of workers) and *fit* (merge, PCA, tables, DP). A
:class:`ShardStats` holds everything the fit needs, and two of them merge into the
statistics of the union of their windows:

- per feature group: token count, sum ``(p_g,)`` and Gram matrix ``(p_g, p_g)``, float64
  (as :class:`~kvtc_store.codec.calibrate.CalibrationStats`): merged by addition;
- the token sample the rANS step tables and the bit allocation are computed from, after
  projection on the fitted bases: a *bottom-k* sample. Every token gets a priority, a
  hash of ``(seed, window id, position)`` (splitmix64), and the sample keeps the
  ``sample_tokens`` tokens of smallest priority, as float16 rows (the precision
  :class:`~kvtc_store.codec.calibrate.PCAFit` keeps anyway). The bottom-k of a union is
  the bottom-k of the two bottom-k's, so merging is exact and the sample does not depend
  on how windows were split into shards (a reservoir sample depends on their order).
  Storing the raw rows instead of coefficients means the fit projects them itself: no
  second pass over the shards.
- per-layer sensitivity measurements (:mod:`kvtc_store.sensitivity`): a float64 sum of
  ``(2, L)`` measurements and their count;
- held-out chunks (bf16 as cached) for the artifact's measured quality;
- where the model runs on a GPU, the sums, Gram matrices and sample accumulate there
  (float32 Gram product per window added into float64 sums, as on the CPU) and come to
  the host once per shard;
- the ids of the work units it covers (``"kv:3"``, ``"sensitivity:0"``, ...): merging two
  statistics that share a unit raises, so no window is counted twice.

Merging is commutative and associative up to float64 rounding of the sums (counts,
samples, unit sets and held-out chunks exactly); the fit casts the covariance to float32
before its eigendecomposition, so shards and one process give the same bases except in
the rare element whose float64 sums round to neighbouring float32 values (tested to
1e-4 relative, :mod:`tests.test_fleet_stats`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import numpy as np
import torch

from ..errors import CalibrationError
from .artifact import FeatureGroup
from .calibrate import CalibrationStats
from .rope import RopeParams

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 ``x`` (Steele, Lea & Flood 2014), element-wise."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def token_priorities(seed: int, window: int, positions: np.ndarray) -> np.ndarray:
    """Sampling priorities of tokens: uint64 ``(n,)`` for int ``positions`` ``(n,)`` of
    window ``window``; a function of ``(seed, window, position)`` only."""
    base = _splitmix64(np.array([seed], dtype=np.uint64) ^ np.uint64(window << 1 | 1))
    return _splitmix64(base ^ positions.astype(np.uint64))


class ShardStats(CalibrationStats):
    """Sufficient statistics of the calibration windows of one shard; see the module doc.

    Args:
        kv_shape, rope, groups, n_sink, sample_tokens, seed, undo_rope: as
            :class:`~kvtc_store.codec.calibrate.CalibrationStats` (``seed`` seeds the
            sample's priorities), positionally or by name.
        device: by name only: where the sums, Gram matrices and the sample's rows
            accumulate (the model's device during :func:`~kvtc_store.calibration.collect`,
            which moves them to the host once at the end of the shard; :meth:`state` and
            :meth:`sample` copy them there). The sensitivity sums and held-out chunks
            stay on the host.

    The Gram matrices are allocated at the first :meth:`add` (a shard of sensitivity
    runs only carries none): ``8 * p_g²`` bytes per group.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, lazy=True)
        self.units: set[str] = set()
        self.sample_keys = np.zeros((0, 2), dtype=np.int64)  # (window, position)
        self.sample_prio = np.zeros(0, dtype=np.uint64)
        self.sample_rows = torch.zeros(
            0, 2 * self._features, dtype=torch.float16, device=self.device
        )
        self.sens_sum: torch.Tensor | None = None  # float64 (2, L)
        self.sens_count = 0
        self.holdout: list[
            tuple[int, torch.Tensor, torch.Tensor, int]
        ] = []  # (window, k, v, first)
        self.model_params = 0

    @property
    def _features(self) -> int:
        layers, heads, dim = self.kv_shape
        return layers * heads * dim

    def _claim(self, unit: str) -> None:
        if unit in self.units:
            raise CalibrationError(f"calibration unit {unit} is already in these statistics")
        self.units.add(unit)

    @torch.no_grad()
    def add_window(
        self, keys: torch.Tensor, values: torch.Tensor, window: int, first_position: int = 0
    ) -> None:
        """Add calibration window ``window`` (its id in the job: it seeds the sample's
        priorities and names unit ``kv:<window>``).

        Args:
            keys, values: ``(L, H, T, D)`` as cached (RoPE applied on keys).
            window: the window's id, unique in the job.
            first_position: absolute position of token 0.

        Raises:
            CalibrationError: the window is already in these statistics.
        """
        self._claim(f"kv:{window}")
        self._window, self._end = window, first_position + keys.shape[2]
        super().add(keys, values, first_position)

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Bottom-k sample over rows of the current window (``rows`` skip the sinks; on
        the statistics' device). Only the window's own bottom-k can enter the sample; the
        sample's rows stay on the statistics' device until :meth:`to` moves them."""
        n = rows.shape[0]  # the window's last n positions (the sinks skipped)
        pos = np.arange(self._end - n, self._end, dtype=np.int64)
        prio = token_priorities(self.seed, self._window, pos)
        local = np.lexsort((pos, prio))[: self.sample_tokens]
        keys = np.stack([np.full(len(local), self._window, dtype=np.int64), pos[local]], axis=1)
        picked = rows[torch.from_numpy(local).to(rows.device)].half()
        self._keep_smallest(keys, prio[local], picked)

    def _keep_smallest(self, keys: np.ndarray, prio: np.ndarray, rows: torch.Tensor) -> None:
        keys = np.concatenate([self.sample_keys, keys])
        prio = np.concatenate([self.sample_prio, prio])
        rows = torch.cat([self.sample_rows, rows.to(self.sample_rows.device)])
        # total order: priority, then (window, position); the kept rows sorted by key
        order = np.lexsort((keys[:, 1], keys[:, 0], prio))[: self.sample_tokens]
        order = order[np.lexsort((keys[order, 1], keys[order, 0]))]
        self.sample_keys, self.sample_prio = keys[order], prio[order]
        self.sample_rows = rows[torch.from_numpy(order).to(rows.device)]

    def add_sensitivity(self, measured: torch.Tensor, index: int) -> None:
        """Add one window's sensitivity measurement, float64 ``(2, L)`` (unit
        ``sensitivity:<index>``); see :func:`kvtc_store.sensitivity.sensitivity_window`."""
        self._claim(f"sensitivity:{index}")
        m = measured.double()
        self.sens_sum = m.clone() if self.sens_sum is None else self.sens_sum + m
        self.sens_count += 1

    def add_holdout(
        self, chunks: list[tuple[torch.Tensor, torch.Tensor, int]], window: int
    ) -> None:
        """Keep held-out chunks ``(keys, values, first_position)`` of window ``window``
        (unit ``holdout:<window>``), as bf16; never added to the sums."""
        self._claim(f"holdout:{window}")
        for k, v, first in chunks:
            self.holdout.append((window, _host_bf16(k), _host_bf16(v), first))

    def sensitivity(self) -> torch.Tensor:
        """Mean sensitivity measurement, float64 ``(2, L)``.

        Raises:
            CalibrationError: none was added.
        """
        if self.sens_sum is None:
            raise CalibrationError("no sensitivity measurement in the calibration statistics")
        return self.sens_sum / self.sens_count

    def holdout_chunks(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Held-out chunks in window order, float32 ``(L, H, T, D)`` (from bf16)."""
        return [(k.float(), v.float(), f) for _, k, v, f in sorted(self.holdout, key=_hold_key)]

    def sample(self) -> dict[str, torch.Tensor]:
        """The sampled tokens' features, sorted by (window, position): ``{"k": (N, L*H*D),
        "v": (N, L*H*D)}`` float32 (from float16).

        Raises:
            CalibrationError: no calibration token was added.
        """
        if not len(self.sample_rows):
            raise CalibrationError("no calibration tokens were added")
        rows = self.sample_rows.float().cpu()
        half = rows.shape[1] // 2
        return {"k": rows[:, :half], "v": rows[:, half:]}

    def _settings(self) -> dict:
        return {
            "kv_shape": list(self.kv_shape),
            "rope": self.rope.to_dict(),
            "groups": [asdict(g) for g in self.groups],
            "n_sink": self.n_sink,
            "sample_tokens": self.sample_tokens,
            "seed": self.seed,
            "undo_rope": self.undo_rope,
        }

    def to(self, device: str | torch.device) -> ShardStats:
        """Move the sums, Gram matrices and the sample's rows to ``device`` (in place;
        returns ``self``)."""
        super().to(device)
        self.sample_rows = self.sample_rows.to(self.device)
        return self

    def copy(self) -> ShardStats:
        """An independent copy (tensors cloned on their devices)."""
        out = copy.copy(self)
        out.units = set(self.units)
        if self.sums is not None:
            out.sums = [s.clone() for s in self.sums]
            out.grams = [g.clone() for g in self.grams]
        if self.sens_sum is not None:
            out.sens_sum = self.sens_sum.clone()
        out.holdout = list(self.holdout)
        return out

    def merge(self, other: ShardStats) -> ShardStats:
        """The statistics of both shards' units (neither is changed).

        Raises:
            CalibrationError: as :meth:`absorb`.
        """
        return self.copy().absorb(other, take=False)

    def absorb(self, other: ShardStats, take: bool = True) -> ShardStats:
        """Add ``other``'s units to these statistics, in place (returns ``self``): the
        merge without copying a Gram matrix, for drivers that merge shards as they come
        (8.6 GB per group for the Llama-3.1-8B shape). Sums and Gram matrices are added
        on ``self``'s device.

        Args:
            other: the shard to add.
            take: ``other`` is not used afterwards, so its tensors may become ``self``'s
                (where ``self`` has none yet) and be added to in place later.

        Raises:
            CalibrationError: the two were collected with different settings (shape,
                groups, RoPE, sample size or seed), for different models (parameter
                counts), or share a unit.
        """
        if self._settings() != other._settings():
            raise CalibrationError("calibration statistics of different settings do not merge")
        if self.model_params and other.model_params and self.model_params != other.model_params:
            raise CalibrationError("calibration statistics of different models do not merge")
        shared = self.units & other.units
        if shared:
            raise CalibrationError(f"calibration units counted twice: {sorted(shared)[:5]}")
        self.units |= other.units
        self.count += other.count
        if other.sums is not None:
            if self.sums is None:
                self.sums = [s.to(self.device, copy=not take) for s in other.sums]
                self.grams = [g.to(self.device, copy=not take) for g in other.grams]
            else:
                for a, b in zip(self.sums + self.grams, other.sums + other.grams):
                    a.add_(b.to(a.device))
        self._keep_smallest(other.sample_keys, other.sample_prio, other.sample_rows)
        if other.sens_sum is not None:
            self.sens_sum = (
                other.sens_sum.clone() if self.sens_sum is None else self.sens_sum + other.sens_sum
            )
        self.sens_count += other.sens_count
        self.holdout = sorted(self.holdout + other.holdout, key=_hold_key)
        self.model_params = self.model_params or other.model_params
        return self

    def state(self) -> dict:
        """Plain data for transport and storage (numpy arrays and one JSON string under
        ``"meta"``; no pickled objects): the inverse of :meth:`from_state`."""
        meta = {
            **self._settings(),
            "count": self.count,
            "units": sorted(self.units),
            "sens_count": self.sens_count,
            "model_params": self.model_params,
            "holdout": [[w, f] for w, _, _, f in self.holdout],
            "has_sums": self.sums is not None,
        }
        out: dict = {"meta": json.dumps(meta)}
        if self.sums is not None:
            for g, (s, m) in enumerate(zip(self.sums, self.grams)):
                out[f"sum{g}"], out[f"gram{g}"] = s.cpu().numpy(), m.cpu().numpy()
        out["sample_keys"], out["sample_prio"] = self.sample_keys, self.sample_prio
        out["sample_rows"] = self.sample_rows.cpu().numpy()
        if self.sens_sum is not None:
            out["sens_sum"] = self.sens_sum.numpy()
        for i, (_, k, v, _) in enumerate(self.holdout):  # bf16 travels as its int16 bits
            out[f"hold{i}.k"] = k.view(torch.int16).numpy()
            out[f"hold{i}.v"] = v.view(torch.int16).numpy()
        return out

    @classmethod
    def from_state(cls, state: dict) -> ShardStats:
        """Statistics from :meth:`state` (arrays are copied).

        Raises:
            CalibrationError: the state is malformed.
        """
        try:
            meta = json.loads(state["meta"])
            out = cls(
                tuple(meta["kv_shape"]),
                RopeParams.from_dict(meta["rope"]),
                [FeatureGroup(**g) for g in meta["groups"]],
                meta["n_sink"],
                meta["sample_tokens"],
                meta["seed"],
                meta["undo_rope"],
            )
            out.count, out.units = meta["count"], set(meta["units"])
            out.sens_count, out.model_params = meta["sens_count"], meta["model_params"]
            if meta["has_sums"]:
                n = len(out.slices)
                out.sums = [_tensor(state[f"sum{g}"]) for g in range(n)]
                out.grams = [_tensor(state[f"gram{g}"]) for g in range(n)]
            out.sample_keys = np.array(state["sample_keys"], dtype=np.int64).reshape(-1, 2)
            out.sample_prio = np.array(state["sample_prio"], dtype=np.uint64)
            out.sample_rows = torch.tensor(np.array(state["sample_rows"]))
            if "sens_sum" in state:
                out.sens_sum = torch.tensor(np.array(state["sens_sum"]))
            out.holdout = [
                (
                    w,
                    torch.tensor(np.array(state[f"hold{i}.k"])).view(torch.bfloat16),
                    torch.tensor(np.array(state[f"hold{i}.v"])).view(torch.bfloat16),
                    f,
                )
                for i, (w, f) in enumerate(meta["holdout"])
            ]
            return out
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CalibrationError(f"malformed calibration statistics: {exc}") from exc

    def nbytes(self) -> int:
        """Bytes of the arrays :meth:`state` carries (what a worker puts in the object
        store)."""
        return sum(v.nbytes for v in self.state().values() if isinstance(v, np.ndarray))


def _hold_key(h) -> tuple[int, int]:
    return (h[0], h[3])


def _host_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` as bf16 on the host."""
    return x.to(device="cpu", dtype=torch.bfloat16)


def _tensor(a) -> torch.Tensor:
    """A tensor owning a copy of array ``a`` (one copy: Ray hands read-only buffers)."""
    return torch.from_numpy(np.array(a))
