"""The peer baseline of benchmarks/quality.py (replay-buffer EBM): its loss and sampler on 2-D toys."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers.replay_ebm import (  # noqa: E402
    PeerCNN,
    PeerSettings,
    ReplayBufferEBM,
    peer_loss,
    sample_langevin,
)


class Quadratic(nn.Module):
    """f(x) = −|x − μ|² / 40: a known negative energy whose maximum is μ (flat enough that the
    published step of 10 contracts towards μ instead of overshooting)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))

    def forward(self, x):
        return -(x - self.mu).pow(2).sum(-1) / 40


def test_sampler_climbs_f_to_its_maximum_with_clipped_steps():
    model = Quadratic([0.4, -0.3])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(512, 2, generator=gen) * 2 - 1
    x = sample_langevin(model, x0, steps=256, step_size=10.0, noise_std=0.005, grad_clip=0.03, generator=gen)
    assert torch.allclose(x.mean(0), model.mu.detach(), atol=0.02)
    assert float(x.std(0).max()) < 0.05
    # one step moves a coordinate by at most step·clip + a few noise σ, and never leaves [−1, 1]
    one = sample_langevin(model, x0, steps=1, step_size=10.0, noise_std=0.0, grad_clip=0.03)
    assert float((one - x0).abs().max()) <= 0.3 + 1e-6
    assert model.mu.requires_grad  # parameters handed back trainable


def test_loss_is_contrastive_divergence_plus_magnitude_penalty():
    f_real, f_fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    loss, parts = peer_loss(f_real, f_fake, alpha=0.1)
    assert parts["cdiv"] == -2.5  # mean f(x⁻) − mean f(x⁺)
    assert abs(parts["reg"] - 0.1 * (5.0 + 0.5)) < 1e-6
    assert abs(float(loss) - (-2.5 + 0.55)) < 1e-6


def test_training_moves_fresh_samples_to_the_data():
    """On a 2-D Gaussian at (0.5, −0.5) the trained peer's fresh samples land near it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1), nn.Flatten(0))
    # the published sampler with a step suited to 2-D (10 is meant for 784 pixels)
    settings = PeerSettings(lr=3e-3, buffer_size=512, langevin_steps=20, sample_steps=100, step_size=1.0)
    peer = ReplayBufferEBM(model, (2,), settings, seed=0)
    before = peer.sample(256, seed=1).mean(0)
    data = torch.randn(4096, 2) * 0.1 + torch.tensor([0.5, -0.5])
    for _ in range(300):
        peer.step(data[torch.randint(len(data), (128,))])
    after = peer.sample(256, seed=1)
    assert float((after.mean(0) - torch.tensor([0.5, -0.5])).norm()) < 0.1
    assert float((before - torch.tensor([0.5, -0.5])).norm()) > 0.4
    assert peer.iterations == 300 and peer.buffer.shape == (512, 2)


def test_restarts_follow_the_published_rate():
    peer = ReplayBufferEBM(PeerCNN(), (1, 28, 28), seed=0)
    peer.buffer.fill_(0.5)  # buffer entries are 0.5 exactly, fresh noise never is
    starts = torch.cat([peer.starts(128) for _ in range(40)])
    fresh = float((starts.flatten(1) != 0.5).any(1).float().mean())
    assert 0.035 < fresh < 0.065
    assert PeerCNN()(torch.zeros(3, 1, 28, 28)).shape == (3,)
