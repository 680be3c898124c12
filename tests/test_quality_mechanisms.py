"""Sample-quality mechanisms (issue 12): clipped ∇ₓΦ in the Langevin step, annealed δ for fresh
samples, the energy-magnitude penalty, spectral normalisation of w, an EMA of the weights used for
sampling, and GGCN's latent restarts. Fast, CPU, exact where the math allows."""

import json
import math

import numpy as np
import pytest
import torch

from distributed_ebm import checkpoint as ckpt
from distributed_ebm import langevin as langevin_module
from distributed_ebm.algorithms import ALGORITHMS, energy_loss, multigrid_chains, resample
from distributed_ebm.algorithms.ebm import draw_gaussian, fit_gaussian
from distributed_ebm.cli import main
from distributed_ebm.config import ConfigError, ModelConfig, RunConfig, load_config
from distributed_ebm.data import load_dataset
from distributed_ebm.energy import build_energy
from distributed_ebm.inference import load_run
from distributed_ebm.langevin import langevin, score_grad, step_schedule
from distributed_ebm.losses import score_grad_penalty
from distributed_ebm.train_loop import train
from tests.test_train import CONFIGS

SHAPE = (1, 8, 8)
CPU = torch.device("cpu")


@pytest.fixture
def energy():
    """A small ConvEnergy with a random θ (the built one has θ = 0, hence ∇Φ = 0)."""
    net = build_energy(ModelConfig(channels=(4, 8)), SHAPE, "conv")
    torch.nn.init.normal_(net.theta.weight, generator=torch.Generator().manual_seed(0), std=2.0)
    return net


@pytest.fixture
def x0():
    return torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(1)) * 2 - 1


def plain_langevin(score_fn, x0, *, step_sizes, ref_sigma, generator, clamp=None, grad_clip=None):
    """ALGORITHMS.md §2 written out the obvious way, with a step size per step and clipped ∇ₓΦ."""
    x = x0.clone()
    for delta in step_sizes:
        grad = score_grad(score_fn, x)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
        noise = torch.randn(x.shape, generator=generator)
        x = x + delta**2 / 2 * (grad - 1 / ref_sigma**2 * x) + delta * noise
        if clamp is not None:
            x = x.clamp(*clamp)
    return x


def build(algorithm: str, overrides: dict | None = None, *, num_classes: int = 0, fit_images=None):
    """A tiny TrainState of `algorithm` for 8×8 grey images."""
    base = {"model.algorithm": algorithm, "model.channels": [4, 8], "chains.bank_size": 8, "chains.batch_size": 8,
            "langevin.langevin_steps": 3, "model.grid_sizes": [2, 4, 8], "generator.latent_dim": 4,
            "generator.base_width": 2, "generator.latent_bank_size": 8}
    config = RunConfig().replace({**base, **(overrides or {})})
    return ALGORITHMS[algorithm].build(config, SHAPE, device=CPU, generator=torch.Generator().manual_seed(0),
                                       data_mean=torch.zeros(1, *SHAPE), num_classes=num_classes,
                                       fit_images=fit_images), config


def data_batch(n: int = 8, seed: int = 5) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- langevin.grad_clip -------------------------------------------------------------------------


def test_grad_clip_is_the_plain_loop_with_clipped_gradients_bit_for_bit(energy, x0):
    knobs = {"ref_sigma": 0.7, "clamp": (-1.0, 1.0)}
    clipped = langevin(energy, x0, steps=5, step_size=0.2, grad_clip=0.05, generator=torch.Generator().manual_seed(3),
                       **knobs)
    plain = plain_langevin(energy, x0, step_sizes=[0.2] * 5, grad_clip=0.05, generator=torch.Generator().manual_seed(3),
                           **knobs)
    assert torch.equal(clipped, plain)
    unclipped = langevin(energy, x0, steps=5, step_size=0.2, generator=torch.Generator().manual_seed(3), **knobs)
    assert not torch.equal(clipped, unclipped)  # the clip was active
    assert float(score_grad(energy, x0).abs().max()) > 0.05


