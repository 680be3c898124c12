"""Load a trained run and draw from it: fresh Langevin chains (the default) or the chain bank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .algorithms import TrainState, get_algorithm
from .config import RunConfig
from .distributed import resolve_device
from .langevin import langevin
from .rundir import RunDirectory


@dataclass
class TrainedModel:
    """A run's networks and chain bank, rebuilt from its latest checkpoint."""

    config: RunConfig
    state: TrainState
    iteration: int
    checkpoint: Path

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.state.meta["sample_shape"])

    def sample(
        self,
        num: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        from_bank: bool = False,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """`num` samples: fresh chains started like training's and run `steps` Langevin steps
        (default langevin.sample_steps), or, with from_bank, states from the persistent bank."""
        bank = self.state.banks["chains"]
        generator = torch.Generator(device=bank.states.device).manual_seed(seed)
        if from_bank:
            if num > len(bank):
                raise ValueError(f"The bank holds {len(bank)} chains; asked for {num}.")
            return bank.states[torch.randperm(len(bank), generator=generator, device=bank.states.device)[:num]].cpu()
        lang = self.config.langevin
        out = []
        for start in range(0, num, batch_size):
            x0 = bank.initial_states(min(batch_size, num - start), generator)
            out.append(
                langevin(
                    self.state.energy,
                    x0,
                    steps=lang.sample_steps if steps is None else steps,
                    step_size=lang.step_size,
                    ref_sigma=lang.ref_sigma,
                    generator=generator,
                    clamp=self.state.data_range if lang.clamp else None,
                ).cpu()
            )
        return torch.cat(out)


def load_run(run_dir: str | Path, *, device: str = "cpu", checkpoint: str | Path | None = None) -> TrainedModel:
    """Rebuild a run from its config and latest (or the given) checkpoint; every rank's chains are merged."""
    run = RunDirectory(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run.checkpoints)
    if path is None:
        raise FileNotFoundError(f"'{run.path}' has no checkpoint yet: train it first (debm train --run-dir ...).")
    shared, rank_states = ckpt.read_checkpoint(path)
    config = RunConfig.from_dict(shared["config"])
    meta = shared["meta"]
    banks = ckpt.bank_shard(rank_states, 0, 1)
    chains = banks["chains"]
    config = config.replace({"chains.bank_size": len(chains["ids"]), "chains.batch_size": len(chains["ids"])})
    algorithm = get_algorithm(config.model.algorithm)
    state = algorithm.build(
        config,
        tuple(meta["sample_shape"]),
        device=resolve_device(device),
        generator=torch.Generator(),
        data_mean=meta["data_mean"],
    )
    state.load_model_state(shared)
    state.load_bank_state(banks)
    for model in state.models.values():
        model.eval()
    return TrainedModel(config, state, shared["iteration"], path)
