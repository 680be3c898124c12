"""What an operator sees, end to end in fresh processes (marked `slow`: each starts its own Ray,
about a minute here; `make test-all` or `pytest -m slow` runs them):

- `debm train --workers 2` as `make demo` runs it: one line saying what runs where, one progress
  bar drawn by the driver, none of Ray's or MLflow's internal chatter, one summary line and where
  to look;
- a real `ray job submit` of jobs/train.py to a `ray start --head` cluster with token
  authentication: the run directory lands in the storage (not in Ray's temporary copy of the
  working directory) and the model is registered in MLflow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

NOISE = ("Failed to query Ray Train Controller", "Reporting training result", "CloudPickle", "Add type hints",
         "Creating initial MLflow database", "Downloading artifacts", "PreemptionWatcher", "Traceback")


def _clean_env(**extra: str) -> dict:
    """This environment without the test session's Ray and MLflow pointers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


def test_distributed_run_console_is_short_and_says_what_runs_where(tmp_path):
    done = subprocess.run(
        [str(VENV_BIN / "debm"), "train", "--config", str(ROOT / "configs" / "digits_wgcn.yaml"), "--workers", "2",
         "--set", "train.iterations=40", "--run-dir", str(tmp_path / "run")],
        cwd=tmp_path, env=_clean_env(), capture_output=True, timeout=600)  # bytes: text mode would turn \r into \n
    console = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, console[-3000:]
    lines = [line.split("\r")[-1] for line in console.split("\n")]  # what a terminal keeps of each line
    assert len(lines) <= 15, console  # the progress bar redraws itself with \r
    assert lines[0].startswith("debm train digits-wgcn: wgcn on digits, 40 iterations; 2 Ray workers × CPU (local Ray)")
    assert f"run directory {tmp_path / 'run'}" in lines[0] and f"MLflow sqlite:///{tmp_path}/mlflow.db" in lines[0]
    bars = [line for line in lines if "/40" in line]
    assert 1 <= len(bars) <= 2 and re.search(r"img/s=\d+ R=[\d.e-]+ gap=.*100%", bars[-1]), bars
    assert any(line.startswith("completed: 40 iterations, 5120 images seen") for line in lines), console
    assert any(line.startswith("Look at it: mlflow ui --backend-store-uri") for line in lines), console
    for noise in NOISE:
        assert noise not in console, noise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_writes_to_the_storage_and_registers_the_model(tmp_path):
    """`ray start --head` (its own --temp-dir, stopped by killing only the processes it started),
    `ray job submit --working-dir` of jobs/train.py with a few iterations, then the run's outputs
    in the storage and the registered model."""
    work, storage, temp = tmp_path / "work", tmp_path / "storage", Path("/tmp") / f"ray-{os.getpid()}"
    (work / "jobs").mkdir(parents=True)
    (work / "configs").mkdir()
    shutil.copy(ROOT / "jobs" / "train.py", work / "jobs" / "train.py")
    shutil.copy(ROOT / "configs" / "digits_wgcn.yaml", work / "configs" / "digits_wgcn.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port, dashboard = _free_port(), _free_port()
    env = _clean_env(RAY_AUTH_MODE="token")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the job API answers once the dashboard is up
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head did not answer: {probe.stderr[-2000:]}")
        job = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(work), "--",
             sys.executable, "jobs/train.py", "--config", "configs/digits_wgcn.yaml", "--workers", "1",
             "--address", "auto", "--storage", str(storage), "--set", "train.iterations=6",
             "--set", "train.checkpoint_every=3", "--set", f"tracking.uri={uri}",
             "--set", "tracking.registered_model=job-test"],
            env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

    runs = sorted((storage / "runs").glob("digits-wgcn-*"))  # the default run directory under a job
    assert len(runs) == 1, list(storage.rglob("*"))[:20]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 6
    assert summary["model_uri"] == "models:/job-test/1"
    assert (runs[0] / "samples" / "final.png").is_file() and any((runs[0] / "checkpoints").iterdir())
    assert any((storage / "digits-wgcn").glob("iter-*"))  # Ray Train's checkpoints in the storage
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version("job-test", "1")
    assert version.run_id == summary["mlflow_run_id"]
