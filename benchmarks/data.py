"""Shard reader throughput and data waiting time, measured in one run.

1. Decoded images per second per core: `debm`'s shard reader (ShardStream: tar parsing, seeded
   shuffle buffer, decode, resize check, batching; in this process, one core) against the plain
   loop a researcher would write over the same JPEG files (PIL open → RGB → tensor). Target ratio
   ≥ 0.8. Also the reader behind a DataLoader with `--loader-workers` processes (total and per core).
2. The fraction of training step time spent waiting for data: `train_loop.train` on the shards with
   `data.loader_workers` worker processes (`data_wait_s` / `seconds` from metrics.jsonl). Target < 5 %.

    python benchmarks/data.py                                   # synthetic 32×32 JPEGs (no downloads)
    python benchmarks/data.py --tar ../shared/data/cifar10-jpeg/cifar10-images.tar --images 10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_ebm.config import RunConfig  # noqa: E402
from distributed_ebm.data.shards import ShardOptions, write_shards  # noqa: E402
from distributed_ebm.data.stream import ShardStream  # noqa: E402


def make_jpegs(folder: Path, images: int, tar: str | None, size: int) -> list[Path]:
    """JPEG files in <class>/ folders: taken from an ImageNet-style tar, or synthetic."""
    from PIL import Image

    if tar:
        with tarfile.open(tar) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]
            for m in members[:images]:
                target = folder / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(m).read())
    else:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        for i in range(images):
            # smooth random images (upsampled noise) compress like photos, unlike white noise
            small = np.clip(base.astype(int) + rng.integers(-40, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            target = folder / f"class{i % 10}" / f"{i:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, quality=90)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def plain_loop(files: list[Path]) -> int:
    """The obvious loop: open each JPEG with PIL, convert to RGB, to a uint8 CHW tensor."""
    from PIL import Image

    count = 0
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        torch.from_numpy(array.transpose(2, 0, 1).copy())
        count += 1
    return count


def reader(urls: list[str], size: int, batch: int, workers: int) -> int:
    stream = ShardStream(urls, batch_size=batch, image_size=size, channels=3, shuffle_buffer=1000, epochs=1,
                         drop_last=False)
    if workers == 0:
        return sum(len(b.images) for b in stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return sum(len(b.images) for b in loader)


def timed(fn, repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        tick = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), n


def wait_fraction(urls_pattern: str, size: int, iterations: int, loader_workers: int, run_dir: Path) -> dict:
    from distributed_ebm.train_loop import train

    config = RunConfig.from_dict({
        "name": "bench-data",
        "data": {"source": "webdataset", "urls": urls_pattern, "loader_workers": loader_workers, "image_size": size},
        "model": {"algorithm": "wgcn", "channels": [32, 64, 128]},
        "train": {"iterations": iterations, "data_batch_size": 64, "sample_every": 10_000, "checkpoint_every": 10_000},
        "chains": {"bank_size": 64, "batch_size": 64},
        "tracking": {"enabled": False},
    })
    train(config, run_dir, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]  # warm-up
    wait = sum(r["data_wait_s"] for r in rows)
    total = sum(r["seconds"] for r in rows)
    return {"iterations": len(rows), "wait_s": wait, "step_s": total, "fraction": wait / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tar", help="ImageNet-style tar of JPEGs (e.g. the CIFAR-10 tar); default synthetic")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=30, help="training iterations for the waiting-time part")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_jpegs(tmp / "jpegs", args.images, args.tar, args.size)
        write_shards(str(tmp / "jpegs"), str(tmp / "shards"), ShardOptions(samples_per_shard=max(1, len(files) // 8),
                                                                            progress=False))
        urls = sorted(str(p) for p in (tmp / "shards").glob("shard-*.tar"))
        print(f"{len(files)} JPEG files ({'from ' + args.tar if args.tar else 'synthetic'}, {args.size}×{args.size}) "
              f"in {len(urls)} shards; {os.cpu_count()} cores; torch {torch.__version__}")
        plain_loop(files[:200]), reader(urls[:1], args.size, args.batch, 0)  # warm the page cache and imports
        rows = []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            rows.append((timed(lambda: plain_loop(files), 1)[0], timed(lambda: reader(urls, args.size, args.batch, 0), 1)[0]))
        plain_s = statistics.median(r[0] for r in rows)
        reader_s = statistics.median(r[1] for r in rows)
        plain_rate, reader_rate = len(files) / plain_s, len(files) / reader_s
        print(f"plain PIL loop over the files : {plain_rate:9.0f} images/s (1 core)")
        print(f"debm shard reader, in process : {reader_rate:9.0f} images/s (1 core)   ratio {reader_rate / plain_rate:.2f}")
        if args.loader_workers:
            loader_s, n = timed(lambda: reader(urls, args.size, args.batch, args.loader_workers), args.repeats)
            print(f"debm shard reader, DataLoader : {n / loader_s:9.0f} images/s ({args.loader_workers} workers, "
                  f"{n / loader_s / args.loader_workers:.0f} per worker, start-up included)")
        pattern = f"{tmp}/shards/shard-{{000000..{len(urls) - 1:06d}}}.tar"
        wait = wait_fraction(pattern, args.size, args.iterations, args.loader_workers, tmp / "run")
        print(f"training wGCN {args.size}×{args.size} from shards ({args.loader_workers} loader worker(s)): "
              f"{wait['wait_s']:.3f} s waiting for data in {wait['step_s']:.2f} s of {wait['iterations']} steps "
              f"= {100 * wait['fraction']:.2f} % (target < 5 %)")


if __name__ == "__main__":
    main()
