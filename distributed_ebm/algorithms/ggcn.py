"""GGCN and its variants (`GGCNAlgorithm`): a generator g(ζ; ξ) starts the chains; learned hidden
space (LHS) or fresh ζ (\\LHS); reconstruction or amortised (AMS) generator loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..chains import ChainBank
from ..config import ChainConfig, ConfigError, RunConfig
from ..distributed import batch_shares
from ..energy import build_energy
from ..generator import build_generator
from ..losses import (
    ams_loss,
    reconstruction_loss,
)
from .common import (
    StepOutput,
    TrainState,
    _num_classes,
    chains_per_step,
    energy_objective,
    energy_step,
    make_optimizer,
    optimizer_step,
)


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
              rank: int = 0, fit_images: torch.Tensor | None = None) -> TrainState:
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
        metrics["langevin_shift"] = shares[1] * (x_hat - x).flatten(1).norm(dim=1).mean().detach()

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
            metrics["loss_generator"] = gen_loss.detach()
        return StepOutput(metrics, x_hat)

    def sample(self, state: TrainState, num: int, *, generator: torch.Generator, steps: int | None = None,
               labels: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """g(ζ) for fresh ζ ~ N(0, T² I), T = generator.latent_temperature (or the given latents),
        refined by `steps` Langevin steps (default generator.refine_steps, else L)."""
        device = next(state.generator.parameters()).device
        gcfg = state.config.generator
        if latents is None:
            latents = gcfg.latent_temperature * torch.randn((num, gcfg.latent_dim), generator=generator, device=device)
        with torch.no_grad():
            x = state.generator(latents.to(device), labels)
        steps = gcfg.refine_steps if steps is None else steps
        return state.fresh_sampler(state.energy.score_fn(labels), x, generator=generator, steps=steps)

