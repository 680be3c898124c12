"""Reading WebDataset tar shards: members, samples grouped by key, decoded images.

A shard that cannot be read to its end is reported (`ShardErrors`) and reading goes on with the
next; a sample whose image does not decode raises in `ImageDecoder` for the caller to skip.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np

from .transforms import centre_crop_resize

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the extensions of a sample's image, in preference order


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
