"""Losses to minimise with any torch optimiser (ALGORITHMS.md §3): small pure callables.

With SGD at learning rate λ these reproduce the papers' update rules; the sign convention is
"minimise", so `mle_loss` is the negative log-likelihood gradient surrogate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mle_loss(phi_data: torch.Tensor, phi_syn: torch.Tensor) -> torch.Tensor:
    """L_mle = −(mean Φ(y) − mean Φ(x_syn)): raise Φ on data, lower it on the chains."""
    return -(phi_data.mean() - phi_syn.mean())


def score_grad_penalty(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """P(x) = mean over the batch of ‖∇ₓΦ(x)‖², differentiable in Φ's parameters.

    `score_fn` decides which parameters the penalty reaches: pass Φ with w detached to reach θ only.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score_fn(x).sum(), x, create_graph=True)
        return grad.flatten(1).pow(2).sum(1).mean()


def jko_loss(
    mle: torch.Tensor,
    penalty_prev: torch.Tensor,
    penalty_syn: torch.Tensor,
    *,
    jko_weight: float,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """L_w = L_mle + (β/2)·((1 − γ)·P(x_prev) + γ·P(x_syn)), the JKO / Wasserstein time piece.

    Args:
        jko_weight: β, the time-piece weight.
        gamma: γ ~ U[0, 1], drawn once per iteration.
    """
    return mle + 0.5 * jko_weight * ((1.0 - gamma) * penalty_prev + gamma * penalty_syn)


def energy_l2_loss(phi_data: torch.Tensor, phi_syn: torch.Tensor, *, weight: float) -> torch.Tensor:
    """α · (mean Φ(y)² + mean Φ(x_syn)²): keeps the scores near 0, so that Φ cannot drift to large
    magnitudes on both data and chains (Du & Mordatch 2019). `weight`: α."""
    return weight * (phi_data.pow(2).mean() + phi_syn.pow(2).mean())


def energy_u(phi: torch.Tensor, x: torch.Tensor, *, ref_sigma: float) -> torch.Tensor:
    """U(x) = −Φ(x) + ‖x‖²/(2σ²), the energy including the Gaussian reference, per sample."""
    return -phi + x.flatten(1).pow(2).sum(1) / (2 * ref_sigma**2)


def reconstruction_loss(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GGCN generator loss without AMS (Eq. 19/20): mean over the batch of ‖g(ζ) − x̂‖²."""
    return (generated - target.detach()).flatten(1).pow(2).sum(1).mean()


def ams_loss(phi_generated: torch.Tensor, generated: torch.Tensor, *, ref_sigma: float) -> torch.Tensor:
    """GGCN+AMS generator loss (Eq. 21–23): −mean log p(g(ζ)) = mean U(g(ζ)), up to log Z."""
    return energy_u(phi_generated, generated, ref_sigma=ref_sigma).mean()
