"""Writing WebDataset shards: `debm shards SOURCE --out DEST`.

A source is one of
- an ImageNet-style tree (`train/<class>/*.JPEG`), as a folder or as a tar (or .tar.gz) of one:
  an image's class is its parent folder, class indices come from the sorted folder names;
- an LSUN LMDB database (keys: image ids, values: encoded webp/jpeg bytes);
- a bundled or `.npz` data set of `distributed_ebm.data.SOURCES` (`digits`, `faces`, a path to a
  `.npz`): pixels are encoded losslessly as PNG.

Every sample is written as `__key__` = running index (nine digits; WebDataset splits the key at
the first dot, so the original name goes into the JSON), the image under its own extension (`jpg`,
`png` or `webp`; encoded bytes are kept as they are unless `image_size` asks for a resize and
centre crop), `cls` (the class index, when there are classes) and `json` (`{"id": original id}`).
Every input is decoded once to check it: unreadable ones are skipped, counted and listed in the
manifest, never fatal. The destination is a local folder, or an `s3://` / `gs://` URL (or any URL)
to which each finished shard is uploaded by a command (`aws s3 cp {src} {dst}` by default) from a
local staging folder. `manifest.json` lists shards, sample counts, classes and checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shlex
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .sources import SOURCES, load_dataset
from .transforms import IMAGE_SUFFIXES, centre_crop_resize

log = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
UPLOAD_COMMANDS = {"s3": "aws s3 cp --only-show-errors {src} {dst}", "gs": "gsutil -q cp {src} {dst}"}
MANIFEST = "manifest.json"


@dataclass
class RawSample:
    """One input before checking: its id, encoded bytes (or decoded pixels) and class name."""

    id: str
    data: bytes | None = None  # encoded image bytes (tree, tar, LMDB)
    pixels: np.ndarray | None = None  # uint8 (H, W) or (H, W, 3) (bundled and .npz data sets)
    label: int | None = None


@dataclass
class ShardOptions:
    """How `write_shards` writes: shard size, optional resize, ordering, upload."""

    samples_per_shard: int = 10_000
    image_size: int | None = None  # resize the shorter side and centre-crop; None keeps the bytes
    quality: int = 95  # JPEG/WebP quality when re-encoding after a resize
    shuffle: bool = True  # write samples in a seeded random order (class-sorted trees mix in shards)
    seed: int = 0
    prefix: str = "shard"
    upload_cmd: str | None = None  # template with {src} and {dst}; default by URL scheme
    split: str | None = None  # only this top-level folder of a tree (e.g. "train")
    progress: bool = True


@dataclass
class ShardReport:
    """What was written: the manifest's content."""

    destination: str
    shards: list[dict] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def brace_pattern(self, prefix: str) -> str:
        last = len(self.shards) - 1
        return f"{prefix}-{{000000..{last:06d}}}.tar" if last > 0 else f"{prefix}-000000.tar"

    def manifest(self, source: str, options: ShardOptions) -> dict:
        return {
            "format": "webdataset",
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "urls": self.brace_pattern(options.prefix),
            "samples_per_shard": options.samples_per_shard,
            "image_size": options.image_size,
            "shuffled": options.shuffle,
            "seed": options.seed,
            "classes": self.classes,
            "class_counts": {self.classes[k] if self.classes else str(k): v for k, v in sorted(self.class_counts.items())},
            "formats": dict(self.formats),
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "shards": self.shards,
        }


# --- sources ---------------------------------------------------------------------------------


def open_source(source: str, options: ShardOptions) -> tuple[list[str], int, Iterator[RawSample]]:
    """(class names, number of inputs, iterator of raw samples) for any supported source."""
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "data.mdb").exists()):
        return _lmdb_source(path, options)
    if path.is_file() and path.suffix == ".mdb":
        return _lmdb_source(path, options)
    if path.is_dir():
        return _tree_source(path, options)
    if path.is_file() and (path.name.endswith((".tar", ".tar.gz", ".tgz"))):
        return _tar_source(path, options)
    if path.is_file() and path.suffix == ".npz" or not path.exists():
        return _dataset_source(source)
    raise ConfigError(
        f"Cannot tell what '{source}' is: give a folder of class folders, a .tar/.tar.gz of one, an "
        "LMDB folder (with data.mdb), a .npz file or a bundled data set name (digits, faces, ...)."
    )


def _order(n: int, options: ShardOptions) -> np.ndarray:
    return np.random.default_rng(options.seed).permutation(n) if options.shuffle else np.arange(n)


