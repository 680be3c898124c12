"""Reading WebDataset shards in training: `data.source: webdataset`, `data.urls: ...`.

URLs are a local path, a brace pattern (`shards/shard-{000000..000099}.tar`), `http(s)://` or a
`pipe:` command (`pipe:aws s3 cp s3://bucket/shard-000000.tar -`); WebDataset's `gopen` opens them.

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

import io
import json
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _name(url: str) -> str:
    """A shard's file name, the key of manifest.json's sample counts."""
    return url.rstrip(" -").rsplit("/", 1)[-1].split()[0]


def url_patterns(urls: str | list[str]) -> list[str]:
    """The brace patterns of `data.urls`: a list, or several joined by `::`."""
    items = urls if isinstance(urls, (list, tuple)) else [urls]
    return [part.strip() for item in items for part in str(item).split("::") if part.strip()]


def expand_urls(urls: str | list[str]) -> list[str]:
    """The shard URLs of `data.urls`, brace patterns expanded."""
    import braceexpand

    return [u for pattern in url_patterns(urls) for u in braceexpand.braceexpand(pattern) if u]


def absolute_urls(urls: str | None) -> str | None:
    """Make relative local paths absolute (Ray workers change directory); URLs stay as they are."""
    if not urls:
        return urls
    return " :: ".join(u if ("://" in u or u.startswith("pipe:") or Path(u).is_absolute()) else
                       str(Path.cwd() / u) for u in url_patterns(urls))


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


class ShardError(OSError):
    """A shard that cannot be opened or read to its end (unreachable, truncated, not a tar)."""


def tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order.

    A lean reader of the ustar/GNU/PAX layouts that WebDataset shards use (Python's tarfile builds
    a TarInfo per member and costs more than decoding a small JPEG); headers are checksummed.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if header == bytes(512):  # the end-of-archive marker
            return
        if len(header) < 512:  # the data stops before the end-of-archive marker
            raise ShardError(f"{url}: truncated tar (it ends without the end-of-archive marker)")
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"{url}: not a tar, or a corrupt tar header")
        field = header[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        data = stream.read(size)
        if len(data) < size:
            raise ShardError(f"{url}: truncated tar (a member of {size} bytes has {len(data)})")
        if size % 512:
            stream.read(512 - size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":  # PAX extended header of the next member
            for record in data.decode("utf-8", "replace").splitlines():
                _, _, item = record.partition(" ")
                if item.startswith("path="):
                    long_name = item[len("path="):]
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            name = f"{prefix}/{name}" if prefix else name
        long_name = None
        yield name, data


def tar_samples(urls: Iterator[str], errors) -> Iterator[dict]:
    """WebDataset samples (files grouped by key: the name up to the first dot of its base name)
    from shard URLs (opened with WebDataset's gopen: paths, http(s), pipe:). A shard that fails is
    passed to `errors` and its incomplete last sample dropped; reading goes on with the next."""
    from webdataset.gopen import gopen

    for url in urls:
        try:
            stream = gopen(url, "rb")
        except Exception as exn:  # unreachable: report, go on
            errors(ShardError(f"{url}: {exn}"))
            continue
        sample: dict = {}
        try:
            for name, data in tar_members(stream, url):
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                if dot < 0 or name[slash:].startswith("__"):
                    continue
                key = name[:dot]
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[name[dot + 1:].lower()] = data
            if sample:
                yield sample
        except GeneratorExit:  # the reader stopped early: close quietly (a pipe's exit status is moot)
            _close_quietly(stream)
            raise
        except Exception as exn:  # truncated, corrupt, a pipe that failed: report, go on
            _close_quietly(stream)
            errors(exn if url in str(exn) else ShardError(f"{url}: {exn}"))
            continue
        try:
            stream.close()  # a pipe: raises if its command failed after sending the data
        except Exception as exn:
            errors(ShardError(f"{url}: {exn}"))


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # already reported, or moot once reading has stopped
        pass


class ShardErrors:
    """Counts shard-level errors (unreachable, truncated) and lets the reader go on."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("Shard error, rest of the shard skipped: %s", exn)
        return True


class ImageDecoder:
    """Raw WebDataset sample → uint8 (C, size, size) array view (and class index, -1 if none)."""

    def __init__(self, image_size: int, channels: int):
        from PIL import Image

        from .sources import centre_crop_resize

        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self._open, self._resize = Image.open, centre_crop_resize

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) among {found}")
        image = self._open(io.BytesIO(sample[key]))
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if image.size != (self.image_size, self.image_size):
            image = self._resize(image, self.image_size)
        array = np.asarray(image)  # decodes; corrupt data raises here
        label = int(sample["cls"]) if "cls" in sample else -1
        return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), label


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
        return min(sum(self.shard_sizes[_name(u)] for u in self.reader_shards(epoch, r, w, num_workers))
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


# --- preflight and the training-side wrapper ---------------------------------------------------


@dataclass
class ShardInfo:
    """What the preflight learnt from the first samples, the same on every rank."""

    shards: list[str]
    image_size: int
    channels: int
    has_labels: bool
    num_classes: int
    first: torch.Tensor  # float (K, C, H, W) in [-1, 1]: the first samples in stored order
    manifest: dict | None


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if ("://" in url or url.startswith("pipe:")) else Path(url)


def read_manifest(shards: list[str], where: str | None = None) -> dict | None:
    """`data.manifest` (a path, URL or pipe: command), else manifest.json next to the shards when
    it can be found there (local folder or http(s))."""
    first = shards[0]
    local = _local_path(first)
    try:
        if where:
            from webdataset.gopen import gopen

            with gopen(where, "rb") as stream:
                return json.loads(stream.read())
        if local is not None:
            path = local.expanduser().parent / "manifest.json"
            return json.loads(path.read_text()) if path.is_file() else None
        if first.startswith(("http://", "https://")):
            import requests

            reply = requests.get(first.rsplit("/", 1)[0] + "/manifest.json", timeout=10)
            return reply.json() if reply.ok else None
    except (OSError, ValueError) as err:
        if where:
            raise ConfigError(f"Cannot read data.manifest '{where}' ({err}). Fix the path or URL.") from None
        log.warning("Ignoring an unreadable manifest.json next to %s (%s)", first, err)
    return None


def shard_sizes(shards: list[str], manifest: dict | None) -> dict[str, int] | None:
    """Samples per shard file name, when the manifest lists every shard."""
    if not manifest or "shards" not in manifest:
        return None
    sizes = {entry["name"]: int(entry["samples"]) for entry in manifest["shards"]}
    return sizes if all(_name(u) in sizes for u in shards) else None


def inspect_shards(config: DataConfig, world_size: int, batch_size: int | None = None) -> ShardInfo:
    """Check the URLs before training starts and learn image size, channels and labels.

    Raises ConfigError, naming the cause and the fix, for: no URLs, fewer shards than readers in
    epoch mode, missing local files, an unreachable or empty first shard, and samples that hold
    no decodable image.
    """
    if not config.urls:
        raise ConfigError(
            "data.source 'webdataset' needs data.urls: a path, a brace pattern "
            "(shards/shard-{000000..000009}.tar), an http(s):// URL or a pipe: command "
            "(pipe:aws s3 cp s3://bucket/shard-{000000..000009}.tar -). Write shards with `debm shards`."
        )
    shards = expand_urls(config.urls)
    if not shards:
        raise ConfigError(f"data.urls '{config.urls}' expands to no URL.")
    readers = world_size * max(1, config.loader_workers)
    if not config.resampled and len(shards) < readers:
        raise ConfigError(
            f"{len(shards)} shard(s) for {world_size} rank(s) × {max(1, config.loader_workers)} loader "
            f"worker(s) = {readers} readers: some readers would get no shard and ranks would see "
            "different amounts of data. Write more, smaller shards (debm shards --samples-per-shard), "
            "lower data.loader_workers, or set data.resampled=true with data.epoch_batches."
        )
    missing = [u for u in shards if (p := _local_path(u)) is not None and not p.expanduser().is_file()]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(shards)} shard files do not exist, e.g. '{missing[0]}'. Check "
            "data.urls (an absolute path on a cluster: workers change directory)."
        )
    errors: list[Exception] = []

    def keep(exn: Exception) -> bool:
        errors.append(exn)
        return True

    wanted = max(1, config.mean_samples)
    decoded, labels, raw_seen = [], [], 0
    decoder = None
    for sample in tar_samples(iter(shards[: max(1, min(len(shards), 4))]), keep):
        raw_seen += 1
        if decoder is None:
            decoder = _first_decoder(sample, config)
        try:
            image, label = decoder(sample)
        except Exception as err:
            log.warning("Preflight: skipping corrupt sample %s (%s)", sample.get("__key__"), err)
            continue
        decoded.append(image)
        labels.append(label)
        if len(decoded) >= wanted:
            break
    if errors and not decoded:
        raise ConfigError(
            f"Cannot read the shard '{shards[0]}': {errors[0]}. Check that the URL is reachable from "
            "every worker (path, credentials, the pipe: command) and that the file is a tar."
        )
    if raw_seen == 0:
        raise ConfigError(f"The shard '{shards[0]}' holds no samples: it is empty. Rewrite it with `debm shards`.")
    if not decoded:
        raise ConfigError(f"None of the first {raw_seen} samples of '{shards[0]}' decodes as an image.")
    manifest = read_manifest(shards, config.manifest)
    _check_epochs(config, shards, manifest, world_size, batch_size)
    has_labels = config.labels and all(label >= 0 for label in labels)
    num_classes = config.num_classes or (len(manifest["classes"]) if manifest and manifest.get("classes") else 0)
    if has_labels and not num_classes:
        num_classes = max(labels) + 1
        log.warning("No manifest.json next to the shards and no data.num_classes: assuming %d classes "
                    "from the first samples. Set data.num_classes to be sure.", num_classes)
    first = torch.from_numpy(np.stack(decoded)).float() / 127.5 - 1.0
    return ShardInfo(shards, decoder.image_size, first.shape[1], has_labels, num_classes if has_labels else 0,
                     first, manifest)


