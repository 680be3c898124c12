"""The per-process training run: the same `train` runs in one process and in each Ray Train worker.

Read it top to bottom: set up (rank, outputs, data, training state), resume if asked, then for
each iteration: a data batch → the algorithm's train_step (Langevin on this rank's chains,
losses, all-reduced gradients, optimiser step) → metrics → collapse check → outputs, checkpoint,
callbacks. Progress is counted in images seen. Rank 0's files and MLflow live behind
`outputs.RunOutputs`; the state that a checkpoint holds lives in `state.RunState`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .checkpoint import CheckpointStore, LocalCheckpointStore
from .config import RunConfig
from .data import training_data
from .distributed import all_reduce_mean, current_context
from .metrics import ResponseDistance
from .outputs import RunOutputs
from .rundir import RunDirectory
from .state import RunState

IterationCallback = Callable[..., None]  # fn(iteration=, rank=, metrics=), after every iteration
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
            fn(iteration=, rank=, metrics=), e.g. a Tune reporter.
        resume: continue from the store's latest checkpoint, if it has one.
        progress: show a progress bar on rank 0.

    Raises TrainingDiverged (after writing the summary) when a score, the loss or a chain became NaN/Inf.
    """
    ctx = current_context(config.train.device)
    run = RunDirectory(run_dir)
    outputs = RunOutputs.for_rank(ctx, config, run, progress=progress)
    store = store or LocalCheckpointStore(run.checkpoints, config.train.keep_checkpoints)
    callbacks = [on_iteration] if callable(on_iteration) else list(on_iteration or ())

    # This rank's share of the data (or of the shards); the data mean is the whole data set's.
    data, data_mean = training_data(config, ctx.rank, ctx.world_size, ctx.device)
    state = RunState.build(config, ctx, data, data_mean)
    response = ResponseDistance(
        data.sample_shape, seed=config.train.response_bank_seed, weights=config.model.filter_bank
    ).to(ctx.device)
    latest = store.latest() if resume else None
    if latest is not None:
        state.load(latest, ctx)
        outputs.resumed(latest, state.iteration)
    info = {
        "algorithm": state.algorithm.name,
        "energy": type(state.train.energy).__name__,
        "filter_bank": getattr(getattr(state.train.energy, "bank", None), "kind", None),
        "response_bank": response.kind,
        "data": data.name,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
    }
    outputs.start(info, state.iteration)

    started, status, metrics, samples = time.perf_counter(), "completed", {}, None
    while state.iteration < config.train.iterations:
        tick = time.perf_counter()
        y, labels = data.batch(config.train.data_batch_size, state.generators["data"])
        y, labels = y.to(ctx.device), None if labels is None else labels.to(ctx.device)
        out = state.algorithm.train_step(state.train, y, labels, generator=state.generators["chains"],
                                         iteration=state.iteration)
        out.metrics["response_distance"] = float(response(out.samples, y))
        out.metrics.update(data.counters())
        metrics, samples = all_reduce_mean(out.metrics, ctx.device, sum_keys=SUMMED), out.samples
        state.iteration += 1
        state.images_seen += config.train.data_batch_size * ctx.world_size
        metrics.update(state.collapse.update(state.iteration, metrics))
        metrics.update(iteration=state.iteration, images_seen=state.images_seen, seconds=time.perf_counter() - tick)

        outputs.record(metrics, samples, y)
        if metrics["collapse_reason"] == "nonfinite":
            status = "diverged"
            break
        if state.iteration % config.train.checkpoint_every == 0 or state.iteration == config.train.iterations:
            store.save(state.iteration, lambda directory: state.save(directory, ctx), metrics, ctx.is_main)
        for callback in callbacks:
            callback(iteration=state.iteration, rank=ctx.rank, metrics=metrics)
        if metrics["collapse"] and config.collapse.stop_on_collapse:
            status = "collapsed"
            break

    summary = {
        "status": status,
        "iterations": state.iteration,
        "images_seen": state.images_seen,
        "wall_time_s": time.perf_counter() - started,
        "collapsed": state.collapse.first is not None,
        "collapse": state.collapse.first,
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "final_response_distance": outputs.recent_mean("response_distance"),
        **info,
    }
    summary = outputs.finish(summary, samples, data.reference, store.final_checkpoint())
    if status == "diverged":
        raise TrainingDiverged.at(state.iteration, store.latest())
    return summary

