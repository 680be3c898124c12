"""Energy networks: shapes, θ/w split, fixed filter bank from a local VGG-16 file or a seeded bank."""

import pytest
import torch

from distributed_ebm.config import ConfigError, ModelConfig
from distributed_ebm.energy import VGG16_FEATURE_INDEX, FilterBank, build_energy


@pytest.mark.parametrize("energy,shape", [("frame", (1, 16, 16)), ("frame", (3, 8, 8)), ("conv", (1, 8, 8)),
                                          ("conv", (3, 32, 32)), ("mlp", (2,))])
def test_energies_score_each_sample(energy, shape):
    net = build_energy(ModelConfig(channels=(8, 16)), shape, energy)
    assert net(torch.rand(5, *shape)).shape == (5,)
    theta, w = net.split_parameters()
    assert theta and all(p.requires_grad for p in theta)
    if energy == "frame":
        assert w == []  # the filter bank is fixed: FRAME learns θ only


def test_frame_theta_layouts():
    per_channel = build_energy(ModelConfig(theta_layout="channel"), (1, 16, 16), "frame")
    per_position = build_energy(ModelConfig(theta_layout="position"), (1, 16, 16), "frame")
    assert per_channel.theta.shape == (128, 1, 1)
    assert per_position.theta.shape == (128, 8, 8)  # one max-pool in the first four VGG-16 layers
    with torch.no_grad():
        assert float(per_channel(torch.rand(2, 1, 16, 16)).abs().sum()) == 0.0  # θ = 0: the model is q


def test_random_bank_is_deterministic_and_named():
    a, b, c = FilterBank(seed=1), FilterBank(seed=1), FilterBank(seed=2)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a.kind == "random:seed=1"


def test_bank_loads_vgg16_weights_from_a_local_file(tmp_path):
    shapes = [(64, 3), (64, 64), (128, 64), (128, 128)]
    state = {}
    for index, (out_ch, in_ch) in zip(VGG16_FEATURE_INDEX, shapes):
        state[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3)
        state[f"features.{index}.bias"] = torch.randn(out_ch)
    torch.save(state, tmp_path / "vgg16.pth")
    bank = FilterBank(layers=4, weights=tmp_path / "vgg16.pth")
    assert bank.kind == "vgg16:vgg16.pth" and bank.normalise
    assert torch.equal(bank.net[0].weight, state["features.0.weight"])
    assert torch.equal(bank.net[7].weight, state["features.7.weight"])  # after the max-pool
    assert not any(p.requires_grad for p in bank.parameters())


def test_bank_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="do not exist.*VGG-16 state dict"):
        FilterBank(weights=tmp_path / "missing.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a VGG-16 state dict"):
        FilterBank(weights=tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="model.energy=mlp"):
        build_energy(ModelConfig(), (2,), "conv")
