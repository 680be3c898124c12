"""Load a trained run and draw from it: fresh samples (the default) or the persistent bank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .algorithms import TrainState, get_algorithm
from .config import ConfigError, RunConfig
from .distributed import resolve_device
from .rundir import RunDirectory


@dataclass
class TrainedModel:
    """A run's networks and banks, rebuilt from a checkpoint (every rank's shards merged)."""

    config: RunConfig
    state: TrainState
    iteration: int
    checkpoint: Path

    @property
    def algorithm(self):
        return get_algorithm(self.config.model.algorithm)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.state.meta["sample_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.state.meta.get("num_classes", 0))

    @property
    def device(self) -> torch.device:
        return next(self.state.energy.parameters()).device

    def labels_for(self, num: int, label: int | None) -> torch.Tensor | None:
        """Labels for `num` samples of a conditional model: all `label`, or cycling through classes."""
        if not self.num_classes:
            if label is not None:
                raise ConfigError("This model is not class-conditional: drop --label.")
            return None
        if label is not None and not 0 <= label < self.num_classes:
            raise ConfigError(f"Label {label} is out of range: this model knows classes 0 … {self.num_classes - 1}.")
        labels = torch.full((num,), label) if label is not None else torch.arange(num) % self.num_classes
        return labels.to(self.device)

    def sample(self, num: int, *, steps: int | None = None, seed: int = 0, from_bank: bool = False,
               label: int | None = None, batch_size: int = 256) -> torch.Tensor:
        """`num` fresh samples (the algorithm's own way: fresh chains, multi-grid, or g(ζ) + Langevin),
        or, with from_bank, states of the persistent chain bank."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if from_bank:
            bank = self.state.banks.get("chains")
            if bank is None:
                raise ConfigError(f"'{self.config.model.algorithm}' keeps no persistent chain bank; drop --from-bank.")
            if num > len(bank):
                raise ConfigError(f"The bank holds {len(bank)} chains; asked for {num}.")
            return bank.states[torch.randperm(len(bank), generator=generator, device=self.device)[:num]].cpu()
        labels = self.labels_for(num, label)
        out = []
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            batch_labels = None if labels is None else labels[start : start + n]
            out.append(self.algorithm.sample(self.state, n, generator=generator, steps=steps, labels=batch_labels).cpu())
        return torch.cat(out)


def load_run(run_dir: str | Path, *, device: str = "cpu", checkpoint: str | Path | None = None) -> TrainedModel:
    """Rebuild a run from its latest (or the given) checkpoint."""
    run = RunDirectory(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run.checkpoints)
    if path is None:
        raise FileNotFoundError(f"'{run.path}' has no checkpoint yet: train it first (debm train --run-dir ...).")
    shared, rank_states = ckpt.read_checkpoint(path)
    banks = ckpt.bank_shard(rank_states, 0, 1)
    meta = shared["meta"]
    overrides = {}
    if "chains" in banks:
        size = len(banks["chains"]["ids"])
        overrides.update({"chains.bank_size": size, "chains.batch_size": size})
    if "latents" in banks:
        overrides["generator.latent_bank_size"] = len(banks["latents"]["ids"])
    config = RunConfig.from_dict(shared["config"]).replace(overrides)
    state = get_algorithm(config.model.algorithm).build(
        config,
        tuple(meta["sample_shape"]),
        device=resolve_device(device),
        generator=torch.Generator(),
        data_mean=meta["data_mean"],
        num_classes=meta.get("num_classes", 0),
    )
    state.load_model_state(shared)
    state.load_bank_state(banks)
    for model in state.models.values():
        model.eval()
    return TrainedModel(config, state, shared["iteration"], path)
