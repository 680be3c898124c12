"""Self-conditioning (model.clusters): k-means clusters of the training images stand in for labels.

An unconditional model with `model.clusters = K` trains the class-conditional networks on K
clusters of the training images found by k-means in pixel space; no label of the data is read.
Every data batch is labelled by its nearest centroid, the chains carry clusters in proportion to
their share of the training images, and fresh samples draw the cluster from that share, so the
model is still a model of p(x) = Σ_k π_k p(x | k). The clusters give the generator and the energy
a mode to start from, as the self-conditioned GAN does with clusters of its discriminator's
features (Liu et al. 2020, "Diverse image generation via self-conditioned GANs").

The fit is deterministic (k-means++ seeded by model.seed, then Lloyd's iterations in float64, on
at most FIT_MAX_IMAGES images drawn by the same seed), so every rank finds the same clusters from
the same images; the centroids and shares are saved with
the model (TrainState.meta["clusters"]) and sampling, inpainting and serving read them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

GOLDEN = (math.sqrt(5) - 1) / 2  # the stratified draw's step: every run of ids covers the shares evenly
FIT_MAX_IMAGES = 60_000  # larger sets are fitted on a seeded subset (a cap on images, not bytes: 60 000 × D float64)


@dataclass
class Clusters:
    """K centroids in pixel space and each cluster's share π_k of the images they were fitted on."""

    centroids: torch.Tensor  # (K, D) float32, D = C·H·W
    shares: torch.Tensor  # (K,) float64, summing to 1

    def __len__(self) -> int:
        return len(self.centroids)

    @classmethod
    def fit(cls, images: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100,
            max_images: int = FIT_MAX_IMAGES) -> Clusters:
        """k-means of `images` (N, …) in pixel space: k-means++ seeding, then Lloyd's iterations
        until no image changes cluster (at most `iterations`). More than `max_images` images: the
        fit (centroids and shares) uses `max_images` of them drawn by `seed` (MNIST's 60 000 and
        CIFAR-10's 50 000 are fitted whole)."""
        generator = torch.Generator().manual_seed(seed)
        if len(images) > max_images:
            images = images[torch.randperm(len(images), generator=generator)[:max_images]]
        x = images.flatten(1).to(torch.float64).cpu()
        if k < 2:
            raise ConfigError(f"model.clusters={k}: self-conditioning needs at least 2 clusters (0 turns it off).")
        if len(x) < k:
            raise ConfigError(
                f"model.clusters={k} needs at least {k} images to fit on; the data gives {len(x)}. "
                "Lower model.clusters (or, for shards, raise data.cluster_samples: the clusters are fitted on "
                "the first data.cluster_samples images)."
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


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid is an image drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    first = torch.randint(len(x), (1,), generator=generator)
    centroids = [x[first[0]]]
    nearest = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        if nearest.sum() <= 0:  # fewer distinct images than clusters
            raise ConfigError(f"model.clusters={k}: the data has fewer than {k} distinct images. Lower model.clusters.")
        index = torch.multinomial(nearest, 1, generator=generator)[0]
        centroids.append(x[index])
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(1))
    return torch.stack(centroids)
