"""The run directory: resolved config, metrics.jsonl, sample grids, curve plots, summary.json.

Only rank 0 writes here (checkpoints have their own sub-directory, written by every rank).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

CURVES = (
    ("phi_data", "phi_chains"),
    ("energy_data", "energy_chains"),
    ("response_distance",),
)


class RunDirectory:
    """Files of one training run, under `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics_file = self.path / "metrics.jsonl"
        self.rolled_back_file = self.path / "metrics_rolled_back.jsonl"  # rows a collapse recovery undid

    def create(self) -> None:
        for folder in (self.path, self.checkpoints, self.samples):
            folder.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def append_metrics(self, row: dict) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_iteration: int) -> None:
        """Drop rows logged after `last_iteration` (a resume replays them from its checkpoint)."""
        rows = [r for r in self.read_metrics() if r["iteration"] <= last_iteration]
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def set_aside_metrics(self, last_iteration: int, **marks) -> int:
        """Move the rows logged after `last_iteration` to metrics_rolled_back.jsonl, each with
        `marks` added (a collapse recovery went back to that iteration); return how many moved."""
        rows = self.read_metrics()
        undone = [{**r, **marks} for r in rows if r["iteration"] > last_iteration]
        with self.rolled_back_file.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in undone))
        self.truncate_metrics(last_iteration)
        return len(undone)

    def save_samples(self, samples: torch.Tensor, name: str, reference: torch.Tensor | None = None) -> Path:
        """A PNG grid of images in [-1, 1], or a scatter plot of 2-D points over the reference."""
        path = self.samples / f"{name}.png"
        save_sample_png(samples, path, reference)
        return path

    def plot_curves(self) -> Path | None:
        """Energy (Φ and U) and response-distance curves against images seen, as one PNG."""
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.5))
        x = [r["images_seen"] for r in rows]
        for ax, keys in zip(axes, CURVES):
            for key in keys:
                ax.plot(x, [r.get(key, math.nan) for r in rows], label=key)
            ax.set_xlabel("images seen")
            ax.legend()
        axes[-1].set_yscale("log")
        fig.tight_layout()
        path = self.path / "curves.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


VIEW_SIDE = 112  # grids show each image at least this many pixels wide (nearest-neighbour)


def view_scale(side: int) -> int:
    """The whole-number up-scaling that shows an image of `side` pixels at ≥ VIEW_SIDE pixels."""
    return max(1, math.ceil(VIEW_SIDE / side))


def save_sample_png(samples: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
                    nrow: int | None = None, scale: int | None = None, classes: int | None = None) -> None:
    """Write images (N, C, H, W) in [-1, 1] as a grid (`nrow` per row, default square, at most 64
    images unless nrow is given), each pixel `scale`×`scale` (default `view_scale`: 8×8 digits
    14×, 28×28 and 32×32 4×, 64×64 2×) with a thin grey grid between images; or 2-D points as a
    scatter plot. With `classes` K (image i drawn for class i mod K, as conditional sampling
    cycles): one row per class, up to 10 images each."""
    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        from torchvision.utils import save_image

        if classes and nrow is None and len(samples) >= classes:
            per = min(10, len(samples) // classes)
            samples = samples[[k + classes * j for k in range(classes) for j in range(per)]]
            nrow = per
        if nrow is None:
            samples = samples[:64]
            nrow = max(1, int(math.sqrt(len(samples))))
        scale = view_scale(samples.shape[-1]) if scale is None else scale
        samples = torch.nn.functional.interpolate(samples.clamp(-1, 1), scale_factor=scale, mode="nearest")
        save_image((samples + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=0.5)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(*reference.cpu()[:2000].T, s=2, c="lightgray", label="data")
    ax.scatter(*samples.T, s=4, c="tab:red", label="samples")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)