def test_grad_clip_bounds_the_drift_of_each_step():
    """Φ(x) = 1000 Σx has ∇Φ = 1000 everywhere: clipped to c, one step moves x by exactly
    δ²/2 (c − x/σ²) + δ ε."""
    x0 = torch.linspace(-1, 1, 64).view(1, *SHAPE)
    delta, sigma, c = 0.3, 0.8, 0.5
    out = langevin(lambda x: 1000.0 * x.flatten(1).sum(1), x0, steps=1, step_size=delta, ref_sigma=sigma, grad_clip=c,
                   generator=torch.Generator().manual_seed(4))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out - x0 - delta * noise, delta**2 / 2 * (c - x0 / sigma**2), rtol=0, atol=1e-6)


def test_grad_clip_reaches_the_training_chains(monkeypatch):
    calls = []
    real = langevin_module.langevin
    monkeypatch.setattr(langevin_module, "langevin", lambda *a, **k: calls.append(k) or real(*a, **k))
    state, _ = build("wgcn", {"langevin.grad_clip": 0.01})
    ALGORITHMS["wgcn"].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    ALGORITHMS["wgcn"].sample(state, 2, generator=torch.Generator().manual_seed(0), steps=2)
    assert [k["grad_clip"] for k in calls] == [0.01, 0.01]


# --- langevin.sample_anneal_to ------------------------------------------------------------------


def test_step_schedule_is_geometric_from_delta_to_the_target():
    schedule = step_schedule(0.2, 5, 0.0125)
    assert schedule[0] == 0.2 and schedule[-1] == pytest.approx(0.0125, rel=1e-12)
    ratios = [b / a for a, b in zip(schedule, schedule[1:])]
    assert ratios == pytest.approx([0.5] * 4, rel=1e-12)
    assert step_schedule(0.2, 3) == [0.2] * 3 and step_schedule(0.2, 1, 0.01) == [0.2]
    with pytest.raises(ValueError, match="positive"):
        step_schedule(0.2, 3, 0.0)


