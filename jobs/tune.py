"""Cluster entry point for `ray job submit --working-dir . -- python jobs/tune.py …`.

Thin: the arguments are `debm tune`'s (see `debm tune --help`), e.g.

    ray job submit --working-dir . -- python jobs/tune.py \
        --space tune_spaces/digits_wgcn_asha.yaml --trials 32 --workers-per-trial 2 \
        --gpus-per-worker 1 --address auto --storage s3://my-bucket/debm
"""

import sys

from distributed_ebm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
