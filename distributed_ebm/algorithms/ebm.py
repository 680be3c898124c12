"""FRAME / wFRAME / GCN / wGCN (`EBMAlgorithm`: persistent chains, MLE + JKO penalty) and
MGCN / wMGCN (`MultiGridAlgorithm`: one energy per grid, chains passed coarse to fine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..chains import ChainBank
from ..config import ConfigError, RunConfig
from ..distributed import batch_shares, to_device
from ..energy import Energy, build_energy
from .common import (
    StepOutput,
    TrainState,
    _num_classes,
    chains_per_step,
    energy_objective,
    energy_step,
    make_optimizer,
    nonfinite,
    optimizer_step,
)


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
              rank: int = 0, fit_images: torch.Tensor | None = None) -> TrainState:
        """Networks (seeded by model.seed, identical on every rank), optimiser and chain bank shard
        (`fit_images` is MGCN's: unused)."""
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


GAUSSIAN_FIT_IMAGES = 10_000  # model.first_grid="gaussian": fitted on at most the first this many images


def fit_gaussian(images: torch.Tensor, *, shrinkage: float = 1e-3) -> dict[str, torch.Tensor]:
    """A Gaussian fitted to `images` (N, ...), flattened: {"mean": (D,), "scale_tril": (D, D)}, its
    mean and the Cholesky factor of its covariance. The covariance is shrunk towards its mean
    variance by `shrinkage` (Ledoit-Wolf style), so that constant pixels or fewer images than
    dimensions still give a proper Gaussian."""
    z = images.reshape(len(images), -1).double()
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1]) if len(z) > 1 else torch.zeros(z.shape[1], z.shape[1],
                                                                                         dtype=z.dtype)
    floor = max(float(cov.diagonal().mean()), 1e-4)
    cov = (1 - shrinkage) * cov + shrinkage * floor * torch.eye(len(cov), dtype=z.dtype)
    return {"mean": z.mean(0).float(), "scale_tril": torch.linalg.cholesky(cov).float()}


def draw_gaussian(fit: dict[str, torch.Tensor], num: int, shape: tuple[int, ...], generator: torch.Generator
                  ) -> torch.Tensor:
    """`num` draws of `fit_gaussian`'s Gaussian, shaped (num, *shape), on the generator's device."""
    mean, tril = (fit[k].to(generator.device) for k in ("mean", "scale_tril"))
    noise = torch.randn((num, len(mean)), generator=generator, device=generator.device)
    return (mean + noise @ tril.T).reshape(num, *shape)


