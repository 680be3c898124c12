"""`debm tune`: validate a search space, run the Ray Tune search, print the summary table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from ..config import parse_overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm tune` to the CLI's subparsers."""
    tune = subparsers.add_parser("tune", help="search hyperparameters with Ray Tune (tune_spaces/)")
    tune.add_argument("--space", required=True,
                      help="search space YAML (see tune_spaces/README.md)")
    tune.add_argument("--trials", type=int, required=True,
                      help="trials in all (a multiple of the grid's combinations)")
    tune.add_argument("--workers-per-trial", type=int, default=0,
                      help="Ray Train workers per trial; 0: train in the trial's process")
    tune.add_argument("--gpus-per-worker", type=float, default=0.0,
                      help="GPUs per Ray Train worker")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override of the space's base config, e.g. train.iterations=100")
    tune.add_argument("--storage", help="Ray storage (absolute path or URI); default OUT/ray")
    tune.add_argument("--address", help="join this Ray cluster (e.g. auto); default: a local one")
    tune.add_argument("--name",
                      help="search name (Tune experiment, MLflow parent run); default the space's")
    tune.add_argument("--out", help="search folder (default runs/<name>-<time>)")
    tune.add_argument("--no-mlflow", action="store_true", help="no MLflow runs and no registration")
    tune.add_argument("--dry-run", action="store_true", help="validate, print the space and exit")
    return tune


def run(args: argparse.Namespace) -> int:
    """`debm tune`: validate the space, run the search, print the summary table."""
    from ..tuning import check_search, load_space, run_search

    overrides = parse_overrides(args.set + (["tracking.enabled=false"] if args.no_mlflow else []))
    space = load_space(args.space, overrides)
    name = args.name or space.name
    if args.dry_run:
        check_search(space, args.trials, args.workers_per_trial, args.storage)
        print(yaml.safe_dump({"search": space.describe(), "base": space.base.to_dict()},
                             sort_keys=False), end="")
        return 0
    out = Path(args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_search(space, trials=args.trials, out_dir=out,
                        workers_per_trial=args.workers_per_trial,
                        gpus_per_worker=args.gpus_per_worker, storage=args.storage,
                        address=args.address, name=name)
    print((result.out_dir / "summary.md").read_text(), end="")
    print(f"Search folder {result.out_dir} (summary.csv, summary.md, search.json)"
          + (f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""))
    return 1 if all(t.status == "error" for t in result.trials) else 0