def _check_epochs(config: DataConfig, shards: list[str], manifest: dict | None, world_size: int,
                  batch_size: int | None) -> None:
    """Every reader must be able to fill batches in every epoch (checked where sizes are known)."""
    workers = max(1, config.loader_workers)
    if config.resampled:
        if not config.epoch_batches and manifest is None:
            raise ConfigError(
                "data.resampled needs data.epoch_batches (batches per rank per epoch), or a "
                "manifest.json to count samples (next to local or http shards, or data.manifest).")
        if config.epoch_batches and config.epoch_batches < workers:
            raise ConfigError(
                f"data.epoch_batches ({config.epoch_batches}) is smaller than data.loader_workers "
                f"({workers}): some loader workers would make no batch. Raise it or use fewer workers.")
        return
    sizes = shard_sizes(shards, manifest)
    if sizes is None:
        if world_size > 1:
            log.warning("No manifest.json lists these shards: ranks cannot be given the same number "
                        "of batches per epoch and may drift into different epochs. Set data.manifest "
                        "or use data.resampled=true.")
        return
    per_reader = len(shards) // (world_size * workers)
    smallest = sum(sorted(sizes[_name(u)] for u in shards)[:per_reader])  # the worst epoch's reader
    if batch_size and smallest < batch_size:
        raise ConfigError(
            f"A reader ({world_size} rank(s) × {workers} loader worker(s)) may get only {smallest} "
            f"samples in an epoch, fewer than one batch of {batch_size}. Write more samples per shard, "
            "use fewer loader workers, or set data.resampled=true.")


