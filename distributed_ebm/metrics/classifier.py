"""A small ConvNet classifier trained on the data set itself: labels for agreement and coverage,
and penultimate-layer features for Fréchet distances where no Inception weights are available."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn

from ..data import ImageData


class SmallClassifier(nn.Module):
    """conv(32)-conv(64)-pool(4×4)-fc(128)-fc(K); `features` returns the 128-d layer."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def train_classifier(data: ImageData, *, epochs: int = 30, seed: int = 0, lr: float = 3e-3) -> SmallClassifier:
    """Fit a SmallClassifier on a labelled image data set (Adam, batch 128, light noise augmentation)."""
    if data.y is None:
        raise ValueError(f"The data set '{data.name}' has no labels to train a classifier on.")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(data.x.shape[1], data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), 128):
            index = order[start : start + 128]
            x = data.x[index] + 0.1 * torch.randn(data.x[index].shape, generator=gen)
            loss = nn.functional.cross_entropy(model(x), data.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussian fits of two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if np.iscomplexobj(root):
        root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
