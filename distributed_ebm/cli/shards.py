"""`debm shards`: write WebDataset shards from an image tree, tar, LMDB, .npz or bundled set."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm shards` to the CLI's subparsers."""
    shards = subparsers.add_parser("shards", help="write WebDataset shards from an image tree, tar, LMDB, .npz or bundled set")
    shards.add_argument("source", help="folder or .tar of <class>/<image> folders, LMDB folder, .npz, or a "
                        "bundled data set name (digits, faces, ...)")
    shards.add_argument("--out", required=True, help="local folder, or s3://… / gs://… (uploaded per shard)")
    shards.add_argument("--samples-per-shard", type=int, default=10_000)
    shards.add_argument("--image-size", type=int, help="resize the shorter side and centre-crop (default: keep the encoded bytes)")
    shards.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding after --image-size")
    shards.add_argument("--split", help="only this top-level folder of the tree (e.g. train)")
    shards.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--prefix", default="shard", help="shard file names: PREFIX-NNNNNN.tar")
    shards.add_argument("--upload-cmd", help="command template with {src} and {dst} for remote --out "
                        "(default: aws s3 cp {src} {dst} / gsutil cp {src} {dst})")
    shards.add_argument("--quiet", action="store_true", help="no progress bar")
    return shards


def run(args: argparse.Namespace) -> int:
    """`debm shards`: write the shards and their manifest, then print how to train from them."""
    from ..data.shards import ShardOptions, write_shards

    options = ShardOptions(
        samples_per_shard=args.samples_per_shard, image_size=args.image_size, quality=args.quality,
        shuffle=not args.no_shuffle, seed=args.seed, prefix=args.prefix, upload_cmd=args.upload_cmd,
        split=args.split, progress=not args.quiet,
    )
    manifest = write_shards(args.source, args.out, options)
    where = args.out.rstrip("/")
    print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards at {where} "
          f"({', '.join(f'{k}: {v}' for k, v in manifest['formats'].items())}); "
          f"{manifest['num_skipped']} unreadable inputs skipped (listed in manifest.json); "
          f"{len(manifest['classes'])} classes")
    urls = f"{where}/{manifest['urls']}"
    if where.startswith("s3://"):
        urls = f"pipe:aws s3 cp {urls} -"
    elif where.startswith("gs://"):
        urls = f"pipe:gsutil cat {urls}"
    print(f"Train from them with: --set data.source=webdataset --set 'data.urls={urls}'")
    return 0
