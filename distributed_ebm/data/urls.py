"""Shard URLs: `data.urls` patterns, their expansion, and the file names manifests key by.

URLs are a local path, a brace pattern (`shards/shard-{000000..000099}.tar`), `http(s)://` or a
`pipe:` command (`pipe:aws s3 cp s3://bucket/shard-000000.tar -`); several are joined by `::`.
"""

from __future__ import annotations

from pathlib import Path


def shard_name(url: str) -> str:
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


def local_path(url: str) -> Path | None:
    """The file a URL names on this machine (a plain path or file://), None for remote URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if ("://" in url or url.startswith("pipe:")) else Path(url)
