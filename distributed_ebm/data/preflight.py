"""Before training reads a shard: check the URLs and the first samples, learn the image size,
channels and classes, and read the manifest (`manifest.json`: samples per shard, classes).

Every problem a user can cause here (no URLs, too few shards for the readers, missing files, an
unreachable or empty shard, samples without images, epochs a reader cannot fill) raises a
ConfigError that names the cause and the fix, before any worker starts.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..clusters import FIT_MAX_VALUES
from ..config import ConfigError, DataConfig
from .tar import IMAGE_KEYS, ImageDecoder, tar_samples
from .urls import expand_urls, local_path, shard_name

log = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    """What the preflight learnt from the first samples, the same on every rank."""

    shards: list[str]
    image_size: int
    channels: int
    has_labels: bool
    num_classes: int
    first: torch.Tensor  # float (K, C, H, W) in [-1, 1]: the first samples in stored order (the mean)
    manifest: dict | None
    fit: torch.Tensor | None = None  # with `samples` (model.clusters): images spread over every shard


def read_manifest(shards: list[str], where: str | None = None) -> dict | None:
    """`data.manifest` (a path, URL or pipe: command), else manifest.json next to the shards when
    it can be found there (local folder or http(s))."""
    first = shards[0]
    local = local_path(first)
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
    return sizes if all(shard_name(u) in sizes for u in shards) else None


def inspect_shards(config: DataConfig, world_size: int, batch_size: int | None = None,
                   samples: int | None = None) -> ShardInfo:
    """Check the URLs before training starts and learn image size, channels and labels from the
    first data.mean_samples images (read from at most the first 4 shards). With `samples`
    (data.cluster_samples) it also reads that many images spread over every shard (`fit`: about
    samples / shards from the start of each, so shards written in class order still give every
    class), and an unreadable shard is an error, not a skip: every rank must fit its clusters on
    the same images.

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
    missing = [u for u in shards if (p := local_path(u)) is not None and not p.expanduser().is_file()]
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
    scanned = shards[: max(1, min(len(shards), 4))]
    decoded, labels, raw_seen = [], [], 0
    decoder = None
    for sample in tar_samples(iter(scanned), keep):
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
    first = _unit_range(decoded)
    fit = _spread_read(shards, samples, decoder, first[0].numel()) if samples else None
    return ShardInfo(shards, decoder.image_size, first.shape[1], has_labels, num_classes if has_labels else 0,
                     first, manifest, fit)


def _spread_read(shards: list[str], samples: int, decoder: ImageDecoder, per_image: int) -> torch.Tensor:
    """`samples` images from the start of the shards in turn, each shard giving its share of what
    is still wanted (a short shard's shortfall passes to the next), as float (N, C, H, W) in [-1, 1].
    With fewer samples than shards, one image from each of `samples` evenly spaced shards. At most
    clusters.FIT_MAX_VALUES pixel values (`per_image` each): the fit would use no more. Corrupt
    samples are skipped (the shard gives another); an unreadable shard stops the read (every rank
    must read the same images)."""
    wanted = min(samples, max(1, FIT_MAX_VALUES // per_image))
    if wanted < samples:
        log.info("Clusters: reading %d images, not data.cluster_samples=%d (the fit's cap of %d pixel values).",
                 wanted, samples, FIT_MAX_VALUES)
    if wanted < len(shards):
        shards = [shards[i * len(shards) // wanted] for i in range(wanted)]

    def stop(exn: Exception) -> bool:
        raise ConfigError(
            f"Reading {wanted} images spread over {len(shards)} shards (data.cluster_samples, for "
            f"model.clusters) failed: {exn}. Every rank fits the clusters on the same images, so none "
            "may be skipped: fix or remove that shard from data.urls.")

    images = []
    for index, url in enumerate(shards):
        share = -(-(wanted - len(images)) // (len(shards) - index))  # ceil of the rest over the shards left
        if share <= 0:
            break
        reader, taken = tar_samples(iter([url]), stop), 0
        for sample in reader:
            try:
                images.append(decoder(sample)[0])
                taken += 1
            except Exception as err:
                log.warning("Cluster read: skipping corrupt sample %s (%s)", sample.get("__key__"), err)
            if taken >= share:
                break
        reader.close()  # stop reading the rest of the shard
    if not images:
        raise ConfigError(
            f"None of the samples read from {len(shards)} shards for model.clusters decodes as an image. "
            "Check the shards (rewrite them with `debm shards`).")
    if len(images) < wanted:
        log.warning("Clusters are fitted on %d images: the %d shards hold fewer than %d readable ones "
                    "(data.cluster_samples).", len(images), len(shards), wanted)
    return _unit_range(images)


def _unit_range(images: list[np.ndarray]) -> torch.Tensor:
    """Decoded uint8 (C, H, W) images stacked as float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).float() / 127.5 - 1.0


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
    smallest = sum(sorted(sizes[shard_name(u)] for u in shards)[:per_reader])  # the worst epoch's reader
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
