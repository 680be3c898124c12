"""Data: bundled sources (no downloads), generic local sources, and (later) WebDataset shards."""

from .sources import SOURCES, ImageData, grid_centres, load_dataset, ring_centres

__all__ = ["SOURCES", "ImageData", "grid_centres", "load_dataset", "ring_centres"]
