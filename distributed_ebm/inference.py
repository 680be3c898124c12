"""Load a trained run and draw from it: fresh samples (the default) or the persistent bank.

A run trained with train.ema_decay draws (samples, inpainting, interpolation) from the EMA of
its weights unless asked for the live ones; fresh chains anneal δ to langevin.sample_anneal_to
when that is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .algorithms import TrainState, get_algorithm
from .clusters import Clusters
from .config import ConfigError, RunConfig
from .distributed import resolve_device
from .inpainting import METHODS, check_average, fit_latents, inpaint_langevin
from .recovery import effective_overrides
from .rundir import RunDirectory


@dataclass
class TrainedModel:
    """A run's networks and banks, rebuilt from a checkpoint (every rank's shards merged)."""

    config: RunConfig
    state: TrainState  # its `models` are the weights drawn from: the EMA ones when `weights` is "ema"
    iteration: int
    checkpoint: Path
    weights: str = "live"  # "ema" (the moving average, train.ema_decay) or "live" (the trained weights)

    @property
    def weights_description(self) -> str:
        """Which weights the samples come from, for reports and sample files."""
        if self.weights == "ema":
            averaged = self.state.averaged_models()
            live = [k for k in self.state.models if k not in averaged]
            which = f" of {', '.join(averaged)}; live {', '.join(live)}" if live else ""
            return f"EMA of the weights{which} (train.ema_decay={self.config.train.ema_decay})"
        return "live weights"

    @property
    def algorithm(self):
        return get_algorithm(self.config.model.algorithm)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.state.meta["sample_shape"])

    @property
    def num_classes(self) -> int:
        """The classes a user can ask for (model.conditional); 0 for unconditional models, also
        self-conditioned ones, whose clusters are not classes (see `clusters`)."""
        return 0 if self.clusters is not None else int(self.state.meta.get("num_classes", 0))

    @property
    def clusters(self) -> Clusters | None:
        """The k-means clusters of a self-conditioned model (model.clusters), else None."""
        saved = self.state.meta.get("clusters")
        return None if saved is None else Clusters.from_state(saved)

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

    def clusters_for(self, num: int, seed: int = 0) -> torch.Tensor | None:
        """The clusters `sample(num, seed=seed)` draws for a self-conditioned model (p(x) = Σ_k π_k
        p(x | k): by their shares, the seed picking the run of ids), else None."""
        if self.clusters is None:
            return None
        return self.clusters.draw(num, offset=seed * num, device=self.device)

    def sample(self, num: int, *, steps: int | None = None, seed: int = 0, from_bank: bool = False,
               label: int | None = None, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """`num` fresh samples (the algorithm's own way: fresh chains, multi-grid, or g(ζ) + Langevin),
        or, with from_bank, states of the persistent chain bank; `progress`: a bar over the images."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if from_bank:
            bank = self.state.banks.get("chains")
            if bank is None:
                raise ConfigError(f"'{self.config.model.algorithm}' keeps no persistent chain bank; drop --from-bank.")
            if num > len(bank):
                raise ConfigError(f"The bank holds {len(bank)} chains; asked for {num}.")
            return bank.states[torch.randperm(len(bank), generator=generator, device=self.device)[:num]].cpu()
        labels = self.labels_for(num, label)
        if labels is None:
            labels = self.clusters_for(num, seed)
        out = []
        with tqdm(total=num, unit="img", desc="sampling", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, num, batch_size):
                n = min(batch_size, num - start)
                batch_labels = None if labels is None else labels[start : start + n]
                out.append(self.algorithm.sample(self.state, n, generator=generator, steps=steps,
                                                 labels=batch_labels).cpu())
                bar.update(n)
        return torch.cat(out)

    def inpaint(self, images: torch.Tensor, missing: torch.Tensor, *, method: str = "langevin",
                steps: int | None = None, seed: int = 0, labels: torch.Tensor | None = None,
                average: int = 1) -> torch.Tensor:
        """Restore the missing pixels (mask 1) of images in [-1, 1]; observed pixels never change.

        method "langevin": masked Langevin on Φ (every model), `steps` default langevin.sample_steps;
        "generator": fit ζ to the observed pixels, fill the hole with g(ζ), then masked Langevin
        for `steps` (default generator.refine_steps, else L) (GGCN models).
        average: 1 gives one restoration (a draw from the model's p(hole | observed)); K > 1 the
        mean of the K restorations with seeds seed … seed + K − 1, an estimate of the posterior
        mean, which is what MSE and PSNR reward (a blur where the posterior has several modes).
        """
        if tuple(images.shape[1:]) != self.sample_shape:
            raise ConfigError(f"Images have shape {tuple(images.shape[1:])}; this model takes {self.sample_shape}.")
        if missing.shape[0] != images.shape[0] or missing.shape[-2:] != images.shape[-2:]:
            raise ConfigError(f"Mask shape {tuple(missing.shape)} does not match images {tuple(images.shape)}.")
        if method not in METHODS:
            raise ConfigError(f"Unknown inpainting method '{method}'. Choose one of {', '.join(METHODS)}.")
        if method == "generator" and self.state.generator is None:
            raise ConfigError("method 'generator' needs a GGCN model; use method 'langevin'.")
        check_average(average)
        images, missing = images.to(self.device), missing.to(self.device).float()
        if labels is None and self.clusters is not None:  # the cluster nearest the observed pixels
            labels = self.clusters.assign(images, observed=1 - missing)
        total = sum(self._restore(images, missing, method=method, steps=steps, seed=seed + k, labels=labels)
                    for k in range(average))
        # (x + x + x) / 3 need not round back to x: observed pixels are taken from the images
        return torch.where(missing.bool(), total / average, images).cpu()

    def _restore(self, images: torch.Tensor, missing: torch.Tensor, *, method: str, steps: int | None,
                 seed: int, labels: torch.Tensor | None) -> torch.Tensor:
        """One restoration (see `inpaint`), on the model's device."""
        lang = self.config.langevin
        generator = torch.Generator(device=self.device).manual_seed(seed)
        init = None
        if method == "generator":
            gen_net = self.state.generator
            z = fit_latents(lambda z: gen_net(z, labels), images, missing,
                            latent_dim=self.config.generator.latent_dim, generator=generator)
            with torch.no_grad():
                init = gen_net(z, labels)
            steps = self.config.generator.refine_steps if steps is None else steps
            steps = lang.langevin_steps if steps is None else steps
        knobs = self.state.fresh_sampler.keywords(lang.sample_steps if steps is None else steps)
        return inpaint_langevin(self.state.energy.score_fn(labels), images, missing, generator=generator,
                                init=init, **knobs)

    def interpolation_latents(self, rows: int, midpoints: int, *, seed: int = 0) -> torch.Tensor:
        """(rows · (midpoints + 2), d) latents: each row runs linearly between two ends ~ N(0, I)
        clipped to [-1, 1]."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        shape = (rows, 1, self.config.generator.latent_dim)
        ends = torch.randn((2, *shape), generator=generator, device=self.device).clamp(-1, 1)
        t = torch.linspace(0, 1, midpoints + 2, device=self.device).view(1, -1, 1)
        return ((1 - t) * ends[0] + t * ends[1]).reshape(-1, shape[-1])

    def interpolate(self, rows: int = 4, midpoints: int = 8, *, seed: int = 0, steps: int = 0,
                    label: int | None = None) -> torch.Tensor:
        """(rows, midpoints + 2, *image) images g(ζ_t) along ζ_t = (1 − t) ζ_a + t ζ_b, with the two
        end latents drawn from N(0, I) and clipped to [-1, 1] (GGCN paper, Fig. 12).

        With steps > 0 each image is refined by that many Langevin steps (the same noise seed for
        every row, so the row stays comparable)."""
        if self.state.generator is None:
            raise ConfigError(f"Interpolation needs a model with a generator (ggcn*), not '{self.config.model.algorithm}'.")
        latents = self.interpolation_latents(rows, midpoints, seed=seed)
        labels = None if not self.num_classes else self.labels_for(len(latents), label)
        if labels is None and self.clusters is not None:  # one cluster per row, by their shares
            labels = self.clusters.draw(rows, offset=seed * rows, device=self.device).repeat_interleave(midpoints + 2)
        images = self.algorithm.sample(self.state, len(latents), generator=torch.Generator(device=self.device).manual_seed(seed),
                                       steps=steps, labels=labels, latents=latents)
        return images.view(rows, midpoints + 2, *self.sample_shape).cpu()


def load_run(run_dir: str | Path, *, device: str = "cpu", checkpoint: str | Path | None = None,
             ema: bool = True) -> TrainedModel:
    """Rebuild a run from its latest (or the given) checkpoint.

    ema: draw from the EMA weights when the run kept them (train.ema_decay); False: the live ones.
    """
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
    # δ (and λ) as the run last trained with them: lowered by any collapse recoveries
    config = RunConfig.from_dict(shared["config"]).replace({**overrides, **effective_overrides(shared)})
    device = resolve_device(device)
    state = get_algorithm(config.model.algorithm).build(
        config,
        tuple(meta["sample_shape"]),
        device=device,
        generator=torch.Generator(device=device),  # the banks' initial states are drawn on `device`
        data_mean=meta["data_mean"],
        num_classes=meta.get("num_classes", 0),
    )
    state.load_model_state(shared)  # with the fitted meta: model.clusters' k-means, MGCN's first-grid Gaussian
    state.load_bank_state(banks)
    weights = "ema" if ema and state.ema else "live"
    if weights == "ema":
        state.models = {**state.models, **state.ema}  # state.energy / state.generator now give the averages
    for model in state.models.values():
        model.eval()
    return TrainedModel(config, state, shared["iteration"], path, weights)