def _first_decoder(sample: dict, config: DataConfig) -> ImageDecoder:
    """The decoder for this data: size and channels from the config, else from the first image."""
    from PIL import Image

    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise ConfigError(
            f"Samples in '{sample.get('__url__')}' hold {found} but no image ({', '.join(IMAGE_KEYS)}): "
            "these are not image shards. Write image shards with `debm shards`."
        )
    try:
        with Image.open(io.BytesIO(sample[key])) as image:
            size, mode = min(image.size), image.mode
    except Exception as err:
        raise ConfigError(f"The first sample of '{sample.get('__url__')}' is not a readable image ({err}).") from None
    channels = {True: 1, False: 3}.get(config.grayscale, 1 if mode in ("L", "1", "I;16") else 3)
    return ImageDecoder(config.image_size or size, channels)


class StreamingData:
    """One rank's endless stream of training batches from WebDataset shards.

    It has what the training loop asks of a data set (`batch`, `sample_shape`, `num_classes`,
    `name`, `reference`) plus `state_dict`/`load_state_dict` (per loader worker: epoch, raw samples
    consumed, batches made) and `counters()` (corrupt samples and bad shards so far, seconds spent
    waiting for a batch).
    """

    def __init__(self, config: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, info: ShardInfo | None = None):
        self.config, self.batch_size, self.device = config, batch_size, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.info = info or inspect_shards(config, world_size, batch_size)
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
