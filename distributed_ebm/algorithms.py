"""The learning algorithms of the FRAME family as one `train_step` each, in a registry.

An algorithm builds a `TrainState` (networks, optimisers, chain and latent banks) and advances it
by one learning iteration. It composes the pure pieces (langevin, losses) and owns no loop, no
files and no rank logic: the gradient all-reduce is a callable the training loop hands in; each
worker's share of the global batch and the global-batch metrics come from distributed.py.

- FRAME / wFRAME / GCN / wGCN (`EBMAlgorithm`): persistent chains, MLE (+ JKO penalty).
- MGCN / wMGCN (`MultiGridAlgorithm`): one energy per grid, chains passed coarse to fine.
- GGCN and its variants (`GGCNAlgorithm`): a generator g(ζ; ξ) starts the chains; learned
  hidden space (LHS) or fresh ζ (\\LHS); reconstruction or amortised (AMS) generator loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .chains import ChainBank
from .config import ChainConfig, ConfigError, LangevinConfig, OptimConfig, RunConfig
from .distributed import all_reduce_sum, batch_shares, shared_generator
from .ema import ema_copy, update_ema
from .energy import Energy, build_energy
from .generator import Generator, build_generator
from .langevin import LangevinSettings
from .losses import (
    ams_loss,
    energy_l2_loss,
    energy_u,
    jko_loss,
    mle_loss,
    reconstruction_loss,
    score_grad_penalty,
)
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
    meta: dict = field(default_factory=dict)  # sample_shape, data_mean, num_classes: what inference needs
    data_range: tuple[float, float] = (-1.0, 1.0)
    sync_gradients: GradientSync = field(default=no_sync)
    ema: dict[str, nn.Module] = field(default_factory=dict)  # train.ema_decay: EMA of `models`, by name
    sampler: LangevinSettings = field(init=False)  # the run's Langevin knobs, from config.langevin

    def __post_init__(self) -> None:
        self.sampler = langevin_settings(self.config.langevin, self.data_range)
        if self.config.train.ema_decay is not None and not self.ema:
            self.ema = {k: ema_copy(m) for k, m in self.models.items()}

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

    metrics: dict[str, float]
    samples: torch.Tensor  # the chains after this iteration's Langevin run (x_syn), finest grid


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


def jko_gamma(seed: int, iteration: int, device: torch.device) -> torch.Tensor:
    """γ ~ U[0, 1] of the JKO penalty: one draw per iteration, the same on every rank."""
    return torch.rand((), generator=shared_generator(seed, iteration)).to(device)


@dataclass
class EnergyLoss:
    """An energy's loss on one batch, with its scores Φ (detached) and its terms as floats."""

    loss: torch.Tensor
    phi_data: torch.Tensor
    phi_syn: torch.Tensor
    terms: dict[str, float]  # loss_mle (+ penalty_prev, penalty_syn, gamma with JKO; loss_l2 with α > 0)


def energy_loss(energy: Energy, data: torch.Tensor, data_labels: torch.Tensor | None, x_prev: torch.Tensor,
                x_syn: torch.Tensor, syn_labels: torch.Tensor | None, *, gamma: torch.Tensor | float | None = None,
                jko_weight: float = 0.0, penalty_params: str = "theta", energy_l2: float = 0.0,
                shares: tuple[float, float] = (1.0, 1.0)) -> EnergyLoss:
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
    terms: dict[str, float] = {"loss_mle": float(loss.detach())}
    if energy_l2:  # mean (√s·Φ)² = s·mean Φ²
        l2 = energy_l2_loss(data_share**0.5 * phi_data, chain_share**0.5 * phi_syn, weight=energy_l2)
        loss = loss + l2
        terms["loss_l2"] = float(l2.detach())
    if gamma is not None:
        score = energy.score_reaching(penalty_params, syn_labels)
        penalty_prev, penalty_syn = (chain_share * score_grad_penalty(score, x) for x in (x_prev, x_syn))
        loss = jko_loss(loss, penalty_prev, penalty_syn, jko_weight=jko_weight, gamma=gamma)
        terms.update(penalty_prev=float(penalty_prev.detach()), penalty_syn=float(penalty_syn.detach()),
                     gamma=float(gamma))
    return EnergyLoss(loss, phi_data.detach(), phi_syn.detach(), terms)