def test_annealed_run_is_the_plain_loop_with_the_schedule_bit_for_bit(energy, x0):
    schedule = step_schedule(0.3, 6, 0.01)
    annealed = langevin(energy, x0, steps=6, step_size=0.3, anneal_to=0.01, ref_sigma=0.7,
                        generator=torch.Generator().manual_seed(3))
    plain = plain_langevin(energy, x0, step_sizes=schedule, ref_sigma=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(annealed, plain)


def test_annealed_variance_matches_the_ornstein_uhlenbeck_closed_form():
    """With ∇Φ = 0 each step is x ← a_t x + δ_t ε, a_t = 1 − δ_t²/(2σ²): from x0 ~ N(0, v0) the
    final variance is v_L = v0 Π a_t² + Σ_t δ_t² Π_{s>t} a_s² (the recursion v ← a_t² v + δ_t²)."""
    n, v0, sigma, steps = 200_000, 0.25, 0.6, 25
    schedule = step_schedule(0.5, steps, 0.02)
    x0 = torch.randn((n, 1), generator=torch.Generator().manual_seed(0)) * math.sqrt(v0)
    x = langevin(lambda x: 0.0 * x.sum(1), x0, steps=steps, step_size=0.5, anneal_to=0.02, ref_sigma=sigma,
                 generator=torch.Generator().manual_seed(1))
    expected = v0
    for delta in schedule:
        expected = (1 - delta**2 / (2 * sigma**2)) ** 2 * expected + delta**2
    standard_error = expected * math.sqrt(2 / n)
    assert abs(float(x.var()) - expected) < 5 * standard_error
    assert abs(float(x.mean())) < 5 * math.sqrt(expected / n)
    # the last steps are nearly noise-free: the last δ_t is the target
    assert schedule[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("algorithm", ["wgcn", "wmgcn", "ggcn"])
def test_fresh_samples_anneal_and_training_chains_do_not(monkeypatch, algorithm):
    calls = []
    real = langevin_module.langevin
    monkeypatch.setattr(langevin_module, "langevin", lambda *a, **k: calls.append(k) or real(*a, **k))
    state, _ = build(algorithm, {"langevin.sample_anneal_to": 0.01})
    ALGORITHMS[algorithm].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    assert calls and all(k["anneal_to"] is None for k in calls)  # training: constant δ
    calls.clear()
    ALGORITHMS[algorithm].sample(state, 3, generator=torch.Generator().manual_seed(0), steps=4)
    grids = 3 if algorithm == "wmgcn" else 1  # multi-grid anneals each grid's run
    assert [(k["anneal_to"], k["step_size"], k["steps"]) for k in calls] == [(0.01, 0.2, 4)] * grids


@pytest.mark.parametrize("first_grid", ["data_mean", "gaussian"])
def test_multigrid_fresh_samples_equal_annealed_chains_grid_by_grid(first_grid):
    state, config = build("wmgcn", {"langevin.sample_anneal_to": 0.05, "model.first_grid": first_grid},
                          fit_images=data_batch(64))
    grids = list(state.models["grids"])
    for net in grids:
        torch.nn.init.normal_(net.theta.weight, generator=torch.Generator().manual_seed(0), std=1.0)
    sampled = ALGORITHMS["wmgcn"].sample(state, 3, generator=torch.Generator().manual_seed(7), steps=4)
    gen = torch.Generator().manual_seed(7)
    by_hand = multigrid_chains(
        grids, ALGORITHMS["wmgcn"].first_grid(state, 3, gen), config.model.grid_sizes, upsample=config.model.upsample,
        sample=lambda net, x: langevin(net, x, steps=4, step_size=0.2, anneal_to=0.05, ref_sigma=1.0,
                                       clamp=(-1.0, 1.0), generator=gen),
    )[-1][1]
    assert torch.equal(sampled, by_hand)


# --- model.first_grid ---------------------------------------------------------------------------


def test_fit_gaussian_recovers_a_known_mean_and_covariance_and_draws_from_it():
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([[0.5, 0.0, 0.0], [0.3, 0.2, 0.0], [-0.1, 0.4, 0.1]])
    mean = torch.tensor([0.2, -0.3, 0.1])
    images = (mean + torch.randn(40_000, 3, generator=gen) @ a.T).reshape(-1, 3, 1, 1)
    fit = fit_gaussian(images)
    assert torch.allclose(fit["mean"], mean, atol=0.01)
    assert torch.allclose(fit["scale_tril"] @ fit["scale_tril"].T, a @ a.T, atol=0.01)
    draws = draw_gaussian(fit, 40_000, (3, 1, 1), torch.Generator().manual_seed(1))
    assert draws.shape == (40_000, 3, 1, 1)
    flat = draws.reshape(-1, 3)
    assert torch.allclose(flat.mean(0), mean, atol=0.01) and torch.allclose(torch.cov(flat.T), a @ a.T, atol=0.01)


def test_fit_gaussian_is_proper_for_constant_pixels_and_fewer_images_than_pixels():
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    images[:, :, 0, 0] = -1.0  # a pixel that never changes (the border of every digit)
    fit = fit_gaussian(images)  # 5 images, 16 pixels: the sample covariance is singular
    assert torch.isfinite(fit["scale_tril"]).all() and (fit["scale_tril"].diagonal() > 0).all()
    assert fit["scale_tril"][0, 0] < 0.05  # the constant pixel keeps (almost) no spread


def test_gaussian_first_grid_draws_the_data_statistics_at_that_grid():
    """Images with a bright left or right half: at the 2×2 grid the two columns are
    anti-correlated; the first grid's chains start with the data's mean and covariance there,
    while the data-mean start (ALGORITHMS.md) gives every chain the same value."""
    side = torch.randint(2, (4000,), generator=torch.Generator().manual_seed(0))
    images = -torch.ones(4000, *SHAPE)
    images[side == 0, :, :, :4] = 1.0
    images[side == 1, :, :, 4:] = 1.0
    state, _ = build("mgcn", {"model.first_grid": "gaussian"}, fit_images=images)
    starts = ALGORITHMS["mgcn"].first_grid(state, 20_000, torch.Generator().manual_seed(1)).reshape(-1, 4)
    target = resample(images, 2, "nearest").reshape(-1, 4)
    assert torch.allclose(starts.mean(0), target.mean(0), atol=0.03)
    assert torch.allclose(torch.cov(starts.T), torch.cov(target.T), atol=0.03)
    assert torch.cov(starts.T)[0, 1] < -0.9  # left and right columns: one is bright when the other is dark
    plain, _ = build("mgcn", fit_images=images)
    assert "first_grid" not in plain.meta and ALGORITHMS["mgcn"].first_grid(plain, 3).unique().numel() == 1


def test_gaussian_first_grid_trains_resumes_bit_for_bit_and_samples_from_the_saved_fit(tmp_path, tiny_overrides):
    overrides = {**tiny_overrides, "model.first_grid": "gaussian", "model.grid_sizes": [4, 8]}
    base = ["train", "--config", str(CONFIGS / "digits_mgcn.yaml"),
            *[f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*base, "--run-dir", str(full)]) == 0
    assert main([*base, "--run-dir", str(part), "--set", "train.iterations=3"]) == 0
    assert main([*base, "--run-dir", str(part), "--resume"]) == 0
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, part)]
    assert rows[0] == rows[1]
    model = load_run(full)
    fit = model.state.meta["first_grid"]
    digits = load_config(CONFIGS / "digits_mgcn.yaml").data
    expected = fit_gaussian(resample(load_dataset(digits).x, 4, "nearest"))  # the whole data set, at the 4×4 grid
    assert all(torch.allclose(fit[k], expected[k], atol=1e-5) for k in fit)
    gen = torch.Generator().manual_seed(3)
    starts = draw_gaussian(fit, 6, (1, 4, 4), gen)
    assert ALGORITHMS["mgcn"].first_grid(model.state, 6, torch.Generator().manual_seed(3)).equal(starts)
    assert model.sample(6, steps=2).shape == (6, 1, 8, 8)


