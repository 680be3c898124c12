"""Ray Train: 2 workers with sharded chains, a crashed worker resumed from its checkpoint with
every chain intact, re-launch by run name, and re-splitting the bank for a new worker count.

One local Ray instance (2 CPUs) is shared by every test in this module.
"""

import functools
from pathlib import Path

import pytest
import torch

from distributed_ebm.checkpoint import read_checkpoint
from distributed_ebm.config import load_config
from distributed_ebm.trainer import train_distributed
from tests.test_train import CONFIGS

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def crash_once(marker: str, at: int, *, iteration: int, rank: int, metrics: dict) -> None:
    """An injected failure: rank 1 raises once, at iteration `at` (the marker file remembers it).

    Workers receive it pickled by reference (tests.test_ray.crash_once): Ray puts the driver's
    working directory, the checkout, on their path.
    """
    if rank == 1 and iteration == at and not Path(marker).exists():
        Path(marker).write_text(f"crashed at iteration {at}")
        raise RuntimeError("injected worker crash")


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(**overrides):
    base = {"train.iterations": 8, "train.checkpoint_every": 2, "train.data_batch_size": 16,
            "chains.bank_size": 8, "chains.batch_size": 8, "langevin.langevin_steps": 2, "model.channels": [8, 16],
            "train.sample_every": 100}
    return load_config(CONFIGS / "digits_wgcn.yaml", {**base, **overrides})


def _ids(checkpoint: Path) -> list[int]:
    shared, ranks = read_checkpoint(checkpoint)
    return sorted(int(i) for r in ranks for i in r["banks"]["chains"]["ids"])


def test_crash_resumes_with_every_chain_and_relaunch_resplits(tmp_path, ray_instance):
    run_dir, storage = tmp_path / "run", str(tmp_path / "storage")
    crash = functools.partial(crash_once, str(tmp_path / "crashed"), 5)
    summary = train_distributed(_config(), run_dir=run_dir, workers=2, storage=storage, max_failures=1,
                                on_iteration=[crash], progress=False)
    assert (tmp_path / "crashed").exists()  # the crash happened, and the group recovered
    assert summary["iterations"] == 8 and summary["world_size"] == 2
    final = run_dir / "checkpoints" / "iter-00000008"
    shared, ranks = read_checkpoint(final)
    assert len(ranks) == 2 and _ids(final) == list(range(16))  # no chain lost or duplicated
    # Each rank kept its own ids: rank r owns r·8 … r·8+7 (chains never move between workers).
    assert [sorted(r["banks"]["chains"]["ids"].tolist()) for r in ranks] == [list(range(8)), list(range(8, 16))]
    rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8  # iterations 5 (lost with the crash) was replayed, not duplicated

    # Re-launch with the same name and storage, one worker and more iterations: resumes at 8 and
    # re-splits the two shards into one.
    more = _config(**{"train.iterations": 10})
    summary = train_distributed(more, run_dir=run_dir, workers=1, storage=storage, progress=False)
    assert summary["iterations"] == 10 and summary["world_size"] == 1
    final = run_dir / "checkpoints" / "iter-00000010"
    assert len(read_checkpoint(final)[1]) == 1 and _ids(final) == list(range(16))
    chains = read_checkpoint(final)[1][0]["banks"]["chains"]["states"]
    assert chains.shape == (16, 1, 8, 8) and torch.isfinite(chains).all()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback (sqlite backend, artifacts in a temporary folder)."""
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield uri
    process.terminate()
    process.wait(timeout=30)


def test_two_workers_track_to_a_real_mlflow_server(tmp_path, ray_instance, mlflow_server):
    import mlflow

    config = _config(**{"train.iterations": 4, "tracking.uri": mlflow_server, "tracking.registered_model": "ray-digits"})
    summary = train_distributed(config, run_dir=tmp_path / "run", workers=2, storage=str(tmp_path / "storage"),
                                progress=False)
    assert summary["model_uri"] == "models:/ray-digits/1"
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.algorithm"] == "wgcn"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "phi_data")]
    assert steps == [32, 64, 96, 128]  # 2 workers × 16 images per iteration
    assert "samples" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_model_version("ray-digits", "1").run_id == run.info.run_id


def test_two_workers_stream_shards_and_resume_their_positions_after_a_crash(tmp_path, ray_instance):
    from distributed_ebm.data.shards import ShardOptions, write_shards

    write_shards("digits", str(tmp_path / "shards"), ShardOptions(samples_per_shard=450, progress=False))
    crash = functools.partial(crash_once, str(tmp_path / "crashed"), 5)
    config = _config(**{"data.source": "webdataset", "data.urls": f"{tmp_path}/shards/shard-{{000000..000003}}.tar",
                        "data.loader_workers": 1, "data.shuffle_buffer": 50})
    summary = train_distributed(config, run_dir=tmp_path / "run", workers=2, storage=str(tmp_path / "storage"),
                                max_failures=1, on_iteration=[crash], progress=False)
    assert (tmp_path / "crashed").exists() and summary["iterations"] == 8
    _, ranks = read_checkpoint(tmp_path / "run" / "checkpoints" / "iter-00000008")
    # Each rank read 8 batches of 16 from its own two shards: its worker's position counts them.
    assert [r["data"]["positions"][0][1] for r in ranks] == [128, 128]
    assert summary["final"]["data_corrupt"] == 0 and summary["final"]["data_bad_shards"] == 0


def test_debm_train_workers_through_the_cli_and_resume_made_explicit(tmp_path, ray_instance, capsys):
    """`debm train --workers 2` via main(): its summary lines; a re-launch into the same storage is
    refused without --resume and continues with it; --resume with nothing to resume is refused."""
    from distributed_ebm.cli import main

    run = tmp_path / "run"
    sets = ["train.iterations=4", "train.checkpoint_every=2", "train.data_batch_size=16", "chains.bank_size=8",
            "chains.batch_size=8", "langevin.langevin_steps=2", "model.channels=[8,16]", "train.sample_every=100"]
    argv = ["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--workers", "2", "--run-dir", str(run),
            "--no-mlflow", *[a for kv in sets for a in ("--set", kv)]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "completed: 4 iterations, 128 images seen" in out and f"run directory {run}" in out

    assert main([*argv, "--set", "train.iterations=6"]) == 2  # same storage, no --resume
    err = capsys.readouterr().err
    assert "already holds checkpoints of run 'digits-wgcn'" in err and "pass --resume" in err

    assert main([*argv, "--set", "train.iterations=6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Resuming run 'digits-wgcn' from Ray storage" in out and "completed: 6 iterations" in out

    assert main([*argv[:-2 * len(sets)], "--run-dir", str(tmp_path / "new"), "--resume"]) == 2
    assert "Nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--workers", "2"]) == 2
    assert "--resume continues the run in --run-dir" in capsys.readouterr().err
