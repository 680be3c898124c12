"""Reading WebDataset shards in training: `data.source: webdataset`, `data.urls: ...`.

URLs are a local path, a brace pattern (`shards/shard-{000000..000099}.tar`), `http(s)://` or a
`pipe:` command (`pipe:aws s3 cp s3://bucket/shard-000000.tar -`); WebDataset's `gopen` opens them
(data/urls.py). The first samples are checked before training starts (data/preflight.py); tar
reading and decoding live in data/tar.py.

How the shards are shared out (every rank and every DataLoader worker reads a disjoint part):

- **Epoch mode** (`data.resampled: false`): in epoch e the shard list is permuted with a seed
  from (train.seed, e) — the same permutation on every rank — then rank r takes shards r, r + R,
  … and its loader worker w every W-th of those. Each sample is read exactly once per epoch.
- **Resampled mode** (`data.resampled: true`): every (rank, worker) draws shards with replacement
  from its own seeded stream, and an epoch is a fixed number of batches per rank
  (`data.epoch_batches`), so every rank yields the same number of batches whatever the shard
  sizes — the mode for uneven shard counts.

Within a worker, samples pass through a seeded shuffle buffer of raw (still encoded) samples and
are decoded after it. Training streams never end: they go from epoch to epoch, so no rank runs
out before another (which would hang the gradient all-reduce).

Every batch says which loader worker made it, in which epoch, and how many raw samples that worker
has consumed in the epoch so far. The training loop keeps the last of these per worker in its
checkpoint; on resume each worker replays its seeded order and skips the consumed raw samples
without decoding them, so training continues exactly where it stopped instead of re-reading the
epoch from its start. Corrupt samples are skipped with a warning and counted; unreadable or
truncated shards are reported and counted; both counts travel with the batches into the metrics.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .preflight import ShardInfo, inspect_shards, shard_sizes
from .tar import ImageDecoder, ShardErrors, tar_samples
from .urls import shard_name

log = logging.getLogger(__name__)


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


@dataclass
class Batch:
    """One decoded batch and where it came from."""

    images: torch.Tensor  # uint8 (B, C, H, W)
    labels: torch.Tensor | None  # int64 (B,)
    worker: int  # loader worker that made it
    epoch: int
    position: int  # raw samples this worker consumed in this epoch, including this batch's
    made: int  # batches this worker made in this epoch, including this one
    corrupt: int  # samples skipped as corrupt since the worker's previous batch
    bad_shards: int  # shards found unreadable or truncated since the worker's previous batch

    def pin_memory(self) -> Batch:
        """Called by the DataLoader with pin_memory=True (CUDA): page-locked, for async copies."""
        self.images = self.images.pin_memory()
        self.labels = None if self.labels is None else self.labels.pin_memory()
        return self


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded shuffle buffer: fill `size` items, then emit a random one for each new item."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of decoded images from WebDataset shards, split by rank and loader worker."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        image_size: int,
        channels: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_batches: int | None = None,
        epochs: int | None = None,
        drop_last: bool = True,
        start: dict[int, tuple[int, int, int]] | None = None,
        worker_offset: int = 0,
        shard_sizes: dict[str, int] | None = None,
    ):
        super().__init__()
        if resampled and not epoch_batches:
            raise ConfigError("Resampled streams need data.epoch_batches (batches per rank per epoch).")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.decoder = ImageDecoder(image_size, channels)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.resampled, self.epoch_batches, self.epochs = resampled, epoch_batches, epochs
        self.drop_last = drop_last
        self.start = dict(start or {})
        self.worker_offset = worker_offset  # DataLoader worker i plays the part of (i + offset) % W
        # Samples per shard (from manifest.json): epoch mode then gives every reader of every rank
        # the same number of batches per epoch, so ranks stay in the same epoch.
        self.shard_sizes = shard_sizes

    # -- shard assignment --

    def reader_shards(self, epoch: int, rank: int, worker: int, num_workers: int) -> list[str]:
        """Epoch mode: the shards reader (rank, worker) reads in `epoch`."""
        order = _seed(self.seed, epoch, 0).permutation(len(self.shards)) if self.shuffle_shards else range(len(self.shards))
        return [self.shards[i] for i in order][rank :: self.world_size][worker::num_workers]

    def epoch_shards(self, epoch: int, worker: int, num_workers: int) -> Iterator[str]:
        """The shards (rank, worker) reads in `epoch` (finite in epoch mode, endless if resampled)."""
        if self.resampled:
            rng = _seed(self.seed, epoch, self.rank, worker, 1)
            while True:
                yield self.shards[int(rng.integers(len(self.shards)))]
        yield from self.reader_shards(epoch, self.rank, worker, num_workers)

    def worker_batches(self, worker: int, num_workers: int, epoch: int) -> int | None:
        """Batches this worker yields in `epoch`: resampled, the rank's quota split evenly; in epoch
        mode with known shard sizes, what the reader with the fewest samples can fill (the same
        for every reader of every rank); otherwise no limit."""
        if self.resampled:
            quota = self.epoch_batches // num_workers + (worker < self.epoch_batches % num_workers)
            if quota == 0:
                raise ValueError(f"data.epoch_batches ({self.epoch_batches}) is smaller than the "
                                 f"{num_workers} loader workers: some would make no batch. Raise it.")
            return quota
        if self.shard_sizes is None:
            return None
        return min(sum(self.shard_sizes[shard_name(u)] for u in self.reader_shards(epoch, r, w, num_workers))
                   for r in range(self.world_size) for w in range(num_workers)) // self.batch_size

    # -- iteration --

    def raw_samples(self, epoch: int, worker: int, num_workers: int, errors: ShardErrors) -> Iterator[dict]:
        samples = tar_samples(self.epoch_shards(epoch, worker, num_workers), errors)
        return shuffled(samples, self.shuffle_buffer, _seed(self.seed, epoch, self.rank, worker, 2))

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (worker + self.worker_offset) % num_workers
        first_epoch, skip, skip_batches = self.start.get(worker, (0, 0, 0))
        epochs = count(first_epoch) if self.epochs is None else range(first_epoch, self.epochs)
        for epoch in epochs:
            quota = self.worker_batches(worker, num_workers, epoch)
            resuming = epoch == first_epoch
            made = skip_batches if resuming else 0
            if quota is not None and made >= quota:
                continue
            errors = ShardErrors()
            position, corrupt, reported = 0, 0, 0
            images, labels = [], []
            for sample in self.raw_samples(epoch, worker, num_workers, errors):
                position += 1
                if resuming and position <= skip:
                    reported = errors.count  # shard errors met here were counted before the checkpoint
                    continue  # consumed before the checkpoint: read again, not decoded again
                try:
                    image, label = self.decoder(sample)
                except Exception as err:  # corrupt bytes raise many kinds in PIL: skip and count
                    corrupt += 1
                    log.warning("Skipping corrupt sample %s in %s (%s)",
                                sample.get("__key__"), sample.get("__url__"), err)
                    continue
                images.append(image)
                labels.append(label)
                if len(images) == self.batch_size:
                    made += 1
                    yield self._batch(images, labels, worker, epoch, position, made, corrupt,
                                      errors.count - reported)
                    images, labels, corrupt, reported = [], [], 0, errors.count
                    if quota is not None and made >= quota:
                        break
            if images and not self.drop_last:
                yield self._batch(images, labels, worker, epoch, position, made + 1, corrupt,
                                  errors.count - reported)
            elif errors.count > reported or corrupt:  # report what the epoch's tail skipped
                yield self._batch([], [], worker, epoch, position, made, corrupt, errors.count - reported)
            if self.epochs is None and made == 0 and not (resuming and skip):
                raise ValueError(
                    f"Loader worker {worker} of rank {self.rank} made no batch of {self.batch_size} in "
                    f"epoch {epoch} ({position} samples): its shards are too small. Write more samples "
                    "per shard, use fewer loader workers or ranks, or set data.resampled=true.")

    def _batch(self, images, labels, worker, epoch, position, made, corrupt, bad_shards) -> Batch:
        y = torch.tensor(labels, dtype=torch.int64)
        channels, size = (1 if self.decoder.mode == "L" else 3), self.decoder.image_size
        x = torch.from_numpy(np.stack(images)) if images else torch.empty((0, channels, size, size), dtype=torch.uint8)
        return Batch(x, None if (y < 0).any() else y, worker, epoch, position, made, corrupt, bad_shards)


class StreamingData:
    """One rank's endless stream of training batches from WebDataset shards.

    It has what the training loop asks of a data set (`batch`, `sample_shape`, `num_classes`,
    `name`, `reference`) plus `state_dict`/`load_state_dict` (per loader worker: epoch, raw samples
    consumed, batches made) and `counters()` (corrupt samples and bad shards so far, seconds spent
    waiting for a batch).
    """

    def __init__(self, config: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, info: ShardInfo | None = None, reference_samples: int | None = None):
        self.config, self.batch_size, self.device = config, batch_size, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.info = info or inspect_shards(config, world_size, batch_size, samples=reference_samples)
        # model.clusters: `reference_samples` images spread over the shards, held until `take_fit_images`;
        # the data mean and the reference are the first data.mean_samples images either way
        if reference_samples and self.info.fit is None:
            raise ValueError("reference_samples needs a ShardInfo read with samples=reference_samples.")
        self._fit_images = self.info.fit if reference_samples else None
        if self.info.fit is not None:  # handed over by take_fit_images, not kept with the info
            self.info = replace(self.info, fit=None)
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.start: dict[int, tuple[int, int, int]] = {}
        self.next_worker = 0  # the loader worker whose batch comes next (DataLoader goes round-robin)
        self.corrupt = self.bad_shards = 0
        self.wait_s = 0.0
        self._iterator = None
        self.name = Path(self.info.shards[0]).parent.name or "webdataset"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.info.channels, self.info.image_size, self.info.image_size)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def take_fit_images(self) -> torch.Tensor:
        """The images read for fitting the clusters (`reference_samples` of them), handed over once
        so that the stream does not hold them for the whole run."""
        images, self._fit_images = self._fit_images, None
        if images is None:
            raise RuntimeError("No fit images: StreamingData was built without reference_samples, or they were taken.")
        return images

    @property
    def mean(self) -> torch.Tensor:
        return self.info.first.mean(0, keepdim=True)

    @property
    def reference(self) -> torch.Tensor:
        return self.info.first

    def epoch_batches(self) -> int | None:
        if not self.config.resampled:
            return None
        if self.config.epoch_batches:
            return self.config.epoch_batches
        manifest = self.info.manifest
        if manifest is None:
            raise ConfigError("data.resampled needs data.epoch_batches (batches per rank per epoch) when "
                              "there is no manifest.json next to the shards to count samples.")
        return max(1, manifest["num_samples"] // (self.batch_size * self.world_size))

    def _loader(self):
        workers = self.config.loader_workers
        stream = ShardStream(
            self.info.shards, batch_size=self.batch_size, image_size=self.info.image_size,
            channels=self.info.channels, rank=self.rank, world_size=self.world_size, seed=self.seed,
            shuffle_shards=self.config.shuffle_shards, shuffle_buffer=self.config.shuffle_buffer,
            resampled=self.config.resampled, epoch_batches=self.epoch_batches(), start=self.start,
            worker_offset=self.next_worker, shard_sizes=shard_sizes(self.info.shards, self.info.manifest),
        )
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=self.config.prefetch if workers else None, persistent_workers=workers > 0,
        )
        return iter(loader)

    def batch(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch as float images in [-1, 1] on the device (n must be the stream's batch size)."""
        if n != self.batch_size:
            raise ValueError(f"This stream makes batches of {self.batch_size}, not {n}.")
        if self._iterator is None:
            self._iterator = self._loader()
        tick = time.perf_counter()
        while True:
            batch: Batch = next(self._iterator)
            self.next_worker = (batch.worker + 1) % max(1, self.config.loader_workers)
            self.corrupt += batch.corrupt
            self.bad_shards += batch.bad_shards
            if len(batch.images):
                break
        self.wait_s += time.perf_counter() - tick
        self.positions[batch.worker] = (batch.epoch, batch.position, batch.made)
        x = batch.images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        labels = batch.labels.to(self.device) if self.info.has_labels and batch.labels is not None else None
        return x, labels

    def counters(self) -> dict[str, float]:
        """Cumulative corrupt samples and bad shards, and the waiting time since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return {"data_corrupt": float(self.corrupt), "data_bad_shards": float(self.bad_shards),
                "data_wait_s": wait, "data_epoch": float(max((p[0] for p in self.positions.values()), default=0))}

    def state_dict(self) -> dict:
        return {"positions": dict(self.positions), "next_worker": self.next_worker, "corrupt": self.corrupt, "bad_shards": self.bad_shards,
                "world_size": self.world_size, "loader_workers": self.config.loader_workers,
                "shards": zlib.crc32("\n".join(self.info.shards).encode())}

    def load_state_dict(self, states: list[dict | None], rank: int) -> None:
        """Resume from the checkpoint's per-rank states: exactly where this rank stopped, or, after
        a change of ranks, loader workers or shards, at a fresh epoch after the latest any rank
        reached (the same epoch on every rank, so their shares stay disjoint)."""
        states = [s for s in states if s]
        if not states:
            return
        self._iterator = None  # a reader already running (a collapse recovery's rollback) restarts there
        state = states[min(rank, len(states) - 1)]
        same = (len(states) == self.world_size and state["world_size"] == self.world_size
                and state["loader_workers"] == self.config.loader_workers
                and state["shards"] == zlib.crc32("\n".join(self.info.shards).encode()))
        if same:
            self.corrupt, self.bad_shards = state["corrupt"], state["bad_shards"]
            self.start = dict(state["positions"])
            self.positions = dict(state["positions"])
            self.next_worker = state["next_worker"]
            return
        epoch = max((p[0] for s in states for p in s["positions"].values()), default=-1) + 1
        workers = max(1, self.config.loader_workers)
        self.start = {w: (epoch, 0, 0) for w in range(workers)}
        log.warning("The data layout changed since the checkpoint (ranks, loader workers or shards): "
                    "reading resumes at the start of a fresh epoch %d with a new order.", epoch)
