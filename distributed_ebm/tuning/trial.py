"""One Tune trial: its run config, training (in the trial's process or in Ray Train workers),
its reports to Tune, and the restore of a Tune checkpoint (PBT's exploit, a restarted trial).

Every trial is one training run in `OUT/trials/TRIAL_ID`: `train` in the trial's own process
(`workers_per_trial` 0), or Ray Train with W workers driven from the trial (trainer.fit_workers),
whose reports reach Tune through Ray's `TuneReportCallback`. A trial reports every
`report_every` iterations (a report costs ~1.7 s here) and once at its end. A trial that
collapses (metrics/collapse.py) stops itself (`collapse.stop_on_collapse`) and is marked
collapsed; it reports a stand-in worst value so that no searcher or scheduler prefers it. A trial
whose config allows recoveries (`collapse.max_recoveries` > 0) rolls back and goes on instead,
like any run (recovery.py): the iteration that collapsed is not reported, and only a collapse
with no recovery left stops and marks it.
"""

from __future__ import annotations

import math
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import SHARED_FILE, checkpoint_name
from ..config import RunConfig
from ..train_loop import TrainingDiverged, train
from ..trainer import (
    check_gpu_request,
    copy_final_checkpoint,
    fit_workers,
    ray_worker,
    read_summary,
    worker_config,
)
from .quality import FRESH_FID, FreshFID
from .space import SMOOTHED_R, SMOOTHING

# What a collapsed trial reports (negated when maximising): finite, because ASHA interpolates
# percentiles of the reported values and ∞ − ∞ would make its cut-off NaN.
WORST = 1e300


@dataclass
class TrialReporter:
    """Sends a trial's metrics to Tune every `every` iterations: the trial's `on_iteration` callback.

    Not at the trial's last iteration (completion or a collapse stop): the trial reports its end
    once, with its status, after training returns.
    """

    every: int  # iterations between reports (each costs ~1.7 s here)
    total: int  # the trial's train.iterations
    stop_on_collapse: bool
    send_to: str  # "tune" (`train` in the trial's process) or "train" (Ray Train workers)
    checkpoints: str | None = None  # attach RUN_DIR/checkpoints/iter-N to each report (PBT)
    worst: float = float("inf")  # what a collapsed trial reports as the search metric
    metric: str = SMOOTHED_R
    fresh_fid: FreshFID | None = None  # metric fresh_fid: score the newest checkpoint of `run_dir`
    run_dir: str | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=SMOOTHING))
    collapsed: bool = False

    def __call__(self, iteration: int, rank: int, metrics: dict) -> None:
        self.recent.append(metrics["response_distance"])
        self.collapsed = self.collapsed or bool(metrics["collapse"])
        last = iteration >= self.total or (metrics["collapse"] and self.stop_on_collapse)
        if last or iteration % self.every:
            return
        result = {**_numeric(metrics), SMOOTHED_R: sum(self.recent) / len(self.recent)}
        if self.fresh_fid is not None and not self.collapsed:  # rank 0 scores; Tune takes rank 0's report
            result.update(self.fresh_fid.score(self.run_dir) if rank == 0 else {FRESH_FID: math.nan})
        if self.collapsed:  # from the first collapse on (stop_on_collapse: false keeps it running)
            result[self.metric] = self.worst
        if self.send_to == "train":
            import ray.train

            ray.train.report(result)  # every rank: TuneReportCallback forwards rank 0's
            return
        import ray.tune

        checkpoint = None
        if self.checkpoints:
            directory = Path(self.checkpoints) / checkpoint_name(iteration, int(metrics.get("recovery", 0)))
            checkpoint = ray.tune.Checkpoint.from_directory(str(directory))
        ray.tune.report(result, checkpoint=checkpoint)


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search shares; it crosses Ray with the trainable."""

    base: dict  # the base RunConfig as a nested dict (tracking already set for the search)
    trials_dir: str  # absolute; trial T trains in trials_dir/T
    metric: str
    mode: str
    report_every: int
    stop_on_collapse: bool
    checkpoints: bool  # reports carry checkpoints (PBT)
    workers: int  # Ray Train workers per trial; 0: `train` in the trial's process
    gpus_per_worker: float
    storage: str  # Ray storage of the Ray Train trials' checkpoints
    fresh_fid: FreshFID | None = None  # metric fresh_fid: how trials score their fresh samples


def trial_config(setup: TrialSetup, params: dict, trial_id: str) -> RunConfig:
    """The run config of one trial: the base with the trial's sampled values."""
    base = RunConfig.from_dict(setup.base)
    return base.replace({**params, "name": f"{base.name}-{trial_id}",
                         "collapse.stop_on_collapse": setup.stop_on_collapse})


