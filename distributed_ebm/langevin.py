"""Langevin dynamics on p(x) ∝ exp(Φ(x)) · N(0, σ² I): pure functions, nothing else.

One step (ALGORITHMS.md §2):

    x ← x + (δ² / 2) · (∇ₓΦ(x) − x / σ²) + δ · ε,     ε ~ N(0, I)

The sampler knows nothing about optimisers, configs or Ray: its knobs are keyword arguments and
its noise comes from an explicit `torch.Generator`, so that a run can be replayed bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # Φ: a batch of x → one score per sample


def score_grad(score_fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """∇ₓΦ(x) for a batch, without touching the parameters' .grad fields."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score_fn(x).sum(), x)
    return grad


def langevin(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    ref_sigma: float,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `steps` Langevin steps from x0 and return the final (detached) states.

    Args:
        score_fn: Φ, mapping a batch (B, ...) to scores (B,).
        x0: initial states (B, ...); not modified.
        steps: number of steps L.
        step_size: δ; the drift is scaled by δ²/2 and the noise by δ.
        ref_sigma: σ of the Gaussian reference q = N(0, σ² I).
        generator: source of the noise ε (on x0's device); None uses the global generator.
        clamp: (low, high) bounds applied after every step, e.g. the data range (-1, 1).
        mask: optional tensor broadcastable to x0; 1 marks entries that move, 0 entries that stay
            at their x0 value (inpainting with observed pixels clamped).
    """
    drift_scale = step_size**2 / 2.0
    inv_var = 1.0 / ref_sigma**2
    x = x0.detach().clone()
    keep = None if mask is None else x0.detach()
    for _ in range(steps):
        grad = score_grad(score_fn, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + drift_scale * (grad - inv_var * x) + step_size * noise
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
        if mask is not None:
            x = torch.where(mask.bool(), x, keep)
    return x.detach()