def energy_diagnostics(result: EnergyLoss, data: torch.Tensor, x_syn: torch.Tensor, *, ref_sigma: float,
                       shares: tuple[float, float] = (1.0, 1.0)) -> dict[str, float]:
    """The loss, mean Φ and U on data and chains, and what the collapse detector watches:
    the energy gap, chain and data saturation, and whether anything became NaN/Inf. Means are
    weighted by their `shares` (`energy_loss`), so that the group's average is the global batch's;
    the energy gap is the global batch's."""
    (data_share, chain_share), phi_data, phi_syn = shares, result.phi_data, result.phi_syn
    return {
        "loss": float(result.loss.detach()),
        "phi_data": data_share * float(phi_data.mean()),
        "phi_chains": chain_share * float(phi_syn.mean()),
        "energy_data": data_share * float(energy_u(phi_data, data, ref_sigma=ref_sigma).mean()),
        "energy_chains": chain_share * float(energy_u(phi_syn, x_syn, ref_sigma=ref_sigma).mean()),
        "energy_gap_z": energy_gap_z(phi_data, phi_syn, sum_over_group=all_reduce_sum),
        "chain_saturation": chain_share * saturation(x_syn),
        "data_saturation": data_share * saturation(data),
        "nonfinite": float(not bool(torch.isfinite(x_syn).all() and torch.isfinite(result.loss))),
    }


