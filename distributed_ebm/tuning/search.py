"""`debm tune`'s search: Ray Tune over a space's trials, the outcome table and the champion.

With MLflow on, the search is a parent run with one nested run per trial (tracking.SearchRun);
the best completed trial's model is registered and takes the `champion` alias only if it beats
the current champion.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import latest_checkpoint
from ..config import ConfigError, RunConfig
from ..rundir import RunDirectory
from ..tracking import (
    SearchRun,
    check_tracking,
    promote_if_better,
    register_model,
    resolve_tracking_uri,
)
from .space import SCHEDULERS, SEARCHERS, SearchSpace
from .trial import TrialSetup, run_trial

DRIVER_MEMORY = 256 * 2**20  # bytes a Ray Train trial's driver asks for (no CPU: see _fit)
STATUSES = ("completed", "collapsed", "stopped by scheduler", "error")
MLFLOW_STATUS = {"completed": "FINISHED", "collapsed": "FAILED", "stopped by scheduler": "KILLED",
                 "error": "FAILED"}


@dataclass
class TrialOutcome:
    """How one trial ended, for the summary table and the registry."""

    trial_id: str
    params: dict
    status: str  # one of STATUSES
    iterations: int  # learning iterations run
    planned: int  # the trial's train.iterations
    langevin_steps: int  # the trial's L (cost per iteration ∝ L + 1)
    value: float | None  # the search metric as measured (None: never reported)
    collapse: str  # "saturated @ 5" or ""
    run_dir: Path
    mlflow_run_id: str | None = None
    error: str = ""


@dataclass
class SearchResult:
    """A finished search: every trial's outcome, the best completed trial, the champion decision."""

    name: str
    out_dir: Path
    metric: str
    mode: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None = None
    model_uri: str | None = None
    champion: str = ""  # what happened to the champion alias, in words
    parent_run_id: str | None = None

    def compute(self) -> dict[str, int]:
        """Iterations run and saved against running every trial to its end, and the same in
        Langevin passes (iterations × (L + 1): L chain steps and the learning step's pass each
        cost one forward and backward of Φ), since L is often searched and sets the cost."""
        planned = sum(t.planned for t in self.trials)
        run = sum(t.iterations for t in self.trials)
        saved = {status: sum(t.planned - t.iterations for t in self.trials if t.status == status)
                 for status in ("collapsed", "stopped by scheduler")}
        passes_planned = sum(t.planned * (t.langevin_steps + 1) for t in self.trials)
        passes_run = sum(t.iterations * (t.langevin_steps + 1) for t in self.trials)
        return {"planned": planned, "run": run, "saved_by_collapse": saved["collapsed"],
                "saved_by_scheduler": saved["stopped by scheduler"],
                "passes_planned": passes_planned, "passes_run": passes_run}


def run_search(space: SearchSpace, *, trials: int, out_dir: str | Path, workers_per_trial: int = 0,
               gpus_per_worker: float = 0.0, storage: str | None = None, address: str | None = None,
               name: str | None = None, verbose: int = 1) -> SearchResult:
    """Run a Ray Tune search over `space` and return its outcome.

    Args:
        trials: trials in all (with grid parameters, a multiple of the grid's size).
        out_dir: the search's folder: trials/TRIAL_ID run directories, summary.csv/.md, search.json.
        workers_per_trial: Ray Train workers per trial; 0 runs `train` in the trial's process.
        storage: Ray storage for Tune (and Ray Train) checkpoints: an absolute path or a URI;
            default OUT_DIR/ray.
        address: an existing Ray cluster ("auto"); None starts a local one unless Ray is running.
        name: the search's name (Tune experiment, MLflow parent run); default the space's.
        verbose: Tune's console output, 0 (silent) to 2.
    """
    import ray

    check_search(space, trials, workers_per_trial, storage)
    name = name or space.name
    kind = SCHEDULERS[space.scheduler]
    out_dir = Path(out_dir).resolve()
    storage = storage or str(out_dir / "ray")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = space.base.replace({"name": name})  # trial T's run is NAME-T
    if kind.checkpoints:  # every report carries the checkpoint written at that iteration
        base = base.replace({"train.checkpoint_every": space.report_every})
    search_run, base = _start_tracking(space, base, name)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 0)
    try:
        grid_result = _fit(space, base, name, trials, out_dir, storage, workers_per_trial,
                           gpus_per_worker, verbose)
    except BaseException as err:
        if search_run is not None:
            search_run.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    setup_dir = out_dir / "trials"
    outcomes = [_outcome(result, base, setup_dir, space.metric) for result in grid_result]
    result = SearchResult(name, out_dir, space.metric, space.mode, outcomes)
    _choose_best(result)
    if search_run is not None:
        _finish_trials(result, search_run, base)
    write_tables(result)
    if search_run is not None:
        _close_search_run(result, search_run)
    return result


