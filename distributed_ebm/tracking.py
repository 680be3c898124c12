"""MLflow: params, per-iteration metrics (step = images seen), artifacts and the registered model.

Only rank 0 talks to MLflow. The tracking URI comes from the config, else MLFLOW_TRACKING_URI,
else an absolute `sqlite:///…/mlflow.db` in the launching directory, so that workers that change
directory still write to the same store.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig, TrackingConfig, flatten

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow marks a nested run with its parent's id under this tag
CHAMPION = "champion"  # the registered model alias a search moves to a better model


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """The tracking URI this run uses (absolute for file and sqlite stores)."""
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early, with the fix, when an HTTP tracking server does not answer (before any worker starts)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(
            f"The MLflow tracking server at {uri} does not answer ({type(err).__name__}). Start it "
            "(mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db), fix "
            "tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false to train without MLflow."
        ) from None


def experiment_id_for(client, name: str) -> str:
    """The id of the MLflow experiment `name`, created if missing."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def run_for_dir(client, experiment_id: str, run_dir: Path) -> str | None:
    """The id of the run a training run opened for `run_dir` (tag debm_run_dir), if any."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.debm_run_dir = '{run_dir}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def log_params(client, run_id: str, params: dict) -> None:
    """Log params in batches of 100 (MLflow's limit per call), values cut to 6000 characters."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


class Tracker:
    """One MLflow run for one training run, written from rank 0."""

    def __init__(self, config: RunConfig, run_dir: Path, info: dict):
        import mlflow

        self.config = config
        self.uri = resolve_tracking_uri(config.tracking)
        self.client = mlflow.MlflowClient(self.uri)
        experiment_id = experiment_id_for(self.client, config.tracking.experiment or config.name)
        existing = run_for_dir(self.client, experiment_id, run_dir)
        if existing:  # a resumed run continues its MLflow run
            self.run_id = existing
        else:
            tags = {"debm_run_dir": str(run_dir), **{f"debm.{k}": str(v) for k, v in info.items()}}
            if config.tracking.parent_run_id:  # a search's trial: nested under the search's run
                tags[PARENT_TAG] = config.tracking.parent_run_id
            run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, flatten(config.to_dict()))
        self.experiment_id = experiment_id
        self.buffer: list = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Buffer one iteration's numeric metrics (step = images seen); sent every flush_every."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and k not in ("iteration",)]
        if len(self.buffer) >= 20 * self.config.tracking.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[start : start + 1000])
        self.buffer = []

    def finish(self, run_dir: Path, status: str) -> None:
        """Send the last metrics, log the run directory's files as artifacts and close the run."""
        self.flush()
        for name in ("config.yaml", "summary.json", "curves.png", "metrics.jsonl"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "samples").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "samples"), "samples")
        self.client.set_terminated(self.run_id, "FAILED" if status == "diverged" else "FINISHED")


def register_model(uri: str, run_id: str, checkpoint: Path, name: str) -> str:
    """Log the checkpoint bundle as a pyfunc model in the run and register a new version of `name`;
    return its URI `models:/NAME/VERSION`."""
    import mlflow
    import torch

    from .serving import EBMModel

    # Explicit requirements: inferring them imports the model in a subprocess (seconds per run).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "distributed_ebm"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # fluent API only; restored so the caller's process is left as it was
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=EBMModel(), artifacts={"checkpoint": str(checkpoint)},
                                           registered_model_name=name, pip_requirements=requirements)
    finally:
        mlflow.set_tracking_uri(previous)
    log.info("Registered %s version %s", name, info.registered_model_version)
    return f"models:/{name}/{info.registered_model_version}"


def finish_summary(summary: dict, config: RunConfig, checkpoint: Path | None) -> dict:
    """Register the final checkpoint (when the run tracked to MLflow, did not diverge and
    `tracking.register` is on) and add the model URI to the summary."""
    if not summary.get("mlflow_run_id") or checkpoint is None or summary.get("status") == "diverged":
        return summary
    if not config.tracking.register:
        return summary
    name = config.tracking.registered_model or config.name
    summary["model_uri"] = register_model(summary["mlflow_uri"], summary["mlflow_run_id"], checkpoint, name)
    return summary


