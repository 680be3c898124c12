"""The training loop end to end through `debm`: run directory, resume, divergence, sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from distributed_ebm.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def _sets(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_run_directory(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run), *_sets(tiny_overrides)]) == 0
    assert "completed: 6 iterations, 96 images seen" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 6
    rows = _metrics(run)
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert rows[-1]["images_seen"] == 96
    for key in ("phi_data", "phi_chains", "energy_data", "energy_chains", "response_distance",
                "grad_norm_theta", "grad_norm_w", "seconds", "collapse", "penalty_syn"):
        assert key in rows[-1], key
    assert (run / "samples" / "iter-000003.png").is_file() and (run / "samples" / "final.png").is_file()
    assert (run / "curves.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-00000003", "iter-00000006"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["collapsed"] is False
    assert summary["filter_bank"] is None and summary["response_bank"].startswith("random")
    assert summary["langevin_precision"] == "float32"  # the preset's langevin.autocast: null


@pytest.mark.parametrize("preset", ["digits_wgcn.yaml", "digits_frame.yaml"])
def test_resume_continues_bit_for_bit(tmp_path, tiny_overrides, preset):
    """Stop at iteration 3, resume, and the next iterations equal an uninterrupted run's."""
    overrides = {**tiny_overrides, "chains.batch_size": 8, "chains.reinit_prob": 0.2}
    full, part = tmp_path / "full", tmp_path / "part"
    base = ["train", "--config", str(CONFIGS / preset), *_sets(overrides)]
    assert main([*base, "--run-dir", str(full)]) == 0
    assert main([*base, "--run-dir", str(part), "--set", "train.iterations=3"]) == 0
    assert main([*base, "--run-dir", str(part), "--resume"]) == 0
    drop = {"seconds"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in _metrics(full)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in _metrics(part)]
    assert a == b


