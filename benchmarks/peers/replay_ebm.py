"""The standard replay-buffer EBM (Du & Mordatch 2019, "Implicit Generation and Modeling with
Energy-Based Models"), with the published settings also used by the University of Amsterdam
deep-learning tutorial on EBMs (UvA DL tutorial 8). Written from the paper and the tutorial's
text; it is the yardstick of `benchmarks/quality.py`, not part of the library.

Settings (all published values, none tuned here):
- network: 4 strided convolutions (16-32-64-64 channels for 28×28 grey images) with Swish,
  then Linear(256→64), Swish, Linear(64→1); its output f(x) is the negative energy;
- optimiser: Adam, lr 1e-4, betas (0, 0.999), the lr multiplied by 0.97 after every epoch;
- batch 128; real images get Gaussian noise of σ 0.005 (clamped to [−1, 1]);
- sampler: a replay buffer of 8192 chains; each iteration draws 128 starts of which 5 % are new
  uniform noise in [−1, 1], runs 60 Langevin steps x ← x + 10·clip(∇f(x), ±0.03) + 𝒩(0, 0.005²),
  clamped to [−1, 1], and writes the ends back to the front of the buffer;
- loss: f(x⁻) − f(x⁺) (contrastive divergence) + α·(f(x⁺)² + f(x⁻)²) with α = 0.1;
- fresh samples: uniform noise run for 256 steps of the same sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PeerSettings:
    """The published hyper-parameters (Du & Mordatch 2019; UvA DL tutorial 8)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    lr_decay_per_epoch: float = 0.97
    batch_size: int = 128
    buffer_size: int = 8192
    restart_prob: float = 0.05  # share of each batch's starts drawn fresh from uniform noise
    langevin_steps: int = 60
    step_size: float = 10.0
    noise_std: float = 0.005
    grad_clip: float = 0.03  # per-pixel clip of ∇f during sampling
    data_noise_std: float = 0.005
    alpha: float = 0.1  # weight of the energy-magnitude penalty
    sample_steps: int = 256  # fresh samples from noise
    hidden: int = 32


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class PeerCNN(nn.Module):
    """The 4-convolution Swish network; output f(x) = −E(x) (higher: more likely)."""

    def __init__(self, channels: int = 1, side: int = 28, hidden: int = 32):
        super().__init__()
        c1, c2, c3 = hidden // 2, hidden, hidden * 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5, stride=2, padding=4), Swish(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), Swish(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), Swish(),
            nn.Conv2d(c3, c3, 3, stride=2, padding=1), Swish(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, side, side)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, c3), Swish(), nn.Linear(c3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)


def sample_langevin(model: nn.Module, x: torch.Tensor, *, steps: int, step_size: float, noise_std: float,
                    grad_clip: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The peer's sampler: x ← clamp(x + step·clip(∇f, ±c) + 𝒩(0, σ²), −1, 1), `steps` times."""
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.detach().clone()
    for _ in range(steps):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = (x + noise_std * noise).clamp(-1.0, 1.0).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).sum(), x)
        x = (x + step_size * grad.clamp(-grad_clip, grad_clip)).clamp(-1.0, 1.0).detach()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train(was_training)
    return x


def peer_loss(f_real: torch.Tensor, f_fake: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict]:
    """Contrastive divergence plus the energy-magnitude penalty α·(f⁺² + f⁻²)."""
    cdiv = f_fake.mean() - f_real.mean()
    reg = alpha * (f_real.pow(2).mean() + f_fake.pow(2).mean())
    return cdiv + reg, {"cdiv": float(cdiv.detach()), "reg": float(reg.detach())}


class ReplayBufferEBM:
    """Training state of the peer: network, optimiser and the replay buffer."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, ...], settings: PeerSettings = PeerSettings(),
                 *, seed: int = 0, device: str | torch.device = "cpu"):
        self.settings = settings
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr, betas=settings.betas)
        self.buffer = self.uniform(settings.buffer_size, sample_shape)
        self.iterations = 0

    def uniform(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand((n, *shape), generator=self.generator, device=self.device) * 2 - 1

    def starts(self, n: int) -> torch.Tensor:
        """n chain starts: a Binomial(n, 5 %) share of fresh noise, the rest from the buffer."""
        fresh = int(torch.binomial(torch.tensor(float(n)), torch.tensor(self.settings.restart_prob)).item())
        picks = torch.randint(len(self.buffer), (n - fresh,), generator=self.generator, device=self.device)
        return torch.cat([self.uniform(fresh, tuple(self.buffer.shape[1:])), self.buffer[picks]])

    def step(self, real: torch.Tensor) -> dict:
        """One learning iteration on a batch of real images in [−1, 1]."""
        s = self.settings
        real = real.to(self.device)
        real = (real + s.data_noise_std * torch.randn(real.shape, generator=self.generator, device=self.device)).clamp(-1, 1)
        fake = sample_langevin(self.model, self.starts(len(real)), steps=s.langevin_steps, step_size=s.step_size,
                               noise_std=s.noise_std, grad_clip=s.grad_clip, generator=self.generator)
        self.buffer = torch.cat([fake, self.buffer])[: s.buffer_size]
        out = self.model(torch.cat([real, fake]))
        loss, metrics = peer_loss(out[: len(real)], out[len(real):], s.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iterations += 1
        return {"loss": float(loss.detach()), **metrics}

    def decay_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= self.settings.lr_decay_per_epoch

    def sample(self, n: int, *, steps: int | None = None, seed: int = 0, batch: int = 500) -> torch.Tensor:
        """n fresh samples: uniform noise run through `steps` (default 256) sampler steps."""
        s = self.settings
        generator = torch.Generator(device=self.device).manual_seed(seed)
        shape = tuple(self.buffer.shape[1:])
        out = []
        for start in range(0, n, batch):
            x0 = torch.rand((min(batch, n - start), *shape), generator=generator, device=self.device) * 2 - 1
            out.append(sample_langevin(self.model, x0, steps=s.sample_steps if steps is None else steps,
                                       step_size=s.step_size, noise_std=s.noise_std, grad_clip=s.grad_clip,
                                       generator=generator).cpu())
        return torch.cat(out)


def train_for(peer: ReplayBufferEBM, images: torch.Tensor, *, budget_s: float, seed: int = 0,
              on_checkpoint: Callable[[float, int], None] | None = None,
              checkpoint_s: tuple[float, ...] = ()) -> int:
    """Train on `images` (N, C, H, W in [−1, 1]) for `budget_s` wall-clock seconds; epochs of
    shuffled batches, the lr decayed after each epoch. `on_checkpoint(elapsed_s, iterations)` is
    called when the training time passes each of `checkpoint_s` (time spent inside it is not
    counted). Returns the number of iterations."""
    generator = torch.Generator().manual_seed(seed)
    pending = sorted(checkpoint_s)
    elapsed, batch = 0.0, peer.settings.batch_size
    while elapsed < budget_s:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch + 1, batch):
            tick = time.perf_counter()
            peer.step(images[order[start : start + batch]])
            elapsed += time.perf_counter() - tick
            while pending and elapsed >= pending[0]:
                if on_checkpoint is not None:
                    on_checkpoint(pending[0], peer.iterations)
                pending.pop(0)
            if elapsed >= budget_s:
                break
        else:
            peer.decay_lr()
    return peer.iterations
