"""Generated samples stored in a file (ours or another system's), read for `debm evaluate --samples`.

The file is an `.npz` with an array `samples`, shaped (N, C, H, W), (N, H, W, C) or (N, H, W)
(grey), holding floats in [-1, 1] or uint8 in [0, 255], and optionally `labels` (N,) with the
class each sample was drawn for. Everything is checked against the reference images before any
scoring: a file that does not fit raises a ConfigError naming the cause and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

SAMPLES_KEY = "samples"  # the array of images in the .npz
LABELS_KEY = "labels"  # the optional array of class indices
RANGE_SLACK = 1e-3  # floats this far outside [-1, 1] (rounding by another system) are clamped
HOW_TO_SAVE = "numpy.savez(PATH, samples=images) (optionally labels=classes)"


@dataclass
class SamplesFile:
    """Samples read from a file: float images in [-1, 1] shaped like the reference images."""

    x: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64, the class each sample was drawn for, or None
    path: Path
    layout: str  # how the file stores them: "NCHW", "NHWC" or "NHW"
    dtype: str  # the file's dtype: uint8 or a float type
    total: int  # samples in the file (x may hold only the first `limit`)


def read_samples(
    path: str | Path,
    shape: tuple[int, int, int],
    *,
    num_classes: int = 0,
    limit: int | None = None,
    min_samples: int = 2,
    reference: str = "the reference data",
) -> SamplesFile:
    """Read and check the samples of `path` against reference images of `shape` (C, H, W).

    `num_classes`: classes of the reference data (labels are checked against them; 0: labels are
    ignored). `limit`: keep the first `limit` samples (None: all). `min_samples`: fewer is an
    error (the k-NN scores need k + 1). `reference` names the reference data in messages.
    """
    path = Path(path).expanduser()
    samples, labels = _arrays(path)
    x, layout = _layout(samples, shape, path, reference)
    total = len(x)
    if limit is not None:
        x = x[:limit]
    if len(x) < min_samples:
        raise ConfigError(
            f"'{path}' holds {total} sample(s); scoring needs at least {min_samples} "
            "(precision/recall use k + 1 nearest neighbours). Save more samples, or lower "
            "--nearest-k."
        )
    images = torch.from_numpy(np.ascontiguousarray(_unit_range(x, path)))
    classes = None if labels is None else _labels(labels, total, num_classes, path)
    return SamplesFile(images, None if classes is None else classes[: len(x)], path, layout,
                       str(samples.dtype), total)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The `samples` (and `labels`, if any) arrays of the .npz at `path`."""
    if not path.is_file():
        raise ConfigError(f"The samples file '{path}' does not exist. Save samples with {HOW_TO_SAVE}.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"'{path}' is not a readable .npz file ({err}). Save samples with {HOW_TO_SAVE}."
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"'{path}' is a single .npy array, not an .npz archive: save it with {HOW_TO_SAVE}."
        )
    with archive:
        if SAMPLES_KEY not in archive.files:
            raise ConfigError(
                f"'{path}' holds the arrays {sorted(archive.files)} but no '{SAMPLES_KEY}': save "
                f"the images under that name: {HOW_TO_SAVE}."
            )
        try:
            samples = archive[SAMPLES_KEY]
            labels = archive[LABELS_KEY] if LABELS_KEY in archive.files else None
        except ValueError as err:  # object arrays need pickle, which stays off
            raise ConfigError(
                f"'{path}': cannot read its arrays ({err}). Store plain numeric arrays: {HOW_TO_SAVE}."
            ) from None
    return samples, labels


