"""GGCN, MGCN, conditional models, inpainting and interpolation."""

import json

import pytest
import torch
import yaml

from distributed_ebm.algorithms import ALGORITHMS, multigrid_chains, resample
from distributed_ebm.cli import main
from distributed_ebm.config import ConfigError, GeneratorConfig, load_config
from distributed_ebm.data import load_dataset
from distributed_ebm.generator import V0_LAYOUTS, build_generator
from distributed_ebm.inference import load_run
from distributed_ebm.inpainting import make_masks
from distributed_ebm.losses import ams_loss
from tests.test_train import CONFIGS, _sets

# The presets on bundled data (the MNIST, CIFAR-10, LSUN, ImageNet and faces presets need files:
# tests/test_presets.py trains them on small data it makes)
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml")
                 if not p.name.startswith("ring") and yaml.safe_load(p.read_text())["data"]["source"] == "digits")


@pytest.mark.parametrize("arch", ["v0", "resnet"])
@pytest.mark.parametrize("size", sorted(V0_LAYOUTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_shapes_and_range(arch, size, channels):
    net = build_generator(GeneratorConfig(arch=arch, latent_dim=8, base_width=4), (channels, size, size), 0, seed=0)
    with torch.no_grad():
        x = net(torch.randn(3, 8) * 5)
    assert x.shape == (3, channels, size, size)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_conditional_generator_uses_the_label():
    net = build_generator(GeneratorConfig(latent_dim=8, base_width=4), (1, 8, 8), 10, seed=0).eval()
    z = torch.randn(2, 8)
    a, b = net(z, torch.tensor([0, 0])), net(z, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pass labels"):
        net(z)


def test_ams_generator_gradient_matches_finite_differences_of_log_p():
    config = load_config(CONFIGS / "digits_ggcn_ams.yaml", {"model.channels": [4, 8], "generator.base_width": 2,
                                                            "generator.latent_dim": 4})
    state = ALGORITHMS["ggcn_ams"].build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator(),
                                         data_mean=torch.zeros(1, 1, 8, 8))
    energy, net = state.energy.double(), state.generator.double().eval()
    torch.nn.init.normal_(energy.theta.weight, std=0.3)
    z = torch.randn(5, 4, dtype=torch.float64)
    sigma = config.langevin.ref_sigma

    def mean_log_p() -> torch.Tensor:  # log p(x) = Φ(x) − ‖x‖²/(2σ²) + const
        x = net(z)
        return (energy(x) - x.flatten(1).pow(2).sum(1) / (2 * sigma**2)).mean()

    x = net(z)
    loss = ams_loss(energy(x), x, ref_sigma=sigma)
    params = dict(net.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name in ("net.0.weight", "net.12.weight"):
        param = params[name]
        for i in (0, param.numel() // 2, param.numel() - 1):
            eps = 1e-6
            with torch.no_grad():
                param.view(-1)[i] += eps
                plus = mean_log_p().item()
                param.view(-1)[i] -= 2 * eps
                minus = mean_log_p().item()
                param.view(-1)[i] += eps
            # the AMS loss is −mean log p, so its gradient is minus the finite difference
            assert grads[name].view(-1)[i].item() == pytest.approx(-(plus - minus) / (2 * eps), rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("algorithm,lhs", [("ggcn", True), ("ggcn_ams", True), ("ggcn_nolhs", False)])
def test_latents_change_only_on_generator_steps_and_only_under_lhs(algorithm, lhs):
    config = load_config(CONFIGS / "digits_ggcn.yaml", {
        "model.algorithm": algorithm, "model.channels": [4, 8], "generator.base_width": 2, "generator.latent_dim": 4,
        "generator.latent_bank_size": 8, "chains.batch_size": 8, "langevin.langevin_steps": 2})
    algo = ALGORITHMS[algorithm]
    gen = torch.Generator().manual_seed(0)
    state = algo.build(config, (1, 8, 8), device=torch.device("cpu"), generator=gen, data_mean=torch.zeros(1, 1, 8, 8))
    data = torch.rand(8, 1, 8, 8) * 2 - 1
    xi = [p.detach().clone() for p in state.generator.parameters()]
    for iteration in range(8):
        before = state.banks["latents"].states.clone()
        out = algo.train_step(state, data, None, generator=gen, iteration=iteration)
        generator_step = (iteration + 1) % 4 == 0
        changed = not torch.equal(before, state.banks["latents"].states)
        assert changed == (generator_step and lhs), iteration
        assert ("loss_generator" in out.metrics) == generator_step
        if iteration == 2:
            assert all(torch.equal(a, b) for a, b in zip(xi, state.generator.parameters()))  # ξ untouched so far
    assert not all(torch.equal(a, b) for a, b in zip(xi, state.generator.parameters()))


def test_multigrid_chains_start_from_the_upsampled_previous_grid():
    config = load_config(CONFIGS / "digits_mgcn.yaml", {"model.channels": [4], "langevin.langevin_steps": 3})
    algo = ALGORITHMS["mgcn"]
    mean = torch.rand(1, 1, 8, 8)
    state = algo.build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator(), data_mean=mean)
    gen = torch.Generator().manual_seed(0)
    chains = multigrid_chains(list(state.models["grids"]), algo.first_grid(state, 5), (1, 4, 8), upsample="nearest",
                              sample=lambda e, x0: algo_sample(state, e, x0, gen))
    assert torch.allclose(chains[0][0], mean.mean().expand(5, 1, 1, 1))  # the data mean, down-sampled to 1×1
    for (start, _), (_, previous) in zip(chains[1:], chains[:-1]):
        assert torch.equal(start, resample(previous, start.shape[-1], "nearest"))
        assert not torch.equal(start, _)  # Langevin moved them
    assert [c[1].shape[-1] for c in chains] == [1, 4, 8]


def test_multigrid_step_logs_every_grid_for_the_collapse_checks():
    """Each grid's gap, saturations and Φ are logged as grid{size}_…, from that grid's own data
    (down-sampled) and chains; the finest grid's also under the plain names."""
    from distributed_ebm.metrics.collapse import saturation, worst_grid

    config = load_config(CONFIGS / "digits_mgcn.yaml", {"model.channels": [4], "langevin.langevin_steps": 3})
    algo = ALGORITHMS["mgcn"]
    data = torch.rand(16, 1, 8, 8) * 2 - 1
    data[:, :, :4] = 1.0  # saturated rows: their share differs between the grids
    state = algo.build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator(),
                       data_mean=data.mean(0, keepdim=True))
    out = algo.train_step(state, data, None, generator=torch.Generator().manual_seed(0))
    metrics = {k: float(v) for k, v in out.metrics.items()}
    for size in config.model.grid_sizes:
        assert metrics[f"grid{size}_data_saturation"] == pytest.approx(float(saturation(resample(data, size, "nearest"))))
        for name in ("energy_gap_z", "chain_saturation", "phi_data", "phi_chains"):
            assert f"grid{size}_{name}" in metrics
    finest = config.model.grid_sizes[-1]
    assert metrics[f"grid{finest}_energy_gap_z"] == metrics["energy_gap_z"]
    assert worst_grid(metrics, 0.0)["energy_gap_z"] == max(metrics[f"grid{s}_energy_gap_z"] for s in config.model.grid_sizes)


def algo_sample(state, energy, x0, gen):
    return state.sampler(energy, x0, generator=gen)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_and_samples(tmp_path, tiny_overrides, preset):
    run = tmp_path / "run"
    overrides = {**tiny_overrides, "generator.base_width": 4, "generator.latent_bank_size": 16}
    if "cond" in preset:
        overrides.update({"chains.bank_size": 20, "chains.batch_size": 20, "train.data_batch_size": 20})
    if "shards" in preset:  # a streaming preset: tiny shards written here (8×8, resized by the reader)
        from tests.test_shards import write_coded_shards

        write_coded_shards(tmp_path / "shards", [20, 20])
        overrides.update({"data.urls": f"{tmp_path}/shards/shard-{{000000..000001}}.tar", "data.loader_workers": 1})
    assert main(["train", "--config", str(CONFIGS / preset), "--run-dir", str(run), *_sets(overrides)]) == 0
    model = load_run(run)
    samples = model.sample(3, steps=2)
    assert samples.shape == (3, *model.sample_shape) and torch.isfinite(samples).all()


@pytest.mark.parametrize("preset", ["digits_ggcn.yaml", "digits_mgcn.yaml", "digits_wgcn_cond.yaml"])
def test_resume_is_exact_for_generators_latents_and_grids(tmp_path, tiny_overrides, preset):
    overrides = {**tiny_overrides, "generator.base_width": 4, "generator.latent_bank_size": 16,
                 "generator.generator_every": 2, "train.data_batch_size": 20, "chains.bank_size": 20,
                 "chains.batch_size": 10}
    base = ["train", "--config", str(CONFIGS / preset), *_sets(overrides)]
    assert main([*base, "--run-dir", str(tmp_path / "full")]) == 0
    assert main([*base, "--run-dir", str(tmp_path / "part"), "--set", "train.iterations=3"]) == 0
    assert main([*base, "--run-dir", str(tmp_path / "part"), "--resume"]) == 0
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("full", "part")]
    assert rows[0] == rows[1]
    full, part = load_run(tmp_path / "full"), load_run(tmp_path / "part")
    for name, bank in full.state.banks.items():
        assert torch.equal(bank.states, part.state.banks[name].states)
    for a, b in zip(full.state.models.values(), part.state.models.values()):
        for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(va, vb), ka


@pytest.fixture(scope="module")
def ggcn_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ggcn") / "run"
    overrides = {"train.iterations": 4, "tracking.enabled": False, "generator.base_width": 4, "model.channels": [8, 16],
                 "langevin.langevin_steps": 3, "chains.batch_size": 16, "train.data_batch_size": 16}
    assert main(["train", "--config", str(CONFIGS / "digits_ggcn.yaml"), "--run-dir", str(run), *_sets(overrides)]) == 0
    return run


@pytest.mark.parametrize("method", ["langevin", "generator"])
@pytest.mark.parametrize("kind", ["square", "spots", "combined"])
def test_inpainting_never_changes_observed_pixels(ggcn_run, method, kind):
    model = load_run(ggcn_run)
    images = load_dataset(model.config.data).x[:6]
    missing = make_masks(kind, 6, 8, generator=torch.Generator().manual_seed(0))
    restored = model.inpaint(images, missing, method=method, steps=5)
    observed = ~missing.bool().expand_as(images)
    assert torch.equal(restored[observed], images[observed])
    assert not torch.equal(restored[~observed], images[~observed])


def test_averaged_inpainting_is_the_mean_of_the_seeded_restorations(ggcn_run):
    """average=K: the mean of the restorations with seeds seed … seed + K − 1 (observed pixels kept)."""
    model = load_run(ggcn_run)
    # values that are not multiples of a power of two: (x + x + x) / 3 does not always round back to x
    images = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    missing = make_masks("combined", 6, 8, generator=torch.Generator().manual_seed(0))
    single = [model.inpaint(images, missing, method="generator", steps=4, seed=s) for s in (3, 4, 5)]
    averaged = model.inpaint(images, missing, method="generator", steps=4, seed=3, average=3)
    torch.testing.assert_close(averaged, torch.stack(single).mean(0))
    assert not torch.allclose(single[0], single[1])  # the seeds give different restorations
    observed = ~missing.bool().expand_as(images)
    assert torch.equal(averaged[observed], images[observed])
    with pytest.raises(ConfigError, match="average must be ≥ 1"):
        model.inpaint(images, missing, average=0)


def test_inpaint_command_reports_scores(ggcn_run, tmp_path, capsys):
    assert main(["inpaint", "--run-dir", str(ggcn_run), "--num", "8", "--steps", "3", "--average", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "inpainting.json").read_text())
    assert report["average"] == 2 and report["estimate"].startswith("posterior mean: the average of 2")
    assert set(report["masks"]) == {"square", "spots", "combined"}
    assert set(report["baseline"]["masks"]) == set(report["masks"]) and "biharmonic" in report["baseline"]["method"]
    for kind, scores in report["masks"].items():
        assert scores["mse"] > 0 and 0 < scores["psnr"] < 60 and -1 <= scores["ssim"] <= 1
        # the error sits in the hole: per missing pixel it is larger than over the whole image
        assert scores["missing_mse"] > scores["mse"] and scores["missing_psnr"] < scores["psnr"]
        assert report["baseline"]["masks"][kind]["missing_mse"] > 0
    printed = capsys.readouterr().out
    assert "missing pixels: PSNR" in printed and "biharmonic baseline" in printed
    from PIL import Image
    assert Image.open(tmp_path / "square.png").size[1] == 4 * (8 * 14 + 1) + 1  # original, masked, baseline, restored


def test_interpolation_endpoints_equal_generated_endpoints(ggcn_run, tmp_path):
    model = load_run(ggcn_run)
    latents = model.interpolation_latents(rows=3, midpoints=8, seed=5)
    images = model.interpolate(rows=3, midpoints=8, seed=5)
    assert images.shape == (3, 10, 1, 8, 8)
    assert float(latents.abs().max()) <= 1.0
    grid = latents.view(3, 10, -1)
    for column in (0, 9):
        expected = model.algorithm.sample(model.state, 3, generator=torch.Generator(), steps=0, latents=grid[:, column])
        assert torch.allclose(images[:, column], expected, atol=1e-6)
    assert main(["interpolate", "--run-dir", str(ggcn_run), "--rows", "2", "--out", str(tmp_path / "i.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "i.png").size == (10 * (8 * 14 + 1) + 1, 2 * (8 * 14 + 1) + 1)  # 14× up-scaled


def test_interpolate_and_label_errors(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run), *_sets(tiny_overrides)]) == 0
    assert main(["interpolate", "--run-dir", str(run), "--out", str(tmp_path / "i.png")]) == 2
    assert "needs a model with a generator" in capsys.readouterr().err
    assert main(["sample", "--run-dir", str(run), "--label", "3", "--out", str(tmp_path / "s.npz")]) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_generator_step_lowers_the_reconstruction_loss_through_both_zeta_and_xi(monkeypatch):
    """On a generator step (GGCN, LHS, no AMS) the ζ step alone and the ξ step alone each lower
    ‖g(ζ; ξ) − x̂‖² towards the iteration's Langevin output x̂: a sign flip of either fails."""
    import copy

    import distributed_ebm.algorithms.ggcn as algorithms
    from distributed_ebm.losses import reconstruction_loss

    config = load_config(CONFIGS / "digits_ggcn.yaml", {
        "model.channels": [4, 8], "generator.base_width": 4, "generator.latent_dim": 4, "generator.latent_bank_size": 8,
        "chains.batch_size": 8, "langevin.langevin_steps": 2, "generator.generator_every": 1,
        "generator.latent_lr": 0.01, "generator.lr": 1e-3})
    algo = ALGORITHMS["ggcn"]
    gen = torch.Generator().manual_seed(0)
    state = algo.build(config, (1, 8, 8), device=torch.device("cpu"), generator=gen, data_mean=torch.zeros(1, 1, 8, 8))
    seen = {}

    def recording(generated, target):
        seen["target"] = target.detach().clone()
        return reconstruction_loss(generated, target)

    monkeypatch.setattr(algorithms, "reconstruction_loss", recording)
    latents = state.banks["latents"]
    write = latents.write
    monkeypatch.setattr(latents, "write", lambda index, z: (seen.update(index=index.clone(), z_new=z.clone()),
                                                            write(index, z)))
    z_bank = latents.states.clone()
    g_old = copy.deepcopy(state.generator)
    algo.train_step(state, torch.rand(8, 1, 8, 8) * 2 - 1, None, generator=gen, iteration=0)
    z_old, z_new, target = z_bank[seen["index"]], seen["z_new"], seen["target"]

    def loss(net, z):  # Eq. 19/20 written out here, independent of losses.py
        with torch.no_grad():
            return float((net(z, None) - target).flatten(1).pow(2).sum(1).mean())

    before = loss(g_old, z_old)
    assert loss(g_old, z_new) < before  # the ζ step alone (ξ as before)
    assert loss(state.generator, z_old) < before  # the ξ step alone (ζ as before)


def test_conditional_multigrid_trains_with_more_chains_than_data_images(tmp_path, tiny_overrides):
    """The chains' labels come from the data batch, cycled: 32 chains on 16 data images work."""
    run = tmp_path / "run"
    overrides = {**tiny_overrides, "model.conditional": True, "train.data_batch_size": 16, "chains.batch_size": 32,
                 "chains.bank_size": 32}
    assert main(["train", "--config", str(CONFIGS / "digits_wmgcn.yaml"), "--run-dir", str(run), *_sets(overrides)]) == 0
    assert json.loads((run / "summary.json").read_text())["iterations"] == 6


@pytest.mark.parametrize("refine_steps", [None, 0, 7])
def test_ggcn_fresh_samples_run_generator_refine_steps_after_g(refine_steps, monkeypatch):
    """g(ζ) is refined by generator.refine_steps Langevin steps (None: L); 0 returns g(ζ) itself."""
    config = load_config(CONFIGS / "digits_ggcn_ams.yaml", {"model.channels": [4, 8], "generator.base_width": 2,
                                                            "generator.latent_dim": 4, "langevin.langevin_steps": 3,
                                                            "generator.refine_steps": refine_steps})
    algorithm = ALGORITHMS["ggcn_ams"]
    state = algorithm.build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator(),
                            data_mean=torch.zeros(1, 1, 8, 8))
    state.generator.eval()
    import distributed_ebm.langevin as langevin_module

    counted = []
    original = langevin_module.langevin
    monkeypatch.setattr(langevin_module, "langevin", lambda *a, **k: counted.append(k["steps"]) or original(*a, **k))
    z = torch.randn(4, 4)
    x = algorithm.sample(state, 4, generator=torch.Generator().manual_seed(0), latents=z)
    assert counted == [3 if refine_steps is None else refine_steps]
    with torch.no_grad():
        start = state.generator(z)
    assert torch.equal(x, start) == (refine_steps == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_ggcn_fresh_latents_are_drawn_at_the_latent_temperature(temperature):
    """Fresh samples draw ζ ~ N(0, T² I): with 0 refinement steps they are g(T·z) for the z the
    same seed draws."""
    config = load_config(CONFIGS / "digits_ggcn.yaml", {"model.channels": [4, 8], "generator.base_width": 2,
                                                        "generator.latent_dim": 4, "generator.refine_steps": 0,
                                                        "generator.latent_temperature": temperature})
    algorithm = ALGORITHMS["ggcn"]
    state = algorithm.build(config, (1, 8, 8), device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                            data_mean=torch.zeros(1, 1, 8, 8))
    state.generator.eval()
    x = algorithm.sample(state, 64, generator=torch.Generator().manual_seed(0))
    z = torch.randn((64, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(x, state.generator(temperature * z))
