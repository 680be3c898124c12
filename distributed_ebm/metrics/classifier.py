"""A small ConvNet classifier trained on the data set itself: labels for agreement and coverage,
and penultimate-layer features for Fréchet distances where no Inception weights are available.

`cached_classifier` keeps trained classifiers in a cache folder, one file per hash of (data
config, classifier settings), so that every evaluation of a data set uses the same network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from ..config import ConfigError, DataConfig
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


# Bump when SmallClassifier or train_classifier change, or a DataConfig default: old cache files then
# stop matching (the key leaves out data keys at their defaults).
CLASSIFIER_VERSION = 1


def classifier_key(data_config: DataConfig, *, epochs: int, seed: int, lr: float) -> str:
    """A hash of (data config, classifier settings): the cache name of a trained classifier. Data
    keys at their defaults are left out, so a key added to DataConfig later does not rename (and
    retrain) the classifiers already cached."""
    defaults = dataclasses.asdict(type(data_config)())
    data = {k: v for k, v in dataclasses.asdict(data_config).items() if v != defaults[k]}
    if data.get("path"):
        data["path"] = str(Path(data["path"]).expanduser().resolve())
    settings = {"arch": "SmallClassifier", "version": CLASSIFIER_VERSION, "epochs": epochs,
                "seed": seed, "lr": lr}
    text = json.dumps({"data": data, "classifier": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """$DEBM_CACHE_DIR/classifiers, else ~/.cache/distributed_ebm/classifiers."""
    root = os.environ.get("DEBM_CACHE_DIR") or Path.home() / ".cache" / "distributed_ebm"
    return Path(root).expanduser() / "classifiers"


def cached_classifier(
    data: ImageData,
    data_config: DataConfig,
    *,
    epochs: int = 30,
    seed: int = 0,
    lr: float = 3e-3,
    cache_dir: str | Path | None = None,
) -> tuple[SmallClassifier, dict]:
    """The SmallClassifier of `data` (built from `data_config`): loaded from the cache folder when a
    file of the same key is there, else trained and saved. Returns it and a description (key,
    file, whether it was reused, training accuracy, settings)."""
    key = classifier_key(data_config, epochs=epochs, seed=seed, lr=lr)
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = path / f"classifier-{key}.pt"
    channels = data.x.shape[1]
    reused = path.is_file()
    if reused:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if (saved["channels"], saved["num_classes"]) != (channels, data.num_classes):
            raise ConfigError(
                f"The cached classifier '{path}' takes {saved['channels']} channels and "
                f"{saved['num_classes']} classes, but the data set has {channels} and "
                f"{data.num_classes} (the data behind the same config changed): delete the file "
                "to retrain it."
            )
        model = SmallClassifier(channels, data.num_classes)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        accuracy = saved["train_accuracy"]
    else:
        model = train_classifier(data, epochs=epochs, seed=seed, lr=lr)
        accuracy = float((model.predict(data.x) == data.y).float().mean())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        saved = {"state_dict": model.state_dict(), "channels": channels,
                 "num_classes": data.num_classes, "train_accuracy": accuracy}
        torch.save(saved, tmp)
        os.replace(tmp, path)
    info = {"hash": key, "file": str(path), "reused": reused, "train_accuracy": accuracy,
            "epochs": epochs, "seed": seed, "lr": lr, "data": data.name, "num_images": len(data)}
    return model, info
