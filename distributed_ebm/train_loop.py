"""The per-process training run: the same `train` runs in one process and in each Ray Train worker.

Read it top to bottom: set up (rank, outputs, data, training state), resume if asked, then for
each iteration: a data batch → the algorithm's train_step (Langevin on this rank's chains,
losses, all-reduced gradients, optimiser step) → its metrics, kept on the device. At a flush
point (every train.log_every iterations, each checkpoint, sample grid and the last iteration) the
window of metrics is all-reduced and read back in one host sync, then settled row by row:
collapse check (and, when it fires and recoveries are left, a rollback to the last healthy
state: recovery.py) → outputs, checkpoint, callbacks; until train.iterations, a collapse that
stops the run, or train.time_budget_s (checked at flush points). Progress is counted in images seen. Rank 0's files and MLflow live behind
`outputs.RunOutputs`; the state that a checkpoint holds lives in `state.RunState`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .algorithms import check_model
from .checkpoint import CheckpointStore, LocalCheckpointStore, checkpoint_name
from .config import RunConfig
from .data import training_data
from .distributed import MetricWindow, all_reduce_sum, current_context, to_device
from .langevin import resolve_autocast
from .metrics import ResponseDistance
from .outputs import RunOutputs
from .recovery import INITIAL, Recovery, collapse_message
from .rundir import RunDirectory
from .state import RunState

IterationCallback = Callable[..., None]  # fn(iteration=, rank=, metrics=), after every iteration kept
SUMMED = ("data_corrupt", "data_bad_shards")  # metrics summed over ranks (the others are averaged)


class TrainingDiverged(RuntimeError):
    """Training produced NaN or Inf; the last good checkpoint is kept."""

    @classmethod
    def at(cls, iteration: int, checkpoint: Path | None) -> TrainingDiverged:
        return cls(
            f"Training diverged at iteration {iteration}: a score, the loss or a chain became NaN/Inf. "
            f"The last good checkpoint is {checkpoint or 'none (no checkpoint was written yet)'}. Lower optim.lr or "
            "langevin.step_size (δ²/(2σ²) must stay well below 1), keep langevin.clamp on, or set "
            "optim.grad_clip; then rerun, or resume from the checkpoint with --resume."
        )


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    store: CheckpointStore | None = None,
    on_iteration: IterationCallback | Sequence[IterationCallback] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train one run in this process (one rank of the group under Ray) and return its summary.

    Args:
        config: the run's configuration.
        run_dir: the run directory; rank 0 writes config, metrics, samples and the summary there.
        store: where checkpoints go (default: a LocalCheckpointStore in run_dir/checkpoints;
            trainer.RayCheckpointStore in Ray Train workers).
        on_iteration: a callable (or several) called on every rank after every iteration as
            fn(iteration=, rank=, metrics=), e.g. a Tune reporter; not after an iteration whose
            collapse made the run roll back (collapse.max_recoveries).
        resume: continue from the store's latest checkpoint, if it has one.
        progress: show a progress bar on rank 0.

    The summary's status is "completed", "collapsed" (the collapse detector fired and the run did
    not recover: it stopped, or trained on with collapse.stop_on_collapse off) or "diverged"; see
    `_outcome` for what else says how the run ended.

    Raises TrainingDiverged (after writing the summary) when a score, the loss or a chain became
    NaN/Inf and no recovery was left.
    """
    check_model(config)  # before any file is written or data are read (or clusters fitted on them)
    ctx = current_context(config.train.device)
    run = RunDirectory(run_dir)
    outputs = RunOutputs.for_rank(ctx, config, run, progress=progress)
    store = store or LocalCheckpointStore(run.checkpoints, config.train.keep_checkpoints)
    callbacks = [on_iteration] if callable(on_iteration) else list(on_iteration or ())

    # This rank's share of the data (or of the shards); the data mean and fit images are the whole data set's.
    data, data_mean, fit_images = training_data(config, ctx.rank, ctx.world_size, ctx.device)
    state = RunState.build(config, ctx, data, data_mean, fit_images)
    response = ResponseDistance(
        data.sample_shape, seed=config.train.response_bank_seed, weights=config.model.filter_bank
    ).to(ctx.device)
    recovery = Recovery(config, ctx)  # the last healthy state, to return to on collapse
    latest = store.latest() if resume else None
    if latest is not None:
        state.load(latest, ctx)
        outputs.resumed(latest, state.iteration)
    recovery.remember(state, INITIAL if latest is None else latest.name)
    info = _describe(state, data, response, ctx)
    outputs.start(info, state.iteration)

    def save_checkpoint(metrics: dict) -> None:  # named after the iteration and the recoveries so far
        name = checkpoint_name(state.iteration, len(state.recoveries))
        store.save(name, lambda directory: state.save(directory, ctx), metrics, ctx.is_main)
        recovery.remember(state, name)

    budget, iterations = config.train.time_budget_s, config.train.iterations
    started, stopped_by, metrics, samples = time.perf_counter(), "iterations", {}, None
    window, tick = MetricWindow(ctx.device, sum_keys=SUMMED), started  # metrics stay on the device until a flush

    def settle(rows: list[dict], out_of_time: bool, seconds: float) -> str | None:
        """The flushed rows, in order: collapse check, outputs, checkpoint, callbacks. Returns why
        the run stops, "rollback" after a collapse recovery (the rows after it are dropped), or None."""
        nonlocal metrics
        for metrics in rows:
            metrics.update(state.collapse.update(metrics["iteration"], metrics), seconds=seconds)
            outputs.record(metrics, samples, y)
            if metrics["collapse"] and recovery.possible(state):
                outputs.rolled_back(recovery.roll_back(state, metrics), config.collapse.max_recoveries)
                save_checkpoint({"iteration": state.iteration, "recovery": len(state.recoveries)})
                return "rollback"
            if metrics["collapse_reason"] == "nonfinite":
                return "divergence"
            last = metrics["iteration"] == state.iteration  # flush points include every checkpoint's iteration
            if metrics["iteration"] % config.train.checkpoint_every == 0 or metrics["iteration"] == iterations or (
                    out_of_time and last):
                save_checkpoint(metrics)
            for callback in callbacks:
                callback(iteration=metrics["iteration"], rank=ctx.rank, metrics=metrics)
            if metrics["collapse"] and (config.collapse.stop_on_collapse or recovery.enabled):
                return "collapse"  # with recovery on: none left, or no healthy state to return to
        return "time_budget" if out_of_time else None

    with outputs.closed_on_interrupt():  # Ctrl-C / SIGTERM: the MLflow run ends KILLED
        while state.iteration < iterations:
            y, labels = data.batch(config.train.data_batch_size, state.generators["data"])
            y, labels = to_device(y, ctx.device), None if labels is None else to_device(labels, ctx.device)
            out = state.algorithm.train_step(state.train, y, labels, generator=state.generators["chains"],
                                             iteration=state.iteration)
            out.metrics["response_distance"] = response(out.samples, y, sum_over_group=all_reduce_sum)
            state.iteration += 1
            state.images_seen += config.train.data_batch_size * ctx.world_size
            window.add({**out.metrics, **data.counters(), **state.knobs(),  # δ, λ in use
                        "recovery": len(state.recoveries), "iteration": state.iteration, "images_seen": state.images_seen})
            samples = out.samples
            if not _flush_due(config, state.iteration):
                continue
            # One host read for the window; rank 0's clock decides for every rank, so all stop together.
            rows, out_of_time = window.flush(budget is not None and time.perf_counter() - started >= budget)
            outcome = settle(rows, out_of_time, seconds=(time.perf_counter() - tick) / len(rows))
            tick = time.perf_counter()
            if outcome not in (None, "rollback"):
                stopped_by = outcome
                if outcome != "time_budget":  # the run ends at the row that stopped it; the rest of its
                    # window ran but is not counted (no checkpoint or metrics row holds it)
                    state.iteration, state.images_seen = int(metrics["iteration"]), int(metrics["images_seen"])
                break

    summary = {**_outcome(config, state, stopped_by, recovery, store), "iterations": state.iteration,
               "images_seen": state.images_seen, "wall_time_s": time.perf_counter() - started,
               "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               "final_response_distance": outputs.recent_mean("response_distance"), **info}
    summary = outputs.finish(summary, samples, data.reference, store.final_checkpoint())
    if summary["status"] == "diverged":
        raise TrainingDiverged(summary["message"])
    return summary


def _flush_due(config: RunConfig, iteration: int) -> bool:
    """Whether the metrics of the iterations so far are read back after `iteration`: every
    train.log_every iterations, and at every checkpoint, sample grid and the last iteration."""
    train = config.train
    return any(iteration % every == 0 for every in (train.log_every, train.checkpoint_every, train.sample_every)) or (
        iteration == train.iterations)


def _describe(state: RunState, data, response: ResponseDistance, ctx) -> dict:
    """What runs where, for the log, MLflow and the summary."""
    return {
        "algorithm": state.algorithm.name,
        "energy": type(state.train.energy).__name__,
        "filter_bank": getattr(getattr(state.train.energy, "bank", None), "kind", None),
        "response_bank": response.kind,
        "data": data.name,
        "device": str(ctx.device),
        "langevin_precision": resolve_autocast(state.train.config.langevin.autocast, ctx.device) or "float32",
        "world_size": ctx.world_size,
    }


def _outcome(config: RunConfig, state: RunState, stopped_by: str, recovery: Recovery, store: CheckpointStore) -> dict:
    """How a run ended, for its summary: status; stopped_by ("iterations", "time_budget",
    "collapse" or "divergence"); the collapse of its last stretch (since its last rollback) and
    the recoveries (recovery.py's records); the δ and λ in use ("effective", the config's times
    the recoveries' factors); and, for a run that did not complete, a message naming what to change."""
    status = ("diverged" if stopped_by == "divergence"
              else "collapsed" if state.collapse.first is not None else "completed")
    knobs = state.knobs()
    outcome = {"status": status, "stopped_by": stopped_by, "collapsed": state.collapse.first is not None,
               "collapse": state.collapse.first, "recoveries": state.recoveries,
               "effective": {"langevin.step_size": knobs["step_size"], "optim.lr": knobs["lr"]}}
    if status == "collapsed":
        outcome["message"] = collapse_message(config, state, stopped=stopped_by == "collapse", recovery=recovery)
    elif status == "diverged":
        outcome["message"] = str(TrainingDiverged.at(state.iteration, store.latest()))
    return outcome
