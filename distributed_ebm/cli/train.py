"""`debm train`: build the run config, train in one process or in Ray Train workers, print the summary."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import yaml

from ..checkpoint import CheckpointWriteError, latest_checkpoint
from ..config import ConfigError, load_config, parse_overrides
from ..distributed import resolve_device


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
    if args.run_dir and RAY_JOB_ENV in os.environ and not Path(args.run_dir).is_absolute():
        raise ConfigError(
            f"--run-dir '{args.run_dir}' is relative: inside a Ray job it would land in Ray's temporary copy of "
            "--working-dir, which Ray deletes after the job. Give an absolute path every node mounts, or leave "
            "--run-dir out and pass --storage /path/every/node/mounts.")
    if args.resume and not args.run_dir:
        raise ConfigError("--resume continues the run in --run-dir: name the run directory to resume "
                          "(with --workers, its Ray storage: --storage, default RUN_DIR/ray).")
    run_dir = Path(args.run_dir or _default_run_dir(args, config.name)).resolve()
    if args.workers > 0:
        _check_ray_resume(args, config.name, run_dir)
    print(_start_line(args, config, run_dir), flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop ends the run like Ctrl-C
    try:
        summary = _train(args, config, run_dir)
    except KeyboardInterrupt:
        print(_interrupted_line(args, config.name, run_dir), file=sys.stderr)
        return 130
    except CheckpointWriteError as err:  # one message, the last good checkpoint and how to go on
        print(f"debm: error: {err} Resume with: {_resume_command(args, run_dir)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    collapse, recoveries = summary["collapse"], summary.get("recoveries", [])
    print(
        f"{summary['status']}{' (train.time_budget_s ran out)' if summary.get('stopped_by') == 'time_budget' else ''}: "
        f"{summary['iterations']} iterations, {summary['images_seen']} images seen in "
        f"{summary['wall_time_s']:.1f}s; final R {_number(summary.get('final_response_distance'))}; "
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


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _check_ray_resume(args: argparse.Namespace, name: str, run_dir: Path) -> None:
    """Ray Train continues a run from its storage (STORAGE/NAME) whenever that holds a checkpoint:
    make that explicit. Without --resume, a storage that holds one is refused; with --resume, a
    local storage that holds none is. (A remote storage, s3://…, is not listed here: Ray resumes
    from it if it holds a checkpoint.)"""
    storage = _ray_run_storage(args, name, run_dir)
    if storage is None:
        if args.resume:
            print(f"Resuming from Ray storage {args.storage.rstrip('/')}/{name} if it holds a checkpoint.")
        return
    latest = latest_checkpoint(storage)
    if latest and not args.resume:
        raise ConfigError(
            f"Ray storage '{storage}' already holds checkpoints of run '{name}' (latest {latest.name}): "
            "pass --resume to continue it, or start a new run with another --run-dir, --storage or name.")
    if args.resume and not latest:
        raise ConfigError(
            f"Nothing to resume: Ray storage '{storage}' holds no checkpoint of run '{name}'. "
            "Name the run's --run-dir (and --storage if it had one), or drop --resume to start afresh.")
    if args.resume:
        print(f"Resuming run '{name}' from Ray storage {storage} (latest checkpoint {latest.name}).")


def _ray_run_storage(args: argparse.Namespace, name: str, run_dir: Path) -> Path | None:
    """The local folder where Ray Train keeps this run's checkpoints (STORAGE/NAME, default
    RUN_DIR/ray/NAME); None for a remote storage (s3://…)."""
    storage = args.storage or str(run_dir / "ray")
    return None if "://" in storage else Path(storage) / name


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint


def _default_run_dir(args: argparse.Namespace, name: str) -> Path:
    """runs/NAME-TIME; inside a Ray job (`ray job submit`) the working directory is Ray's temporary
    copy of --working-dir, deleted after the job: there the run goes to STORAGE/runs/NAME-TIME
    with a local --storage every node mounts, and a relative or missing --run-dir is refused."""
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if RAY_JOB_ENV not in os.environ:
        return Path("runs") / stamp
    if args.storage and "://" not in args.storage and Path(args.storage).is_absolute():
        return Path(args.storage) / "runs" / stamp
    raise ConfigError(
        "Inside a Ray job the working directory is Ray's temporary copy of --working-dir, which Ray deletes "
        "after the job: pass --storage /path/every/node/mounts (the run directory then goes to "
        "STORAGE/runs/NAME-TIME) or an absolute --run-dir on such a path.")


def _train(args: argparse.Namespace, config, run_dir: Path) -> dict:
    if args.workers > 0:
        from ..trainer import train_distributed

        return train_distributed(
            config, run_dir=run_dir, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            address=args.address, storage=args.storage, max_failures=args.max_failures,
            verbose=getattr(args, "verbose", False),
        )
    from ..train_loop import train

    return train(config, run_dir, resume=args.resume)


def _start_line(args: argparse.Namespace, config, run_dir: Path) -> str:
    """One line: what trains, on what data, where, and where it is written and tracked."""
    data = config.data
    source = data.path or (f"{len(data.urls)} shard URL(s)" if isinstance(data.urls, (list, tuple)) else data.urls)
    where = (f"{args.workers} Ray worker{'s' if args.workers > 1 else ''} × "
             f"{f'{args.gpus_per_worker:g} GPU' if args.gpus_per_worker else 'CPU'} "
             f"({'cluster ' + args.address if args.address else 'local Ray'})"
             if args.workers > 0 else f"one process on {resolve_device(config.train.device)}")
    from ..tracking import resolve_tracking_uri

    tracking = f"MLflow {resolve_tracking_uri(config.tracking)}" if config.tracking.enabled else "no MLflow"
    return (f"debm train {config.name}: {config.model.algorithm} on {data.source}{f' {source}' if source else ''}, "
            f"{config.train.iterations} iterations; {where}; run directory {run_dir}; {tracking}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted_line(args: argparse.Namespace, name: str, run_dir: Path) -> str:
    """One line: where the run stopped and the command that continues it."""
    storage = _ray_run_storage(args, name, run_dir) if args.workers > 0 else run_dir / "checkpoints"
    latest = latest_checkpoint(storage) if storage is not None else None
    where = f"last checkpoint {latest}" if latest else "no checkpoint yet (a resume starts afresh)"
    return f"debm: interrupted; {where}. Resume with: {_resume_command(args, run_dir)}"


def _resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command as given (cli.main keeps it), with the run directory and --resume."""
    argv = [a for a in args.argv if a != "--resume"]
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(run_dir)]
    return f"debm {shlex.join(argv)} --resume"
