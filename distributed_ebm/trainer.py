"""Ray Train wiring, once: the same `train` in N `TorchTrainer` workers (gloo on CPU, NCCL on GPU).

Each worker owns its shard of the chain and latent banks (chains never move); only gradients are
all-reduced. Checkpoints go through `ray.train.report`: every worker writes its rank file into the
same checkpoint, which Ray merges into one directory in the run's storage. A restarted worker
group (FailureConfig) or a re-launch with the same run name and storage resumes from the latest
one, re-splitting the banks if the number of workers changed.

`fit_workers` builds the TorchTrainer for `train_distributed` and for the Tune trials that run
Ray Train inside (tuning/trial.py). The run config crosses Ray as a plain dict; `ray_worker`
turns it back into a RunConfig and calls `train_loop.train` with a `RayCheckpointStore`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .algorithms import check_model
from .checkpoint import read_checkpoint
from .config import ConfigError, RunConfig
from .train_loop import train

log = logging.getLogger(__name__)


class RayCheckpointStore:
    """Checkpoints reported to Ray Train (merged across workers in the run's storage).

    Metrics reach Ray only with checkpoints: a ray.train.report costs ~1.7 s here (it synchronises
    with the controller), 10× a digits iteration. Rank 0 writes every iteration's metrics to the run
    directory (and MLflow) itself.
    """

    def __init__(self):
        self._restored: tempfile.TemporaryDirectory | None = None

    def latest(self) -> Path | None:
        """Ray's latest checkpoint for this run (after a restart or re-launch), as a local folder."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="debm-restore-")
        return Path(checkpoint.to_directory(self._restored.name))

    def save(self, name: str, write: Callable[[Path], None], metrics: dict, is_main: bool) -> None:
        """Write this rank's files into a temporary folder and report it, as `name`, with the metrics."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="debm-ckpt-") as directory:
            write(Path(directory))
            ray.train.report(
                _plain_metrics(metrics),
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=name,
            )

    def final_checkpoint(self) -> Path | None:
        """None: the driver copies Ray's final checkpoint into the run directory and registers it
        (`copy_final_checkpoint`, `train_distributed`)."""
        return None


def _plain_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def ray_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: `train` with Ray's checkpoints, resuming from Ray's latest.

    `loop_config` is what crosses Ray: config (the RunConfig as a nested dict), run_dir, progress,
    verbose, and on_iteration (picklable callables, e.g. a Tune reporter or a test's injected failure).
    """
    quiet_worker_logs(loop_config.get("verbose", False))
    train(
        RunConfig.from_dict(loop_config["config"]),
        Path(loop_config["run_dir"]),
        store=RayCheckpointStore(),
        on_iteration=loop_config.get("on_iteration"),
        resume=True,  # a restarted worker group always continues from Ray's latest checkpoint
        progress=loop_config.get("progress", True),
    )


def worker_config(config: RunConfig, run_dir: Path, *, progress: bool = True, verbose: bool = False,
                  on_iteration: Sequence[Callable] = ()) -> dict:
    """The train_loop_config of `ray_worker`: the run config as a plain dict, with what goes along."""
    return {"config": config.to_dict(), "run_dir": str(run_dir), "progress": progress, "verbose": verbose,
            "on_iteration": list(on_iteration)}


def quiet_worker_logs(verbose: bool) -> None:
    """In a Ray Train worker: the library logs at INFO only with `debm -v`, and Ray Train's
    per-report line ("Reporting training result N: … metrics={…}", logged at INFO by a logger
    named after its file, which Ray Train's log level does not reach) only then. Warnings and
    errors always reach the driver."""
    from .tracking import quiet_mlflow

    quiet_mlflow(verbose)  # also on a cluster's workers, which do not inherit the driver's environment
    level = logging.INFO if verbose else logging.WARNING
    for name in ("distributed_ebm", "mlflow", "alembic"):  # MLflow's store set-up logs at INFO
        logging.getLogger(name).setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # Train V1: its reports are not logged per call
        return
    logging.getLogger(train_context.__file__).setLevel(level)


@contextlib.contextmanager
def ray_train_settings(local: bool):
    """Ray Train's own switches while a run starts, where the caller has not set them (Ray Train
    passes them from the driver to its controller and workers), restored afterwards: print stays
    print in the workers (Ray Train's print patch would send each progress-bar update through the
    log as well, so the driver draws it twice), and a local cluster runs no spot-preemption
    watcher (nothing preempts one machine)."""
    wanted = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **({"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"} if local else {})}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def ray_logging(verbose: bool) -> dict:
    """ray.init's logging arguments: Ray's own driver-side messages at WARNING unless `verbose`."""
    return {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": True}


def check_gpu_request(device: str, workers: int, gpus_per_worker: float, cluster_gpus: float | None = None) -> str:
    """The device each worker trains on, or a ConfigError naming the fix for a request that
    cannot work: fractional GPUs with NCCL, `train.device` contradicting --gpus-per-worker, or
    more GPUs than the cluster has (Ray would wait for them forever). `cluster_gpus`: the GPUs of
    a fixed (local) cluster; None for one that can grow (an autoscaler adds nodes).

    With `train.device: auto`, workers that asked for no GPU train on the CPU: Ray 2.60 no longer
    hides GPUs from such actors, and every worker would otherwise pile onto GPU 0."""
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be ≥ 0, got {gpus_per_worker}.")
    if 0 < gpus_per_worker < 1 or gpus_per_worker != int(gpus_per_worker):
        raise ConfigError(
            f"--gpus-per-worker {gpus_per_worker}: each worker needs whole GPUs (NCCL refuses two ranks on one "
            "GPU, and one worker drives one device). Use --gpus-per-worker 1, or 0 for CPU workers (gloo).")
    if gpus_per_worker > 0 and device == "cpu":
        raise ConfigError(f"train.device is 'cpu' but --gpus-per-worker is {gpus_per_worker:g}: drop "
                          "--gpus-per-worker to train on CPUs, or set train.device to auto or cuda.")
    if gpus_per_worker == 0 and device == "cuda":
        raise ConfigError("train.device is 'cuda' but the workers ask Ray for no GPU: add --gpus-per-worker 1 "
                          "(Ray then gives each worker its own GPU), or set train.device to auto or cpu.")
    wanted = workers * gpus_per_worker
    if cluster_gpus is not None and wanted > cluster_gpus:
        raise ConfigError(f"{workers} workers × {gpus_per_worker:g} GPU need {wanted:g} GPUs; this Ray cluster has "
                          f"{cluster_gpus:g}. Lower --workers or --gpus-per-worker, or join a cluster with more "
                          "GPUs (--address).")
    return "cuda" if gpus_per_worker > 0 else "cpu"


def fit_workers(
    worker_fn: Callable[[dict], None],
    loop_config: dict,
    *,
    workers: int,
    gpus_per_worker: float,
    name: str,
    storage: str,
    keep_checkpoints: int,
    cpus_per_worker: int = 1,
    max_failures: int = 0,
    callbacks: Sequence = (),
    verbose: bool = False,
):
    """Run `worker_fn(loop_config)` in `workers` Ray Train workers; return Ray's Result.

    Args:
        gpus_per_worker: GPUs per worker; > 0 selects NCCL and CUDA devices.
        name, storage: the Ray Train run's name and storage path (checkpoints land in
            storage/name; a re-launch with both resumes).
        keep_checkpoints: checkpoints Ray keeps.
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        callbacks: Ray Train callbacks (e.g. a TuneReportCallback in a Tune trial).
        verbose: Ray Train's own logs at INFO (its LoggingConfig); default WARNING.

    Ray Train V2 raises when the worker group fails; V1 returns the error in the Result.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    gpus = {"GPU": gpus_per_worker} if gpus_per_worker > 0 else {}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **gpus},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )
    return trainer.fit()


def copy_final_checkpoint(result, run_dir: Path) -> Path | None:
    """Copy Ray's final checkpoint into run_dir/checkpoints (where `debm sample` and the model
    registry look); its path there, or None if the run reported none."""
    if result is None or result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as directory:
        shared, _ = read_checkpoint(directory)  # a complete bundle
        target = Path(run_dir) / "checkpoints" / Path(result.checkpoint.path).name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(directory, target)
    log.info("Final checkpoint (iteration %d) copied to %s", shared["iteration"], target)
    return target


def read_summary(run_dir: Path) -> dict:
    """The summary rank 0 wrote into run_dir (empty if the run ended before writing one)."""
    summary_file = Path(run_dir) / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.is_file() else {}


def train_distributed(
    config: RunConfig,
    *,
    run_dir: Path,
    workers: int,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    storage: str | None = None,
    max_failures: int = 0,
    on_iteration: Sequence[Callable] = (),
    progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Train in `workers` Ray Train workers and return the run's summary.

    Args:
        run_dir: absolute run directory (rank 0 writes metrics, samples and the summary there; the
            final checkpoint is copied into run_dir/checkpoints so that `debm sample` works).
        gpus_per_worker: GPUs per worker; > 0 selects NCCL and CUDA devices.
        address: an existing Ray cluster ("auto", "ray://host:10001"); None starts a local one.
        storage: Ray storage path for checkpoints: an absolute local path or a URI (s3://…, gs://…);
            default run_dir/ray.
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        on_iteration: picklable callables each worker calls after every iteration as
            fn(iteration=, rank=, metrics=) (e.g. to inject a failure); they cross Ray by pickling.
        progress: rank 0's progress bar (Ray's tqdm_ray: drawn once, on the driver).
        verbose: Ray's, Ray Train's and the workers' logs at INFO (`debm -v`); default: warnings only.
    """
    import ray

    if workers < 1:
        raise ConfigError("train_distributed needs at least one worker; use --workers 0 for one process without Ray.")
    run_dir = Path(run_dir).resolve()
    storage = storage or str(run_dir / "ray")
    if "://" not in storage and not Path(storage).is_absolute():
        raise ConfigError(f"--storage '{storage}' must be an absolute path or a URI (s3://…, gs://…): workers change directory.")
    check_gpu_request(config.train.device, workers, gpus_per_worker)
    config = _check_before_workers(config, workers)
    with ray_train_settings(local=address is None):  # Ray Train's switches, for this run only
        started_ray = not ray.is_initialized()
        if started_ray:
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, include_dashboard=True, **ray_logging(verbose),
                     **({} if address else {"num_cpus": max(workers, 1)}))
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # ray.init replaces it with sys.exit: keep the caller's
        local_gpus = None if address else float(ray.cluster_resources().get("GPU", 0))
        try:
            device = check_gpu_request(config.train.device, workers, gpus_per_worker, local_gpus)
        except ConfigError:
            if started_ray:
                ray.shutdown()
            raise
        config = config.replace({"train.device": device})  # what each worker trains on
        cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers) if not address else 1
        try:
            result = fit_workers(
                ray_worker, worker_config(config, run_dir, progress=progress, verbose=verbose, on_iteration=on_iteration),
                workers=workers, gpus_per_worker=gpus_per_worker, name=config.name, storage=storage,
                keep_checkpoints=config.train.keep_checkpoints, cpus_per_worker=cpus, max_failures=max_failures,
                verbose=verbose,
            )
        finally:
            if started_ray:
                ray.shutdown()  # also flushes the workers' logs before the summary is printed
    if result.error is not None:
        raise result.error
    target = copy_final_checkpoint(result, run_dir)
    summary = read_summary(run_dir)
    summary["ray_storage"] = f"{storage.rstrip('/')}/{config.name}"
    if config.tracking.enabled and target is not None:
        from .tracking import finish_summary

        summary = finish_summary(summary, config, target)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_before_workers(config: RunConfig, workers: int) -> RunConfig:
    """Fail before any worker starts on unreachable shards or tracking server; make the shard
    URLs and the tracking URI absolute (workers change directory)."""
    check_model(config)
    if config.data.source == "webdataset":
        from .data.preflight import inspect_shards
        from .data.urls import absolute_urls

        config = config.replace({"data.urls": absolute_urls(config.data.urls)})
        inspect_shards(config.data, workers, config.train.data_batch_size)  # unreachable, empty, too few
    if config.tracking.enabled:
        from .tracking import check_tracking, resolve_tracking_uri

        uri = resolve_tracking_uri(config.tracking)
        check_tracking(uri)
        config = config.replace({"tracking.uri": uri})
    return config
