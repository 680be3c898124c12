"""Cluster entry point for `ray job submit --working-dir . -- python jobs/train.py …`.

Thin: the arguments are `debm train`'s (see `debm train --help`), e.g.

    ray job submit --working-dir . -- python jobs/train.py \
        --config configs/digits_wgcn.yaml --workers 8 --gpus-per-worker 1 --address auto \
        --storage s3://my-bucket/debm --set tracking.uri=http://mlflow.internal:5000
"""

import sys

from distributed_ebm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