class SearchRun:
    """The MLflow parent run of one `debm tune` search: every trial's run nests under it."""

    def __init__(self, uri: str, experiment: str, name: str, params: dict, tags: dict):
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        self.experiment_id = experiment_id_for(self.client, experiment)
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"debm.kind": "search", **tags})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, params)

    def trial_run_id(self, run_dir: Path) -> str | None:
        """The id of the run a trial's train_loop opened for `run_dir` (None if it never did)."""
        return run_for_dir(self.client, self.experiment_id, run_dir)

    def finish_trial(self, run_id: str, mlflow_status: str, metrics: dict, tags: dict) -> None:
        """Log a trial's outcome on its nested run and close it with `mlflow_status` (FINISHED,
        FAILED or KILLED): trials stopped by the scheduler were killed before their own end."""
        self._log(run_id, metrics, tags)
        self.client.set_terminated(run_id, mlflow_status)

    def finish(self, metrics: dict, tags: dict, artifacts: list[Path]) -> None:
        """Log the search's totals, tags and result files, and close the parent run."""
        self._log(self.run_id, metrics, tags)
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        """Close the parent run as FAILED (the search itself broke), with the reason as a tag."""
        self._log(self.run_id, {}, {"debm.error": reason})
        self.client.set_terminated(self.run_id, "FAILED")

    def _log(self, run_id: str, metrics: dict, tags: dict) -> None:
        import math

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)]
        self.client.log_batch(run_id, metrics=values,
                              tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a newly registered model version took the `champion` alias, and why."""

    promoted: bool
    model_uri: str  # models:/NAME/VERSION of the new version
    message: str


def promote_if_better(uri: str, model_uri: str, value: float, metric: str,
                      mode: str) -> ChampionDecision:
    """Record `metric` = `value` on the new version `model_uri` and give it the `champion` alias
    only if it beats the current champion's recorded value (mode "min" or "max").

    The champion's value is read from its version's tags (written here by an earlier search), else
    from its run's metrics; a champion with neither keeps the alias: the two cannot be compared.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    recorded = {"search_metric": metric, "search_mode": mode, "search_metric_value": value}
    for key, tag in recorded.items():
        client.set_model_version_tag(name, version, f"debm.{key}", str(tag))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        promoted = True
        message = f"{name} version {version} is the first '{CHAMPION}' ({metric} {value:.4g})."
    else:
        theirs = _recorded_value(client, current, metric, mode)
        if theirs is None:
            promoted = False
            message = (f"'{CHAMPION}' stays on {name} version {current.version}: it has no "
                       f"recorded {metric} ({mode}) to compare with version {version}'s "
                       f"{value:.4g}. Move it by hand if you want: MlflowClient()."
                       f"set_registered_model_alias('{name}', '{CHAMPION}', {version}).")
        else:
            promoted = value < theirs if mode == "min" else value > theirs
            verdict = "beats" if promoted else "does not beat"
            outcome = (f"'{CHAMPION}' moves to version {version}" if promoted
                       else f"'{CHAMPION}' stays on version {current.version}")
            message = (f"{name} version {version} ({metric} {value:.4g}) {verdict} the champion, "
                       f"version {current.version} ({theirs:.4g}, {mode}imised): {outcome}.")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "debm.champion_decision", message)
    return ChampionDecision(promoted, model_uri, message)


def _recorded_value(client, version, metric: str, mode: str) -> float | None:
    """The champion's value of `metric`: from its version's tags, else from its run's metrics."""
    tags = version.tags or {}
    if tags.get("debm.search_metric") == metric and tags.get("debm.search_mode") == mode:
        return float(tags["debm.search_metric_value"])
    if version.run_id:
        return client.get_run(version.run_id).data.metrics.get(metric)
    return None