def test_unknown_first_grid_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'model.first_grid' must be 'data_mean'.*'gaussian'"):
        RunConfig().replace({"model.first_grid": "noise"})


# --- model.energy_l2 ----------------------------------------------------------------------------


def test_energy_l2_gradient_matches_its_formula():
    """Φ(x) = θ·x + b (an MLP energy without hidden layers): the loss
    −(mean Φ(y) − mean Φ(x)) + α (mean Φ(y)² + mean Φ(x)²) has
    ∂/∂θ = −mean y + mean x + 2α (mean Φ(y) y + mean Φ(x) x), ∂/∂b = 2α (mean Φ(y) + mean Φ(x))."""
    net = build_energy(ModelConfig(channels=()), (3,), "mlp").double()
    torch.nn.init.normal_(net.theta.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.constant_(net.theta.bias, 0.3)
    y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha = 0.7
    result = energy_loss(net, y, None, x, x, None, energy_l2=alpha)
    grad_theta, grad_b = torch.autograd.grad(result.loss, [net.theta.weight, net.theta.bias])
    with torch.no_grad():
        phi_y, phi_x = net(y), net(x)
    hand_theta = -y.mean(0) + x.mean(0) + 2 * alpha * ((phi_y[:, None] * y).mean(0) + (phi_x[:, None] * x).mean(0))
    hand_b = 2 * alpha * (phi_y.mean() + phi_x.mean())
    assert torch.allclose(grad_theta.flatten(), hand_theta, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_b.flatten(), hand_b.view(1), rtol=1e-12, atol=1e-12)
    assert result.terms["loss_l2"] == pytest.approx(alpha * float(phi_y.pow(2).mean() + phi_x.pow(2).mean()))
    assert "loss_l2" not in energy_loss(net, y, None, x, x, None).terms  # off by default: no new metric


def test_energy_l2_is_logged_by_training():
    state, _ = build("wgcn", {"model.energy_l2": 0.1})
    out = ALGORITHMS["wgcn"].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    assert out.metrics["loss_l2"] >= 0 and "loss_l2" in out.metrics


# --- model.spectral_norm ------------------------------------------------------------------------


def _largest_singular_values(energy) -> list[float]:
    layers = [m for m in energy.features.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        return [float(torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)) for m in layers]


@pytest.mark.parametrize("algorithm", ["wgcn", "mgcn"])
def test_spectral_norm_keeps_the_largest_singular_value_near_one_after_training(algorithm):
    """Every energy's filters, each grid's for MGCN (mnist_mgcn bounds its grids' Φ so)."""
    state, _ = build(algorithm, {"model.spectral_norm": True})
    energies = list(state.models["grids"]) if algorithm == "mgcn" else [state.energy]
    layers = [m for e in energies for m in e.features.modules() if isinstance(m, torch.nn.Conv2d)]
    original = [m.parametrizations.weight.original.detach().clone() for m in layers]
    for i in range(5):
        ALGORITHMS[algorithm].train_step(state, data_batch(seed=i), None, generator=torch.Generator().manual_seed(i),
                                         iteration=i)
    assert all(not torch.equal(m.parametrizations.weight.original, w) for m, w in zip(layers, original))
    for energy in energies:
        energy.eval()  # the stored power-iteration vectors, no further iteration
        assert _largest_singular_values(energy) == pytest.approx([1.0, 1.0], abs=1e-2)
    with torch.no_grad():
        raw = [float(torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2)) for m in layers]
    assert len(raw) == 2 * len(energies) and all(abs(s - 1) > 0.05 for s in raw)  # the normalisation does the work


