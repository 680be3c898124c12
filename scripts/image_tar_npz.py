"""An image tar with class folders (`train/<class>/*.jpg`, `test/<class>/*.jpg`, e.g.
../shared/data/cifar10-jpeg/cifar10-images.tar) as the .npz that `data.source: npz` and
benchmarks/quality.py read: `x_train`, `y_train`, `x_test`, `y_test` (uint8 images, N×H×W×3 or
N×H×W for grey; labels by the sorted class names, stored in `classes`), each split shuffled
with a fixed seed. A file that does not decode is skipped and counted.

    .venv/bin/python scripts/image_tar_npz.py ../shared/data/cifar10-jpeg/cifar10-images.tar --out /tmp/cifar10.npz
    .venv/bin/python benchmarks/quality.py --budget-s 1740 --data /tmp/cifar10.npz --presets configs/cifar10_ggcn.yaml --no-peer
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "test")
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def convert(tar_path: str | Path, out: str | Path, *, grey: bool = False, seed: int = 0) -> dict:
    """Write the .npz; return {"train": N, "test": N, "classes": [...], "skipped": N}."""
    images: dict[str, list] = {s: [] for s in SPLITS}
    names: dict[str, list] = {s: [] for s in SPLITS}
    skipped = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLITS or \
                    not member.name.lower().endswith(SUFFIXES):
                continue
            try:
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L" if grey else "RGB")
            except (UnidentifiedImageError, OSError):
                skipped += 1
                continue
            images[parts[-3]].append(np.asarray(image))
            names[parts[-3]].append(parts[-2])
    if not images["train"]:
        raise SystemExit(f"{tar_path}: no images under train/<class>/ — expected train/<class>/*.jpg and test/<class>/*.jpg")
    classes = sorted({c for split in SPLITS for c in names[split]})
    index = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng(seed)
    arrays = {"classes": np.array(classes)}
    for split in SPLITS:
        if not images[split]:
            continue
        order = rng.permutation(len(images[split]))
        arrays[f"x_{split}"] = np.stack(images[split])[order]
        arrays[f"y_{split}"] = np.array([index[c] for c in names[split]], dtype=np.int64)[order]
    np.savez(out, **arrays)
    return {"train": len(images["train"]), "test": len(images["test"]), "classes": classes, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tar", help="tar with train/<class>/ and test/<class>/ image files")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--grey", action="store_true", help="convert to one grey channel")
    parser.add_argument("--seed", type=int, default=0, help="shuffle of each split")
    args = parser.parse_args(argv)
    done = convert(args.tar, args.out, grey=args.grey, seed=args.seed)
    print(f"{args.out}: {done['train']} train and {done['test']} test images, {len(done['classes'])} classes, "
          f"{done['skipped']} undecodable file(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
