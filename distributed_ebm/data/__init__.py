"""Data: bundled sources (no downloads), generic local sources and WebDataset shards.

Modules: `sources` (the SOURCES registry and in-memory ImageData), `transforms` (pixel ranges,
layouts, resizing), `urls` (shard URL patterns), `tar` (reading and decoding tar shards),
`preflight` (checks before training, the manifest), `stream` (the training stream of shards),
`shards` (writing shards).
"""

from __future__ import annotations

import torch

from ..clusters import ClusteredData, Clusters
from .sources import SOURCES, ImageData, grid_centres, load_dataset, ring_centres
from .stream import StreamingData


def training_data(config, rank: int, world_size: int, device: torch.device):
    """(this rank's data, the whole data set's mean image, fit images) for the training loop.

    In-memory sources give the rank's disjoint share (`ImageData.shard`); `webdataset` gives a
    `StreamingData` that reads the rank's shards. Both answer `batch(n, generator)`. With
    model.clusters the batches carry k-means clusters instead of labels (`ClusteredData`), fitted
    on the whole in-memory data set (a seeded subset past clusters.FIT_MAX_IMAGES or
    FIT_MAX_VALUES), or on a stream's data.cluster_samples images spread over every shard: the
    same images on every rank, so every rank finds the same clusters. The fit images (the whole
    in-memory set, or a stream's cluster images or else its first data.mean_samples) are what
    data statistics beyond the mean are fitted on (MGCN's model.first_grid="gaussian"), the same on
    every rank.
    """
    if config.data.source == "webdataset":
        fit_samples = config.data.cluster_samples if config.model.clusters else None
        data = StreamingData(config.data, batch_size=config.train.data_batch_size, rank=rank,
                             world_size=world_size, seed=config.train.seed, device=device,
                             reference_samples=fit_samples)
        fit_on, mean = (data.take_fit_images() if fit_samples else None), data.mean
    else:
        full = load_dataset(config.data)
        data, fit_on, mean = full.shard(rank, world_size), full.x, full.x.mean(0, keepdim=True)
    if config.model.clusters:
        data = ClusteredData(data, Clusters.fit(fit_on, config.model.clusters, seed=config.model.seed))
    return data, mean, (fit_on if fit_on is not None else data.reference)


__all__ = ["SOURCES", "ImageData", "grid_centres", "load_dataset", "ring_centres", "training_data"]
