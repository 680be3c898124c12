"""Cluster entry point for `ray job submit --working-dir . -- python jobs/evaluate.py …`.

Thin: the arguments are `debm evaluate`'s (see `debm evaluate --help`), e.g.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/digits-wgcn@champion
"""

import sys

from distributed_ebm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