def _class_of(relative: PurePosixPath, split: str | None) -> str | None:
    parts = relative.parts
    if split is not None:
        if not parts or parts[0] != split:
            return None
        parts = parts[1:]
    return parts[-2] if len(parts) >= 2 else ""


def _tree_entries(names: list[str], split: str | None, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(sorted class names, [(name, class)]) for the image files among `names`."""
    entries = []
    for name in names:
        relative = PurePosixPath(name)
        if relative.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in relative.parts):
            continue
        cls = _class_of(relative, split)
        if cls is not None:
            entries.append((name, cls))
    if not entries:
        hint = f" under the top-level folder '{split}'" if split else ""
        raise ConfigError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{where}'{hint}.")
    classes = sorted({c for _, c in entries})
    if classes == [""]:
        classes = []
    return classes, sorted(entries)


def _tree_source(root: Path, options: ShardOptions):
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    classes, entries = _tree_entries(names, options.split, str(root))
    index = {c: i for i, c in enumerate(classes)}

    def samples():
        for i in _order(len(entries), options):
            name, cls = entries[i]
            try:
                data = (root / name).read_bytes()
            except OSError as err:
                log.warning("Cannot read %s (%s)", name, err)
                data = b""  # counted as unreadable by the writer
            yield RawSample(name, data, label=index.get(cls))

    return classes, len(entries), samples()


def _tar_source(path: Path, options: ShardOptions):
    compressed = not path.name.endswith(".tar")
    tar = tarfile.open(path, "r:*")
    members = {m.name: m for m in tar.getmembers() if m.isfile()}
    classes, entries = _tree_entries(list(members), options.split, str(path))
    index = {c: i for i, c in enumerate(classes)}
    if compressed and options.shuffle:
        log.warning("%s is compressed: reading it in random order is slow; writing in stored order "
                    "instead (decompress it first to shuffle)", path)
        entries.sort(key=lambda e: members[e[0]].offset)
        options.shuffle = False  # and manifest.json says so

    def samples():
        try:
            for i in _order(len(entries), options):
                name, cls = entries[i]
                try:
                    data = tar.extractfile(members[name]).read()
                except (OSError, tarfile.TarError) as err:
                    log.warning("Cannot read %s from %s (%s)", name, path, err)
                    data = b""
                yield RawSample(name, data, label=index.get(cls))
        finally:
            tar.close()

    return classes, len(entries), samples()


def _lmdb_source(path: Path, options: ShardOptions):
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir(), max_readers=4)
    with env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    if not keys:
        raise ConfigError(f"The LMDB database '{path}' is empty.")

    def samples():
        try:
            with env.begin() as txn:
                for i in _order(len(keys), options):
                    value = txn.get(keys[i])
                    yield RawSample(keys[i].decode("utf-8", "replace"), bytes(value or b""))
        finally:
            env.close()

    return [], len(keys), samples()


def _dataset_source(source: str):
    path = Path(source).expanduser()
    if path.suffix == ".npz":
        config = DataConfig(source="npz", path=str(path))
    elif source in SOURCES and source not in ("npz", "folder"):
        config = DataConfig(source=source)
    else:
        raise ConfigError(
            f"'{source}' does not exist and is not a bundled data set. Give a folder of class folders, a "
            f".tar of one, an LMDB folder, a .npz file or one of {sorted(set(SOURCES) - {'npz', 'folder'})}."
        )
    data = load_dataset(config)
    if data.x.dim() != 4:
        raise ConfigError(f"'{source}' holds vectors of shape {data.sample_shape}, not images: nothing to shard.")
    pixels = ((data.x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    classes = [str(k) for k in range(data.num_classes)] if data.y is not None else []

    def samples():
        for i in range(len(pixels)):
            image = pixels[i, :, :, 0] if pixels.shape[-1] == 1 else pixels[i]
            yield RawSample(f"{data.name}/{i}", pixels=image, label=None if data.y is None else int(data.y[i]))

    return classes, len(pixels), samples()


# --- encoding --------------------------------------------------------------------------------


def encode_sample(raw: RawSample, options: ShardOptions) -> tuple[str, bytes]:
    """(extension, bytes) of a checked sample; raises ValueError/OSError when it is unreadable."""
    from PIL import Image

    if raw.pixels is not None:
        image = Image.fromarray(raw.pixels)
        fmt = "PNG"
    else:
        if not raw.data:
            raise OSError("empty or unreadable file")
        image = Image.open(io.BytesIO(raw.data))
        fmt = image.format
        image.load()  # decodes fully: truncated and corrupt files fail here
        if fmt not in FORMAT_EXTENSIONS:
            fmt = "PNG"  # other formats (BMP, GIF, TIFF) are re-encoded losslessly
        elif options.image_size is None:
            return FORMAT_EXTENSIONS[fmt], raw.data
    if options.image_size is not None:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = centre_crop_resize(image, options.image_size)
    buffer = io.BytesIO()
    extra = {"quality": options.quality} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **extra)
    return FORMAT_EXTENSIONS[fmt], buffer.getvalue()


# --- destination -----------------------------------------------------------------------------


class Destination:
    """A local folder, or a URL that finished files are uploaded to by a command."""

    def __init__(self, out: str, upload_cmd: str | None):
        self.out = out.rstrip("/")
        self.remote = "://" in out
        if self.remote:
            scheme = out.split("://", 1)[0]
            self.upload_cmd = upload_cmd or UPLOAD_COMMANDS.get(scheme)
            if self.upload_cmd is None:
                raise ConfigError(
                    f"No default upload command for '{scheme}://' destinations: pass --upload-cmd, a "
                    "command template with {src} and {dst} (e.g. \"rclone copyto {src} {dst}\")."
                )
            if "{src}" not in self.upload_cmd or "{dst}" not in self.upload_cmd:
                raise ConfigError(f"--upload-cmd '{self.upload_cmd}' must contain {{src}} and {{dst}}.")
            self._staging = tempfile.TemporaryDirectory(prefix="debm-shards-")
            self.folder = Path(self._staging.name)
        else:
            self.folder = Path(out).expanduser().resolve()
            self.folder.mkdir(parents=True, exist_ok=True)

    def finish(self, path: Path) -> str:
        """Upload a finished file (remote) and return its final location."""
        if not self.remote:
            return str(path)
        dst = f"{self.out}/{path.name}"
        command = self.upload_cmd.format(src=shlex.quote(str(path)), dst=shlex.quote(dst))
        result = subprocess.run(command, shell=True, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Uploading {path.name} to {dst} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-500:]}\nCommand: {command}\n"
                "Check credentials and the bucket, or pass --upload-cmd."
            )
        path.unlink()
        return dst


# --- the writer ------------------------------------------------------------------------------


def write_shards(source: str, out: str, options: ShardOptions | None = None) -> dict:
    """Convert `source` to WebDataset shards in `out`; return the manifest (also written there)."""
    import webdataset as wds
    from tqdm import tqdm

    options = options or ShardOptions()
    if options.samples_per_shard < 1:
        raise ConfigError("--samples-per-shard must be at least 1.")
    classes, total, samples = open_source(source, options)
    destination = Destination(out, options.upload_cmd)
    report = ShardReport(destination=destination.out, classes=classes)
    writer, shard_path, count = None, None, 0

    def close_shard():
        nonlocal writer
        writer.close()
        data = shard_path.read_bytes()
        entry = {"name": shard_path.name, "samples": count, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        entry["url"] = destination.finish(shard_path)
        report.shards.append(entry)
        writer = None

    bar = tqdm(total=total, desc=f"shards from {Path(source).name}", unit="img", disable=not options.progress)
    for raw in samples:
        bar.update(1)
        try:
            ext, data = encode_sample(raw, options)
        except Exception as err:  # PIL raises many kinds on corrupt input: skip, count, list
            report.skipped.append({"id": raw.id, "error": f"{type(err).__name__}: {err}"[:300]})
            log.warning("Skipping unreadable input %s (%s)", raw.id, err)
            continue
        if writer is None:
            shard_path = destination.folder / f"{options.prefix}-{len(report.shards):06d}.tar"
            # An int mtime: a float one makes tarfile add a PAX header to every member (2× slower reads).
            writer, count = wds.TarWriter(str(shard_path), mtime=0), 0
        key = f"{report.num_samples + count:09d}"
        sample = {"__key__": key, ext: data, "json": json.dumps({"id": raw.id}).encode()}
        if raw.label is not None:
            sample["cls"] = str(raw.label).encode()
            report.class_counts[raw.label] += 1
        writer.write(sample)
        report.formats[ext] += 1
        count += 1
        if count == options.samples_per_shard:
            close_shard()
    if writer is not None:
        close_shard()
    bar.close()
    if not report.shards:
        raise ConfigError(f"None of the {total} inputs of '{source}' could be read; no shards written.")
    manifest = report.manifest(str(source), options)
    manifest_path = destination.folder / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2))
    manifest["manifest"] = destination.finish(manifest_path)
    if report.skipped:
        log.warning("Skipped %d unreadable inputs (listed in %s)", len(report.skipped), MANIFEST)
    return manifest
