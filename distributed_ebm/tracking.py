"""MLflow, and only here: params, per-iteration metrics (step = images seen), artifacts, the
registered model, searches' parent runs, evaluation metrics, and loading models by URI.

Only rank 0 talks to MLflow. The tracking URI comes from the config, else MLFLOW_TRACKING_URI,
else an absolute `sqlite:///…/mlflow.db` in the launching directory, so that workers that change
directory still write to the same store. Clients are built for an explicit URI; where MLflow's
fluent API needs the global URI (logging or loading a model), `fluent_tracking_uri` sets it for
one block and restores the caller's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig, TrackingConfig, flatten

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow marks a nested run with its parent's id under this tag
CHAMPION = "champion"  # the registered model alias a search moves to a better model
EVALUATE_EXPERIMENT = "debm-evaluate"  # evaluations that have no training run to join log here
ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")  # models:/NAME@ALIAS


def quiet_mlflow(verbose: bool) -> None:
    """MLflow's INFO logs (store set-up, "Validating input example…") and its artifact progress
    bars only when `verbose` (`debm -v`); set through MLflow's own environment variables, before
    MLflow is imported, so that the Ray workers this process starts inherit them. A value the
    user set is kept."""
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (start_run, pyfunc.load_model, `models:/` URIs) at `uri` for the
    block, then restore the caller's tracking URI."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


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

    def log_recovery(self, record: dict) -> None:
        """Tag a collapse recovery: debm.recoveries (how many so far) and debm.recovery.N (its
        record as JSON). The metrics of the iterations it undid stay in the run's history."""
        self.client.set_tag(self.run_id, "debm.recoveries", str(record["recovery"]))
        self.client.set_tag(self.run_id, f"debm.recovery.{record['recovery']}", json.dumps(record)[:5000])

    def interrupted(self, status: str = "interrupted") -> None:
        """The run was stopped: send what is buffered and end it as KILLED (Ctrl-C, SIGTERM;
        tag debm.status interrupted) or FAILED (any other `status`, e.g. checkpoint_write_failed)."""
        self.flush()
        self.client.set_tag(self.run_id, "debm.status", status)
        self.client.set_terminated(self.run_id, "KILLED" if status == "interrupted" else "FAILED")

    def finish(self, run_dir: Path, status: str) -> None:
        """Send the last metrics, log the run directory's files as artifacts, tag the status
        (debm.status: completed, collapsed or diverged) and close the run."""
        self.flush()
        self.client.set_tag(self.run_id, "debm.status", status)
        for name in ("config.yaml", "summary.json", "curves.png", "metrics.jsonl", "metrics_rolled_back.jsonl"):
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

    from . import serving

    # Explicit requirements: inferring them imports the model in a subprocess (seconds per run).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "distributed_ebm"]
    code = Path(serving.__file__).with_name("serving_model.py")  # models from code: no pickle
    with fluent_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        # MLflow loads the model and answers INPUT_EXAMPLE once here (one sample, one step); it
        # warns, and still registers, if that fails.
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={"checkpoint": str(checkpoint)},
                                       registered_model_name=name, pip_requirements=requirements,
                                       signature=serving.SIGNATURE, input_example=serving.INPUT_EXAMPLE)
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