def energy_objective(state: TrainState, energy: Energy, data: torch.Tensor, data_labels: torch.Tensor | None,
                     x_prev: torch.Tensor, x_syn: torch.Tensor, syn_labels: torch.Tensor | None, *,
                     jko: bool, iteration: int, shares: tuple[float, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """The run's energy loss (L_w with the config's β and this iteration's γ when `jko`) and its
    metrics; `shares`: the data's and the chains' `batch_shares`."""
    cfg = state.config
    gamma = jko_gamma(cfg.train.seed, iteration, x_syn.device) if jko else None
    result = energy_loss(energy, data, data_labels, x_prev, x_syn, syn_labels, gamma=gamma,
                         jko_weight=cfg.model.jko_weight, penalty_params=cfg.model.penalty_params,
                         energy_l2=cfg.model.energy_l2, shares=shares)
    metrics = {**result.terms, **energy_diagnostics(result, data, x_syn, ref_sigma=cfg.langevin.ref_sigma, shares=shares)}
    return result.loss, metrics


def optimizer_step(state: TrainState, name: str, loss: torch.Tensor, groups: dict[str, list[nn.Parameter]],
                   clip: float | None) -> dict[str, float]:
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
    for key in state.models_of(name) if state.ema else ():
        update_ema(state.ema[key], state.models[key], decay=state.config.train.ema_decay)
    return norms


def energy_step(state: TrainState, energy: Energy, loss: torch.Tensor) -> dict[str, float]:
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
    if not config.model.conditional:
        return 0
    if num_classes < 2:
        raise ConfigError(
            "model.conditional needs labelled data with at least 2 classes; this data source has none. "
            "Use a labelled source (digits, npz with 'y', a folder of class sub-folders) or set model.conditional=false."
        )
    return num_classes


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

    def build(self, config: RunConfig, sample_shape: tuple[int, ...], *, device: torch.device,
              generator: torch.Generator, data_mean: torch.Tensor, num_classes: int = 0,
              rank: int = 0) -> TrainState:
        """Networks (seeded by model.seed, identical on every rank), optimiser and chain bank shard."""
        classes = _num_classes(config, num_classes)
        energy = build_energy(config.model, sample_shape, config.model.energy or self.default_energy, classes)
        energy = energy.to(device)
        bank = ChainBank.create(
            config.chains.bank_size, sample_shape, generator=generator, first_id=rank * config.chains.bank_size,
            device=device,
            init=config.chains.init, reinit_prob=config.chains.reinit_prob, init_value=data_mean.to(device),
            num_classes=classes,
        )
        params = [p for p in energy.parameters() if p.requires_grad]
        return TrainState(
            config=config,
            models={"energy": energy},
            optimizers={"energy": make_optimizer(params, config.optim)},
            banks={"chains": bank},
            meta={"sample_shape": list(sample_shape), "data_mean": data_mean.cpu(), "num_classes": classes},
        )

    def train_step(self, state: TrainState, data: torch.Tensor, labels: torch.Tensor | None, *,
                   generator: torch.Generator, iteration: int = 0) -> StepOutput:
        """One learning iteration: Langevin on the chains, then one optimiser step on θ, w."""
        cfg, energy, bank = state.config, state.energy, state.banks["chains"]
        index, x_prev = bank.sample(chains_per_step(cfg.chains.batch_size, cfg.chains.bank_size, bank), generator)
        syn_labels = bank.labels_at(index)
        x_syn = state.sampler(energy.score_fn(syn_labels), x_prev, generator=generator)
        bank.write(index, x_syn)
        data_labels = labels if syn_labels is not None else None
        loss, metrics = energy_objective(state, energy, data, data_labels, x_prev, x_syn, syn_labels,
                                         jko=self.jko, iteration=iteration,
                                         shares=batch_shares([len(data), len(x_syn)], x_syn.device))
        metrics.update(energy_step(state, energy, loss))
        return StepOutput(metrics, x_syn)

    def sample(self, state: TrainState, num: int, *, generator: torch.Generator, steps: int | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """Fresh chains: started like the bank's chains, run `steps` (default langevin.sample_steps)."""
        x0 = state.banks["chains"].initial_states(num, generator)
        steps = state.config.langevin.sample_steps if steps is None else steps
        return state.fresh_sampler(state.energy.score_fn(labels), x0, generator=generator, steps=steps)


def resample(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Down-sample (area average) or up-sample (`mode`: nearest or bilinear) images to size × size."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def multigrid_chains(
    energies: list[Energy],
    x_first: torch.Tensor,
    sizes: tuple[int, ...],
    *,
    upsample: str,
    sample: Callable[[Energy, torch.Tensor], torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Coarse-to-fine sampling: [(start, final) per grid].

    The first grid starts from `x_first` (the data mean down-sampled to its size); grid s starts
    from the final chains of grid s−1 up-sampled to its size.
    """
    chains, x = [], x_first
    for energy, size in zip(energies, sizes):
        start = resample(x, size, upsample)
        x = sample(energy, start)
        chains.append((start, x))
    return chains


@dataclass(frozen=True)
class MultiGridAlgorithm:
    """MGCN / wMGCN: one ConvNet energy per grid (model.grid_sizes), chains passed coarse to fine.

    The chains are not persistent: each iteration restarts them from the data mean down-sampled
    to the first grid (ALGORITHMS.md §3), as in multi-grid sampling. Each grid's energy is trained on data
    down-sampled to its size; the losses of all grids are summed (they share no parameters).
    """

    name: str
    jko: bool
    description: str
    default_energy: str = "conv"

    def build(self, config: RunConfig, sample_shape: tuple[int, ...], *, device: torch.device,
              generator: torch.Generator, data_mean: torch.Tensor, num_classes: int = 0,
              rank: int = 0) -> TrainState:
        if len(sample_shape) != 3:
            raise ConfigError(f"Multi-grid models need images; got samples of shape {sample_shape}.")
        sizes = config.model.grid_sizes
        if list(sizes) != sorted(sizes) or sizes[-1] != sample_shape[-1]:
            raise ConfigError(
                f"model.grid_sizes {list(sizes)} must increase and end at the image size {sample_shape[-1]}."
            )
        classes = _num_classes(config, num_classes)
        energies = nn.ModuleList(
            build_energy(config.model, (sample_shape[0], s, s), config.model.energy or "conv", classes, seed_offset=i)
            for i, s in enumerate(sizes)
        ).to(device)
        params = [p for p in energies.parameters() if p.requires_grad]
        return TrainState(
            config=config,
            models={"grids": energies},
            optimizers={"energy": make_optimizer(params, config.optim)},
            banks={},
            meta={"sample_shape": list(sample_shape), "data_mean": data_mean.cpu(), "num_classes": classes},
        )

    def first_grid(self, state: TrainState, batch_size: int) -> torch.Tensor:
        """`batch_size` copies of the data mean down-sampled to the first grid."""
        mean = state.meta["data_mean"].to(next(state.models["grids"].parameters()).device)
        return resample(mean, state.config.model.grid_sizes[0], state.config.model.upsample).expand(
            batch_size, -1, -1, -1).clone()

    def train_step(self, state: TrainState, data: torch.Tensor, labels: torch.Tensor | None, *,
                   generator: torch.Generator, iteration: int = 0) -> StepOutput:
        cfg = state.config
        energies = list(state.models["grids"])
        # The chains' classes are the data batch's, cycled when the chains outnumber the images.
        syn_labels = (labels[torch.arange(cfg.chains.batch_size, device=labels.device) % len(labels)]
                      if state.meta["num_classes"] else None)

        def sample(energy: Energy, x0: torch.Tensor) -> torch.Tensor:
            return state.sampler(energy.score_fn(syn_labels), x0, generator=generator)

        chains = multigrid_chains(energies, self.first_grid(state, cfg.chains.batch_size), cfg.model.grid_sizes,
                                  upsample=cfg.model.upsample, sample=sample)
        total, metrics = 0.0, {}
        shares = batch_shares([len(data), cfg.chains.batch_size], data.device)
        for energy, size, (start, final) in zip(energies, cfg.model.grid_sizes, chains):
            data_labels = labels if syn_labels is not None else None
            loss, grid_metrics = energy_objective(state, energy, resample(data, size, cfg.model.upsample),
                                                  data_labels, start, final, syn_labels, jko=self.jko,
                                                  iteration=iteration, shares=shares)
            total = total + loss
            metrics.update({f"grid{size}_{k}": v for k, v in grid_metrics.items() if k in ("loss", "phi_data", "phi_chains")})
            metrics.update(grid_metrics)  # the finest grid's metrics stay under the plain names
        theta, w = [], []
        for energy in energies:
            t, v = energy.split_parameters()
            theta, w = theta + t, w + v
        metrics.update(optimizer_step(state, "energy", total, {"theta": theta, "w": w}, cfg.optim.grad_clip))
        metrics["nonfinite"] = max(metrics["nonfinite"], float(not torch.isfinite(total).item()))
        return StepOutput(metrics, chains[-1][1])

    def sample(self, state: TrainState, num: int, *, generator: torch.Generator, steps: int | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse-to-fine chains from the data mean, `steps` (default L) Langevin steps per grid."""
        chains = multigrid_chains(
            list(state.models["grids"]), self.first_grid(state, num), state.config.model.grid_sizes,
            upsample=state.config.model.upsample,
            sample=lambda energy, x0: state.fresh_sampler(energy.score_fn(labels), x0, generator=generator, steps=steps),
        )
        return chains[-1][1]


@dataclass(frozen=True)
class GGCNAlgorithm:
    """GGCN (Algorithm 2): the generator g(ζ; ξ) proposes, Langevin on the wGCN synthesiser refines.

    Each iteration: x = g(ζ) → x̂ = L Langevin steps → θ, w step with L_w(x_prev=x, x_syn=x̂).
    Every `generator.generator_every` iterations: ξ (Adam) and, with LHS, ζ (SGD, lr ε) step on
    the reconstruction loss ‖g(ζ) − x̂‖² or, with AMS, on −log p(g(ζ)). With LHS each sampled ζ
    restarts from N(0, I) with probability chains.reinit_prob (`latent_restarts`).
    """

    name: str
    learned_latents: bool  # LHS: a persistent, learned latent bank; otherwise fresh ζ ~ N(0, I)
    amortised: bool  # AMS: generator loss −log p(g(ζ)) instead of reconstruction of x̂
    description: str
    jko: bool = True
    default_energy: str = "conv"

    def build(self, config: RunConfig, sample_shape: tuple[int, ...], *, device: torch.device,
              generator: torch.Generator, data_mean: torch.Tensor, num_classes: int = 0,
              rank: int = 0) -> TrainState:
        classes = _num_classes(config, num_classes)
        reinit_prob = self.latent_restarts(config)
        energy = build_energy(config.model, sample_shape, config.model.energy or "conv", classes).to(device)
        gen_net = build_generator(config.generator, sample_shape, classes, seed=config.model.seed + 1).to(device)
        gcfg = config.generator
        latents = ChainBank.create(gcfg.latent_bank_size, (gcfg.latent_dim,), generator=generator,
                                   first_id=rank * gcfg.latent_bank_size, device=device, init="gaussian",
                                   reinit_prob=reinit_prob, num_classes=classes)
        params = [p for p in energy.parameters() if p.requires_grad]
        return TrainState(
            config=config,
            models={"energy": energy, "generator": gen_net},
            optimizers={
                "energy": make_optimizer(params, config.optim),
                "generator": torch.optim.Adam(gen_net.parameters(), lr=gcfg.lr, betas=gcfg.betas),
            },
            banks={"latents": latents},
            meta={"sample_shape": list(sample_shape), "data_mean": data_mean.cpu(), "num_classes": classes},
        )

    def latent_restarts(self, config: RunConfig) -> float:
        """chains.reinit_prob for GGCN: the chance that a sampled latent ζ restarts from N(0, I) (LHS).
        Chains start from g(ζ), so chains.init does not apply; fresh-ζ variants restart every chain."""
        if config.chains.init != ChainConfig.init:
            raise ConfigError(
                f"chains.init='{config.chains.init}' does not apply to '{self.name}': its chains start "
                "from g(ζ) every iteration. Remove chains.init (restart latents with chains.reinit_prob)."
            )
        if config.chains.reinit_prob and not self.learned_latents:
            raise ConfigError(
                f"chains.reinit_prob={config.chains.reinit_prob} does not apply to '{self.name}': it draws "
                "fresh ζ ~ N(0, I) every iteration, so every chain restarts anyway. Set chains.reinit_prob=0, "
                "or use a learned-latent variant (ggcn, ggcn_ams) to restart persistent latents."
            )
        return config.chains.reinit_prob

    def train_step(self, state: TrainState, data: torch.Tensor, labels: torch.Tensor | None, *,
                   generator: torch.Generator, iteration: int = 0) -> StepOutput:
        cfg, gcfg = state.config, state.config.generator
        energy, gen_net, latents = state.energy, state.generator, state.banks["latents"]
        index, z = latents.sample(chains_per_step(cfg.chains.batch_size, gcfg.latent_bank_size, latents), generator)
        if not self.learned_latents:
            z = torch.randn(z.shape, generator=generator, device=z.device)
        elif latents.reinit_prob:
            latents.write(index, z)  # a restarted ζ stays restarted, also without a ζ step this iteration
        syn_labels = latents.labels_at(index)
        with torch.no_grad():
            x = gen_net(z, syn_labels)
        x_hat = state.sampler(energy.score_fn(syn_labels), x, generator=generator)
        data_labels = labels if syn_labels is not None else None
        shares = batch_shares([len(data), len(z)], z.device)
        loss, metrics = energy_objective(state, energy, data, data_labels, x, x_hat, syn_labels, jko=self.jko,
                                         iteration=iteration, shares=shares)
        metrics.update(energy_step(state, energy, loss))
        metrics["langevin_shift"] = shares[1] * float((x_hat - x).flatten(1).norm(dim=1).mean())

        if (iteration + 1) % gcfg.generator_every == 0:
            z = z.detach().requires_grad_(self.learned_latents)
            out = gen_net(z, syn_labels)
            if self.amortised:
                phi = energy(out, syn_labels) if syn_labels is not None else energy(out)
                gen_loss = ams_loss(phi, out, ref_sigma=cfg.langevin.ref_sigma)
            else:
                gen_loss = reconstruction_loss(out, x_hat)
            if self.learned_latents:
                # ζ_i ← ζ_i − ε ∂(Σ_j ℓ_j)/∂ζ_i, ℓ_j sample j's loss: not scaled by the batch size; ζ_i
                # reaches the other ℓ_j only through the batch norm's statistics, the global batch's,
                # so the step does not depend on the number of workers.
                (z_grad,) = torch.autograd.grad(gen_loss * len(z), z, retain_graph=True)
                latents.write(index, (z - gcfg.latent_lr * z_grad).detach())
            gen_loss = shares[1] * gen_loss  # this worker's part of the global batch's mean
            # Only ξ (and ζ above) step here; the energy's .grad is cleared before its next step.
            metrics.update(optimizer_step(state, "generator", gen_loss, {"xi": list(gen_net.parameters())},
                                          cfg.optim.grad_clip))
            metrics["loss_generator"] = float(gen_loss.detach())
        return StepOutput(metrics, x_hat)

    def sample(self, state: TrainState, num: int, *, generator: torch.Generator, steps: int | None = None,
               labels: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """g(ζ) for fresh ζ ~ N(0, I) (or the given latents), refined by `steps` (default L) Langevin steps."""
        device = next(state.generator.parameters()).device
        if latents is None:
            latents = torch.randn((num, state.config.generator.latent_dim), generator=generator, device=device)
        with torch.no_grad():
            x = state.generator(latents.to(device), labels)
        return state.fresh_sampler(state.energy.score_fn(labels), x, generator=generator, steps=steps)


Algorithm = EBMAlgorithm | MultiGridAlgorithm | GGCNAlgorithm

ALGORITHMS: dict[str, Algorithm] = {
    "frame": EBMAlgorithm("frame", "frame", jko=False, description="FRAME: fixed filter bank, θ by MLE"),
    "wframe": EBMAlgorithm("wframe", "frame", jko=True, description="wFRAME: FRAME with the JKO penalty"),
    "gcn": EBMAlgorithm("gcn", "conv", jko=False, description="GCN: ConvNet filters w and θ by MLE"),
    "wgcn": EBMAlgorithm("wgcn", "conv", jko=True, description="wGCN: GCN with the JKO penalty"),
    "mgcn": MultiGridAlgorithm("mgcn", jko=False, description="MGCN: one GCN per grid, coarse to fine"),
    "wmgcn": MultiGridAlgorithm("wmgcn", jko=True, description="wMGCN: MGCN with the JKO penalty"),
    "ggcn": GGCNAlgorithm("ggcn", learned_latents=True, amortised=False,
                          description="GGCN: generator + wGCN synthesiser, learned hidden space"),
    "ggcn_nolhs": GGCNAlgorithm("ggcn_nolhs", learned_latents=False, amortised=False,
                                description="GGCN\\LHS: fresh latents every iteration"),
    "ggcn_ams": GGCNAlgorithm("ggcn_ams", learned_latents=True, amortised=True,
                              description="GGCN+AMS: amortised sampling, learned hidden space"),
    "ggcn_nolhs_ams": GGCNAlgorithm("ggcn_nolhs_ams", learned_latents=False, amortised=True,
                                    description="GGCN\\LHS+AMS: amortised sampling, fresh latents"),
}


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm `name`, or a ConfigError listing the valid names."""
    if name not in ALGORITHMS:
        raise ConfigError(f"Unknown model.algorithm '{name}'. Choose one of {sorted(ALGORITHMS)}.")
    return ALGORITHMS[name]
