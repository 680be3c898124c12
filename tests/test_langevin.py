"""Langevin dynamics recovers known distributions; it is a pure, replayable function."""

import math

import torch

from distributed_ebm.langevin import langevin, score_grad


def quadratic_score(mean_shift: torch.Tensor, curvature: float):
    """Φ(x) = a·x − (b/2)‖x‖²: with q = N(0, σ²I), p is Gaussian with precision b + 1/σ²."""
    return lambda x: (x * mean_shift).sum(1) - 0.5 * curvature * x.pow(2).sum(1)


def test_langevin_recovers_analytic_gaussian():
    a, b, sigma, delta = torch.tensor([1.0, -0.5]), 1.0, 0.8, 0.05
    precision = b + 1 / sigma**2
    x0 = torch.zeros(4000, 2, dtype=torch.float64)
    x = langevin(
        quadratic_score(a.double(), b), x0, steps=3000, step_size=delta, ref_sigma=sigma,
        generator=torch.Generator().manual_seed(0),
    )
    # Exact stationary law of the discretised chain (an AR(1) process): same mean, variance
    # 1 / (precision · (1 − h·precision/2)) with h = δ²/2; it differs from 1/precision by 0.3 % here.
    h = delta**2 / 2
    expected_var = 1 / (precision * (1 - h * precision / 2))
    assert torch.allclose(x.mean(0), a.double() / precision, atol=0.03)
    assert torch.allclose(x.var(0), torch.full((2,), expected_var, dtype=torch.float64), rtol=0.06)
    assert abs(expected_var - 1 / precision) / (1 / precision) < 0.01


def test_langevin_step_matches_formula():
    score = quadratic_score(torch.tensor([0.3, 0.7]), 2.0)
    x0 = torch.randn(5, 2)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1 = langevin(score, x0, steps=1, step_size=0.1, ref_sigma=0.5, generator=gen_a)
    eps = torch.randn(x0.shape, generator=gen_b)
    expected = x0 + 0.1**2 / 2 * (score_grad(score, x0) - x0 / 0.25) + 0.1 * eps
    assert torch.allclose(x1, expected, atol=1e-6)


def test_langevin_is_replayable_and_leaves_x0_alone():
    score = quadratic_score(torch.tensor([1.0, 1.0]), 1.0)
    x0 = torch.zeros(8, 2)
    runs = [
        langevin(score, x0, steps=10, step_size=0.1, ref_sigma=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.count_nonzero(x0) == 0


def test_clamp_and_mask():
    score = quadratic_score(torch.tensor([50.0, 50.0]), 0.0)
    x0 = torch.zeros(16, 2)
    mask = torch.tensor([1.0, 0.0])
    x = langevin(score, x0, steps=20, step_size=0.5, ref_sigma=1.0, clamp=(-1.0, 1.0), mask=mask,
                 generator=torch.Generator().manual_seed(0))
    assert x[:, 0].max() <= 1.0 and x[:, 0].min() >= -1.0
    assert math.isclose(float(x[:, 0].mean()), 1.0, abs_tol=0.1)  # pushed to the bound
    assert torch.equal(x[:, 1], x0[:, 1])  # masked entries never move
