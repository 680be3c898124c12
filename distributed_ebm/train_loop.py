"""The per-process training loop: the same function runs in one process and in a Ray Train worker.

Read it top to bottom: set up (config, rank, seeds, data, model, chains), resume if asked, then
for each iteration: a data batch → the algorithm's train_step (Langevin on this rank's chains,
losses, all-reduced gradients, optimiser step) → metrics → collapse check → files and
checkpoints. Progress is counted in images seen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .algorithms import TrainState, get_algorithm
from .config import RunConfig
from .data import training_data
from .distributed import (
    ProcessContext,
    all_reduce_gradients,
    all_reduce_mean,
    current_context,
    make_generator,
    stream_seed,
)
from .metrics import CollapseDetector, ResponseDistance
from .rundir import RunDirectory

log = logging.getLogger(__name__)

class TrainingDiverged(RuntimeError):
    """Training produced NaN or Inf; the last good checkpoint is kept."""


@dataclass
class LoopState:
    """Counters and random streams of this process, next to the algorithm's TrainState."""

    iteration: int
    images_seen: int
    generators: dict[str, torch.Generator]


def train_loop(loop_config: dict) -> dict:
    """Train one run and return its summary.

    Args:
        loop_config: a plain dict (it crosses Ray as is) with
            config: the RunConfig as a nested dict;
            run_dir: absolute path of the run directory;
            resume: continue from the latest checkpoint in run_dir/checkpoints (default False);
            progress: show a progress bar on rank 0 (default True);
            store: where checkpoints go, "local" (run_dir/checkpoints) or "ray" (ray.train.report;
                a restarted worker group always resumes from Ray's latest checkpoint);
            callbacks: "module:function" or "/path/file.py:function" specs, each called after
                every iteration as fn(iteration=, rank=, metrics=) (e.g. to inject a failure).
    """
    config = RunConfig.from_dict(loop_config["config"])
    run = RunDirectory(loop_config["run_dir"])
    ctx = current_context(config.train.device)
    if ctx.is_main:
        run.create()
        run.write_config(config.to_dict())

    # Data: this rank's share of the data set (or of the shards), and its own random streams
    # from (seed, rank). The data mean is the whole data set's: the same on every rank.
    data, data_mean = training_data(config, ctx.rank, ctx.world_size, ctx.device)
    # Data batches are drawn on the CPU, chain noise on the training device.
    generators = {
        "data": make_generator(config.train.seed, ctx.rank, "data", torch.device("cpu")),
        "chains": make_generator(config.train.seed, ctx.rank, "chains", ctx.device),
    }

    # Model, optimiser and this rank's chain shard (ids rank·bank_size …).
    algorithm = get_algorithm(config.model.algorithm)
    state = algorithm.build(
        config,
        data.sample_shape,
        device=ctx.device,
        generator=generators["chains"],
        data_mean=data_mean,
        num_classes=data.num_classes,
        rank=ctx.rank,
    )
    state.sync_gradients = all_reduce_gradients
    response = ResponseDistance(
        data.sample_shape, seed=config.train.response_bank_seed, weights=config.model.filter_bank
    ).to(ctx.device)
    collapse = CollapseDetector(config.collapse)
    loop = LoopState(iteration=0, images_seen=0, generators=generators)
    store = make_store(loop_config.get("store", "local"), run, config)
    callbacks = [load_callback(spec) for spec in loop_config.get("callbacks", [])]

    if loop_config.get("resume") or loop_config.get("store") == "ray":
        latest = store.latest()
        if latest is not None:
            _restore(latest, state, loop, collapse, ctx, config, data)
            if ctx.is_main:
                run.truncate_metrics(loop.iteration)
                log.warning("Resumed from %s at iteration %d", latest, loop.iteration)

    info = {
        "algorithm": algorithm.name,
        "energy": type(state.energy).__name__,
        "filter_bank": getattr(getattr(state.energy, "bank", None), "kind", None),
        "response_bank": response.kind,
        "data": data.name,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
    }
    tracker = None
    if ctx.is_main:
        log.info("Training %s", info)
        if config.tracking.enabled:
            from .tracking import Tracker

            tracker = Tracker(config, run.path, info)
    total = config.train.iterations
    bar = tqdm(
        total=total,
        initial=loop.iteration,
        desc=f"{algorithm.name} on {data.name}",
        disable=not (ctx.is_main and loop_config.get("progress", True)),
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    status, metrics = "completed", {}
    while loop.iteration < total:
        tick = time.perf_counter()
        y, labels = data.batch(config.train.data_batch_size, loop.generators["data"])
        y = y.to(ctx.device)
        labels = None if labels is None else labels.to(ctx.device)
        out = algorithm.train_step(state, y, labels, generator=loop.generators["chains"], iteration=loop.iteration)
        out.metrics["response_distance"] = float(response(out.samples, y))
        out.metrics.update(data.counters())
        metrics = all_reduce_mean(out.metrics, ctx.device, sum_keys=("data_corrupt", "data_bad_shards"))
        loop.iteration += 1
        loop.images_seen += config.train.data_batch_size * ctx.world_size
        metrics.update(collapse.update(loop.iteration, metrics))
        metrics.update(iteration=loop.iteration, images_seen=loop.images_seen, seconds=time.perf_counter() - tick)

        if metrics["collapse_reason"] == "nonfinite":
            status = "diverged"
            if ctx.is_main:
                run.append_metrics(metrics)
            break
        if ctx.is_main and loop.iteration % config.train.log_every == 0:
            run.append_metrics(metrics)
            if tracker is not None:
                tracker.log_metrics(metrics, step=loop.images_seen)
        if ctx.is_main and loop.iteration % config.train.sample_every == 0:
            run.save_samples(out.samples, f"iter-{loop.iteration:06d}", reference=y)
        if loop.iteration % config.train.checkpoint_every == 0 or loop.iteration == total:
            store.save(loop.iteration, lambda d: _write(d, state, loop, collapse, ctx, config, data), metrics, ctx.is_main)
        elif loop.iteration % config.train.log_every == 0:
            store.report(metrics)
        for callback in callbacks:
            callback(iteration=loop.iteration, rank=ctx.rank, metrics=metrics)
        bar.update(1)
        bar.set_postfix(R=f"{metrics['response_distance']:.3g}", phi_gap=f"{metrics['energy_gap_z']:.2g}")
        if metrics["collapse"] and config.collapse.stop_on_collapse:
            status = "collapsed"
            break
    bar.close()

    summary = {
        "status": status,
        "iterations": loop.iteration,
        "images_seen": loop.images_seen,
        "wall_time_s": time.perf_counter() - started,
        "collapsed": collapse.first is not None,
        "collapse": collapse.first,
        "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "final_response_distance": _recent_mean(run, "response_distance") if ctx.is_main else None,
        **info,
    }
    if tracker is not None:
        summary.update(mlflow_run_id=tracker.run_id, mlflow_uri=tracker.uri,
                       mlflow_experiment_id=tracker.experiment_id)
    if ctx.is_main:
        if metrics:
            run.save_samples(out.samples, "final", reference=data.reference)
        run.plot_curves()
        run.write_summary(summary)
        if tracker is not None:
            tracker.finish(run.path, status)
        if loop_config.get("store", "local") == "local" and config.tracking.enabled:
            from .tracking import finish_summary

            summary = finish_summary(summary, config, store.latest())
            run.write_summary(summary)
    if status == "diverged":
        last = store.latest()
        raise TrainingDiverged(
            f"Training diverged at iteration {loop.iteration}: a score, the loss or a chain became NaN/Inf. "
            f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}. Lower optim.lr or "
            "langevin.step_size (δ²/(2σ²) must stay well below 1), keep langevin.clamp on, or set "
            "optim.grad_clip; then rerun, or resume from the checkpoint with --resume."
        )
    return summary


