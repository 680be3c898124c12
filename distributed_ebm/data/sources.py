"""Bundled and generic data sources, each giving images scaled to [-1, 1] (and labels if any).

Nothing here downloads: the bundled sources come from scikit-learn and scikit-image, which ship
their data inside the package; `npz` and `folder` read the user's local files. Sources are
registered by name in SOURCES and built from a DataConfig with `load_dataset`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig, did_you_mean
from .preflight import inspect_shards
from .stream import ShardStream
from .transforms import IMAGE_SUFFIXES, centre_crop_resize, resize, to_nchw

log = logging.getLogger(__name__)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
TEXTURES = ("brick", "grass", "gravel")


@dataclass
class ImageData:
    """An in-memory data set: samples in [-1, 1], optional integer labels."""

    x: torch.Tensor  # (N, C, H, W) images or (N, D) vectors, float32 in [-1, 1]
    y: torch.Tensor | None  # (N,) int64 class labels, or None
    name: str
    num_classes: int = 0
    skipped: int = 0  # unreadable inputs skipped while loading

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n samples drawn uniformly with replacement (so a few-image set still fills a batch)."""
        index = torch.randint(len(self), (n,), generator=generator)
        return self.x[index], None if self.y is None else self.y[index]

    @property
    def reference(self) -> torch.Tensor:
        """Real samples to show next to generated ones."""
        return self.x

    def counters(self) -> dict[str, float]:
        """Data-side metrics of a stream; an in-memory set has none."""
        return {}

    def state_dict(self) -> None:
        """Nothing to resume: batches come from the checkpointed `data` generator."""
        return None

    def load_state_dict(self, states: list, rank: int) -> None:
        return None

    def shard(self, rank: int, world_size: int) -> ImageData:
        """The rank's disjoint share (every world_size-th sample, starting at rank)."""
        if world_size == 1:
            return self
        if len(self) < world_size:
            raise ConfigError(
                f"The data set '{self.name}' has {len(self)} samples, fewer than the {world_size} workers."
            )
        y = None if self.y is None else self.y[rank::world_size]
        return ImageData(self.x[rank::world_size], y, self.name, self.num_classes, self.skipped)


def _finish(x: torch.Tensor, y: torch.Tensor | None, name: str, config: DataConfig, skipped: int = 0) -> ImageData:
    """Apply the shared options: image size, grey/RGB, few-sample cut, labels."""
    if x.dim() == 4:
        if config.image_size is not None:
            x = resize(x, config.image_size)
        if config.grayscale is True and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif config.grayscale is False and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
    if config.num_images is not None:
        x = x[: config.num_images]
        y = None if y is None else y[: config.num_images]
    if not config.labels:
        y = None
    num_classes = int(y.max()) + 1 if y is not None and len(y) else 0
    return ImageData(x.contiguous().float(), y, name, num_classes, skipped)


def _digits(config: DataConfig) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return _finish(x, torch.from_numpy(digits.target).long(), "digits", config)


def _texture(config: DataConfig) -> ImageData:
    import skimage.data

    if config.texture not in TEXTURES:
        hint = did_you_mean(config.texture, TEXTURES, list_choices=False)
        raise ConfigError(f"Unknown data.texture '{config.texture}'.{hint} Choose one of {list(TEXTURES)}.")
    image = to_nchw(getattr(skimage.data, config.texture)()[None], f"texture '{config.texture}'")
    size = config.image_size or 64
    h, w = image.shape[-2:]
    gen = torch.Generator().manual_seed(0)
    tops = torch.randint(0, h - size + 1, (config.crops,), generator=gen)
    lefts = torch.randint(0, w - size + 1, (config.crops,), generator=gen)
    crops = torch.stack([image[0, :, t : t + size, s : s + size] for t, s in zip(tops.tolist(), lefts.tolist())])
    return _finish(crops, None, f"texture-{config.texture}", _without_resize(config))


def _photos(config: DataConfig) -> ImageData:
    import skimage.data

    size = config.image_size or 64
    images = [resize(to_nchw(getattr(skimage.data, name)()[None], name), size) for name in PHOTOS]
    return _finish(torch.cat(images), None, "photos", _without_resize(config))


def _faces(config: DataConfig) -> ImageData:
    import skimage.data

    return _finish(to_nchw(skimage.data.lfw_subset(), "lfw_subset"), None, "faces", config)


def _mixture(centres: np.ndarray, name: str, config: DataConfig) -> ImageData:
    gen = np.random.default_rng(0)
    which = gen.integers(0, len(centres), config.num_points)
    points = centres[which] + gen.normal(0, config.mixture_std, (config.num_points, 2))
    x = torch.from_numpy(points.astype(np.float32))
    return _finish(x, torch.from_numpy(which).long(), name, config)


def ring_centres(modes: int = 8, radius: float = 0.7) -> np.ndarray:
    """Centres of the ring-of-Gaussians mixture."""
    angles = 2 * math.pi * np.arange(modes) / modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def grid_centres(side: int = 5, extent: float = 0.8) -> np.ndarray:
    """Centres of the grid-of-Gaussians mixture (side × side)."""
    ticks = np.linspace(-extent, extent, side)
    return np.stack(np.meshgrid(ticks, ticks), axis=-1).reshape(-1, 2)


