"""Data: bundled sources (no downloads), generic local sources and WebDataset shards."""

from __future__ import annotations

import torch

from .sources import SOURCES, ImageData, grid_centres, load_dataset, ring_centres


def training_data(config, rank: int, world_size: int, device: torch.device):
    """(this rank's data, the whole data set's mean image) for the training loop.

    In-memory sources give the rank's disjoint share (`ImageData.shard`); `webdataset` gives a
    `StreamingData` that reads the rank's shards. Both answer `batch(n, generator)`.
    """
    if config.data.source == "webdataset":
        from .stream import StreamingData

        stream = StreamingData(config.data, batch_size=config.train.data_batch_size, rank=rank,
                               world_size=world_size, seed=config.train.seed, device=device)
        return stream, stream.mean
    full = load_dataset(config.data)
    return full.shard(rank, world_size), full.x.mean(0, keepdim=True)


__all__ = ["SOURCES", "ImageData", "grid_centres", "load_dataset", "ring_centres", "training_data"]