def test_spectral_norm_keeps_the_theta_w_split_and_the_theta_only_penalty():
    plain = build_energy(ModelConfig(channels=(4, 8), activation="silu"), SHAPE, "conv")
    normed = build_energy(ModelConfig(channels=(4, 8), activation="silu", spectral_norm=True), SHAPE, "conv")
    theta, w = normed.split_parameters()
    assert normed.theta_names() == plain.theta_names() == {"theta.weight", "theta.bias"}
    assert [p.shape for p in theta] == [p.shape for p in plain.split_parameters()[0]]
    assert sorted(p.numel() for p in w) == sorted(p.numel() for p in plain.split_parameters()[1])
    originals = [n for n, _ in normed.named_parameters() if n.endswith("parametrizations.weight.original")]
    assert len(originals) == 2 and not set(originals) & normed.theta_names()  # the conv filters: w
    torch.nn.init.normal_(normed.theta.weight, generator=torch.Generator().manual_seed(0))
    x = data_batch(4)
    params = dict(normed.named_parameters())
    for reach, w_moves in (("theta", False), ("all", True)):  # a double backward through the parametrization
        normed.zero_grad(set_to_none=True)
        score_grad_penalty(normed.score_reaching(reach), x).backward()
        assert float(params["theta.weight"].grad.abs().sum()) > 0
        for name in originals:
            grad = params[name].grad
            assert (grad is not None and float(grad.abs().sum()) > 0) == w_moves, (reach, name)


def test_spectral_norm_round_trips_through_the_model_state():
    state, _ = build("wgcn", {"model.spectral_norm": True})
    ALGORITHMS["wgcn"].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    saved = state.model_state()
    assert any(k.endswith("._u") for k in saved["models"]["energy"])  # the power-iteration vectors are saved
    again, _ = build("wgcn", {"model.spectral_norm": True, "model.seed": 9})
    again.load_model_state(saved)
    for net in (state.energy, again.energy):
        net.eval()
    x = data_batch(4)
    assert torch.equal(state.energy(x), again.energy(x))
    with pytest.raises(ConfigError, match="spectral_norm"):
        build("wframe", {"model.spectral_norm": True})


# --- train.ema_decay ----------------------------------------------------------------------------


