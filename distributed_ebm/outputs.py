"""Rank 0's outputs of a training run behind one object; every other rank gets one that does nothing.

Rank 0 owns the run directory (config.yaml as the user wrote it, metrics.jsonl, the rows of
iterations a collapse recovery undid in metrics_rolled_back.jsonl, sample grids, curves.png,
summary.json), the MLflow run (tracking.Tracker), the progress bar and the final registration of
the model (tracking.finish_summary). Checkpoints are not outputs: every rank writes its part
through the checkpoint store.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointWriteError
from .config import RunConfig
from .distributed import ProcessContext
from .rundir import RunDirectory
from .tracking import Tracker, finish_summary

log = logging.getLogger(__name__)


class RunOutputs:
    """What rank 0 writes while a run trains: files in the run directory, MLflow, progress."""

    @staticmethod
    def for_rank(ctx: ProcessContext, config: RunConfig, run: RunDirectory, *, progress: bool = True) -> RunOutputs:
        """Rank 0's outputs (creating the run directory and writing config.yaml), or, on every other
        rank, an object with the same methods that does nothing."""
        return RunOutputs(config, run, progress=progress) if ctx.is_main else NoOutputs(config, run)

    def __init__(self, config: RunConfig, run: RunDirectory, *, progress: bool = True):
        self.config, self.run, self.progress = config, run, progress
        self.tracker: Tracker | None = None
        self.bar: Progress | None = None
        run.create()
        run.write_config(config.to_dict())

    def resumed(self, checkpoint: Path, iteration: int) -> None:
        """Drop the metrics logged after the checkpoint the run resumes from (they are replayed)."""
        self.run.truncate_metrics(iteration)
        log.warning("Resumed from %s at iteration %d", checkpoint, iteration)

    def rolled_back(self, record: dict, max_recoveries: int) -> None:
        """A collapse recovery (recovery.py's record): move the metrics rows of the iterations it
        undid to metrics_rolled_back.jsonl (each with `undone_by_recovery`: its number), say so on the
        console and in MLflow (tags debm.recoveries, debm.recovery.N), rewind the progress bar."""
        moved = self.run.set_aside_metrics(record["rolled_back_to"], undone_by_recovery=record["recovery"])
        log.warning(
            "Collapse (%s) at iteration %d: recovery %d of %d returns to %s (iteration %d; %d metrics rows "
            "moved to %s) with δ %.4g → %.4g and λ %.4g → %.4g", record["reason"], record["iteration"],
            record["recovery"], max_recoveries, record["checkpoint"], record["rolled_back_to"], moved,
            self.run.rolled_back_file.name, record["step_size_before"], record["step_size"],
            record["lr_before"], record["lr"])
        if self.tracker is not None:
            self.tracker.log_recovery(record)
        self.bar.rewind(record["rolled_back_to"])

    @contextlib.contextmanager
    def closed_on_interrupt(self):
        """Around the training loop: on Ctrl-C (or SIGTERM turned into one by `debm train`) close
        the progress bar and end the MLflow run as KILLED (tag debm.status: interrupted), then let
        the interrupt go on; the last periodic checkpoint is where a resume continues."""
        try:
            yield
        except KeyboardInterrupt:
            self.interrupted()
            raise
        except CheckpointWriteError:  # e.g. a full disk: the MLflow run ends FAILED
            self.interrupted("checkpoint_write_failed")
            raise

    def interrupted(self, status: str = "interrupted") -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.interrupted(status)

    def start(self, info: dict, iteration: int) -> None:
        """Open the MLflow run (or continue a resumed run's) and the progress bar at `iteration`."""
        log.info("Training %s", info)
        if self.config.tracking.enabled:
            self.tracker = Tracker(self.config, self.run.path, info)
        self.bar = Progress(f"{info['algorithm']} on {info['data']}", self.config.train.iterations, iteration,
                            enabled=self.progress, images_per_iteration=self.config.train.data_batch_size * info["world_size"])

    def record(self, metrics: dict, samples: torch.Tensor, reference: torch.Tensor) -> None:
        """One iteration's metrics (every train.log_every, the last iteration's, and always the
        row that shows a divergence), sample grid (every train.sample_every) and progress."""
        iteration, train = metrics["iteration"], self.config.train
        if metrics["collapse_reason"] == "nonfinite":
            self.run.append_metrics(metrics)
            return
        if iteration % train.log_every == 0 or iteration == train.iterations:
            self.run.append_metrics(metrics)
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, step=metrics["images_seen"])
        if iteration % train.sample_every == 0:
            self.run.save_samples(samples, f"iter-{iteration:06d}", reference=reference)
        self.bar.advance(metrics)

    def recent_mean(self, key: str, last: int = 10) -> float | None:
        """The mean of `key` over the last `last` logged rows (None if none has it)."""
        values = [r[key] for r in self.run.read_metrics()[-last:] if key in r]
        return sum(values) / len(values) if values else None

    def finish(self, summary: dict, samples: torch.Tensor | None, reference: torch.Tensor | None,
               checkpoint: Path | None) -> dict:
        """Close the run's outputs and return the summary with its MLflow ids and, when the run
        registers its model, the model URI.

        Writes the final sample grid (`samples`, None if no iteration ran here), the curves and
        summary.json; registers `checkpoint` (None: the caller registers, as the Ray driver does)
        and closes the MLflow run.
        """
        self.bar.close()
        if self.tracker is not None:
            summary.update(mlflow_run_id=self.tracker.run_id, mlflow_uri=self.tracker.uri,
                           mlflow_experiment_id=self.tracker.experiment_id)
        if samples is not None:
            self.run.save_samples(samples, "final", reference=reference)
        self.run.plot_curves()
        if self.tracker is not None:
            summary = finish_summary(summary, self.config, checkpoint)
        self.run.write_summary(summary)
        if self.tracker is not None:
            self.tracker.finish(self.run.path, summary["status"])
        return summary


class Progress:
    """The run's progress bar: iteration, images/s, R and the energy gap.

    In one process a tqdm bar; in a Ray worker Ray's own `ray.experimental.tqdm_ray` bar, which
    the worker sends to the driver (at most once a second) and the driver draws once, instead of
    Ray re-printing every refresh of a worker's bar as a log line."""

    def __init__(self, desc: str, total: int, initial: int, *, enabled: bool, images_per_iteration: int):
        self.desc, self.images_per_iteration, self.ray = desc, images_per_iteration, _in_ray_worker()
        if not enabled:
            self.bar = None
        elif self.ray:
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            self.bar = ray_tqdm(desc=desc, total=total, unit="it")
            self.bar.n = initial
        else:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def advance(self, metrics: dict) -> None:
        """One iteration done; show its figures."""
        if self.bar is None:
            return
        figures = {"img/s": f"{self.images_per_iteration / max(metrics['seconds'], 1e-9):.0f}",
                   "R": f"{metrics['response_distance']:.3g}", "gap": f"{metrics['energy_gap_z']:.2g}"}
        if self.ray:  # tqdm_ray has no postfix: the figures go into the description
            self.bar.set_description(f"{self.desc} " + " ".join(f"{k}={v}" for k, v in figures.items()))
        else:
            self.bar.set_postfix(figures, refresh=False)
        self.bar.update(1)

    def rewind(self, iteration: int) -> None:
        """Back to `iteration` (a collapse recovery)."""
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a Ray Train worker), whose output Ray forwards to the driver."""
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    try:  # what ray.experimental.tqdm_ray itself checks
        return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except AttributeError:  # another Ray version: a plain bar, which Ray forwards line by line
        return False


class NoOutputs(RunOutputs):
    """The outputs of a rank other than 0: nothing."""

    def __init__(self, config: RunConfig, run: RunDirectory):
        self.config, self.run, self.progress, self.tracker, self.bar = config, run, False, None, None

    def resumed(self, checkpoint: Path, iteration: int) -> None:
        pass

    def interrupted(self, status: str = "interrupted") -> None:
        pass

    def rolled_back(self, record: dict, max_recoveries: int) -> None:
        pass

    def start(self, info: dict, iteration: int) -> None:
        pass

    def record(self, metrics: dict, samples: torch.Tensor, reference: torch.Tensor) -> None:
        pass

    def recent_mean(self, key: str, last: int = 10) -> float | None:
        return None

    def finish(self, summary: dict, samples: torch.Tensor | None, reference: torch.Tensor | None,
               checkpoint: Path | None) -> dict:
        return summary
