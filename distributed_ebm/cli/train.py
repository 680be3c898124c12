"""`debm train`: build the run config, train in one process or in Ray Train workers, print the summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from ..config import load_config, parse_overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm train` to the CLI's subparsers."""
    train = subparsers.add_parser("train", help="train a model (one process, or Ray Train workers)")
    train.add_argument("--no-mlflow", action="store_true", help="do not track to MLflow (same as --set tracking.enabled=false)")
    train.add_argument("--config", help="YAML preset (see configs/); defaults apply without one")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. langevin.step_size=0.1")
    train.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0: one process without Ray")
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (NCCL when > 0)")
    train.add_argument("--address", help="join this Ray cluster (e.g. auto); default: start a local one")
    train.add_argument("--storage", help="Ray storage for checkpoints: absolute path or URI (s3://…); default RUN_DIR/ray")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    train.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --run-dir (Ray runs resume by run name and storage)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return train


def run(args: argparse.Namespace) -> int:
    """`debm train`: train, then print a one-line summary (and where to look at the MLflow run).

    Exit status 0 when the run completed or collapsed (its summary says which, and for a
    collapsed run what to change, also printed to stderr); a divergence raises TrainingDiverged,
    which `debm` turns into exit status 1."""
    config = load_config(args.config, parse_overrides(args.set + (["tracking.enabled=false"] if args.no_mlflow else [])))
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = Path(args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if args.workers > 0:
        from ..trainer import train_distributed

        summary = train_distributed(
            config, run_dir=run_dir, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            address=args.address, storage=args.storage, max_failures=args.max_failures,
        )
    else:
        from ..train_loop import train

        summary = train(config, run_dir, resume=args.resume)
    collapse, recoveries = summary["collapse"], summary.get("recoveries", [])
    print(
        f"{summary['status']}{' (train.time_budget_s ran out)' if summary.get('stopped_by') == 'time_budget' else ''}: "
        f"{summary['iterations']} iterations, {summary['images_seen']} images seen in "
        f"{summary['wall_time_s']:.1f}s; final R {summary['final_response_distance']:.4g}; "
        f"collapse: {'none' if collapse is None else collapse['reason'] + ' at iteration ' + str(collapse['iteration'])}; "
        + (f"{len(recoveries)} recover{'y' if len(recoveries) == 1 else 'ies'} (δ now "
           f"{summary['effective']['langevin.step_size']:.4g}, λ {summary['effective']['optim.lr']:.4g}); "
           if recoveries else "")
        + f"run directory {run_dir}"
    )
    if summary["status"] == "collapsed":  # a result, not an error: exit status 0, as for completed runs
        print(f"debm: {summary['message']}", file=sys.stderr)
    if summary.get("mlflow_run_id"):
        uri = summary["mlflow_uri"]
        print(f"MLflow: run {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) at {uri}"
              + (f"; registered {summary['model_uri']}" if summary.get("model_uri") else ""))
        ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
        print(f"Look at it: {ui}  (then http://127.0.0.1:5000/#/experiments/{summary['mlflow_experiment_id']})")
    return 0