def check_search(space: SearchSpace, trials: int, workers_per_trial: int,
                 storage: str | None) -> None:
    """The command line's choices against the space (ConfigError naming the fix)."""
    grid = space.grid_size()
    if trials < 1 or trials % grid:
        raise ConfigError(f"--trials {trials} must be a positive multiple of the grid's {grid} "
                          "combinations: every pass over the grid is one sample of the rest.")
    if workers_per_trial < 0:
        raise ConfigError("--workers-per-trial must be ≥ 0 (0: training in the trial's process).")
    if SCHEDULERS[space.scheduler].checkpoints and workers_per_trial > 0:
        raise ConfigError("PBT copies Tune checkpoints between trials, which Ray Train trials "
                          "(--workers-per-trial > 0) do not report to Tune: use "
                          "--workers-per-trial 0.")
    if storage and "://" not in storage and not Path(storage).is_absolute():
        raise ConfigError(f"--storage '{storage}' must be an absolute path or a URI (s3://…).")


def _fit(space: SearchSpace, base: RunConfig, name: str, trials: int, out_dir: Path, storage: str,
         workers: int, gpus_per_worker: float, verbose: int):
    """Tuner.fit over the space; one trial = run_trial."""
    import ray
    import ray.tune

    kind = SCHEDULERS[space.scheduler]
    setup = TrialSetup(base=base.to_dict(), trials_dir=str(out_dir / "trials"), metric=space.metric,
                       mode=space.mode, report_every=space.report_every,
                       stop_on_collapse=space.stop_on_collapse, checkpoints=kind.checkpoints,
                       workers=workers, gpus_per_worker=gpus_per_worker, storage=storage,
                       fresh_fid=space.fresh_fid(str(out_dir / "feature-cache")))
    if setup.fresh_fid is not None:  # one feature network for every trial, trained before the first
        setup.fresh_fid.prepare(base.data)
    # A Ray Train trial's driver only waits on its workers, which hold the trial's CPUs: it asks
    # for no CPU (Tune refuses an empty request, hence some memory).
    resources = {"cpu": 1} if workers == 0 else {"cpu": 0, "memory": DRIVER_MEMORY}
    if workers == 0 and gpus_per_worker > 0:
        resources["gpu"] = gpus_per_worker  # a trial that trains in its own process gets the GPU it asks for
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = space.max_concurrent or max(1, cpus // max(workers, 1))
    images_per_iteration = base.train.data_batch_size * max(workers, 1)
    horizon = {"iteration": base.train.iterations,
               "images_seen": base.train.iterations * images_per_iteration}
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), resources),
        param_space=space.param_space(),
        tune_config=ray.tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=trials // space.grid_size(),
            scheduler=kind.build(space.scheduler_options, space.mutations(), horizon),
            search_alg=SEARCHERS[space.searcher][1](space.searcher_options, concurrent),
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=verbose,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


def _outcome(result, base: RunConfig, trials_dir: Path, metric: str) -> TrialOutcome:
    """A trial's outcome from its last Tune result and its run directory."""
    trial_id = Path(result.path).name
    params = dict(result.config or {})
    run_dir = trials_dir / trial_id
    trial_config = base.replace(params)
    planned, langevin_steps = trial_config.train.iterations, trial_config.langevin.langevin_steps
    last = result.metrics or {}
    rows = RunDirectory(run_dir).read_metrics()
    iterations = rows[-1]["iteration"] if rows else int(last.get("iteration", 0))
    value = last.get("measured", last.get(metric))
    collapse = (f"{last['collapse_reason']} @ {last['collapse_iteration']}"
                if last.get("collapse_reason") else "")
    if result.error is not None:
        status = "error"
    elif "trial_status" in last:
        status = last["trial_status"]
    else:  # the scheduler stopped it before its end (its process was ended mid-training)
        status = "stopped by scheduler"
    error = f"{type(result.error).__name__}: {result.error}" if result.error is not None else ""
    return TrialOutcome(trial_id, params, status, iterations, planned, langevin_steps,
                        None if value is None else float(value), collapse, run_dir, error=error)


def _choose_best(result: SearchResult) -> None:
    """The best completed, never-collapsed trial with a finite metric."""
    eligible = [t for t in result.trials if t.status == "completed" and not t.collapse
                and t.value is not None and math.isfinite(t.value)]
    if eligible:
        pick = min if result.mode == "min" else max
        result.best = pick(eligible, key=lambda t: t.value)


