"""Collapse recovery: a collapse rolls the run back to its last healthy checkpoint (chains, random
streams and all) with δ lowered, the lowered δ survives a resume, NaN is recovered too, the run
stops `collapsed` when no recovery is left, and two ranks take the same decision."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ebm.checkpoint import (
    SHARED_FILE,
    final_trajectory,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
)
from distributed_ebm.cli import main
from distributed_ebm.metrics import CollapseDetector
from distributed_ebm.recovery import effective_overrides
from tests.test_train import CONFIGS, _metrics, _sets

DROP = ("seconds", "recovery")  # what differs between a recovered run and its reference


def saturating(update, from_iteration: int, above_step_size: float):
    """`CollapseDetector.update` that sees fully saturated chains from `from_iteration` on while δ
    is above `above_step_size`: a collapse that lowering δ cures."""

    def forced(self, iteration, metrics):
        if iteration >= from_iteration and metrics["step_size"] > above_step_size:
            metrics = {**metrics, "chain_saturation": 1.0}
        return update(self, iteration, metrics)

    forced.saturating = True
    return forced


def force_saturation(monkeypatch, *, from_iteration: int, above_step_size: float) -> None:
    monkeypatch.setattr(CollapseDetector, "update", saturating(CollapseDetector.update, from_iteration, above_step_size))


def install_saturation(from_iteration: int, above_step_size: float, **_) -> None:
    """An on_iteration callback that installs `saturating` in the process that calls it (a Ray
    Train worker), from its first iteration on."""
    if not getattr(CollapseDetector.update, "saturating", False):
        CollapseDetector.update = saturating(CollapseDetector.update, from_iteration, above_step_size)


def _rows(run: Path, drop=DROP) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in _metrics(run)]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _banks_and_models(checkpoint: Path) -> tuple[list, dict]:
    shared, ranks = read_checkpoint(checkpoint)
    return [r["banks"]["chains"]["states"] for r in ranks], shared["models"]["energy"]


# Collapse at iteration 7 (saturated from 6, patience 2): the checkpoint at 6 was written while the
# condition held, so the last healthy one is at 4.
ROLLBACK = {"train.iterations": 10, "train.checkpoint_every": 2, "train.keep_checkpoints": 10,
            "collapse.patience": 2, "collapse.max_recoveries": 1, "collapse.recovery_factor": 0.5}


def test_collapse_rolls_back_to_the_last_healthy_checkpoint_with_a_lower_step_size(
        tmp_path, tiny_overrides, monkeypatch, caplog):
    force_saturation(monkeypatch, from_iteration=6, above_step_size=0.15)  # δ = 0.2 in the preset
    run, reference = tmp_path / "run", tmp_path / "reference"
    base = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), *_sets({**tiny_overrides, **ROLLBACK})]
    caplog.set_level("WARNING", logger="distributed_ebm.outputs")
    assert main([*base, "--run-dir", str(run)]) == 0
    assert "Collapse (saturated) at iteration 7: recovery 1 of 1 returns to iter-00000004" in caplog.text

    summary = _summary(run)
    assert (summary["status"], summary["stopped_by"], summary["collapsed"]) == ("completed", "iterations", False)
    assert summary["recoveries"] == [{
        "recovery": 1, "iteration": 7, "reason": "saturated", "rolled_back_to": 4, "checkpoint": "iter-00000004",
        "step_size": 0.1, "lr": 0.003, "step_size_before": 0.2, "lr_before": 0.003}]
    assert summary["effective"] == {"langevin.step_size": 0.1, "optim.lr": 0.003}
    rows = _metrics(run)
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert [r["step_size"] for r in rows] == [0.2] * 4 + [0.1] * 6
    assert [r["recovery"] for r in rows] == [0] * 4 + [1] * 6
    undone = [json.loads(line) for line in (run / "metrics_rolled_back.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["step_size"], r["undone_by_recovery"]) for r in undone] == [
        (5, 0.2, 1), (6, 0.2, 1), (7, 0.2, 1)]
    assert undone[-1]["collapse_reason"] == "saturated"

    # The rollback restored the checkpoint exactly: the recovered state, saved at once as
    # iter-00000004-r1, holds the chains and weights of iter-00000004, and the config as written.
    checkpoints = run / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == [
        "iter-00000002", "iter-00000004", "iter-00000006", "iter-00000004-r1", "iter-00000006-r1",
        "iter-00000008-r1", "iter-00000010-r1"]
    (banks, models), (banks_r1, models_r1) = (_banks_and_models(checkpoints / n) for n in
                                              ("iter-00000004", "iter-00000004-r1"))
    assert all(torch.equal(a, b) for a, b in zip(banks, banks_r1))
    assert all(torch.equal(models[k], models_r1[k]) for k in models)
    shared = torch.load(checkpoints / "iter-00000010-r1" / SHARED_FILE, weights_only=False)
    assert shared["recovery"]["knob_scales"] == {"step_size": 0.5, "lr": 1.0}
    assert shared["config"]["langevin"]["step_size"] == 0.2
    assert effective_overrides(shared) == {"langevin.step_size": 0.1, "optim.lr": 0.003}
    from distributed_ebm.inference import load_run

    assert load_run(run).state.sampler.step_size == 0.1  # debm sample draws with the lowered δ

    # ... and its random streams: the iterations after the rollback equal those of a run resumed
    # from iter-00000004 with δ = 0.1.
    assert main([*base, "--run-dir", str(reference), "--set", "train.iterations=4"]) == 0
    assert main([*base, "--run-dir", str(reference), "--set", "langevin.step_size=0.1", "--resume"]) == 0
    assert _rows(run) == _rows(reference)


def test_a_rollback_rereads_the_shards_from_the_checkpoints_positions(tmp_path, tiny_overrides, monkeypatch):
    """Streamed shards: the running reader restarts at the read positions of the checkpoint
    returned to, as a resume from it would."""
    from distributed_ebm.data.shards import ShardOptions, write_shards

    write_shards("digits", str(tmp_path / "shards"), ShardOptions(samples_per_shard=450, progress=False))
    force_saturation(monkeypatch, from_iteration=6, above_step_size=0.15)
    shards = {"data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000003}}.tar",
              "data.loader_workers": 1, "data.shuffle_buffer": 50}
    base = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), *_sets({**tiny_overrides, **ROLLBACK, **shards})]
    run, reference = tmp_path / "run", tmp_path / "reference"
    assert main([*base, "--run-dir", str(run)]) == 0
    assert main([*base, "--run-dir", str(reference), "--set", "train.iterations=4"]) == 0
    assert main([*base, "--run-dir", str(reference), "--set", "langevin.step_size=0.1", "--resume"]) == 0
    drop = (*DROP, "data_wait_s")
    assert _summary(run)["recoveries"][0]["rolled_back_to"] == 4 and _rows(run, drop) == _rows(reference, drop)


def test_resume_after_a_recovery_keeps_the_lowered_step_size(tmp_path, tiny_overrides):
    """δ = 10 saturates the chains at once (collapse at iteration 2, before any checkpoint: the
    run returns to its initial state); δ × 0.1 = 1 does not. A resumed run keeps δ = 1."""
    settings = {**tiny_overrides, "langevin.step_size": 10.0, "collapse.patience": 2, "collapse.max_recoveries": 1,
                "collapse.recovery_factor": 0.1, "train.checkpoint_every": 2}
    full, part = tmp_path / "full", tmp_path / "part"
    base = ["train", *_sets(settings)]
    assert main([*base, "--run-dir", str(full)]) == 0
    assert _summary(full)["recoveries"][0]["checkpoint"] == "the initial state"
    assert main([*base, "--run-dir", str(part), "--set", "train.iterations=4"]) == 0
    assert main([*base, "--run-dir", str(part), "--resume"]) == 0
    assert [r["step_size"] for r in _metrics(part)] == [1.0] * 6
    assert _rows(part, drop=("seconds",)) == _rows(full, drop=("seconds",))
    summary = _summary(part)
    assert summary["status"] == "completed" and summary["effective"]["langevin.step_size"] == 1.0
    assert [r["iteration"] for r in summary["recoveries"]] == [2]
    # A recovered run equals a run that started with the lower δ: the rollback to the initial
    # state restored the random streams too.
    fresh = tmp_path / "fresh"
    assert main([*base, "--run-dir", str(fresh), "--set", "langevin.step_size=1.0",
                 "--set", "collapse.max_recoveries=0"]) == 0
    assert _rows(full) == _rows(fresh)


def test_a_nan_divergence_is_recovered(tmp_path, tiny_overrides):
    # δ²/(2σ²) = 50 without clamping: Inf, then NaN at iteration 1 (tests/test_train.py).
    diverge = {**tiny_overrides, "langevin.clamp": False, "langevin.step_size": 10.0, "chains.init": "noise",
               "langevin.langevin_steps": 40, "collapse.max_recoveries": 1, "collapse.recovery_factor": 0.001,
               "collapse.recovery_target": "both"}
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *_sets(diverge)]) == 0
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["iterations"] == 6
    assert [(r["reason"], r["iteration"], r["rolled_back_to"]) for r in summary["recoveries"]] == [("nonfinite", 1, 0)]
    assert all((r["step_size"], r["lr"]) == pytest.approx((0.01, 3e-6)) for r in _metrics(run))
    shared = torch.load(run / "checkpoints" / "iter-00000006-r1" / SHARED_FILE, weights_only=False)
    assert shared["optimizers"]["energy"]["param_groups"][0]["lr"] == pytest.approx(3e-6)


def test_a_run_out_of_recoveries_stops_collapsed(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    settings = {**tiny_overrides, "langevin.step_size": 10.0, "collapse.patience": 2, "collapse.max_recoveries": 2,
                "collapse.recovery_factor": 0.9,  # δ 10 → 9 → 8.1: still saturating
                "tracking.enabled": True, "tracking.register": False}
    assert main(["train", "--run-dir", str(run), *_sets(settings)]) == 0  # collapsed is a result, not an error
    out, err = capsys.readouterr()
    assert "collapsed: 2 iterations" in out and "2 recoveries (δ now 8.1" in out
    assert "The run collapsed (saturated) at iteration 2 after 2 recoveries" in err
    summary = _summary(run)
    assert (summary["status"], summary["stopped_by"], summary["collapsed"]) == ("collapsed", "collapse", True)
    assert [r["step_size"] for r in summary["recoveries"]] == [9.0, pytest.approx(8.1)]
    assert "collapse.max_recoveries" in summary["message"]
    assert [(r["iteration"], r["recovery"]) for r in _metrics(run)] == [(1, 2), (2, 2)]
    import mlflow

    tags = mlflow.MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"]).data.tags
    assert (tags["debm.recoveries"], tags["debm.status"]) == ("2", "collapsed")
    assert json.loads(tags["debm.recovery.2"]) == summary["recoveries"][1]


def test_checkpoints_written_after_a_recovery_are_newer_whatever_their_iteration(tmp_path):
    for name in ("iter-00000006", "iter-00000004-r1", "iter-00000002", "iter-00000008-r1", "iter-00000003-r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / SHARED_FILE).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "iter-00000002", "iter-00000006", "iter-00000004-r1", "iter-00000008-r1", "iter-00000003-r2"]
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter-00000008-r1", "iter-00000003-r2"]


@pytest.mark.parametrize("names, final", [
    # a benchmark run: rolled back from 884 to 870, then from 876 to 870 again, and stopped at 875
    (["iter-00000860", "iter-00000870", "iter-00000880", "iter-00000870-r1", "iter-00000870-r2"],
     {860: "iter-00000860", 870: "iter-00000870-r2"}),
    (["iter-00000002", "iter-00000006", "iter-00000004-r1", "iter-00000008-r1", "iter-00000003-r2"],
     {2: "iter-00000002", 3: "iter-00000003-r2"}),
    (["iter-00000002", "iter-00000004", "iter-00000004-r1", "iter-00000006-r1"],
     {2: "iter-00000002", 4: "iter-00000004-r1", 6: "iter-00000006-r1"}),
])
def test_the_final_trajectory_leaves_out_checkpoints_a_recovery_abandoned(tmp_path, names, final):
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / SHARED_FILE).write_bytes(b"")
    assert {it: p.name for it, p in final_trajectory(tmp_path).items()} == final


def _rank_worker(rank, world, init_file, run_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from distributed_ebm.config import load_config
    from distributed_ebm.train_loop import train

    overrides = {"train.data_batch_size": 8, "chains.bank_size": 6, "chains.batch_size": 6, "langevin.langevin_steps": 2,
                 "model.channels": [4, 8], "tracking.enabled": False, "train.sample_every": 100, **ROLLBACK}
    summary = train(load_config(CONFIGS / "digits_wgcn.yaml", overrides), run_dir, progress=False)
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(summary["recoveries"]))
    dist.destroy_process_group()


def test_two_ranks_roll_back_together_each_to_its_own_chains(tmp_path, monkeypatch):
    """Every rank sees the same all-reduced collapse metrics, so both roll back at iteration 7 to
    their in-memory copy of iteration 4, each with its own chain shard and random streams."""
    force_saturation(monkeypatch, from_iteration=6, above_step_size=0.15)  # inherited by the forked ranks
    run = tmp_path / "run"
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(run), str(tmp_path)), nprocs=2,
                       start_method="fork" if os.name == "posix" else "spawn")
    decisions = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert decisions[0] == decisions[1] and [(d["iteration"], d["rolled_back_to"]) for d in decisions[0]] == [(7, 4)]
    banks, _ = _banks_and_models(run / "checkpoints" / "iter-00000004")
    banks_r1, _ = _banks_and_models(run / "checkpoints" / "iter-00000004-r1")
    assert len(banks) == 2 and all(torch.equal(a, b) for a, b in zip(banks, banks_r1))
    assert not torch.equal(banks[0], banks[1])
    assert [r["step_size"] for r in _metrics(run)] == [0.2] * 4 + [0.1] * 6
    assert _summary(run)["status"] == "completed"


@pytest.mark.ray
def test_ray_workers_roll_back_together_and_report_the_new_checkpoints_apart(tmp_path):
    """Under Ray Train each worker returns to its own in-memory copy of iteration 4; the
    checkpoints written after the recovery reach Ray's storage under their own names (-r1)."""
    import functools

    ray = pytest.importorskip("ray")
    from distributed_ebm.config import load_config
    from distributed_ebm.trainer import train_distributed

    overrides = {"train.data_batch_size": 16, "chains.bank_size": 8, "chains.batch_size": 8, "langevin.langevin_steps": 2,
                 "model.channels": [8, 16], "train.sample_every": 100, "tracking.enabled": False, **ROLLBACK}
    config = load_config(CONFIGS / "digits_wgcn.yaml", overrides)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = train_distributed(config, run_dir=tmp_path / "run", workers=2, storage=str(tmp_path / "storage"),
                                    on_iteration=[functools.partial(install_saturation, 6, 0.15)], progress=False)
    finally:
        ray.shutdown()
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert [(r["iteration"], r["rolled_back_to"], r["step_size"]) for r in summary["recoveries"]] == [(7, 4, 0.1)]
    stored = tmp_path / "storage" / config.name
    assert {"iter-00000006", "iter-00000004-r1", "iter-00000006-r1", "iter-00000010-r1"} <= {p.name for p in stored.iterdir()}
    banks, _ = _banks_and_models(stored / "iter-00000004")
    banks_r1, _ = _banks_and_models(stored / "iter-00000004-r1")
    assert all(torch.equal(a, b) for a, b in zip(banks, banks_r1))
    assert (tmp_path / "run" / "checkpoints" / "iter-00000010-r1").is_dir()  # the final one, for debm sample
    assert [r["step_size"] for r in _metrics(tmp_path / "run")] == [0.2] * 4 + [0.1] * 6