def _layout(samples: np.ndarray, shape: tuple[int, int, int], path: Path,
            reference: str) -> tuple[np.ndarray, str]:
    """The samples as (N, C, H, W) and the layout the file used; the shape must match `shape`."""
    channels, height, width = shape
    if samples.ndim == 3 and (1, *samples.shape[1:]) == tuple(shape):
        return samples[:, None], "NHW"
    if samples.ndim == 4 and samples.shape[1:] == tuple(shape):
        return samples, "NCHW"
    if samples.ndim == 4 and samples.shape[1:] == (height, width, channels):
        return samples.transpose(0, 3, 1, 2), "NHWC"
    wanted = f"{channels}×{height}×{width} (C×H×W)"
    if samples.ndim == 3:
        found = (1, *samples.shape[1:])
    elif samples.ndim == 4 and samples.shape[1] in (1, 3):
        found = samples.shape[1:]
    elif samples.ndim == 4 and samples.shape[-1] in (1, 3):
        found = (samples.shape[-1], *samples.shape[1:3])
    else:
        raise ConfigError(
            f"'{path}': '{SAMPLES_KEY}' has shape {samples.shape}; expected (N, C, H, W), "
            f"(N, H, W, C) or (N, H, W) with C = 1 (grey) or 3 (RGB), like the "
            f"images of {reference}, {wanted}."
        )
    if found[0] != channels:
        other = "grey (1 channel)" if found[0] == 1 else "RGB (3 channels)"
        flag = "true" if found[0] == 1 else "false"
        raise ConfigError(
            f"'{path}': the samples are {other} but the images of {reference} have {channels} "
            f"channel(s). Convert the samples to {channels} channel(s), or make the reference "
            f"data {other} with --set data.grayscale={flag}."
        )
    size_fix = f" or resize the reference data with --set data.image_size={found[1]}" if found[1] == found[2] else ""
    raise ConfigError(
        f"'{path}': the samples are {found[1]}×{found[2]} pixels but the images of {reference} are "
        f"{height}×{width}. Resize the samples to {height}×{width}{size_fix}."
    )


def _unit_range(x: np.ndarray, path: Path) -> np.ndarray:
    """uint8 [0, 255] or floats in [-1, 1] as float32 in [-1, 1]; anything else is an error."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(
            f"'{path}': '{SAMPLES_KEY}' has dtype {x.dtype}; expected uint8 in [0, 255] or floats "
            "in [-1, 1]. Convert it (e.g. images.astype(numpy.uint8) for 0…255 integers)."
        )
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int((~finite.reshape(len(x), -1)).any(1).sum())
        raise ConfigError(
            f"'{path}': {bad} of {len(x)} samples hold NaN or infinite values (a sampler that "
            "diverged?). Drop or redraw those samples before scoring."
        )
    low, high = float(x.min()), float(x.max())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ConfigError(
            f"'{path}': the samples span [{low:.4g}, {high:.4g}]; expected floats in [-1, 1] or "
            "uint8 in [0, 255]. Rescale them: x / 127.5 - 1 for floats in [0, 255], x * 2 - 1 for "
            "[0, 1]."
        )
    if low >= 0:
        log.warning("'%s': every sample value lies in [0, %.3g]; samples are read as [-1, 1]. If "
                    "they are [0, 1] images, rescale them (x * 2 - 1).", path, high)
    return np.clip(x, -1.0, 1.0)


def _labels(labels: np.ndarray, total: int, num_classes: int, path: Path) -> torch.Tensor | None:
    """The file's labels as int64, checked: one per sample, integers in 0 … num_classes − 1."""
    if not num_classes:
        log.warning("'%s' has labels but the reference data has no classes: ignoring them.", path)
        return None
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all()
        and (labels == np.round(labels)).all()
    )
    if labels.shape != (total,) or not integral:
        raise ConfigError(
            f"'{path}': '{LABELS_KEY}' has shape {labels.shape} and dtype {labels.dtype}; expected "
            f"{total} integers, one class index per sample (or leave '{LABELS_KEY}' out)."
        )
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"'{path}': '{LABELS_KEY}' spans {labels.min()} … {labels.max()}; the reference data "
            f"has classes 0 … {num_classes - 1}. Map the labels to those classes."
        )
    return torch.from_numpy(labels)