def _recent_mean(run: RunDirectory, key: str, last: int = 10) -> float | None:
    values = [r[key] for r in run.read_metrics()[-last:] if key in r]
    return sum(values) / len(values) if values else None


def make_store(kind: str, run: RunDirectory, config: RunConfig):
    """The checkpoint store named `kind`: "local" (run_dir/checkpoints) or "ray" (Ray Train)."""
    if kind == "local":
        return ckpt.LocalCheckpointStore(run.checkpoints, config.train.keep_checkpoints)
    if kind == "ray":
        from .trainer import RayCheckpointStore

        return RayCheckpointStore()
    raise ValueError(f"Unknown checkpoint store '{kind}': use 'local' or 'ray'.")


def load_callback(spec: str):
    """Import `module:function` or `/path/to/file.py:function`."""
    import importlib
    import importlib.util

    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def _write(
    directory: Path, state: TrainState, loop: LoopState, collapse: CollapseDetector, ctx: ProcessContext,
    config: RunConfig, data,
) -> None:
    """Write this rank's part of the checkpoint into `directory` (rank 0 adds the shared part)."""
    ckpt.write_rank(
        directory,
        ctx.rank,
        {
            "banks": state.bank_state(),
            "generators": {k: g.get_state() for k, g in loop.generators.items()},
            "data": data.state_dict(),  # a stream's read positions (None for in-memory data)
            "rank": ctx.rank,
        },
    )
    if ctx.is_main:
        ckpt.write_shared(
            directory,
            {
                **state.model_state(),
                "config": config.to_dict(),
                "iteration": loop.iteration,
                "images_seen": loop.images_seen,
                "collapse": collapse.state_dict(),
                "world_size": ctx.world_size,
            },
        )


def _restore(
    directory: Path, state: TrainState, loop: LoopState, collapse: CollapseDetector, ctx: ProcessContext,
    config: RunConfig, data,
) -> None:
    """Load a checkpoint into this process: models, optimisers, its chain shard, its generators."""
    shared, rank_states = ckpt.read_checkpoint(directory)
    state.load_model_state(shared)
    state.load_bank_state(ckpt.bank_shard(rank_states, ctx.rank, ctx.world_size))
    collapse.load_state_dict(shared["collapse"])
    loop.iteration, loop.images_seen = shared["iteration"], shared["images_seen"]
    same_ranks = len(rank_states) == ctx.world_size
    data.load_state_dict([r.get("data") for r in rank_states], ctx.rank)
    if same_ranks:
        for key, gen in loop.generators.items():
            gen.set_state(rank_states[ctx.rank]["generators"][key])
    else:
        # A new world size means new streams: derive them from (seed, rank, resume iteration).
        for key, gen in loop.generators.items():
            gen.manual_seed(stream_seed(config.train.seed + loop.iteration, ctx.rank, key))
    if not all(bool(torch.isfinite(p).all()) for model in state.models.values() for p in model.parameters()):
        raise ValueError(f"Checkpoint '{directory}' holds non-finite weights; resume from an earlier one.")
