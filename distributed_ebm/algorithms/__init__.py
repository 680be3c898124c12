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

from ..config import ConfigError, RunConfig
from ..energy import check_energy
from .common import (
    EnergyLoss,
    GradientSync,
    StepOutput,
    TrainState,
    energy_loss,
    energy_step,
    jko_gamma,
    langevin_settings,
)
from .ebm import EBMAlgorithm, MultiGridAlgorithm, multigrid_chains, resample
from .ggcn import GGCNAlgorithm

__all__ = [
    "ALGORITHMS", "Algorithm", "EBMAlgorithm", "EnergyLoss", "GGCNAlgorithm", "GradientSync", "MultiGridAlgorithm",
    "StepOutput", "TrainState", "check_model", "energy_loss", "energy_step", "get_algorithm", "jko_gamma", "langevin_settings",
    "multigrid_chains", "resample",
]

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


def check_model(config: RunConfig) -> None:
    """Refuse, before any data are read or a worker starts, a model that cannot be built: an
    unknown algorithm or energy, or labels / clusters for an energy without a conditional variant."""
    algorithm = get_algorithm(config.model.algorithm)
    check_energy(config.model, config.model.energy or algorithm.default_energy,
                 conditional=bool(config.model.clusters or config.model.conditional))
