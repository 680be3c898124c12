"""Response distance R (both papers): R = (1/K) Σ_k |mean_i F_k(x_i) − mean_j F_k(y_j)|."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..energy import FilterBank


class ResponseDistance(nn.Module):
    """R over the K channels of a fixed filter bank (averaged over positions and samples).

    Images use the VGG-16-layout bank (local VGG weights if given, else a seeded random bank);
    vectors (the 2-D mixtures) use a fixed random ReLU feature map with K = 64.
    """

    def __init__(self, sample_shape: tuple[int, ...], *, seed: int = 1234, weights: str | None = None):
        super().__init__()
        if len(sample_shape) == 3:
            self.features = FilterBank(layers=4, weights=weights, seed=seed)
            self.kind = self.features.kind
        else:
            gen = torch.Generator().manual_seed(seed)
            dim = int(torch.tensor(sample_shape).prod())
            linear = nn.Linear(dim, 64)
            linear.weight.data = torch.randn(64, dim, generator=gen) * 2.0
            linear.bias.data = torch.rand(64, generator=gen) * 2 - 1
            self.features = nn.Sequential(nn.Flatten(), linear, nn.ReLU())
            self.kind = f"random-relu-features:seed={seed}"
        for param in self.parameters():
            param.requires_grad_(False)

    def channel_means(self, x: torch.Tensor) -> torch.Tensor:
        """mean_i F_k(x_i) for every channel k: (K,)."""
        with torch.no_grad():
            response = self.features(x)
        return response.transpose(0, 1).flatten(1).mean(1)

    def channel_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_i F_k(x_i) over samples (and positions) for every channel k, then the number of terms
        per channel: (K + 1,), float64."""
        with torch.no_grad():
            response = self.features(x).transpose(0, 1).flatten(1)
        return torch.cat([response.sum(1, dtype=torch.float64),
                          response.new_full((1,), response.shape[1], dtype=torch.float64)])

    def forward(self, x: torch.Tensor, y: torch.Tensor, *,
                sum_over_group: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """R between samples x and data y (a scalar tensor). With `sum_over_group`
        (distributed.all_reduce_sum), R between the whole group's samples and data: the channel
        means come from sums and counts summed over the group, not a mean of per-worker R's
        (which |·| biases upwards, the more so the more workers)."""
        sums = torch.stack([self.channel_sums(x), self.channel_sums(y)])
        if sum_over_group is not None:
            sums = sum_over_group(sums)
        means = sums[:, :-1] / sums[:, -1:]
        return (means[0] - means[1]).abs().mean().to(x.dtype)
