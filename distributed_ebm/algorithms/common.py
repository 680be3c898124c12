"""What every algorithm shares: the training state, the energy loss and its step, optimisers,
Langevin knobs and the JKO γ draw. An algorithm composes these pure pieces (langevin, losses) and
owns no loop, no files and no rank logic: the gradient all-reduce is a callable the training loop
hands in; each worker's share of the global batch and the global-batch metrics come from
distributed.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..chains import ChainBank
from ..config import ConfigError, LangevinConfig, OptimConfig, RunConfig
from ..distributed import all_reduce_sum, shared_generator
from ..ema import ema_copy, update_ema
from ..energy import Energy
from ..generator import Generator
from ..langevin import LangevinSettings
from ..losses import (
    energy_l2_loss,
    energy_u,
    jko_loss,
    mle_loss,
    score_grad_penalty,
)
from ..metrics.collapse import energy_gap_z, saturation

GradientSync = Callable[[list[torch.Tensor]], None]


def no_sync(params: list[torch.Tensor]) -> None:
    """Single-process gradient 'all-reduce': nothing to do."""


# What a run fitted on its data and saved in `meta` (model.clusters' k-means, MGCN's first-grid Gaussian):
# sampling, inpainting and serving read them there, so loading a model state brings them back.
FITTED_META = ("clusters", "first_grid")


@dataclass
class TrainState:
    """Everything an algorithm updates: networks, optimisers and banks, by name."""

    config: RunConfig
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    banks: dict[str, ChainBank]
    meta: dict = field(default_factory=dict)  # sample_shape, data_mean, num_classes: what inference needs
    data_range: tuple[float, float] = (-1.0, 1.0)
    sync_gradients: GradientSync = field(default=no_sync)
    ema: dict[str, nn.Module] = field(default_factory=dict)  # train.ema_decay: EMA of `models`, by name
    sampler: LangevinSettings = field(init=False)  # the run's Langevin knobs, from config.langevin

    def __post_init__(self) -> None:
        self.sampler = langevin_settings(self.config.langevin, self.data_range)
        if self.config.train.ema_decay is not None and not self.ema:
            self.ema = {k: ema_copy(self.models[k]) for k in self.averaged_models()}

    def averaged_models(self) -> list[str]:
        """The names of the networks train.ema_decay averages: train.ema_models, or all of them."""
        names = self.config.train.ema_models
        if names is None:
            return list(self.models)
        unknown = sorted(set(names) - set(self.models))
        if unknown or not names:
            raise ConfigError(
                f"train.ema_models={list(names)} must name some of this model's networks "
                f"{sorted(self.models)}{f', not {unknown}' if unknown else ''}. Fix the list, or remove it to average all."
            )
        return list(dict.fromkeys(names))

    @property
    def fresh_sampler(self) -> LangevinSettings:
        """The knobs of fresh chains (`sample`, inpainting): δ anneals to langevin.sample_anneal_to."""
        return self.sampler.for_fresh_chains()

    @property
    def energy(self) -> Energy:
        """The energy Φ (for multi-grid models, the finest grid's)."""
        return self.models["energy"] if "energy" in self.models else self.models["grids"][-1]

    @property
    def generator(self) -> Generator | None:
        return self.models.get("generator")

    def model_state(self) -> dict:
        """Networks, optimisers and, with train.ema_decay, the EMA weights (identical on every rank)."""
        state = {
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "meta": self.meta,
        }
        if self.ema:
            state["ema"] = {k: m.state_dict() for k, m in self.ema.items()}
        return state

    def load_model_state(self, state: dict) -> None:
        """Load `model_state()`'s output. A checkpoint without EMA weights (written before EMA
        was turned on) starts the EMA from its live weights."""
        for key, model in self.models.items():
            model.load_state_dict(state["models"][key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        saved_meta = state.get("meta", {})
        self.meta.update({k: saved_meta[k] for k in FITTED_META if k in saved_meta})
        saved = state.get("ema") or {}
        for key, average in self.ema.items():
            average.load_state_dict(saved[key] if key in saved else self.models[key].state_dict())

    def models_of(self, optimizer: str) -> list[str]:
        """The names of the models whose parameters the optimiser `optimizer` steps."""
        held = {id(p) for group in self.optimizers[optimizer].param_groups for p in group["params"]}
        return [k for k, m in self.models.items() if any(id(p) in held for p in m.parameters())]

    def bank_state(self) -> dict:
        """This process's shard of every bank."""
        return {k: b.state_dict() for k, b in self.banks.items()}

    def load_bank_state(self, state: dict) -> None:
        for key, bank in self.banks.items():
            bank.load_state_dict(state[key])


@dataclass
class StepOutput:
    """What one learning iteration reports."""

    metrics: dict[str, torch.Tensor | float]  # 0-d tensors on the device (read at the loop's flush: no host sync)
    samples: torch.Tensor  # the chains after this iteration's Langevin run (x_syn), finest grid


def make_optimizer(params: list[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (the papers' rule, lr = λ) or Adam over `params`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    raise ConfigError(f"Unknown optim.optimizer '{config.optimizer}'. Choose 'sgd' or 'adam'.")


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor | float:
    """The norm of the gradients of `params` (a 0-d tensor on their device; 0.0 without any)."""
    grads = [p.grad.flatten() for p in params if p.grad is not None]
    return torch.cat(grads).norm() if grads else 0.0


def langevin_settings(config: LangevinConfig, data_range: tuple[float, float]) -> LangevinSettings:
    """The sampler knobs of `config` (L steps per call by default; clamped to `data_range` when
    langevin.clamp is on; constant δ, annealed for fresh chains only: `for_fresh_chains`): the one
    place the config's Langevin section is read."""
    return LangevinSettings(
        steps=config.langevin_steps,
        step_size=config.step_size,
        ref_sigma=config.ref_sigma,
        clamp=data_range if config.clamp else None,
        grad_clip=config.grad_clip,
        sample_anneal_to=config.sample_anneal_to,
        compile=config.compile,
        autocast=config.autocast,
        channels_last=config.channels_last,
    )


def jko_gamma(seed: int, iteration: int) -> float:
    """γ ~ U[0, 1] of the JKO penalty: one draw per iteration, the same on every rank, drawn on
    the host (a CPU generator, read through numpy: never a device sync)."""
    return float(torch.rand((), generator=shared_generator(seed, iteration)).numpy())


@dataclass
class EnergyLoss:
    """An energy's loss on one batch, with its scores Φ (detached) and its terms as floats."""

    loss: torch.Tensor
    phi_data: torch.Tensor
    phi_syn: torch.Tensor
    terms: dict[str, torch.Tensor | float]  # 0-d tensors; loss_mle (+ penalty_prev, penalty_syn, gamma with JKO; loss_l2 with α > 0)


def energy_loss(energy: Energy, data: torch.Tensor, data_labels: torch.Tensor | None, x_prev: torch.Tensor,
                x_syn: torch.Tensor, syn_labels: torch.Tensor | None, *, gamma: torch.Tensor | float | None = None,
                jko_weight: float = 0.0, penalty_params: str = "theta", energy_l2: float = 0.0,
                shares: tuple[float | torch.Tensor, float | torch.Tensor] = (1.0, 1.0)) -> EnergyLoss:
    """L_mle, or with `gamma` given L_w = L_mle + (β/2)((1 − γ) P(x_prev) + γ P(x_syn)); plus
    α (mean Φ(y)² + mean Φ(x_syn)²) with `energy_l2` = α > 0.

    Args:
        gamma: γ ∈ [0, 1] (drawn by the caller: `jko_gamma`); None: no JKO penalty.
        jko_weight: β, the weight of the JKO time piece.
        penalty_params: which parameters the penalty's gradient reaches, "theta" or "all".
        energy_l2: α, the weight of the energy-magnitude penalty (Du & Mordatch 2019); 0: off.
        shares: `distributed.batch_shares` of the data and the chains (1, 1 in one process): each
            mean over data (chains) is weighted by its share, this worker's part of the global mean.
    """
    data_share, chain_share = shares
    phi_data = energy(data, data_labels) if data_labels is not None else energy(data)
    phi_syn = energy(x_syn, syn_labels) if syn_labels is not None else energy(x_syn)
    loss = mle_loss(data_share * phi_data, chain_share * phi_syn)  # the means are linear in Φ
    terms: dict[str, torch.Tensor | float] = {"loss_mle": loss.detach()}
    if energy_l2:  # mean (√s·Φ)² = s·mean Φ²
        l2 = energy_l2_loss(data_share**0.5 * phi_data, chain_share**0.5 * phi_syn, weight=energy_l2)
        loss = loss + l2
        terms["loss_l2"] = l2.detach()
    if gamma is not None:
        score = energy.score_reaching(penalty_params, syn_labels)
        penalty_prev, penalty_syn = (chain_share * score_grad_penalty(score, x) for x in (x_prev, x_syn))
        loss = jko_loss(loss, penalty_prev, penalty_syn, jko_weight=jko_weight, gamma=gamma)
        terms.update(penalty_prev=penalty_prev.detach(), penalty_syn=penalty_syn.detach(), gamma=float(gamma))
    return EnergyLoss(loss, phi_data.detach(), phi_syn.detach(), terms)


def nonfinite(*tensors: torch.Tensor) -> torch.Tensor:
    """1.0 if any entry of `tensors` is NaN or ±Inf, else 0.0: a 0-d tensor, not read back."""
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    return (~finite).float()


def energy_diagnostics(result: EnergyLoss, data: torch.Tensor, x_syn: torch.Tensor, *, ref_sigma: float,
                       shares: tuple[float | torch.Tensor, float | torch.Tensor] = (1.0, 1.0)) -> dict[str, torch.Tensor]:
    """The loss, mean Φ and U on data and chains, and what the collapse detector watches:
    the energy gap, chain and data saturation, and whether anything became NaN/Inf. Means are
    weighted by their `shares` (`energy_loss`), so that the group's average is the global batch's;
    the energy gap is the global batch's. All are 0-d tensors on the device: nothing is read back."""
    (data_share, chain_share), phi_data, phi_syn = shares, result.phi_data, result.phi_syn
    return {
        "loss": result.loss.detach(),
        "phi_data": data_share * phi_data.mean(),
        "phi_chains": chain_share * phi_syn.mean(),
        "energy_data": data_share * energy_u(phi_data, data, ref_sigma=ref_sigma).mean(),
        "energy_chains": chain_share * energy_u(phi_syn, x_syn, ref_sigma=ref_sigma).mean(),
        "energy_gap_z": energy_gap_z(phi_data, phi_syn, sum_over_group=all_reduce_sum),
        "chain_saturation": chain_share * saturation(x_syn),
        "data_saturation": data_share * saturation(data),
        "nonfinite": nonfinite(x_syn, result.loss),
    }


def energy_objective(state: TrainState, energy: Energy, data: torch.Tensor, data_labels: torch.Tensor | None,
                     x_prev: torch.Tensor, x_syn: torch.Tensor, syn_labels: torch.Tensor | None, *,
                     jko: bool, iteration: int, shares: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The run's energy loss (L_w with the config's β and this iteration's γ when `jko`) and its
    metrics; `shares`: the data's and the chains' `batch_shares`."""
    cfg = state.config
    gamma = jko_gamma(cfg.train.seed, iteration) if jko else None
    result = energy_loss(energy, data, data_labels, x_prev, x_syn, syn_labels, gamma=gamma,
                         jko_weight=cfg.model.jko_weight, penalty_params=cfg.model.penalty_params,
                         energy_l2=cfg.model.energy_l2, shares=shares)
    metrics = {**result.terms, **energy_diagnostics(result, data, x_syn, ref_sigma=cfg.langevin.ref_sigma, shares=shares)}
    return result.loss, metrics


def optimizer_step(state: TrainState, name: str, loss: torch.Tensor, groups: dict[str, list[nn.Parameter]],
                   clip: float | None) -> dict[str, torch.Tensor | float]:
    """Backward, all-reduce the gradients, clip, step the optimiser `name`, then step the EMA of
    the models it updates (train.ema_decay).

    Returns the all-reduced gradient norm of each parameter group, before clipping."""
    params = [p for group in groups.values() for p in group]
    optimizer = state.optimizers[name]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.sync_gradients([p for p in params if p.grad is not None])
    norms = {f"grad_norm_{k}": grad_norm(v) for k, v in groups.items()}
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    for key in state.models_of(name) if state.ema else ():  # off: no per-step walk over the parameters
        if key in state.ema:  # train.ema_models may leave this optimiser's models live
            update_ema(state.ema[key], state.models[key], decay=state.config.train.ema_decay)
    return norms


def energy_step(state: TrainState, energy: Energy, loss: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """One optimiser step on θ and w of `energy` (the "energy" optimiser); gradient norms."""
    theta, w = energy.split_parameters()
    return optimizer_step(state, "energy", loss, {"theta": theta, "w": w}, state.config.optim.grad_clip)


def chains_per_step(batch_size: int, bank_size: int, bank: ChainBank) -> int:
    """How many chains of this rank's bank one iteration updates.

    `batch_size == bank_size` in the config means "every chain of the shard" (Algorithm 1); it
    stays so when a resume on another number of workers re-splits the bank into shards of a
    different size. Otherwise the configured batch must fit the shard.
    """
    if batch_size == bank_size:
        return len(bank)
    if batch_size > len(bank):
        raise ConfigError(
            f"chains.batch_size ({batch_size}) exceeds this worker's {len(bank)} chains (after re-splitting "
            "the bank for a new number of workers). Lower chains.batch_size, or set it equal to the bank size "
            "to update every chain of each shard."
        )
    return batch_size


def _num_classes(config: RunConfig, num_classes: int) -> int:
    """The classes the networks are built for: the data's labels (model.conditional), the
    clusters (model.clusters) or none."""
    if config.model.clusters:
        return config.model.clusters
    if not config.model.conditional:
        return 0
    if num_classes < 2:
        raise ConfigError(
            "model.conditional needs labelled data with at least 2 classes; this data source has none. "
            "Use a labelled source (digits, npz with 'y', a folder of class sub-folders) or set model.conditional=false."
        )
    return num_classes

