"""`debm tune`: spaces are validated with line numbers before any trial; a search stops a collapsing
trial and a poor one (ASHA), nests its trials under one MLflow run and registers a champion; a
worse search leaves the champion alone; PBT continues a donor with the trial's own optimiser
settings; Ray Train trials report through TuneReportCallback.

One local Ray instance (2 CPUs) is shared by every test in this module.
"""

import argparse
import csv
import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from distributed_ebm.cli import build_parser
from distributed_ebm.cli.tune import run
from distributed_ebm.config import ConfigError
from distributed_ebm.train_loop import train
from distributed_ebm.tuning import (
    SMOOTHED_R,
    WORST,
    final_result,
    load_space,
    restore_tune_checkpoint,
    run_search,
)
from tests.test_train import CONFIGS

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

MODEL = "tune-test-digits"  # the registered model both searches compete for
# conftest's tiny_overrides, for the module-scoped search (a function-scoped fixture cannot feed it)
TINY = {"train.data_batch_size": 16, "train.sample_every": 100, "chains.bank_size": 16,
        "chains.batch_size": 16, "langevin.langevin_steps": 3, "model.channels": [8, 16]}


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _write_space(folder: Path, space: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _client():
    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def first_search(ray_instance, tmp_path_factory):
    """Three trials, one at a time so ASHA's decisions are reproducible: δ = 0.2 trains, δ = 0.1
    is clearly worse at ASHA's first rung (iteration 2), δ = 3.0 saturates the chains at once."""
    folder = tmp_path_factory.mktemp("search1")
    space = _write_space(folder, {
        "name": "tune-test-1",
        "base": str(CONFIGS / "digits_wgcn.yaml"),
        "fixed": {**TINY, "train.iterations": 10, "train.checkpoint_every": 5,
                  "collapse.warmup": 2, "collapse.patience": 2,
                  "tracking.registered_model": MODEL, "tracking.experiment": "tune-test"},
        "report_every": 2,
        "max_concurrent": 1,
        "params": {"langevin.step_size": {"grid": [0.2, 0.1, 3.0]}},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    })
    result = run_search(load_space(space), trials=3, out_dir=folder / "out", verbose=0)
    return result


def test_search_stops_collapsed_and_poor_trials_and_registers_a_champion(first_search):
    result = first_search
    by_step = {t.params["langevin.step_size"]: t for t in result.trials}
    assert sorted(by_step) == [0.1, 0.2, 3.0]
    good, poor, wild = by_step[0.2], by_step[0.1], by_step[3.0]
    assert (good.status, good.iterations, good.planned, good.collapse) == ("completed", 10, 10, "")
    assert (wild.status, wild.iterations, wild.collapse) == ("collapsed", 2, "saturated @ 2")
    assert poor.status == "stopped by scheduler" and 2 <= poor.iterations < 10
    # The search metric of a completed trial is the mean R of its last 10 iterations.
    rows = [json.loads(line) for line in (good.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert good.value == pytest.approx(sum(r["response_distance"] for r in rows[-10:]) / 10)
    assert wild.value < good.value and result.best is good  # a collapsed trial is never the best

    # The summary lists every trial with its status, and the compute the stops saved.
    table = list(csv.DictReader((result.out_dir / "summary.csv").open()))
    assert {r["trial"]: (r["status"], r["iterations"]) for r in table} == {
        t.trial_id: (t.status, f"{t.iterations}/10") for t in result.trials}
    compute = result.compute()
    passes = 3 + 1  # every trial has L = 3: cost per iteration ∝ L + 1
    assert compute == {"planned": 30, "run": 12 + poor.iterations, "saved_by_collapse": 8,
                       "saved_by_scheduler": 10 - poor.iterations, "passes_planned": 30 * passes,
                       "passes_run": (12 + poor.iterations) * passes}
    summary = (result.out_dir / "summary.md").read_text()
    saved = 18 - poor.iterations
    assert f"{12 + poor.iterations} of 30 run; {saved} saved ({saved / 30:.0%})" in summary
    assert "1 completed, 1 collapsed, 1 stopped by scheduler, 0 error" in summary
    assert json.loads((result.out_dir / "search.json").read_text())["best"] == good.trial_id

    # MLflow: one parent run, the three trials nested under it with their status.
    client = _client()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["debm.kind"] == "search" and parent.info.status == "FINISHED"
    assert parent.data.params["search.langevin.step_size"] == "grid[0.2, 0.1, 3.0]"
    nested = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    state = {r.info.run_id: (r.info.status, r.data.tags["debm.trial_status"]) for r in nested}
    assert state == {good.mlflow_run_id: ("FINISHED", "completed"),
                     poor.mlflow_run_id: ("KILLED", "stopped by scheduler"),
                     wild.mlflow_run_id: ("FAILED", "collapsed")}
    assert client.get_run(wild.mlflow_run_id).data.tags["debm.collapse"] == "saturated @ 2"
    assert client.get_run(good.mlflow_run_id).data.params["langevin.step_size"] == "0.2"

    # The best trial's model is a new version that took the champion alias (none existed).
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert result.model_uri == f"models:/{MODEL}/{champion.version}"
    assert champion.run_id == good.mlflow_run_id
    assert float(champion.tags["debm.search_metric_value"]) == pytest.approx(good.value)
    decision = champion.tags["debm.champion_decision"]
    assert "first 'champion'" in decision and parent.data.tags["debm.champion"] == decision


def test_a_worse_search_registers_but_does_not_move_the_champion(first_search, tmp_path, capsys):
    client = _client()
    before = client.get_model_version_by_alias(MODEL, "champion")
    # Chains that hardly move (one step of δ = 1e-6) stay far from the data: R ≈ 0.45 against ≈ 0.16.
    space = _write_space(tmp_path, {
        "base": str(CONFIGS / "digits_wgcn.yaml"),
        "fixed": {**TINY, "train.iterations": 4, "langevin.langevin_steps": 1, "langevin.step_size": 1.0e-6,
                  "tracking.registered_model": MODEL, "tracking.experiment": "tune-test"},
        "report_every": 2,
        "params": {"optim.lr": {"grid": [1.0e-3, 3.0e-3]}},
    })
    args = _parser().parse_args(["tune", "--space", str(space), "--trials", "2",
                                 "--name", "tune-test-2", "--out", str(tmp_path / "out")])
    assert args.func is run and run(args) == 0
    out = capsys.readouterr().out

    after = client.get_model_version_by_alias(MODEL, "champion")
    newest = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert int(newest.version) == int(before.version) + 1 and after.version == before.version
    worse, best = (float(v.tags["debm.search_metric_value"]) for v in (newest, before))
    assert worse > best  # the premise of this test
    decision = newest.tags["debm.champion_decision"]
    assert "does not beat the champion" in decision
    assert f"stays on version {before.version}" in decision
    assert decision in out and "2 completed, 0 collapsed" in out


SPACE_HEAD = f"base: {CONFIGS / 'digits_wgcn.yaml'}\nparams:\n"


@pytest.mark.parametrize("text, message", [
    (SPACE_HEAD + "  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
     "  langevin.step_szie: {uniform: [0.1, 0.3]}\n",
     r"space.yaml:4: Unknown config key 'langevin.step_szie'. Did you mean 'step_size'\?"),
    (SPACE_HEAD + "  optim.lr: {logunifrom: [1.0e-4, 1.0e-2]}\n",
     r"space.yaml:3: Unknown distribution 'logunifrom' for 'optim.lr'. "
     r"Did you mean 'loguniform'\?"),
    (SPACE_HEAD + "  langevin.step_size:\n    uniform: [0.4, 0.1]\n",
     r"space.yaml:4: 'langevin.step_size': uniform takes \[low, high\]; it needs low < high, "
     r"got low 0.4 and high 0.1"),
    (SPACE_HEAD + "  optim.lr: {loguniform: [0, 1.0e-2]}\n", r"space.yaml:3: .*needs 0 < low"),
    (SPACE_HEAD + "  optim.lr: {choice: [1.0e-3]}\nscheduler:\n  type: ashaa\n",
     r"space.yaml:5: Unknown scheduler 'ashaa'. Did you mean 'asha'\?"),
    (SPACE_HEAD + "  optim.lr: {choice: [1.0e-3]}\nscheduler: {type: asha, grace_perod: 3}\n",
     r"space.yaml:4: Unknown option 'grace_perod' for scheduler 'asha'. "
     r"Did you mean 'grace_period'\?"),
    (SPACE_HEAD + "  optim.lr: {choice: [1.0e-3]}\nshceduler: {type: asha}\n",
     r"space.yaml:4: Unknown search space key 'shceduler'. Did you mean 'scheduler'\?"),
    (SPACE_HEAD + "  langevin.langevin_steps: {uniform: [5, 30]}\n",
     r"space.yaml:3: 'langevin.langevin_steps' takes whole numbers but uniform samples floats: "
     r"use randint"),
    (SPACE_HEAD + "  optim.lr: {grid: [1.0e-3]}\nsearcher: {type: optuna}\n",
     r"space.yaml:4: The optuna searcher cannot take grid parameters \('optim.lr', line 3\)"),
])
def test_malformed_space_fails_before_any_trial_naming_the_line(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    args = _parser().parse_args(["tune", "--space", str(path), "--trials", "2", "--out", str(out)])
    with pytest.raises(ConfigError, match=message):
        run(args)
    assert not out.exists()  # nothing started


@pytest.mark.parametrize("space, flags, message", [
    ("  optim.lr: {grid: [1.0e-3, 3.0e-3, 1.0e-2]}\n", ["--trials", "4"],
     r"--trials 4 must be a positive multiple of the grid's 3 combinations"),
    ("  optim.lr: {loguniform: [1.0e-3, 1.0e-2]}\n"
     "scheduler: {type: pbt, perturbation_interval: 2}\n",
     ["--trials", "2", "--workers-per-trial", "2"],
     r"PBT copies Tune checkpoints.*--workers-per-trial 0"),
])
def test_command_line_choices_are_checked_before_any_trial(tmp_path, space, flags, message):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE_HEAD + space)
    for dry_run in ([], ["--dry-run"]):
        args = _parser().parse_args(["tune", "--space", str(path), *flags, *dry_run,
                                     "--out", str(tmp_path / "out")])
        with pytest.raises(ConfigError, match=message):
            run(args)
    assert not (tmp_path / "out").exists()


def test_a_collapsed_trial_reports_the_worst_value():
    summary = {"status": "collapsed", "iterations": 7, "images_seen": 112,
               "final_response_distance": 0.05, "final": {"response_distance": 0.04},
               "collapse": {"iteration": 7, "reason": "saturated"}}
    for mode, worst in (("min", WORST), ("max", -WORST)):
        result = final_result(summary, SMOOTHED_R, mode)
        assert result[SMOOTHED_R] == worst and result["measured"] == 0.05
        assert (result["trial_status"], result["collapse_reason"], result["iteration"]) == (
            "collapsed", "saturated", 7)
    completed = final_result({**summary, "status": "completed", "collapse": None}, SMOOTHED_R,
                             "min")
    assert completed[SMOOTHED_R] == 0.05 and completed["trial_status"] == "completed"


def test_pbt_restore_continues_the_donor_with_the_trials_optimiser_settings(tmp_path, ray_instance):
    from distributed_ebm.config import load_config

    donor = load_config(CONFIGS / "digits_wgcn.yaml", {
        **TINY, "train.iterations": 2, "train.checkpoint_every": 2, "optim.lr": 1e-3,
        "tracking.enabled": False})
    train(donor, tmp_path / "donor", progress=False)
    trial = donor.replace({"optim.lr": 5e-3, "optim.betas": [0.9, 0.99], "train.iterations": 4})
    donated = tmp_path / "donor" / "checkpoints" / "iter-00000002"
    run_dir = tmp_path / "trial"
    checkpoint = ray.tune.Checkpoint.from_directory(str(donated))
    assert restore_tune_checkpoint(checkpoint, run_dir, trial)

    summary = train(trial, run_dir, resume=True, progress=False)
    assert summary["iterations"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [3, 4]  # continued from the donor's iteration 2
    state = torch.load(run_dir / "checkpoints" / "iter-00000004" / "state.pt", weights_only=False)
    groups = state["optimizers"]["energy"]["param_groups"]
    # The trial's own settings, not the donor's λ = 1e-3 and betas (0.5, 0.999):
    assert [(g["lr"], tuple(g["betas"])) for g in groups] == [(5e-3, (0.9, 0.99))]
    assert state["optimizers"]["energy"]["state"]  # the donor's Adam moments came along


def test_ray_train_trials_report_through_tune(ray_instance, tmp_path):
    space = _write_space(tmp_path, {
        "base": str(CONFIGS / "digits_wgcn.yaml"),
        "fixed": {**TINY, "chains.bank_size": 8, "chains.batch_size": 8, "train.iterations": 4,
                  "train.checkpoint_every": 4, "tracking.enabled": False},
        "report_every": 2,
        "params": {"optim.lr": {"grid": [3.0e-3]}},
    })
    result = run_search(load_space(space), trials=1, out_dir=tmp_path / "out", workers_per_trial=2,
                        verbose=0)
    (trial,) = result.trials
    assert (trial.status, trial.iterations) == ("completed", 4)
    assert json.loads((trial.run_dir / "summary.json").read_text())["world_size"] == 2
    tune_results = tmp_path / "out" / "ray" / "space" / trial.trial_id / "result.json"
    reports = [json.loads(line) for line in tune_results.read_text().splitlines()]
    # iteration 2 came from the workers through TuneReportCallback; 4 is the trial's own last report
    assert [(r["iteration"], SMOOTHED_R in r) for r in reports] == [(2, True), (4, True)]
    assert reports[-1]["trial_status"] == "completed"
    assert (trial.run_dir / "checkpoints" / "iter-00000004" / "state.pt").is_file()


def test_a_collapsed_trial_that_kept_running_still_reports_the_worst_value():
    summary = {"status": "completed", "collapsed": True, "collapse": {"reason": "saturated", "iteration": 4},
               "final": {"response_distance": 0.01}, "final_response_distance": 0.01, "iterations": 10,
               "images_seen": 160}
    result = final_result(summary, SMOOTHED_R, "min")  # stop_on_collapse: false ran it to its end
    assert (result[SMOOTHED_R], result["measured"], result["trial_status"]) == (WORST, 0.01, "collapsed")
    assert final_result({**summary, "collapsed": False}, SMOOTHED_R, "min")[SMOOTHED_R] == 0.01


def test_a_search_ranks_trials_by_the_fid_of_their_fresh_samples(ray_instance, tmp_path):
    """metric fresh_fid: every report and the end score fresh samples of the newest checkpoint in
    one feature space, trained once by the driver; the best trial is the lowest FID."""
    from distributed_ebm.tuning.quality import FRESH_FID, FreshFID

    space = _write_space(tmp_path, {
        "base": str(CONFIGS / "digits_wgcn.yaml"),
        "fixed": {**TINY, "train.iterations": 4, "train.checkpoint_every": 2, "tracking.enabled": False},
        "metric": FRESH_FID, "fid_samples": 64, "fid_steps": 5, "report_every": 2, "max_concurrent": 1,
        "params": {"langevin.step_size": {"grid": [0.2, 0.05]}},
    })
    loaded = load_space(space)
    assert (loaded.metric, loaded.mode, loaded.fid_samples, loaded.fid_steps) == (FRESH_FID, "min", 64, 5)
    result = run_search(loaded, trials=2, out_dir=tmp_path / "out", verbose=0)
    cache = tmp_path / "out" / "feature-cache"
    assert len([p for p in cache.rglob("*") if p.is_file() and p.suffix == ".pt"]) == 1  # one network, shared
    scorer = FreshFID(cache_dir=str(cache), samples=64, steps=5)
    for trial in result.trials:
        assert trial.status == "completed"
        assert trial.value == pytest.approx(scorer.score(trial.run_dir)[FRESH_FID], rel=1e-5)  # final checkpoint
        reports = [json.loads(line) for line in
                   (tmp_path / "out" / "ray" / "space" / trial.trial_id / "result.json").read_text().splitlines()]
        assert [(r["iteration"], r["fresh_fid_iteration"]) for r in reports] == [(2, 2), (4, 4)]
        assert all(r[FRESH_FID] > 0 and r["fresh_fid_seconds"] > 0 for r in reports)
    assert result.best is min(result.trials, key=lambda t: t.value)


@pytest.mark.parametrize("text, message", [
    ("metric: fresh_fid\nmode: max\n", "'fresh_fid' is a distance: use 'mode: min'"),
    ("fid_samples: 100\n", "'fid_samples' only applies with 'metric: fresh_fid'"),
    ("metric: fresh_fid\nfid_samples: 0\n", "'fid_samples' must be a whole number ≥ 1, got 0"),
    ("metric: fresh_fid\nfid_steps: -2\n", "'fid_steps' must be null"),
])
def test_fresh_fid_settings_are_checked(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(f"base: {CONFIGS / 'digits_wgcn.yaml'}\nparams:\n  optim.lr: {{choice: [1.0e-3]}}\n{text}")
    with pytest.raises(ConfigError, match=message):
        load_space(path)
