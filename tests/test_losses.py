"""Loss gradients match their formulas; the JKO penalty reaches θ only unless asked otherwise."""

import torch

from distributed_ebm.config import ModelConfig
from distributed_ebm.energy import ConvEnergy, FilterBank, FrameEnergy, build_energy
from distributed_ebm.losses import jko_loss, mle_loss, score_grad_penalty


def _frame(layout="position"):
    energy = FrameEnergy(FilterBank(layers=2, seed=0), (1, 8, 8), layout).double()
    torch.nn.init.normal_(energy.theta, std=0.1)
    return energy


def test_mle_gradient_of_linear_frame_equals_feature_mean_difference():
    energy = _frame()
    y, x = torch.rand(10, 1, 8, 8).double() * 2 - 1, torch.rand(12, 1, 8, 8).double() * 2 - 1
    loss = mle_loss(energy(y), energy(x))
    loss.backward()
    with torch.no_grad():
        by_hand = energy.bank(y).mean(0) - energy.bank(x).mean(0)  # E_data ∇θΦ − E_syn ∇θΦ
    # Minimising L_mle moves θ along +(E_data ∇Φ − E_syn ∇Φ): the loss gradient is its negative.
    assert torch.allclose(energy.theta.grad, -by_hand, atol=1e-12)


def test_channel_layout_gradient_sums_over_positions():
    energy = _frame("channel")
    y, x = torch.rand(4, 1, 8, 8).double(), torch.rand(4, 1, 8, 8).double()
    mle_loss(energy(y), energy(x)).backward()
    with torch.no_grad():
        by_hand = (energy.bank(y).mean(0) - energy.bank(x).mean(0)).sum((1, 2), keepdim=True)
    assert torch.allclose(energy.theta.grad, -by_hand, atol=1e-12)


def _conv(seed=0):
    torch.manual_seed(seed)
    energy = ConvEnergy((1, 8, 8), (4, 6), activation="softplus").double()
    torch.nn.init.normal_(energy.theta.weight, std=0.5)
    return energy


def test_penalty_gradient_matches_finite_differences():
    energy = _conv()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    penalty = score_grad_penalty(energy.score_reaching("all"), x)
    params = dict(energy.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(penalty, list(params.values()), allow_unused=True)))
    gen = torch.Generator().manual_seed(1)
    for name in ("theta.weight", "features.0.weight"):
        param = params[name]
        for _ in range(3):
            i = int(torch.randint(param.numel(), (1,), generator=gen))
            eps = 1e-6
            with torch.no_grad():
                param.view(-1)[i] += eps
                plus = score_grad_penalty(energy, x).item()
                param.view(-1)[i] -= 2 * eps
                minus = score_grad_penalty(energy, x).item()
                param.view(-1)[i] += eps
            assert abs((plus - minus) / (2 * eps) - grads[name].view(-1)[i].item()) < 1e-5 * (1 + abs(plus))


def test_penalty_reaches_theta_only_by_default():
    energy = _conv()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    score_grad_penalty(energy.score_reaching("theta"), x).backward()
    theta, w = energy.split_parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in theta[:1])
    assert all(p.grad is None for p in w)
    energy.zero_grad(set_to_none=True)
    score_grad_penalty(energy.score_reaching("all"), x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in w)


def test_jko_loss_combines_terms_with_gamma_and_beta():
    mle, p_prev, p_syn = torch.tensor(1.0), torch.tensor(4.0), torch.tensor(8.0)
    assert float(jko_loss(mle, p_prev, p_syn, jko_weight=2.0, gamma=0.25)) == 1.0 + 1.0 * (0.75 * 4 + 0.25 * 8)


def test_build_energy_is_seeded():
    config = ModelConfig(channels=(4,), seed=3)
    a, b = build_energy(config, (1, 8, 8), "conv"), build_energy(config, (1, 8, 8), "conv")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
