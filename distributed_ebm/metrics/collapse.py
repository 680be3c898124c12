"""A measurable definition of collapse, checked every iteration.

A run has collapsed when one of these holds (the divergence checks for `patience` consecutive
iterations after `warmup`, energy_pinned for `energy_pinned_patience`):

- nonfinite:   a score, the loss or a chain is NaN or Inf (always stops the run);
- r_diverged:  the smoothed response distance R exceeds `r_ratio_max` × its best smoothed value;
- energy_diverged: |mean Φ(data) − mean Φ(chains)| exceeds `energy_gap_max` standard deviations
               of Φ over the data batch (smoothed; the whole group's batch with several workers);
- energy_pinned: with the energy penalty α = model.energy_l2 > 0, the smoothed |mean Φ(data) −
               mean Φ(chains)| exceeds `energy_pinned_max` × 1/α. The penalty bounds that gap by
               1/α (Φ(data) = 1/(2α), Φ(chains) = −1/(2α) is the loss's minimum when the chains
               cannot follow), so a gap near it means the sampler has lost the data and the energy
               only separates the two sets: samples stop improving while R and the gap in data-Φ
               standard deviations can stay below their thresholds for hundreds of iterations;
- saturated:   the chains' excess saturation, (s_chains − s_data) / (1 − s_data) with s the
               fraction of entries at the bounds of [-1, 1], exceeds `saturation_max`: the share
               of the data's unsaturated entries that the chains have pushed to the bounds.

A multi-grid model (MGCN) logs the gap, Φ and saturations of every grid as `grid{size}_{name}`;
the energy and saturation checks read the worst grid, since one grid's energy can run away while
the finest grid's chains still look fine (its chains start from the runaway grid's, so the finest
grid only shows it later). R stays the finest grid's: the samples are its chains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import CollapseConfig

BOUND = 0.999  # |x| at or beyond this counts as sitting at the bounds of [-1, 1]


def saturation(x: torch.Tensor) -> torch.Tensor:
    """Fraction of entries of x at or beyond the bounds of [-1, 1] (a 0-d tensor, not read back)."""
    return (x.detach().abs() >= BOUND).float().mean()


def excess_saturation(chain_saturation: float, data_saturation: float) -> float:
    """(s_chains − s_data) / (1 − s_data): 0 when chains saturate like data, 1 when fully saturated."""
    return (chain_saturation - data_saturation) / max(1.0 - data_saturation, 1e-6)


def energy_gap_z(phi_data: torch.Tensor, phi_syn: torch.Tensor, *,
                 sum_over_group: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """|mean Φ(data) − mean Φ(chains)| in units of the data batch's Φ standard deviation (a 0-d
    float64 tensor on Φ's device, not read back).

    With `sum_over_group` (distributed.all_reduce_sum) the batches are the whole group's: the
    means and the (unbiased) deviation come from Φ's counts, sums and sums of squares summed over
    the group, in float64, not from a mean of per-worker gaps."""
    d, s = phi_data.detach().double(), phi_syn.detach().double()
    moments = torch.stack([d.new_full((), len(d)), d.sum(), d.square().sum(), s.new_full((), len(s)), s.sum()])
    n_data, sum_data, squares_data, n_syn, sum_syn = (
        moments if sum_over_group is None else sum_over_group(moments)).unbind()
    mean_data = sum_data / n_data
    variance = torch.where(n_data > 1, (squares_data - sum_data * mean_data) / (n_data - 1).clamp_min(1), 0.0)
    spread = variance.clamp_min(0.0).sqrt()
    return (mean_data - sum_syn / n_syn).abs() / spread.clamp_min(1e-6)


def grid_values(metrics: dict[str, float], name: str) -> list[float]:
    """`name`'s value in metrics, then each grid's (`grid{size}_{name}`, a multi-grid model's)."""
    grids = [v for k, v in metrics.items()
             if k.startswith("grid") and k.endswith(f"_{name}") and k[4:-len(name) - 1].isdigit()]
    return [metrics[name], *grids]


def worst_grid(metrics: dict[str, float], energy_l2: float) -> dict[str, float]:
    """The energy gap (in data-Φ stds), the pinned gap α·|Φ(data) − Φ(chains)| and the excess
    saturation of the worst grid: for a single-grid model, its own."""
    saturations = zip(grid_values(metrics, "chain_saturation"), grid_values(metrics, "data_saturation"))
    worst = {"energy_gap_z": max(grid_values(metrics, "energy_gap_z")),
             "excess_saturation": max(excess_saturation(c, d) for c, d in saturations)}
    if energy_l2:
        worst["pinned"] = energy_l2 * max(abs(d - c) for d, c in zip(grid_values(metrics, "phi_data"),
                                                                     grid_values(metrics, "phi_chains")))
    return worst


class CollapseDetector:
    """Tracks the collapse conditions over iterations; its state is checkpointed."""

    def __init__(self, config: CollapseConfig, *, energy_l2: float = 0.0):
        self.config = config
        self.energy_l2 = energy_l2  # α of the energy penalty (model.energy_l2); 0: no energy_pinned check
        self.r_ema: float | None = None
        self.gap_ema: float | None = None
        self.pinned_ema: float | None = None  # smoothed α·|mean Φ(data) − mean Φ(chains)|
        self.best_r = math.inf
        self.streaks = {"r_diverged": 0, "energy_diverged": 0, "energy_pinned": 0, "saturated": 0}
        self.seen = 0
        self.first: dict | None = None  # {"iteration", "reason"} of the first collapse

    def update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float | str]:
        """Add one iteration's metrics; return the collapse metrics for that iteration.

        Reads `response_distance`, `energy_gap_z`, `chain_saturation`, `data_saturation` and the
        flag `nonfinite` from metrics; with α > 0 also `phi_data` and `phi_chains`; and each grid's
        `grid{size}_`-prefixed gap, saturations and Φ where present (`worst_grid`).
        """
        cfg = self.config
        self.seen += 1
        reason = ""
        if metrics.get("nonfinite", 0.0) or not all(
            math.isfinite(v) for v in metrics.values() if isinstance(v, float)
        ):
            reason = "nonfinite"
        else:
            worst = worst_grid(metrics, self.energy_l2)
            self.r_ema = self._smooth(self.r_ema, metrics["response_distance"])
            self.gap_ema = self._smooth(self.gap_ema, worst["energy_gap_z"])
            if self.energy_l2:
                self.pinned_ema = self._smooth(self.pinned_ema, worst["pinned"])
            if self.seen > cfg.warmup:
                self.best_r = min(self.best_r, self.r_ema)
            conditions = {
                "r_diverged": self.seen > cfg.warmup and self.r_ema > cfg.r_ratio_max * self.best_r,
                "energy_diverged": self.seen > cfg.warmup and self.gap_ema > cfg.energy_gap_max,
                "energy_pinned": self.seen > cfg.warmup and self.pinned_ema is not None
                and self.pinned_ema > cfg.energy_pinned_max,
                "saturated": worst["excess_saturation"] > cfg.saturation_max,
            }
            for name, holds in conditions.items():
                self.streaks[name] = self.streaks[name] + 1 if holds else 0
                patience = cfg.energy_pinned_patience if name == "energy_pinned" else cfg.patience
                if not reason and self.streaks[name] >= patience:
                    reason = name
        if reason and self.first is None:
            self.first = {"iteration": iteration, "reason": reason}
        r_ratio = self.r_ema / self.best_r if self.r_ema is not None and math.isfinite(self.best_r) else 1.0
        return {
            "collapse": 1.0 if reason else 0.0,
            "collapse_reason": reason,
            "collapse_r_ratio": r_ratio,
            "collapse_energy_gap": self.gap_ema if self.gap_ema is not None else 0.0,
            "collapse_energy_pinned": self.pinned_ema if self.pinned_ema is not None else 0.0,
        }

    def _smooth(self, average: float | None, value: float) -> float:
        """The exponential average (collapse.ema) of a condition's value, started at its first value."""
        return value if average is None else self.config.ema * average + (1 - self.config.ema) * value

    @property
    def healthy(self) -> bool:
        """No condition is building up (every streak is zero): a state a recovery may return to."""
        return not any(self.streaks.values())

    def state_dict(self) -> dict:
        return {
            "r_ema": self.r_ema,
            "gap_ema": self.gap_ema,
            "pinned_ema": self.pinned_ema,
            "best_r": self.best_r,
            "streaks": dict(self.streaks),
            "seen": self.seen,
            "first": self.first,
        }

    def load_state_dict(self, state: dict) -> None:
        self.r_ema, self.gap_ema, self.best_r = state["r_ema"], state["gap_ema"], state["best_r"]
        self.pinned_ema = state.get("pinned_ema")  # absent in checkpoints written before energy_pinned
        self.streaks = {**dict.fromkeys(self.streaks, 0), **state["streaks"]}
        self.seen, self.first = state["seen"], state["first"]
