"""Shared fixtures: fast, exact, CPU-only; threads pinned so timings and results are stable."""

from __future__ import annotations

import os

# The CPU suite runs unchanged on a GPU host: CUDA stays hidden (from this process and from the
# Ray workers it starts, which inherit the variable) unless DEBM_TEST_GPU=1 asks for the `gpu`
# tests (scripts/gpu_check.sh). Set before torch initialises CUDA, which it does lazily.
if os.environ.get("DEBM_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# No usage reports leave a test run: Ray's usage stats and MLflow's telemetry are off (both are
# inherited by the Ray workers, MLflow servers and CLI subprocesses the tests start).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides():
    """Overrides that make any preset run in a second or two."""
    return {
        "train.iterations": 6,
        "train.data_batch_size": 16,
        "train.sample_every": 3,
        "train.checkpoint_every": 3,
        "chains.bank_size": 16,
        "chains.batch_size": 16,
        "langevin.langevin_steps": 3,
        "model.channels": [8, 16],
        "tracking.enabled": False,  # MLflow has its own tests (test_tracking.py)
    }


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """The test session tracks into one temporary MLflow store, never into the checkout."""
    import os

    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield store
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
