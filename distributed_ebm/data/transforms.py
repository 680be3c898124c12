"""Image transforms shared by the sources, the shard writer and the shard reader: pixel ranges,
array layouts, resizing and centre-cropping."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # image files by name


def to_unit_range(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 [0, 255], float [0, 1] or float [-1, 1] arrays to float32 in [-1, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    images = images.astype(np.float32)
    low, high = float(images.min()), float(images.max())
    if low >= 0.0 and high <= 1.0:
        return images * 2.0 - 1.0
    if low >= -1.0 and high <= 1.0:
        return images
    raise ConfigError(
        f"{source}: pixel values span [{low:.3g}, {high:.3g}]; expected uint8 [0, 255] or floats in "
        "[0, 1] or [-1, 1]. Rescale the array before training."
    )


def to_nchw(images: np.ndarray, source: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} to a float tensor (N, C, H, W)."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise ConfigError(
            f"{source}: images have shape {images.shape}; expected (N, H, W), (N, H, W, C) or "
            "(N, C, H, W) with C = 1 (grey) or 3 (RGB)."
        )
    return torch.from_numpy(np.ascontiguousarray(to_unit_range(images, source)))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (antialiased bilinear) and centre-crop to size × size."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top : top + size, left : left + size].clamp(-1, 1)


def centre_crop_resize(image, size: int):
    """Resize the shorter side to `size` (antialiased) and centre-crop to size × size (PIL)."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