def _start_tracking(space: SearchSpace, base: RunConfig, name: str):
    """The search's MLflow parent run, and the base config that nests every trial under it."""
    if not base.tracking.enabled:
        return None, base
    uri = resolve_tracking_uri(base.tracking)
    check_tracking(uri)
    experiment = base.tracking.experiment or name
    search_run = SearchRun(uri, experiment, name, space.describe(),
                           tags={"debm.space": str(space.path)})
    base = base.replace({"tracking.uri": uri, "tracking.experiment": experiment,
                         "tracking.parent_run_id": search_run.run_id, "tracking.register": False,
                         "tracking.registered_model": base.tracking.registered_model or name})
    return search_run, base


def _finish_trials(result: SearchResult, search_run, base: RunConfig) -> None:
    """Close every trial's nested run with its status, register the best trial's model and move
    the champion alias to it if it is better."""
    result.parent_run_id = search_run.run_id
    for trial in result.trials:
        trial.mlflow_run_id = search_run.trial_run_id(trial.run_dir)
        if trial.mlflow_run_id is None:
            continue
        tags = {"debm.trial_status": trial.status, "debm.trial_id": trial.trial_id}
        if trial.collapse:
            tags["debm.collapse"] = trial.collapse
        metrics = {"trial_iterations": trial.iterations}
        if trial.value is not None:
            metrics[result.metric] = trial.value
        search_run.finish_trial(trial.mlflow_run_id, MLFLOW_STATUS[trial.status], metrics, tags)

    best = result.best
    if best is None or best.mlflow_run_id is None:
        result.champion = "no completed trial without collapse: nothing registered."
    else:
        checkpoint = latest_checkpoint(best.run_dir / "checkpoints")
        result.model_uri = register_model(search_run.uri, best.mlflow_run_id, checkpoint,
                                          base.tracking.registered_model)
        decision = promote_if_better(search_run.uri, result.model_uri, best.value, result.metric,
                                     result.mode)
        result.champion = decision.message


def _close_search_run(result: SearchResult, search_run) -> None:
    """The parent run's totals, the champion decision as a tag, the result files; then close it."""
    best = result.best
    compute = result.compute()
    counts = {f"trials_{s.replace(' ', '_')}": sum(t.status == s for t in result.trials)
              for s in STATUSES}
    totals = {**compute, **counts, **({f"best_{result.metric}": best.value} if best else {})}
    tags = {"debm.champion": result.champion,
            **({"debm.best_trial": best.trial_id} if best else {})}
    search_run.finish(totals, tags, [result.out_dir / n for n in ("summary.md", "summary.csv",
                                                                   "search.json")])


def write_tables(result: SearchResult) -> str:
    """Write summary.csv, summary.md and search.json into the search folder; return the Markdown."""
    keys = sorted({k for t in result.trials for k in t.params})
    header = ["trial", "status", "iterations", *keys, result.metric, "collapse", "mlflow run"]
    rows = [[t.trial_id, t.status, f"{t.iterations}/{t.planned}",
             *(_short(t.params.get(k)) for k in keys),
             "" if t.value is None else f"{t.value:.4g}", t.collapse, t.mlflow_run_id or ""]
            for t in result.trials]
    with (result.out_dir / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    lines = [f"# Search {result.name}", "", table, "", *_totals(result)]
    (result.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    record = {"name": result.name, "metric": result.metric, "mode": result.mode,
              "best": result.best.trial_id if result.best else None, "model_uri": result.model_uri,
              "champion": result.champion, "parent_run_id": result.parent_run_id,
              "compute": result.compute(),
              "trials": [{**asdict(t), "run_dir": str(t.run_dir), "value": _finite(t.value)}
                         for t in result.trials]}
    (result.out_dir / "search.json").write_text(json.dumps(record, indent=2))
    return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _totals(result: SearchResult) -> list[str]:
    """The lines under the table: counts, compute saved, the best trial and the champion."""
    c = result.compute()
    saved = c["planned"] - c["run"]
    share = saved / c["planned"] if c["planned"] else 0.0
    counts = ", ".join(f"{sum(t.status == s for t in result.trials)} {s}" for s in STATUSES)
    best = (f"Best: trial {result.best.trial_id}, {result.metric} {result.best.value:.4g}"
            if result.best else "Best: none (no trial completed without collapse)")
    errors = [f"Trial {t.trial_id} failed: {t.error.splitlines()[0] if t.error else ''}"
              for t in result.trials if t.status == "error"]
    return [f"Trials: {counts}.",
            f"Iterations: {c['run']} of {c['planned']} run; {saved} saved ({share:.0%}) against "
            f"running every trial to its end: {c['saved_by_collapse']} by collapse stopping, "
            f"{c['saved_by_scheduler']} by the scheduler. Weighted by cost (iterations × (L + 1)): "
            f"{1 - c['passes_run'] / max(1, c['passes_planned']):.0%} saved.",
            best + (f", registered as {result.model_uri}." if result.model_uri else "."),
            f"Champion: {result.champion}" if result.champion else "Champion: MLflow is off.",
            *errors]