def test_resume_discards_metrics_logged_after_the_checkpoint(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    base = ["train", "--run-dir", str(run), *_sets({**tiny_overrides, "train.checkpoint_every": 4})]
    assert main([*base, "--set", "train.iterations=6"]) == 0  # checkpoints at 4 and 6
    import shutil
    shutil.rmtree(run / "checkpoints" / "iter-00000006")  # as if it crashed after logging 5, 6
    assert main([*base, "--set", "train.iterations=6", "--resume"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("window", [{"train.checkpoint_every": 1}, {"train.log_every": 5, "train.checkpoint_every": 6,
                                                                   "train.sample_every": 6}])
def test_nan_energy_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, capsys, window):
    """Also when the NaN shows at the first row of a 5-iteration metrics window: the run ends at
    that iteration (the rest of the window is not counted)."""
    run = tmp_path / "run"
    # δ²/(2σ²) = 50 without clamping multiplies the chains by −49 per step: Inf, then NaN.
    diverge = {**tiny_overrides, "langevin.clamp": False, "langevin.step_size": 10.0, "chains.init": "noise", **window}
    code = main(["train", "--run-dir", str(run), *_sets(diverge), "--set", "langevin.langevin_steps=40"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Training diverged at iteration 1" in err and "NaN/Inf" in err and "Lower optim.lr or langevin.step_size" in err
    assert "no checkpoint was written yet" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["collapse"]["reason"] == "nonfinite"
    assert summary["iterations"] == 1 and summary["images_seen"] == 16 and summary["collapse"]["iteration"] == 1


def test_sample_draws_fresh_chains_or_the_bank(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *_sets(tiny_overrides)]) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", "--run-dir", str(run), "--num", "5", "--steps", "4", "--out", str(out), "--png", str(tmp_path / "s.png")]) == 0
    fresh = np.load(out)
    assert fresh["x"].shape == (5, 1, 8, 8) and "fresh" in str(fresh["source"])
    assert np.abs(fresh["x"]).max() <= 1.0 and (tmp_path / "s.png").is_file()
    assert main(["sample", "--run-dir", str(run), "--num", "4", "--from-bank", "--out", str(out)]) == 0
    assert str(np.load(out)["source"]) == "bank"
    assert main(["sample", "--run-dir", str(tmp_path / "nothing"), "--num", "4", "--out", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_after_a_device_change_reseeds_only_the_moved_stream(tmp_path, tiny_overrides, caplog):
    """A checkpoint whose chain-noise stream was saved on another device (a CUDA generator state
    is 16 bytes, a CPU one 5056) resumes: that stream is reseeded from (seed, rank, iteration) with
    a warning; the data stream, on the CPU in both, continues exactly."""
    import torch

    run = tmp_path / "run"
    base = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run), *_sets(tiny_overrides)]
    assert main([*base, "--set", "train.iterations=3"]) == 0
    rank_file = run / "checkpoints" / "iter-00000003" / "rank-00000.pt"
    state = torch.load(rank_file, weights_only=False)
    state["generators"]["chains"] = torch.zeros(16, dtype=torch.uint8)  # as saved by a CUDA generator
    torch.save(state, rank_file)
    caplog.set_level("WARNING", logger="distributed_ebm.state")
    assert main([*base, "--resume"]) == 0
    assert "Random stream 'chains' cannot continue" in caplog.text and "another device" in caplog.text
    assert "'data'" not in caplog.text
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_a_collapse_without_recovery_ends_the_run_collapsed(tmp_path, tiny_overrides, capsys):
    """δ = 10 saturates the chains at once; with collapse.stop_on_collapse off the run trains on,
    and ends `collapsed`, not `completed`."""
    run = tmp_path / "run"
    saturate = {**tiny_overrides, "langevin.step_size": 10.0, "collapse.patience": 2}
    assert main(["train", "--run-dir", str(run), *_sets(saturate)]) == 0  # a result, not an error
    out, err = capsys.readouterr()
    assert "collapsed: 6 iterations" in out and "collapse: saturated at iteration 2" in out
    assert "Set collapse.max_recoveries" in err
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["recoveries"]) == ("collapsed", "iterations", [])
    assert "trained on to iteration 6 without recovering" in summary["message"]


def test_time_budget_stops_with_a_checkpoint(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    budget = {**tiny_overrides, "train.iterations": 1000000, "train.time_budget_s": 1e-6}
    assert main(["train", "--run-dir", str(run), *_sets(budget)]) == 0
    assert "completed (train.time_budget_s ran out): 1 iterations" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stopped_by"], summary["iterations"]) == ("completed", "time_budget", 1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["iter-00000001"]
    assert main(["train", "--run-dir", str(run), *_sets({**budget, "train.time_budget_s": 1e6}),
                 "--set", "train.iterations=3", "--resume"]) == 0  # the budget counts this process's time
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3]


def test_sample_grids_are_upscaled_with_one_row_per_class(tmp_path):
    """Image i drawn for class i mod K lands in row K; pixels are up-scaled to ≥ 112 px per image."""
    import numpy as np
    import torch
    from PIL import Image

    from distributed_ebm.rundir import save_sample_png, view_scale

    shades = torch.tensor([-1.0, 0.0, 1.0])  # class k's images are uniformly shades[k]
    images = shades[torch.arange(30) % 3].view(30, 1, 1, 1).expand(30, 1, 4, 4).clone()
    save_sample_png(images, tmp_path / "grid.png", classes=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L")).astype(float)
    cell = 4 * view_scale(4) + 1  # image plus the 1-pixel grid line
    assert view_scale(4) == 28 and view_scale(28) == 4 and view_scale(64) == 2
    assert grid.shape == (3 * cell + 1, 10 * cell + 1)
    for k, shade in enumerate(shades.tolist()):
        row = grid[1 + k * cell : (k + 1) * cell, 1:-1]
        inside = row[:, [c for c in range(row.shape[1]) if (c + 1) % cell]]  # skip grid lines
        assert np.allclose(inside, round((shade + 1) / 2 * 255), atol=1)


def test_sigterm_stops_the_run_with_one_line_naming_the_checkpoint_and_the_resume_command(tmp_path):
    """A scheduler's SIGTERM ends `debm train` like Ctrl-C: exit 130, no traceback, one line with the
    last checkpoint and the command that resumes (the same arguments plus --resume)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "distributed_ebm.cli", "train", "--config", str(CONFIGS / "digits_wgcn.yaml"),
            "--run-dir", str(run), "--set", "train.iterations=100000", "--set",
            "train.checkpoint_every=5", "--set", "model.channels=[8]", "--set", "chains.bank_size=8",
            "--set", "chains.batch_size=8", "--set", "langevin.langevin_steps=2"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri})
    deadline = time.time() + 120
    from distributed_ebm.checkpoint import latest_checkpoint

    while (not (run / "checkpoints").is_dir() or latest_checkpoint(run / "checkpoints") is None) \
            and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "SIGTERM received" not in err
    (line,) = [row for row in err.splitlines() if row.startswith("debm: interrupted")]
    assert "last checkpoint" in line and str(run / "checkpoints" / "iter-") in line
    import mlflow

    client = mlflow.MlflowClient(uri)
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name != "Default"])
    assert logged.info.status == "KILLED" and logged.data.tags["debm.status"] == "interrupted"
    command = line.split("Resume with: debm ")[1]
    assert command.startswith("train --config") and f"--run-dir {run}" in command and command.endswith(" --resume")


class HostReads:
    """Counts the reads of a tensor value on the host (.item(), float(t), bool(t), int(t),
    .tolist()): each is a device sync on a GPU. Reads made by torch.optim are not counted: they
    read the optimisers' step counters, which live on the CPU, not on the device."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        import sys

        import torch

        self.count = 0

        def counting(original):
            def read(tensor, *args, **kwargs):
                if "torch/optim/" not in sys._getframe(1).f_code.co_filename:
                    self.count += 1
                return original(tensor, *args, **kwargs)
            return read

        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))


@pytest.mark.parametrize("preset", ["digits_wgcn.yaml", "digits_ggcn.yaml", "digits_mgcn.yaml"])
def test_training_loop_reads_the_device_once_per_log_every(tmp_path, tiny_overrides, monkeypatch, preset):
    """Metrics stay on the device between flushes: 20 more iterations at log_every 10 cost at
    most 2 more host reads (one all-reduce and read per window), whatever the algorithm."""
    from distributed_ebm.config import load_config
    from distributed_ebm.train_loop import train

    reads = HostReads(monkeypatch)
    counts = {}
    for iterations in (10, 30):
        config = load_config(CONFIGS / preset, {**tiny_overrides, "train.iterations": iterations, "train.log_every": 10,
                                                "train.checkpoint_every": 1000, "train.sample_every": 1000})
        before = reads.count
        train(config, tmp_path / f"run-{iterations}", progress=False)
        counts[iterations] = reads.count - before
    assert counts[30] - counts[10] <= 2, counts
    rows = _metrics(tmp_path / "run-30")
    assert [r["iteration"] for r in rows] == [10, 20, 30]  # every log_every-th row is written
    assert all(isinstance(v, float) for r in rows for k, v in r.items() if k.startswith(("loss", "phi_", "grad_norm")))


def test_a_full_disk_while_checkpointing_ends_with_one_message_and_the_resume_command(tmp_path, tiny_overrides,
                                                                                       monkeypatch, capsys):
    """torch.save failing as on a full disk (torch's own RuntimeError) at the second checkpoint:
    exit status 1, one message naming the last complete checkpoint and the command that resumes;
    the partial file is removed and the resume continues from the complete checkpoint."""
    import torch

    from distributed_ebm import checkpoint

    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if "iter-00000006" in str(path):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 1024")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    argv = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run), *_sets(tiny_overrides)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line and "it/s" not in line]
    assert "Traceback" not in err and len(lines) == 1, err  # besides the progress bar
    assert "inline_container.cc:672" in err and "If the disk is full, free space under" in err
    assert f"The last complete checkpoint is {run / 'checkpoints' / 'iter-00000003'}" in err
    assert "Resume with: debm train --config" in lines[0] and f"--run-dir {run}" in lines[0]
    assert lines[0].endswith(" --resume")
    assert not list((run / "checkpoints").rglob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main([*argv, "--resume"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_a_run_shorter_than_log_every_still_logs_its_last_iteration(tmp_path, tiny_overrides, capsys):
    """log_every 10 on a 6-iteration run: the last iteration's row is written (the summary's final
    R comes from the logged rows), and nothing else."""
    run = tmp_path / "run"
    argv = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run),
            *_sets({**tiny_overrides, "train.log_every": 10})]
    assert main(argv) == 0
    assert [r["iteration"] for r in _metrics(run)] == [6]
    out = capsys.readouterr().out
    assert "completed: 6 iterations" in out and "final R n/a" not in out