def test_no_healthy_state_to_return_to_stops_collapsed_and_says_so(tmp_path, tiny_overrides):
    """A run resumed from a checkpoint written while a condition was building has no healthy
    state until it writes one; a collapse before that stops it."""
    run = tmp_path / "run"
    settings = {**tiny_overrides, "langevin.step_size": 10.0, "collapse.patience": 2, "train.checkpoint_every": 1}
    assert main(["train", "--run-dir", str(run), *_sets(settings), "--set", "train.iterations=1"]) == 0
    assert main(["train", "--run-dir", str(run), *_sets(settings), "--set", "collapse.max_recoveries=1",
                 "--resume"]) == 0
    summary = _summary(run)
    assert (summary["status"], summary["stopped_by"], summary["iterations"]) == ("collapsed", "collapse", 2)
    assert summary["recoveries"] == [] and "no healthy state to return to" in summary["message"]


def test_energy_pinned_reads_the_penalty_of_the_run(tmp_path, tiny_overrides):
    """The detector gets α = model.energy_l2 from the run: its `collapse_energy_pinned` is the
    smoothed (collapse.ema 0.9) α·|mean Φ(data) − mean Φ(chains)| and a threshold under it rolls
    the run back with reason energy_pinned, then stops it `collapsed`; without the penalty the
    same thresholds never fire."""
    alpha = 0.01
    settings = {**tiny_overrides, "collapse.warmup": 0, "collapse.energy_pinned_max": 1e-9,
                "collapse.energy_pinned_patience": 1, "collapse.max_recoveries": 1}
    run, plain = tmp_path / "run", tmp_path / "plain"
    assert main(["train", "--run-dir", str(run), *_sets({**settings, "model.energy_l2": alpha})]) == 0
    summary = _summary(run)
    assert summary["status"] == "collapsed"
    undone = [json.loads(line) for line in (run / "metrics_rolled_back.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["iteration"], r["checkpoint"]) for r in summary["recoveries"]] == [
        ("energy_pinned", len(undone), "the initial state")]
    assert undone[-1]["collapse_reason"] == "energy_pinned" and undone[-1]["collapse_energy_pinned"] > 0
    smoothed = None
    for row in undone:
        raw = alpha * abs(row["phi_data"] - row["phi_chains"])
        smoothed = raw if smoothed is None else 0.9 * smoothed + 0.1 * raw
        assert row["collapse_energy_pinned"] == pytest.approx(smoothed)
    assert main(["train", "--run-dir", str(plain), *_sets(settings)]) == 0
    assert _summary(plain)["status"] == "completed"
    assert all(r["collapse_energy_pinned"] == 0.0 for r in _metrics(plain))
