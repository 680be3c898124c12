"""Self-conditioning (model.clusters): k-means clusters of the training images stand in for labels.

An unconditional model with `model.clusters = K` trains the class-conditional networks on K
clusters of the training images found by k-means in pixel space; no label of the data is read.
Every data batch is labelled by its nearest centroid, the chains carry clusters in proportion to
their share of the training images, and fresh samples draw the cluster from that share, so the
model is still a model of p(x) = Σ_k π_k p(x | k). The clusters give the generator and the energy
a mode to start from, as the self-conditioned GAN does with clusters of its discriminator's
features (Liu et al. 2020, "Diverse image generation via self-conditioned GANs").

The fit is deterministic (k-means++ seeded by model.seed, then Lloyd's iterations in float64, on
at most FIT_MAX_IMAGES images and FIT_MAX_VALUES pixel values, drawn by the same seed), so every
rank finds the same clusters from the same images; the centroids and shares are saved with the
model (TrainState.meta["clusters"]) and sampling, inpainting and serving read them there. The fit
holds one float64 copy of its images (at most 8 · FIT_MAX_VALUES bytes = 1.6 GB) and no
temporary of that size: distances are taken CHUNK images at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

GOLDEN = (math.sqrt(5) - 1) / 2  # the stratified draw's step: every run of ids covers the shares evenly
FIT_MAX_IMAGES = 60_000  # larger sets are fitted on a seeded subset of this many images …
FIT_MAX_VALUES = 200_000_000  # … and of at most this many pixel values (MNIST: 47 M, CIFAR-10: 154 M, whole;
                              # 64×64 RGB: 16 276 images, 1.6 GB in float64)
CHUNK = 4096  # images per distance computation in the fit


@dataclass
class Clusters:
    """K centroids in pixel space and each cluster's share π_k of the images they were fitted on."""

    centroids: torch.Tensor  # (K, D) float32, D = C·H·W
    shares: torch.Tensor  # (K,) float64, summing to 1

    def __len__(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, images: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100,
            max_images: int = FIT_MAX_IMAGES, max_values: int = FIT_MAX_VALUES) -> Clusters:
        """k-means of `images` (N, …) in pixel space: k-means++ seeding, then Lloyd's iterations
        until no image changes cluster (at most `iterations`). More than `max_images` images, or
        more than `max_values` pixel values: the fit (centroids and shares) uses as many as fit,
        drawn by `seed` (MNIST's 60 000 and CIFAR-10's 50 000 are fitted whole)."""
        generator = torch.Generator().manual_seed(seed)
        per_image = images[0].numel() if len(images) else 1
        max_images = min(max_images, max(k, max_values // per_image))
        if len(images) > max_images:
            images = images[torch.randperm(len(images), generator=generator)[:max_images]]
        x = images.flatten(1).to(torch.float64).cpu()
        del images  # the subset's float32 copy, if one was made (the caller keeps its own)
        if k < 2:
            raise ConfigError(f"model.clusters={k}: self-conditioning needs at least 2 clusters (0 turns it off).")
        if len(x) < k:
            raise ConfigError(
                f"model.clusters={k} needs at least {k} images to fit on; the data gives {len(x)}. "
                "Lower model.clusters (or, for shards, raise data.cluster_samples: the clusters are fitted on "
                "data.cluster_samples images spread over the shards)."
            )
        centroids = _kmeans_pp(x, k, generator)
        assignment = None
        for _ in range(iterations):
            new = _nearest(x, centroids)
            if assignment is not None and torch.equal(new, assignment):
                break
            assignment = new
            counts = torch.bincount(assignment, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
            empty = counts == 0  # a cluster that lost every image keeps its centroid
            centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        counts = torch.bincount(_nearest(x, centroids), minlength=k).to(torch.float64)
        if (counts == 0).any():
            raise ConfigError(
                f"model.clusters={k}: k-means left {int((counts == 0).sum())} cluster(s) empty on these "
                f"{len(x)} images (too few distinct images). Lower model.clusters."
            )
        return cls(centroids.to(torch.float32), counts / counts.sum())

    def assign(self, images: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """The nearest centroid of each image (N,) int64, on the images' device. With `observed`
        (1 where a pixel is known, broadcastable to the images) only those pixels count, as for
        an image with a hole to inpaint."""
        x = images.flatten(1).to(torch.float32)
        centroids = self.centroids.to(x.device)
        if observed is None:
            return _nearest(x, centroids)
        weight = torch.broadcast_to(observed.to(x.device, torch.float32), images.shape).flatten(1)
        # Σ_j w_j (x_j − c_j)², without the Σ w x² term that does not depend on the cluster
        distance = (weight @ (centroids**2).T) - 2 * ((weight * x) @ centroids.T)
        return distance.argmin(1)

    def draw(self, num: int, *, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
        """`num` clusters in proportion to the shares, for sample ids offset … offset+num−1: a
        stratified draw (the golden-ratio sequence), so every batch of ids holds each cluster close
        to its share."""
        return self.label_ids(torch.arange(offset, offset + num), device=device)

    def label_ids(self, ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The cluster of each chain or sample id (int64), in proportion to the shares."""
        u = torch.frac(ids.to(torch.float64).cpu() * GOLDEN + 0.5 * GOLDEN)
        edges = torch.cumsum(self.shares, 0)
        labels = torch.searchsorted(edges, u, right=True).clamp(max=len(self) - 1)
        return labels.to(ids.device if device is None else device)

    def state_dict(self) -> dict:
        return {"centroids": self.centroids.cpu().clone(), "shares": self.shares.cpu().clone()}

    @classmethod
    def from_state(cls, state: dict) -> Clusters:
        return cls(state["centroids"].to(torch.float32), state["shares"].to(torch.float64))


class ClusteredData:
    """A training data set whose batches carry their cluster (not the source's labels)."""

    def __init__(self, data, clusters: Clusters):
        self.data, self.clusters = data, clusters

    @property
    def num_classes(self) -> int:
        return len(self.clusters)

    def batch(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = self.data.batch(n, generator)
        return images, self.clusters.assign(images)

    def __getattr__(self, name: str):  # sample_shape, name, reference, counters, state_dict, …
        if name in ("data", "clusters"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.data, name)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of `x` (squared Euclidean distance)."""
    distance = (centroids**2).sum(1)[None, :] - 2 * (x @ centroids.T)
    return distance.argmin(1)


def _squared_distance(x: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """‖x_i − point‖² of every row of `x`, CHUNK rows at a time (no N × D temporary)."""
    return torch.cat([((x[i:i + CHUNK] - point) ** 2).sum(1) for i in range(0, len(x), CHUNK)])


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid is an image drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    first = torch.randint(len(x), (1,), generator=generator)
    centroids = [x[first[0]]]
    nearest = _squared_distance(x, centroids[0])
    for _ in range(1, k):
        if nearest.sum() <= 0:  # fewer distinct images than clusters
            raise ConfigError(f"model.clusters={k}: the data has fewer than {k} distinct images. Lower model.clusters.")
        index = torch.multinomial(nearest, 1, generator=generator)[0]
        centroids.append(x[index])
        nearest = torch.minimum(nearest, _squared_distance(x, x[index]))
    return torch.stack(centroids)