def _npz(config: DataConfig) -> ImageData:
    path = _existing(config.path, "npz", "a .npz file with an image array under key 'x'")
    with np.load(path) as archive:
        keys = set(archive.files)
        if config.split not in ("train", "test"):
            raise ConfigError(f"data.split must be 'train' or 'test', got {config.split!r}.")
        wanted = ("x", "x_train") if config.split == "train" else ("x_test",)
        x_key = next((k for k in wanted if k in keys), None)
        if x_key is None:
            raise ConfigError(
                f"'{path}' has keys {sorted(keys)} but no {' or '.join(repr(k) for k in wanted)}: store the "
                f"{config.split} images under that key (and integer labels under 'y', 'y_train' or 'y_test')."
            )
        y_key = {"x": "y", "x_train": "y_train", "x_test": "y_test"}[x_key]
        x = to_nchw(archive[x_key], f"'{path}' key '{x_key}'")
        y = torch.from_numpy(archive[y_key].astype(np.int64)) if y_key in keys else None
    if y is not None and len(y) != len(x):
        raise ConfigError(f"'{path}': {len(x)} images but {len(y)} labels under '{y_key}'.")
    return _finish(x, y, path.stem, config)


def _folder(config: DataConfig) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    root = _existing(config.path, "folder", "a folder of images (optionally one sub-folder per class)")
    if not root.is_dir():
        raise ConfigError(f"data.path '{root}' is a file; the folder source needs a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{root}'.")
    classes = sorted({p.parent.name for p in files}) if all(p.parent != root for p in files) else []
    class_index = {name: i for i, name in enumerate(classes)}
    images, labels, skipped = [], [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if config.image_size is not None:  # as the shard reader does (data/tar.py)
                    image = centre_crop_resize(image, config.image_size)
                array = np.asarray(image)
        except (UnidentifiedImageError, OSError) as err:
            skipped.append(path)
            log.warning("Skipping unreadable image %s (%s)", path, err)
            continue
        images.append(to_nchw(array[None], str(path)))
        labels.append(class_index.get(path.parent.name, 0))
    if not images:
        raise ConfigError(f"None of the {len(files)} images under '{root}' could be read.")
    sizes = {tuple(t.shape[-2:]) for t in images}
    if len(sizes) > 1:
        raise ConfigError(
            f"Images under '{root}' have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
            "set data.image_size to resize and centre-crop them to one size."
        )
    y = torch.tensor(labels) if classes else None
    if skipped:
        log.warning("Skipped %d unreadable images under %s", len(skipped), root)
    return _finish(torch.cat(images), y, root.name, _without_resize(config), skipped=len(skipped))


def _webdataset(config: DataConfig) -> ImageData:
    """The first `num_images` (default 10 000) samples of the shards, in stored order, in memory
    (for sampling references, inpainting and evaluation; training streams them instead)."""
    info = inspect_shards(config, world_size=1)
    limit = config.num_images or 10_000
    stream = ShardStream(info.shards, batch_size=256, image_size=info.image_size, channels=info.channels,
                         shuffle_shards=False, shuffle_buffer=1, epochs=1, drop_last=False)
    images, labels, corrupt = [], [], 0
    for batch in stream:
        corrupt += batch.corrupt
        if len(batch.images):
            images.append(batch.images)
            labels.append(batch.labels)
        if sum(len(b) for b in images) >= limit:
            break
    if not images:
        raise ConfigError(f"No readable images in the shards of data.urls '{config.urls}'.")
    x = torch.cat(images)[:limit].float() / 127.5 - 1.0
    y = torch.cat(labels)[:limit] if info.has_labels and all(t is not None for t in labels) else None
    if len(x) == limit and config.num_images is None:
        log.warning("Read the first %d samples of the shards into memory (set data.num_images to change)", limit)
    return _finish(x, y, Path(info.shards[0]).parent.name or "webdataset", _without_resize(config), skipped=corrupt)


def _existing(path: str | None, source: str, what: str) -> Path:
    if not path:
        raise ConfigError(f"data.source '{source}' needs data.path: {what}.")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ConfigError(f"data.path '{path}' does not exist. Give {what} (an absolute path on a cluster).")
    return resolved


def _without_resize(config: DataConfig) -> DataConfig:
    return replace(config, image_size=None)


SOURCES: dict[str, Callable[[DataConfig], ImageData]] = {
    "digits": _digits,
    "texture": _texture,
    "photos": _photos,
    "faces": _faces,
    "ring8": lambda c: _mixture(ring_centres(), "ring8", c),
    "grid25": lambda c: _mixture(grid_centres(), "grid25", c),
    "npz": _npz,
    "folder": _folder,
    "webdataset": _webdataset,
}


def load_dataset(config: DataConfig) -> ImageData:
    """Build the data set named by config.source."""
    if config.source not in SOURCES:
        hint = did_you_mean(config.source, SOURCES, list_choices=False)
        raise ConfigError(f"Unknown data.source '{config.source}'.{hint} Choose one of {sorted(SOURCES)}.")
    data = SOURCES[config.source](config)
    if len(data) == 0:
        raise ConfigError(f"data.source '{config.source}' gave no samples (check data.num_images).")
    return data