def run_trial(params: dict, setup: TrialSetup) -> None:
    """One trial, as a Tune function trainable: train, report every K iterations, report the end."""
    import ray.tune
    import torch

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(setup, params, trial_id)
    run_dir = Path(setup.trials_dir) / trial_id
    resume = restore_tune_checkpoint(ray.tune.get_checkpoint(), run_dir, config)
    torch.set_num_threads(1)
    reporter = TrialReporter(setup.report_every, config.train.iterations, setup.stop_on_collapse,
                             "tune" if setup.workers == 0 else "train",
                             str(run_dir / "checkpoints") if setup.checkpoints else None,
                             worst=WORST if setup.mode == "min" else -WORST, metric=setup.metric,
                             fresh_fid=setup.fresh_fid, run_dir=str(run_dir))
    if setup.workers == 0:  # the trial's own process, on the GPU Tune gave it or on the CPU
        config = config.replace({"train.device": check_gpu_request(config.train.device, 1, setup.gpus_per_worker)})
        summary = _train_here(config, run_dir, reporter, resume)
    else:
        summary = _train_with_ray_train(config, run_dir, reporter, setup)
    scored = None
    if setup.fresh_fid is not None and summary["status"] == "completed":
        scored = setup.fresh_fid.score(run_dir)  # the final checkpoint
    ray.tune.report(final_result(summary, setup.metric, setup.mode, scored))


def _train_here(config: RunConfig, run_dir: Path, reporter: TrialReporter, resume: bool) -> dict:
    """`train` in this process; a NaN/Inf divergence ends the trial as collapsed."""
    try:
        return train(config, run_dir, on_iteration=reporter, resume=resume, progress=False)
    except TrainingDiverged:
        return read_summary(run_dir)


def _forward_search_reports(metric: str):
    """Ray's TuneReportCallback, passing on only the reports that carry the search metric (the
    trial reporter's): the checkpoint reports of `train` do not, and Tune rejects such results."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardSearchReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, None)

    return ForwardSearchReports()


def _train_with_ray_train(config: RunConfig, run_dir: Path, reporter: TrialReporter,
                          setup: TrialSetup) -> dict:
    """Ray Train with `setup.workers` workers driven from this trial (Train V2 inside Tune); each
    worker calls its copy of the trial's reporter."""
    device = check_gpu_request(config.train.device, setup.workers, setup.gpus_per_worker)
    config = config.replace({"train.device": device})  # workers without GPUs train on the CPU
    loop_config = worker_config(config, run_dir, progress=False, on_iteration=[reporter])
    try:
        result = fit_workers(ray_worker, loop_config, workers=setup.workers,
                             gpus_per_worker=setup.gpus_per_worker, name=config.name,
                             storage=setup.storage, keep_checkpoints=config.train.keep_checkpoints,
                             callbacks=[_forward_search_reports(setup.metric)])
        error = result.error
    except Exception as err:  # Train V2 raises when the worker group fails
        result, error = None, err
    summary = read_summary(run_dir)
    if error is not None and summary.get("status") != "diverged":
        raise error
    copy_final_checkpoint(result, run_dir)  # champions are registered from RUN_DIR/checkpoints
    return summary


def final_result(summary: dict, metric: str, mode: str, scored: dict | None = None) -> dict:
    """A trial's last report: its final metrics, status and the search metric (`scored`: the
    fresh-sample FID of its final checkpoint, metric fresh_fid). A collapsed trial reports WORST
    (the measured value under `measured`) so no searcher or scheduler prefers it."""
    stopped = summary["status"] in ("collapsed", "diverged") or bool(summary.get("collapsed"))
    collapse = summary.get("collapse") or {}
    final = {**summary["final"], **(scored or {})}
    measured = (summary.get("final_response_distance") if metric == SMOOTHED_R
                else final.get(metric))
    measured = math.nan if measured is None else float(measured)
    worst = WORST if mode == "min" else -WORST
    return {**_numeric(final), "iteration": summary["iterations"],
            "images_seen": summary["images_seen"], metric: worst if stopped else measured,
            "measured": measured, "trial_status": "collapsed" if stopped else "completed",
            "collapse_reason": collapse.get("reason", ""),
            "collapse_iteration": collapse.get("iteration", 0)}


def restore_tune_checkpoint(checkpoint, run_dir: Path, config: RunConfig) -> bool:
    """Put a Tune checkpoint (PBT's exploit, or a restarted trial) into RUN_DIR/checkpoints as the
    only one, with this trial's optimiser settings; True when there was one to resume from."""
    if checkpoint is None:
        return False
    import torch

    root = run_dir / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    with checkpoint.as_directory() as directory:
        shared = torch.load(Path(directory) / SHARED_FILE, map_location="cpu", weights_only=False)
        target = root / checkpoint_name(shared["iteration"])
        shutil.copytree(directory, target)
    apply_optimiser_settings(shared, config)
    torch.save(shared, target / SHARED_FILE)
    return True


def apply_optimiser_settings(shared: dict, config: RunConfig) -> None:
    """Set the learning rates (and Adam's betas, weight decay) stored in a checkpoint's optimiser
    states to `config`'s: PBT continues a donor's weights and moments with new hyperparameters,
    and torch's load_state_dict would otherwise bring back the donor's."""
    optim = config.optim
    adam = {"betas": optim.betas} if optim.optimizer == "adam" else {}
    settings = {"energy": {"lr": optim.lr, "weight_decay": optim.weight_decay, **adam},
                "generator": {"lr": config.generator.lr, "betas": config.generator.betas}}
    for name, state in shared["optimizers"].items():
        for group in state["param_groups"]:
            group.update({k: v for k, v in settings.get(name, {}).items() if k in group})
