"""cluster.yaml passes Ray's cluster-config validation; jobs/*.py forward to debm."""

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).parents[1]
# jobs/NAME.py → the debm subcommand it forwards to
JOBS = {"train": "train", "tune": "tune", "make_shards": "shards", "evaluate": "evaluate"}


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in the provider's defaults, then
    check the result against ray-schema.json and the node-type rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation():
    prepared = _validate(_cluster())
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and nodes["head"]["max_workers"] == 0
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] >= 1
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU types
    # The project is installed on every node, from the checkout the launcher syncs there.
    assert prepared["file_mounts"] == {"~/distributed_ebm": "."}
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any("pip install" in c and "~/distributed_ebm" in c for c in commands)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_wrokers=4),  # a misspelt top-level key
        lambda c: c["available_node_types"]["gpu_worker"].pop("resources"),  # required
        lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": 0.5}),
        lambda c: c["docker"].update(imag="rayproject/ray"),  # unknown docker key
        lambda c: c.update(idle_timeout_minutes="ten"),  # must be a number
    ],
    ids=["unknown-key", "no-resources", "fractional-gpu", "docker-typo", "timeout-not-number"],
)
def test_a_broken_cluster_yaml_fails_rays_validation(break_it):
    config = _cluster()
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate(config)


def test_a_head_type_missing_from_the_node_types_fails_rays_validation():
    config = _cluster()
    config["head_node_type"] = "cpu_head"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(config)


def test_cluster_runs_this_ray_version_and_points_every_node_at_mlflow():
    config = _cluster()
    for image in (config["docker"]["head_image"], config["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image
    # MLFLOW_TRACKING_URI must be in the environment `ray start` gives every job and worker.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.index("export MLFLOW_TRACKING_URI=http://") < start.index("ray start"), key
    assert "$RAY_HEAD_IP:5000" in next(
        c for c in config["worker_start_ray_commands"] if "ray start" in c
    )
    assert any(
        "mlflow server" in c and "--port 5000" in c for c in config["head_start_ray_commands"]
    )


@pytest.mark.parametrize(("job", "subcommand"), sorted(JOBS.items()))
def test_job_entry_point_answers_help_of_its_subcommand(job, subcommand):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: debm {subcommand} "), done.stdout[:200]


def test_every_job_file_is_covered():
    assert sorted(p.stem for p in (ROOT / "jobs").glob("*.py")) == sorted(JOBS)


def test_train_job_forwards_its_arguments(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"),
         "--config", str(ROOT / "configs" / "digits_wgcn.yaml"),
         "--set", "train.iterations=7", "--set", "langevin.step_size=0.05", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = yaml.safe_load(done.stdout)
    assert resolved["train"]["iterations"] == 7 and resolved["langevin"]["step_size"] == 0.05
