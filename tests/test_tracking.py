"""MLflow tracking: params, metrics stepped by images seen, artifacts, a registered pyfunc model."""

import base64
import io
import os

import mlflow
import pandas as pd
import pytest
from PIL import Image

from distributed_ebm.cli import main
from distributed_ebm.config import ConfigError, load_config
from distributed_ebm.tracking import check_tracking, fluent_tracking_uri
from distributed_ebm.trainer import train_distributed
from tests.test_train import CONFIGS, _sets


def test_run_is_tracked_and_registered(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    overrides = {**tiny_overrides, "tracking.enabled": True, "tracking.registered_model": "digits-test",
                 "tracking.flush_every": 2}
    assert main(["train", "--config", str(CONFIGS / "digits_wgcn.yaml"), "--run-dir", str(run), *_sets(overrides)]) == 0
    out = capsys.readouterr().out
    assert "registered models:/digits-test/" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits-wgcn").experiment_id],
                              filter_string=f"tags.debm_run_dir = '{run}'")
    assert len(runs) == 1
    tracked = runs[0]
    assert tracked.data.params["langevin.step_size"] == "0.2" and tracked.data.params["model.algorithm"] == "wgcn"
    history = client.get_metric_history(tracked.info.run_id, "response_distance")
    assert [m.step for m in history] == [16 * i for i in range(1, 7)]  # step = images seen
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"samples", "curves.png", "summary.json", "config.yaml"} <= artifacts  # the model is a LoggedModel

    model = mlflow.pyfunc.load_model("models:/digits-test/latest")
    answer = model.predict(pd.DataFrame([{"n": 3, "steps": 2, "seed": 1}]))
    assert len(answer) == 3
    image = Image.open(io.BytesIO(base64.b64decode(answer["image"][0])))
    assert image.size == (8, 8)

    # Logged from code, not pickled: the model holds serving_model.py and the checkpoint, its
    # output columns and a request example; a misspelled key still reaches predict's check (an
    # input schema would have dropped it).
    files = set(os.listdir(mlflow.artifacts.download_artifacts("models:/digits-test/latest")))
    assert "serving_model.py" in files and not any(f.endswith(".pkl") for f in files), files
    assert {"input_example.json", "serving_input_example.json"} <= files
    assert model.metadata.flavors["python_function"]["model_code_path"].endswith("serving_model.py")
    assert model.metadata.signature.inputs is None
    assert model.metadata.signature.outputs.input_names() == ["request", "task", "index", "image", "array", "shape",
                                                              "label", "position"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="Unknown field 'nn'.*Did you mean 'n'"):
        model.predict(pd.DataFrame([{"nn": 3}]))


def test_unreachable_tracking_server_fails_before_workers_start(tmp_path):
    with pytest.raises(ConfigError, match=r"does not answer.*mlflow server"):
        check_tracking("http://127.0.0.1:9", timeout_s=1)
    config = load_config(CONFIGS / "digits_wgcn.yaml", {"tracking.uri": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="does not answer"):
        train_distributed(config, run_dir=tmp_path / "run", workers=2)


def test_fluent_tracking_uri_is_restored_after_the_block_even_on_error(tmp_path):
    before = mlflow.get_tracking_uri()
    inside = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(KeyError), fluent_tracking_uri(inside):
        assert mlflow.get_tracking_uri() == inside
        raise KeyError("fails inside")
    assert mlflow.get_tracking_uri() == before
