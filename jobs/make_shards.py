"""Cluster entry point for `ray job submit --working-dir . -- python jobs/make_shards.py …`.

Thin: the arguments are `debm shards`'s (see `debm shards --help`), e.g.

    ray job submit --working-dir . -- python jobs/make_shards.py \
        /data/imagenet --split train --image-size 64 --out s3://my-bucket/shards/imagenet64
"""

import sys

from distributed_ebm.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