def describe_model(model_uri: str, tracking_uri: str, *,
                   store_fix: str = "set MLFLOW_TRACKING_URI") -> tuple[str, list[str]]:
    """(a description, the flavors) of the model `model_uri` in the store at `tracking_uri`; for
    `models:/NAME@ALIAS`, the description names the version the alias points at.

    Raises ConfigError, naming the fix, when the store does not answer or the URI does not resolve;
    `store_fix` says how the caller points at another store.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    check_tracking(tracking_uri)
    alias = ALIAS_URI.match(model_uri)
    described = model_uri
    try:
        with fluent_tracking_uri(tracking_uri):  # Model.load resolves models:/ URIs through it
            if alias:
                client = mlflow.MlflowClient(tracking_uri)
                version = client.get_model_version_by_alias(alias["name"], alias["alias"]).version
                described = f"{alias['name']} version {version} (alias {alias['alias']})"
            flavors = Model.load(model_uri).flavors
    except MlflowException as err:
        fix = (
            f"Check the name in the registry at {tracking_uri} "
            f"(mlflow.MlflowClient().search_registered_models()); {store_fix} to the store the "
            "model was registered in"
        )
        if alias:
            fix += (
                "; or point the alias at a version: mlflow.MlflowClient()"
                f".set_registered_model_alias('{alias['name']}', '{alias['alias']}', VERSION)"
            )
        raise ConfigError(f"Cannot load model {model_uri}: {err.message} {fix}.") from None
    return described, list(flavors)


def load_trained_model(model_uri: str, tracking_uri: str, device: str = "cpu"):
    """The TrainedModel inside the pyfunc model `model_uri` (a `models:/` URI resolves in the
    store at `tracking_uri`), on `device`."""
    import mlflow.pyfunc

    from .distributed import resolve_device
    from .inference import load_run

    with fluent_tracking_uri(tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    model = pyfunc.unwrap_python_model().model
    if model.device != resolve_device(device):  # rebuilt from its checkpoint on the asked device
        model = load_run(model.checkpoint, checkpoint=model.checkpoint, device=device, ema=model.weights == "ema")
    return model


# --- evaluation reports (debm evaluate) ------------------------------------------------------


def report_name(report: dict) -> str:
    """The name an evaluation report is filed under: its task, or for inpainting that averaged K
    restorations per image `inpainting-mean{K}` (its scores are not those of single restorations)."""
    average = report["samples"].get("average", 1) if report["task"] == "inpainting" else 1
    return report["task"] if average == 1 else f"{report['task']}-mean{average}"


def evaluation_metrics(report: dict) -> dict[str, float]:
    """An evaluation report's finite numbers under MLflow metric names (eval/fid, eval/bank/fid,
    eval/inpainting/square/mse, eval/inpainting-mean8/square/mse, …)."""
    prefix = "eval/bank/" if report["samples"]["source"] == "bank" else "eval/"
    if report["task"] == "inpainting":
        name = report_name(report)
        flat = {
            f"{name}/{kind}/{k}": v
            for kind, scores in report["masks"].items()
            for k, v in scores.items()
            if k != "ssim_window"
        }
        flat.update({
            f"{name}/baseline/{kind}/{k}": v
            for kind, scores in report.get("baseline", {}).get("masks", {}).items()
            for k, v in scores.items()
            if k != "ssim_window"
        })
    else:
        flat = dict(report["scores"])
        flat.update({f"class_coverage/{c}": v for c, v in report.get("class_coverage", {}).items()})
        flat.update(
            {f"class_share/{c}": v for c, v in report.get("generated_class_share", {}).items()}
        )
        if report.get("label_agreement") is not None:
            flat["label_agreement"] = report["label_agreement"]
    return {prefix + k: float(v) for k, v in flat.items() if v is not None and math.isfinite(v)}


def training_run(run_dir: str | None) -> tuple[str, str] | None:
    """(tracking URI, run id) of a run directory's MLflow run, when summary.json names one and its
    store answers; None (with the reason logged) otherwise."""
    if run_dir is None:
        return None
    summary_file = Path(run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    run_id, uri = summary.get("mlflow_run_id"), summary.get("mlflow_uri")
    if not run_id or not uri:
        log.info("%s names no MLflow run: logging to a new run in '%s'", summary_file,
                 EVALUATE_EXPERIMENT)
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        log.warning(
            "The training run's MLflow store %s is not here: logging to a new run in '%s'",
            uri,
            EVALUATE_EXPERIMENT,
        )
        return None
    import mlflow

    try:
        check_tracking(uri)
        mlflow.MlflowClient(uri).get_run(run_id)
    except (ConfigError, mlflow.exceptions.MlflowException) as err:
        log.warning(
            "The training run %s at %s cannot be reached (%s): logging to a new run in '%s'",
            run_id,
            uri,
            err,
            EVALUATE_EXPERIMENT,
        )
        return None
    return uri, run_id


# report["model"] keys that tag a new evaluation run: what was scored
_EVALUATED_TAGS = {"run_dir": "debm_run_dir", "model_uri": "debm_model_uri",
                   "samples_file": "debm_samples_file"}


def log_evaluation(report: dict, report_path: Path, *, run_dir: str | None, step: int) -> dict:
    """Log an evaluation report's metrics (at `step`, images seen) and file to the training run
    of `run_dir`, or to a new run in experiment `debm-evaluate`; return where they went."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    target = training_run(run_dir)
    if target is not None:
        uri, run_id = target
        client = mlflow.MlflowClient(uri)
        where = "training run"
    else:
        uri = resolve_tracking_uri(TrackingConfig())
        check_tracking(uri)
        client = mlflow.MlflowClient(uri)
        experiment_id = experiment_id_for(client, EVALUATE_EXPERIMENT)
        scored = report["model"]
        tags = {tag: scored[key] for key, tag in _EVALUATED_TAGS.items() if scored.get(key)}
        run_id = client.create_run(
            experiment_id, run_name=f"evaluate-{report_name(report)}", tags=tags
        ).info.run_id
        where = f"new run in experiment '{EVALUATE_EXPERIMENT}'"
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in evaluation_metrics(report).items()]
    network, samples = report["feature_network"], report["samples"]
    tag = f"eval.{'bank.' if samples['source'] == 'bank' else ''}{report_name(report)}"
    tags = [
        RunTag(
            f"{tag}.feature_network",
            f"{network['name']} {network.get('hash') or network['weights']}",
        ),
        RunTag(f"{tag}.samples", f"{samples['num']} {samples['source']}"),
    ]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.log_artifact(run_id, str(report_path), "evaluation")
    if target is None:
        client.set_terminated(run_id)
    return {"uri": uri, "run_id": run_id, "logged_to": where, "metrics": len(metrics)}


# --- searches (debm tune) --------------------------------------------------------------------


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
        """The id of the run a trial's `train` opened for `run_dir` (None if it never did)."""
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
