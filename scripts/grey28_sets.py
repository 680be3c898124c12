"""Write 28×28 grey data sets other than MNIST, as .npz files the presets read (`x_train`, `y_train`,
`x_test`, `y_test`, uint8): the check that the MNIST presets train without collapse on data nobody
tuned them on (docs/stability_other_data.md). Everything comes from what scikit-learn and
scikit-image ship, or is drawn here; nothing is downloaded.

- `digits28`: scikit-learn's 1 797 8×8 digits, bilinearly up-sampled to 28×28 (blurry, 10 classes).
- `faces28`: scikit-image's `lfw_subset` (100 faces and 100 non-faces, 25×25), resized to 28×28.
- `textures28`: random 28×28 crops of scikit-image's brick, grass and gravel (3 classes).
- `strokes28`: synthetic pen strokes: 1–3 random lines or arcs, white on black like MNIST
  (class: the number of strokes − 1).

    .venv/bin/python scripts/grey28_sets.py --out /tmp/grey28
    .venv/bin/python scripts/sweep.py --config configs/mnist_ggcn.yaml \\
        --grid data.path=/tmp/grey28/digits28.npz,/tmp/grey28/faces28.npz --set train.iterations=300
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIDE = 28


def _resize(images: np.ndarray) -> np.ndarray:
    """(N, h, w) floats in [0, 1] → (N, 28, 28) uint8, bilinear."""
    import torch

    x = torch.from_numpy(images.astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (x[:, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def digits28() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _resize(digits.images / 16.0), digits.target


def faces28() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import lfw_subset

    faces = lfw_subset()  # 200 × 25 × 25 in [0, 1]: the first 100 are faces
    return _resize(faces), (np.arange(len(faces)) < 100).astype(np.int64)


def textures28(per_class: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(("brick", "grass", "gravel")):
        texture = getattr(data, name)().astype(np.float32) / 255.0
        rows = rng.integers(0, texture.shape[0] - SIDE, per_class)
        cols = rng.integers(0, texture.shape[1] - SIDE, per_class)
        images += [texture[r : r + SIDE, c : c + SIDE] for r, c in zip(rows, cols)]
        labels += [label] * per_class
    return (np.stack(images) * 255).round().astype(np.uint8), np.array(labels)


def strokes28(num: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(num):
        count = int(rng.integers(1, 4))
        image = Image.new("L", (SIDE, SIDE), 0)
        pen = ImageDraw.Draw(image)
        for _ in range(count):
            x0, y0, x1, y1 = rng.integers(4, SIDE - 4, 4).tolist()
            width = int(rng.integers(2, 4))
            if rng.random() < 0.5:
                pen.line((x0, y0, x1, y1), fill=255, width=width)
            else:
                box = (min(x0, x1), min(y0, y1), max(x0, x1) + 4, max(y0, y1) + 4)
                start = float(rng.uniform(0, 360))
                pen.arc(box, start, start + float(rng.uniform(90, 270)), fill=255, width=width)
        images.append(np.asarray(image))
        labels.append(count - 1)
    return np.stack(images), np.array(labels)


SETS = {"digits28": digits28, "faces28": faces28, "textures28": textures28, "strokes28": strokes28}


def write(name: str, out: Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """SETS[name] shuffled and split into train and test, saved as OUT/NAME.npz."""
    x, y = SETS[name]()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = len(x) - max(1, int(len(x) * test_fraction))
    path = out / f"{name}.npz"
    np.savez_compressed(path, x_train=x[:cut], y_train=y[:cut], x_test=x[cut:], y_test=y[cut:])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the .npz files")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        path = write(name, out)
        with np.load(path) as archive:
            print(f"{path}: {archive['x_train'].shape[0]} train + {archive['x_test'].shape[0]} test, "
                  f"{archive['x_train'].shape[1:]} {archive['x_train'].dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
