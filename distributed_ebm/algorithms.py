"""The learning algorithms (FRAME, wFRAME, GCN, wGCN, …) as one `train_step` each, in a registry.

An algorithm builds a `TrainState` (networks, optimisers, chain banks) and advances it by one
learning iteration. It composes the pure pieces (langevin, losses) and owns no loop, no files and
no rank logic: the gradient all-reduce is a callable the training loop hands in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .chains import ChainBank
from .config import ConfigError, OptimConfig, RunConfig
from .energy import Energy, build_energy
from .langevin import langevin
from .losses import energy_u, jko_loss, mle_loss, score_grad_penalty
from .metrics.collapse import energy_gap_z, saturation

GradientSync = Callable[[list[torch.Tensor]], None]


def no_sync(params: list[torch.Tensor]) -> None:
    """Single-process gradient 'all-reduce': nothing to do."""


@dataclass
class TrainState:
    """Everything an algorithm updates: networks, optimisers and banks, by name."""

    config: RunConfig
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    banks: dict[str, ChainBank]
    meta: dict = field(default_factory=dict)  # sample_shape, data_mean: what inference needs to rebuild
    data_range: tuple[float, float] = (-1.0, 1.0)
    sync_gradients: GradientSync = field(default=no_sync)

    @property
    def energy(self) -> Energy:
        return self.models["energy"]

    def model_state(self) -> dict:
        """Networks and optimisers (identical on every rank)."""
        return {
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "meta": self.meta,
        }

    def load_model_state(self, state: dict) -> None:
        for key, model in self.models.items():
            model.load_state_dict(state["models"][key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])

    def bank_state(self) -> dict:
        """This process's shard of every bank."""
        return {k: b.state_dict() for k, b in self.banks.items()}

    def load_bank_state(self, state: dict) -> None:
        for key, bank in self.banks.items():
            bank.load_state_dict(state[key])


@dataclass
class StepOutput:
    """What one learning iteration reports."""

    metrics: dict[str, float]
    samples: torch.Tensor  # the chains after this iteration's Langevin run (x_syn)


def make_optimizer(params: list[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (the papers' rule, lr = λ) or Adam over `params`."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    raise ConfigError(f"Unknown optim.optimizer '{config.optimizer}'. Choose 'sgd' or 'adam'.")


def grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


@dataclass(frozen=True)
class EBMAlgorithm:
    """FRAME / GCN learning by persistent Langevin chains, with or without the JKO penalty.

    FRAME and GCN differ only in their energy (a fixed filter bank with θ, or a ConvNet with θ and
    w); the "w" variants add the JKO / Wasserstein penalty (ALGORITHMS.md §3).
    """

    name: str
    default_energy: str
    jko: bool
    description: str

    def build(
        self,
        config: RunConfig,
        sample_shape: tuple[int, ...],
        *,
        device: torch.device,
        generator: torch.Generator,
        data_mean: torch.Tensor,
        first_chain_id: int = 0,
    ) -> TrainState:
        """Networks (seeded by model.seed, identical on every rank), optimiser and chain bank shard."""
        energy = build_energy(config.model, sample_shape, config.model.energy or self.default_energy).to(device)
        params = [p for p in energy.parameters() if p.requires_grad]
        bank = ChainBank.create(
            config.chains.bank_size,
            sample_shape,
            generator=generator,
            first_id=first_chain_id,
            device=device,
            init=config.chains.init,
            reinit_prob=config.chains.reinit_prob,
            init_value=data_mean.to(device),
        )
        return TrainState(
            config=config,
            models={"energy": energy},
            optimizers={"energy": make_optimizer(params, config.optim)},
            banks={"chains": bank},
            meta={"sample_shape": list(sample_shape), "data_mean": data_mean.cpu()},
        )

    def train_step(
        self, state: TrainState, data: torch.Tensor, labels: torch.Tensor | None, *, generator: torch.Generator
    ) -> StepOutput:
        """One learning iteration: Langevin on the chains, then one optimiser step on θ, w."""
        cfg = state.config
        energy, bank, optimizer = state.energy, state.banks["chains"], state.optimizers["energy"]
        index, x_prev = bank.sample(cfg.chains.batch_size, generator)
        x_syn = langevin(
            energy,
            x_prev,
            steps=cfg.langevin.langevin_steps,
            step_size=cfg.langevin.step_size,
            ref_sigma=cfg.langevin.ref_sigma,
            generator=generator,
            clamp=state.data_range if cfg.langevin.clamp else None,
        )
        bank.write(index, x_syn)

        phi_data, phi_syn = energy(data), energy(x_syn)
        loss = mle_loss(phi_data, phi_syn)
        metrics: dict[str, float] = {"loss_mle": float(loss.detach())}
        if self.jko:
            gamma = torch.rand((), generator=generator, device=x_syn.device)
            score = energy.score_reaching(cfg.model.penalty_params)
            penalty_prev, penalty_syn = score_grad_penalty(score, x_prev), score_grad_penalty(score, x_syn)
            loss = jko_loss(loss, penalty_prev, penalty_syn, jko_weight=cfg.model.jko_weight, gamma=gamma)
            metrics.update(penalty_prev=float(penalty_prev.detach()), penalty_syn=float(penalty_syn.detach()), gamma=float(gamma))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        theta, w = energy.split_parameters()
        state.sync_gradients([p for p in theta + w if p.grad is not None])
        metrics.update(grad_norm_theta=grad_norm(theta), grad_norm_w=grad_norm(w))
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(theta + w, cfg.optim.grad_clip)
        optimizer.step()

        sigma = cfg.langevin.ref_sigma
        phi_data, phi_syn = phi_data.detach(), phi_syn.detach()
        metrics.update(
            loss=float(loss),
            phi_data=float(phi_data.mean()),
            phi_chains=float(phi_syn.mean()),
            energy_data=float(energy_u(phi_data, data, ref_sigma=sigma).mean()),
            energy_chains=float(energy_u(phi_syn, x_syn, ref_sigma=sigma).mean()),
            energy_gap_z=energy_gap_z(phi_data, phi_syn),
            chain_saturation=saturation(x_syn),
            data_saturation=saturation(data),
            nonfinite=float(not bool(torch.isfinite(x_syn).all() and torch.isfinite(loss))),
        )
        return StepOutput(metrics, x_syn)


ALGORITHMS: dict[str, EBMAlgorithm] = {
    "frame": EBMAlgorithm("frame", "frame", jko=False, description="FRAME: fixed filter bank, θ by MLE"),
    "wframe": EBMAlgorithm("wframe", "frame", jko=True, description="wFRAME: FRAME with the JKO penalty"),
    "gcn": EBMAlgorithm("gcn", "conv", jko=False, description="GCN: ConvNet filters w and θ by MLE"),
    "wgcn": EBMAlgorithm("wgcn", "conv", jko=True, description="wGCN: GCN with the JKO penalty"),
}


def get_algorithm(name: str) -> EBMAlgorithm:
    """The registered algorithm `name`, or a ConfigError listing the valid names."""
    if name not in ALGORITHMS:
        raise ConfigError(f"Unknown model.algorithm '{name}'. Choose one of {sorted(ALGORITHMS)}.")
    return ALGORITHMS[name]