def _weights(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_ema_after_k_steps_is_the_closed_form_average(spectral_norm):
    """ema_k = d^k w_0 + (1 − d) Σ_{j=1..k} d^(k−j) w_j for the energy (a step every iteration)
    and the generator (a step every generator_every iterations); buffers are copied."""
    d, k = 0.8, 4
    state, _ = build("ggcn", {"train.ema_decay": d, "generator.generator_every": 2,
                              "model.spectral_norm": spectral_norm})
    history = {"energy": [_weights(state.energy)], "generator": [_weights(state.generator)]}
    for i in range(k):
        ALGORITHMS["ggcn"].train_step(state, data_batch(seed=i), None, generator=torch.Generator().manual_seed(i),
                                      iteration=i)
        history["energy"].append(_weights(state.energy))
        if (i + 1) % 2 == 0:
            history["generator"].append(_weights(state.generator))
    assert len(history["generator"]) == 1 + k // 2
    for key, snapshots in history.items():
        steps = len(snapshots) - 1
        average = dict(state.ema[key].named_parameters())
        for name, w0 in snapshots[0].items():
            expected = d**steps * w0 + sum((1 - d) * d ** (steps - j) * snapshots[j][name] for j in range(1, steps + 1))
            assert torch.allclose(average[name], expected, rtol=1e-5, atol=1e-6), (key, name)
            assert not torch.equal(average[name], snapshots[-1][name]) or torch.equal(w0, snapshots[-1][name])
        for (name, buffer), (_, live) in zip(state.ema[key].named_buffers(), state.models[key].named_buffers()):
            assert torch.equal(buffer, live), name


def test_ema_round_trips_and_old_checkpoints_start_it_from_the_live_weights():
    state, _ = build("wgcn", {"train.ema_decay": 0.5})
    for i in range(2):
        ALGORITHMS["wgcn"].train_step(state, data_batch(seed=i), None, generator=torch.Generator().manual_seed(i))
    saved = state.model_state()
    again, _ = build("wgcn", {"train.ema_decay": 0.5})
    again.load_model_state(saved)
    for name, param in state.ema["energy"].state_dict().items():
        assert torch.equal(again.ema["energy"].state_dict()[name], param), name
    old = {k: v for k, v in saved.items() if k != "ema"}  # written before EMA was turned on
    again.load_model_state(old)
    for name, param in state.energy.state_dict().items():
        assert torch.equal(again.ema["energy"].state_dict()[name], param), name
    assert "ema" not in build("wgcn")[0].model_state()  # off: the checkpoint format is unchanged


def test_ema_models_averages_only_the_named_networks():
    d = 0.5
    state, _ = build("ggcn", {"train.ema_decay": d, "train.ema_models": ["energy"], "generator.generator_every": 1})
    assert set(state.ema) == {"energy"} and state.averaged_models() == ["energy"]
    before = _weights(state.energy)
    ALGORITHMS["ggcn"].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    after = _weights(state.energy)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for name, average in state.ema["energy"].named_parameters():
        assert torch.allclose(average, d * before[name] + (1 - d) * after[name], rtol=1e-6, atol=1e-7), name
    assert set(state.model_state()["ema"]) == {"energy"}  # the generator's step left no average behind
    for names, algorithm in ((["energie"], "ggcn"), (["generator"], "wgcn"), ([], "ggcn")):
        with pytest.raises(ConfigError, match=r"train\.ema_models.*Fix the list"):
            build(algorithm, {"train.ema_decay": d, "train.ema_models": names})
    with pytest.raises(ConfigError, match=r"train\.ema_models.*needs train\.ema_decay"):
        RunConfig().replace({"train.ema_models": ["energy"]})


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """Tiny wGCN and GGCN runs trained with an EMA of the weights (ggcn_energy: of the energy only)."""
    runs = {}
    for name, preset, extra in (("wgcn", "digits_wgcn.yaml", {}), ("ggcn", "digits_ggcn.yaml", {}),
                                ("ggcn_energy", "digits_ggcn.yaml", {"train.ema_models": ["energy"]})):
        run_dir = tmp_path_factory.mktemp(name)
        config = load_config(CONFIGS / preset, {
            "train.iterations": 4, "train.checkpoint_every": 4, "train.sample_every": 4, "train.data_batch_size": 8,
            "train.ema_decay": 0.5, "chains.bank_size": 8, "chains.batch_size": 8, "langevin.langevin_steps": 2,
            "model.channels": [4, 8], "generator.latent_dim": 4, "generator.base_width": 2,
            "generator.latent_bank_size": 8, "generator.generator_every": 1, "tracking.enabled": False, **extra,
        })
        train(config, run_dir, progress=False)
        runs[name] = run_dir
    return runs


def _spoil_live_weights(run_dir) -> None:
    """Set every live weight of the latest checkpoint to NaN (the EMA copy stays)."""
    path = ckpt.latest_checkpoint(run_dir / "checkpoints") / ckpt.SHARED_FILE
    shared = torch.load(path, map_location="cpu", weights_only=False)
    assert "ema" in shared
    for model in shared["models"].values():
        for value in model.values():
            if value.is_floating_point():
                value.fill_(float("nan"))
    torch.save(shared, path)


@pytest.mark.parametrize("name", ["wgcn", "ggcn"])
def test_load_run_samples_from_the_ema_weights(ema_runs, name, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(ema_runs[name], run_dir)
    by_hand = load_run(run_dir, ema=False)  # the live weights, then the EMA ones loaded by hand
    shared, _ = ckpt.read_checkpoint(by_hand.checkpoint)
    for key, model in by_hand.state.models.items():
        model.load_state_dict(shared["ema"][key])
    expected = by_hand.sample(3, steps=2, seed=1)
    _spoil_live_weights(run_dir)
    model = load_run(run_dir)
    assert model.weights == "ema" and "EMA" in model.weights_description
    samples = model.sample(3, steps=2, seed=1)
    assert torch.isfinite(samples).all() and torch.equal(samples, expected)
    missing = torch.zeros(2, *SHAPE)
    missing[..., 2:6, 2:6] = 1
    assert torch.isfinite(model.inpaint(data_batch(2), missing, steps=2)).all()
    if name == "ggcn":
        assert torch.isfinite(model.interpolate(1, 1, steps=1)).all()
    assert torch.isnan(load_run(run_dir, ema=False).sample(3, steps=2, seed=1)).all()  # the spoiled live copy


def test_load_run_averages_only_the_ema_models_and_keeps_the_rest_live(ema_runs):
    by_hand = load_run(ema_runs["ggcn_energy"], ema=False)
    shared, _ = ckpt.read_checkpoint(by_hand.checkpoint)
    assert set(shared["ema"]) == {"energy"}
    by_hand.state.energy.load_state_dict(shared["ema"]["energy"])
    model = load_run(ema_runs["ggcn_energy"])
    assert model.weights == "ema" and model.state.generator is not None
    assert "of energy; live generator" in model.weights_description
    assert torch.equal(model.sample(3, steps=2, seed=1), by_hand.sample(3, steps=2, seed=1))
    live = load_run(ema_runs["ggcn_energy"], ema=False)
    assert not torch.equal(live.sample(3, steps=2, seed=1), by_hand.sample(3, steps=2, seed=1))


def test_debm_sample_says_it_used_the_ema_weights(ema_runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--run-dir", str(ema_runs["wgcn"]), "--num", "2", "--steps", "1", "--out", str(out)]) == 0
    saved = np.load(out)
    assert str(saved["weights"]) == "ema" and "EMA" in str(saved["source"])
    assert "EMA" in capsys.readouterr().out


# --- GGCN and chains.reinit_prob / chains.init --------------------------------------------------


def test_ggcn_restarts_persistent_latents_at_the_configured_rate():
    p, size = 0.25, 512
    state, _ = build("ggcn", {"chains.reinit_prob": p, "chains.batch_size": size, "generator.latent_bank_size": size,
                              "generator.generator_every": 1000})
    latents = state.banks["latents"]
    latents.states.fill_(50.0)  # far from N(0, I): a restarted ζ is easy to spot
    ALGORITHMS["ggcn"].train_step(state, data_batch(), None, generator=torch.Generator().manual_seed(0))
    restarted = int((latents.states != 50.0).all(1).sum())  # written back without a ζ step this iteration
    assert int((latents.states == 50.0).all(1).sum()) + restarted == size
    sd = math.sqrt(size * p * (1 - p))
    assert abs(restarted - size * p) < 4 * sd
    assert float(latents.states[(latents.states != 50.0).all(1)].std()) == pytest.approx(1.0, abs=0.1)


def test_ggcn_refuses_chain_options_that_do_not_apply():
    with pytest.raises(ConfigError, match="reinit_prob=0.1 does not apply to 'ggcn_nolhs'"):
        build("ggcn_nolhs", {"chains.reinit_prob": 0.1})
    with pytest.raises(ConfigError, match="chains.init='noise' does not apply to 'ggcn_ams'"):
        build("ggcn_ams", {"chains.init": "noise"})
    build("ggcn_nolhs")  # the defaults are fine


def test_ggcn_restart_decisions_resume_bit_for_bit(tmp_path, tiny_overrides):
    """Stop at iteration 3, resume: the metrics, the latent bank and the random streams equal an
    uninterrupted run's, so the restart decisions continue exactly."""
    overrides = {**tiny_overrides, "chains.reinit_prob": 0.3, "chains.batch_size": 8, "generator.latent_dim": 4,
                 "generator.base_width": 2, "generator.latent_bank_size": 16, "generator.generator_every": 2}
    full, part = tmp_path / "full", tmp_path / "part"
    config = load_config(CONFIGS / "digits_ggcn.yaml", overrides)
    train(config, full, progress=False)
    train(config.replace({"train.iterations": 3}), part, progress=False)
    train(config, part, resume=True, progress=False)

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(full) == rows(part)
    _, a = ckpt.read_checkpoint(ckpt.latest_checkpoint(full / "checkpoints"))
    _, b = ckpt.read_checkpoint(ckpt.latest_checkpoint(part / "checkpoints"))
    assert torch.equal(a[0]["banks"]["latents"]["states"], b[0]["banks"]["latents"]["states"])
    assert torch.equal(a[0]["generators"]["chains"], b[0]["generators"]["chains"])
    first = load_config(CONFIGS / "digits_ggcn.yaml", {**overrides, "chains.reinit_prob": 0.0})
    train(first, tmp_path / "never", progress=False)
    _, c = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "never" / "checkpoints"))
    assert not torch.equal(a[0]["banks"]["latents"]["states"], c[0]["banks"]["latents"]["states"])  # restarts happened


# --- config checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("langevin.grad_clip", 0.0), ("langevin.sample_anneal_to", -0.1),
                                        ("model.energy_l2", -1.0), ("train.ema_decay", 1.0)])
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunConfig().replace({key: value})