def multigrid_chains(
    energies: list[Energy],
    x_first: torch.Tensor,
    sizes: tuple[int, ...],
    *,
    upsample: str,
    sample: Callable[[Energy, torch.Tensor], torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Coarse-to-fine sampling: [(start, final) per grid].

    The first grid starts from `x_first` (`MultiGridAlgorithm.first_grid`); grid s starts from the
    final chains of grid s−1 up-sampled to its size.
    """
    chains, x = [], x_first
    for energy, size in zip(energies, sizes):
        start = resample(x, size, upsample)
        x = sample(energy, start)
        chains.append((start, x))
    return chains


# logged per grid as grid{size}_{name}: the collapse checks read every grid's (metrics/collapse.py)
GRID_METRICS = ("loss", "phi_data", "phi_chains", "energy_gap_z", "chain_saturation", "data_saturation")


@dataclass(frozen=True)
class MultiGridAlgorithm:
    """MGCN / wMGCN: one ConvNet energy per grid (model.grid_sizes), chains passed coarse to fine.

    The chains are not persistent: each iteration restarts them from the data mean down-sampled
    to the first grid (ALGORITHMS.md §3), as in multi-grid sampling, or with model.first_grid="gaussian"
    from draws of a Gaussian fitted to the data down-sampled to the first grid (mean and covariance of
    `fit_images`, the same images on every rank; saved with the model). Each grid's energy is trained on
    data down-sampled to its size; the losses of all grids are summed (they share no parameters).
    """

    name: str
    jko: bool
    description: str
    default_energy: str = "conv"

    def build(self, config: RunConfig, sample_shape: tuple[int, ...], *, device: torch.device,
              generator: torch.Generator, data_mean: torch.Tensor, num_classes: int = 0,
              rank: int = 0, fit_images: torch.Tensor | None = None) -> TrainState:
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
        meta = {"sample_shape": list(sample_shape), "data_mean": data_mean.cpu(), "num_classes": classes}
        if config.model.first_grid == "gaussian" and fit_images is not None:
            # without fit_images (a model loaded for inference) the fit comes with the saved meta
            meta["first_grid"] = fit_gaussian(resample(fit_images[:GAUSSIAN_FIT_IMAGES].float().cpu(), sizes[0],
                                                       config.model.upsample))
        return TrainState(
            config=config,
            models={"grids": energies},
            optimizers={"energy": make_optimizer(params, config.optim)},
            banks={},
            meta=meta,
        )

    def first_grid(self, state: TrainState, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`batch_size` starts of the first grid's chains: copies of the data mean down-sampled to
        it, or with model.first_grid="gaussian" draws of the Gaussian fitted there (from `generator`)."""
        cfg = state.config.model
        device = next(state.models["grids"].parameters()).device
        if cfg.first_grid == "gaussian":
            if "first_grid" not in state.meta or generator is None:
                raise ValueError("model.first_grid='gaussian' draws the first grid from the Gaussian fitted at build "
                                 "time (build(..., fit_images=...)) with a random generator; this state has "
                                 f"{'no fit' if 'first_grid' not in state.meta else 'no generator'}.")
            shape = (state.meta["sample_shape"][0], cfg.grid_sizes[0], cfg.grid_sizes[0])
            return draw_gaussian(state.meta["first_grid"], batch_size, shape, generator).to(device)
        mean = to_device(state.meta["data_mean"], device)
        return resample(mean, cfg.grid_sizes[0], cfg.upsample).expand(batch_size, -1, -1, -1).clone()

    def train_step(self, state: TrainState, data: torch.Tensor, labels: torch.Tensor | None, *,
                   generator: torch.Generator, iteration: int = 0) -> StepOutput:
        cfg = state.config
        energies = list(state.models["grids"])
        # The chains' classes are the data batch's, cycled when the chains outnumber the images.
        syn_labels = (labels[torch.arange(cfg.chains.batch_size, device=labels.device) % len(labels)]
                      if state.meta["num_classes"] else None)

        def sample(energy: Energy, x0: torch.Tensor) -> torch.Tensor:
            return state.sampler(energy.score_fn(syn_labels), x0, generator=generator)

        chains = multigrid_chains(energies, self.first_grid(state, cfg.chains.batch_size, generator), cfg.model.grid_sizes,
                                  upsample=cfg.model.upsample, sample=sample)
        total, metrics = 0.0, {}
        shares = batch_shares([len(data), cfg.chains.batch_size], data.device)
        for energy, size, (start, final) in zip(energies, cfg.model.grid_sizes, chains):
            data_labels = labels if syn_labels is not None else None
            loss, grid_metrics = energy_objective(state, energy, resample(data, size, cfg.model.upsample),
                                                  data_labels, start, final, syn_labels, jko=self.jko,
                                                  iteration=iteration, shares=shares)
            total = total + loss
            metrics.update({f"grid{size}_{k}": v for k, v in grid_metrics.items() if k in GRID_METRICS})
            metrics.update(grid_metrics)  # the finest grid's metrics stay under the plain names
        theta, w = [], []
        for energy in energies:
            t, v = energy.split_parameters()
            theta, w = theta + t, w + v
        metrics.update(optimizer_step(state, "energy", total, {"theta": theta, "w": w}, cfg.optim.grad_clip))
        metrics["nonfinite"] = torch.maximum(metrics["nonfinite"], nonfinite(total))
        return StepOutput(metrics, chains[-1][1])

    def sample(self, state: TrainState, num: int, *, generator: torch.Generator, steps: int | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse-to-fine chains from `first_grid`, `steps` (default L) Langevin steps per grid."""
        chains = multigrid_chains(
            list(state.models["grids"]), self.first_grid(state, num, generator), state.config.model.grid_sizes,
            upsample=state.config.model.upsample,
            sample=lambda energy, x0: state.fresh_sampler(energy.score_fn(labels), x0, generator=generator, steps=steps),
        )
        return chains[-1][1]