def test_masked_langevin_inpainting_beats_biharmonic_interpolation_on_a_known_field():
    """A Gaussian field of checkerboards and stripes (amplitudes ~ N(0, 0.15²), pixel noise 0.05) with
    its exact energy: masked Langevin (observed pixels clamped, δ annealed) restores the missing
    pixels far better than biharmonic interpolation, which smooths the high frequencies away; a
    hole filled with noise does not."""
    from distributed_ebm.inpainting import (
        MASK_KINDS,
        biharmonic_fill,
        inpaint_langevin,
        inpainting_scores,
        make_masks,
    )

    size, amplitude, noise = 8, 0.15, 0.05
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = torch.stack([(-1.0) ** (i + j), (-1.0) ** i, (-1.0) ** j, (-1.0) ** ((i + j) // 2)]).flatten(1).T
    cov = amplitude**2 * patterns @ patterns.T + noise**2 * torch.eye(size * size)
    precision = torch.linalg.inv(cov)
    generator = torch.Generator().manual_seed(0)
    amplitudes = amplitude * torch.randn(32, patterns.shape[1], generator=generator)
    images = (amplitudes @ patterns.T + noise * torch.randn(32, size * size, generator=generator))
    images = images.clamp(-1, 1).view(32, 1, size, size)

    def phi(x: torch.Tensor) -> torch.Tensor:  # p(x) ∝ exp(Φ(x) − ‖x‖²/2): Φ = −½ xᵀPx + ½‖x‖²
        flat = x.flatten(1)
        return -0.5 * ((flat @ precision) * flat).sum(1) + 0.5 * flat.pow(2).sum(1)

    for kind in MASK_KINDS:
        missing = make_masks(kind, 32, size, generator=generator)
        ours = inpaint_langevin(phi, images, missing, steps=1500, step_size=0.05, ref_sigma=1.0, anneal_to=0.005,
                                generator=torch.Generator().manual_seed(1))
        assert torch.equal(ours[missing == 0], images[missing == 0])
        baseline = inpainting_scores(biharmonic_fill(images, missing), images, missing)
        scores = inpainting_scores(ours, images, missing)
        noise_fill = torch.where(missing.bool(), torch.rand(images.shape, generator=generator) * 2 - 1, images)
        noisy = inpainting_scores(noise_fill, images, missing)
        assert scores["missing_mse"] < 0.25 * baseline["missing_mse"], (kind, scores, baseline)
        assert scores["missing_psnr"] > baseline["missing_psnr"] + 6
        assert scores["missing_ssim"] > baseline["missing_ssim"]
        assert noisy["missing_mse"] > baseline["missing_mse"]  # the bar is not one any fill clears
        # The mean of K restorations estimates the posterior mean: its error is MMSE + var/K against
        # 2·MMSE for one draw (E‖x − x̂‖² with x̂ an independent draw), so 8 of them roughly halve it.
        draws = torch.stack([
            inpaint_langevin(phi, images, missing, steps=1500, step_size=0.05, ref_sigma=1.0, anneal_to=0.005,
                             generator=torch.Generator().manual_seed(2 + k)) for k in range(8)])
        averaged = inpainting_scores(draws.mean(0), images, missing)
        assert averaged["missing_mse"] < 0.75 * scores["missing_mse"], (kind, averaged, scores)
