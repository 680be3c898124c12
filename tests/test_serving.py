"""Serving: the pyfunc's answers and request checks (in process), then `debm serve` over HTTP.

One tiny conditional GGCN is trained with MLflow tracking on (so that it is registered) and
given the `champion` alias; one scoring server is started for the whole module.
"""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from distributed_ebm.cli.serve import check_model, check_port, start_server, stop_server
from distributed_ebm.config import ConfigError, DataConfig, load_config
from distributed_ebm.data import load_dataset
from distributed_ebm.inference import load_run
from distributed_ebm.serving import EBMModel, InvalidRequest, png_base64
from distributed_ebm.train_loop import train
from tests.test_train import CONFIGS

NAME = "serving-test-ggcn"
# conftest's tiny_overrides (function-scoped there), for module-scoped runs.
TINY = {
    "train.iterations": 4, "train.data_batch_size": 16, "train.sample_every": 4,
    "train.checkpoint_every": 4, "chains.bank_size": 16, "chains.batch_size": 16,
    "langevin.langevin_steps": 3, "langevin.sample_steps": 3, "model.channels": [8, 16],
    "tracking.enabled": False,
}  # fmt: skip
TINY_GGCN = {
    **TINY, "model.conditional": True, "generator.base_width": 4, "generator.latent_dim": 8,
    "generator.latent_bank_size": 16, "tracking.enabled": True, "tracking.registered_model": NAME,
}  # fmt: skip
BLANK = [[0.0] * 8] * 8  # one 8×8 image (or mask) as nested lists

# (request rows, fragments its 400 message must hold: the problem and the fix)
INVALID = [
    ({"n": 1000}, ["'n' must be between 1 and 256, got 1000", "at most 256 images"]),
    ({"n": "four"}, ["'n' must be an integer, got 'four'", "JSON number"]),
    ({"n": 2.5}, ["'n' must be an integer, got 2.5"]),
    ({"n": 2, "steps": -1}, ["'steps' must be between 0 and 2000, got -1"]),
    ({"n": 2, "label": 10}, ["'label' must be between 0 and 9, got 10", "classes 0 … 9"]),
    ({"task": "paint"}, ["Unknown task 'paint'", "sample, inpaint, interpolate"]),
    ({"task": "sample", "num": 3}, ["Unknown field 'num' for task 'sample'", "Did you mean 'n'?"]),
    ({"n": 2, "return": "jpeg"}, ["'return' must be one of png, array, both; got 'jpeg'"]),
    ([{"n": 200}, {"n": 200}], ["asks for 400 images in all", "split it into several requests"]),
    (
        {"task": "inpaint", "images": [[[0.0] * 7] * 7], "masks": "square", "label": 1},
        ["image 0 has shape (1, 7, 7)", "takes images of shape (1, 8, 8)", "resize to 8×8"],
    ),
    (
        {"task": "inpaint", "images": [BLANK], "masks": [[[0] * 7] * 8], "label": 1},
        ["mask 0 has shape (1, 8, 7)", "send masks of shape (8, 8)"],
    ),
    (
        {"task": "inpaint", "images": [BLANK], "masks": "square", "label": 1, "average": 0},
        ["'average' must be between 1 and 16, got 0"],
    ),
    (
        {"task": "inpaint", "images": [BLANK] * 20, "masks": "square", "label": 1, "average": 16},
        ["20 images × average 16 is 320 restorations", "at most 256 per request"],
    ),
    (
        {"task": "inpaint", "images": [BLANK, BLANK], "masks": [BLANK], "label": 1},
        ["'masks' holds 1 masks for 2 images", "one mask per image"],
    ),
    (
        {"task": "inpaint", "images": [[[3.0] * 8] * 8], "masks": "square", "label": 1},
        ["image 0 has values outside [-1, 1]", "scale pixels"],
    ),
    (
        {"task": "inpaint", "images": ["not a png"], "masks": "square", "label": 1},
        ["image 0 is a string but not a base64-encoded PNG"],
    ),
    (
        {"task": "inpaint", "images": [[["a"] * 8] * 8], "masks": "square", "label": 1},
        ["image 0 is not numeric"],
    ),
    (
        {"task": "inpaint", "images": [BLANK], "masks": "square"},
        ["class-conditional: give 'label' (0 … 9)"],
    ),
    (
        {"task": "interpolate", "rows": 30, "midpoints": 8},
        ["rows × (midpoints + 2) = 300 images", "at most 256"],
    ),
]


def _records(request) -> list[dict]:
    return request if isinstance(request, list) else [request]


def _png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def _digits(num: int) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(DataConfig(source="digits"))
    return data.x[:num].numpy(), data.y[:num].numpy()


@pytest.fixture(scope="module")
def ggcn_run(tmp_path_factory, mlflow_store):
    """A tiny conditional GGCN, registered as NAME with the alias `champion`."""
    root = tmp_path_factory.mktemp("serving")
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    # Artifacts (the logged model) in the temporary folder, not in ./mlruns of the checkout.
    client.create_experiment(NAME, artifact_location=(root / "artifacts").as_uri())
    config = load_config(CONFIGS / "digits_ggcn.yaml", {**TINY_GGCN, "tracking.experiment": NAME})
    summary = train(config, root / "ggcn", progress=False)
    version = summary["model_uri"].rsplit("/", 1)[1]
    client.set_registered_model_alias(NAME, "champion", version)
    return root / "ggcn"


@pytest.fixture(scope="module")
def served(ggcn_run):
    """The registered model as MLflow loads it (load_context from the registry)."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def _untracked(tmp_path_factory, preset: str, overrides: dict) -> EBMModel:
    run_dir = tmp_path_factory.mktemp("serving") / preset
    config = load_config(CONFIGS / preset, {**TINY, **overrides})
    train(config, run_dir, progress=False)
    model = EBMModel()
    model.model = load_run(run_dir)
    return model


@pytest.fixture(scope="module")
def wgcn(tmp_path_factory):
    """A tiny unconditional wGCN (no generator), wrapped without the registry."""
    return _untracked(tmp_path_factory, "digits_wgcn.yaml", {})


@pytest.fixture(scope="module")
def ring8(tmp_path_factory):
    """A tiny wGCN on 2-D points: its samples are vectors, not images."""
    return _untracked(tmp_path_factory, "ring8_wgcn.yaml", {"model.channels": [16]})


# ----------------------------------------------------------------------------- in process


def test_sample_answers_arrays_and_pngs_of_the_trained_model(served, ggcn_run):
    answer = served.predict(pd.DataFrame([{"task": "sample", "n": 3, "seed": 5, "label": 2,
                                           "return": "both"}]))  # fmt: skip
    assert list(answer["request"]) == [0, 0, 0] and list(answer["index"]) == [0, 1, 2]
    assert list(answer["label"]) == [2, 2, 2] and list(answer["task"]) == ["sample"] * 3
    arrays = np.array(list(answer["array"]), dtype=np.float32)
    expected = load_run(ggcn_run).sample(3, seed=5, label=2).numpy()
    np.testing.assert_allclose(arrays, expected, atol=1e-6)
    for text, array in zip(answer["image"], arrays):
        image = _png(text)
        assert image.size == (8, 8) and image.mode == "L"
        pixels = np.asarray(image).astype(np.float32)
        np.testing.assert_allclose(pixels, np.round((array[0] + 1) * 127.5), atol=1)


def test_default_task_is_sample_with_pngs_only_and_labels_cycling(served):
    answer = served.predict(pd.DataFrame([{"n": 12}]))
    assert len(answer) == 12 and list(answer["label"]) == [i % 10 for i in range(12)]
    assert answer["array"].isna().all() and all(_png(t).size == (8, 8) for t in answer["image"])


def test_inpaint_keeps_observed_pixels_for_arrays_pngs_and_mask_kinds(served):
    images, labels = _digits(3)
    missing = np.zeros((3, 8, 8), dtype=np.float32)
    missing[:, 2:6, 2:6] = 1
    requests_ = [
        {"task": "inpaint", "images": images.tolist(), "masks": missing.tolist(),
         "label": labels.tolist(), "return": "array", "seed": 1},
        {"task": "inpaint", "images": [png_base64(x) for x in images], "masks": "square",
         "label": int(labels[0]), "return": "array", "method": "generator", "steps": 2, "average": 2},
    ]  # fmt: skip
    answer = served.predict(pd.DataFrame(requests_))
    assert list(answer["request"]) == [0, 0, 0, 1, 1, 1]
    restored = np.array(list(answer["array"]), dtype=np.float32)
    observed = missing[:, None] == 0
    np.testing.assert_allclose(restored[:3][observed], images[observed], atol=1e-6)
    assert not np.allclose(restored[:3][~observed], images[~observed])  # the hole was filled
    # PNG input is quantised to 256 levels; the square mask is the centred 4×4 block as above.
    quantised = np.round((images + 1) * 127.5) / 127.5 - 1
    np.testing.assert_allclose(restored[3:][observed], quantised[observed], atol=1e-6)
    assert list(answer["label"]) == labels.tolist() + [int(labels[0])] * 3


def test_interpolate_rows_positions_and_values(served, ggcn_run):
    answer = served.predict(pd.DataFrame([{"task": "interpolate", "rows": 2, "midpoints": 3,
                                           "label": 4, "return": "array", "seed": 2}]))  # fmt: skip
    assert list(answer["position"]) == [[r, c] for r in range(2) for c in range(5)]
    expected = load_run(ggcn_run).interpolate(2, 3, seed=2, label=4).flatten(0, 1).numpy()
    np.testing.assert_allclose(np.array(list(answer["array"])), expected, atol=1e-6)


@pytest.mark.parametrize(("request_", "fragments"), INVALID)
def test_invalid_requests_name_the_problem_and_the_fix(served, request_, fragments):
    with pytest.raises(InvalidRequest) as raised:
        served.predict(pd.DataFrame(_records(request_)))
    assert raised.value.get_http_status_code() == 400
    for fragment in fragments:
        assert fragment in raised.value.message


def test_models_without_generator_or_classes_refuse_what_they_cannot_do(wgcn):
    with pytest.raises(
        InvalidRequest, match="Interpolation needs a GGCN model.*'wgcn'.*task 'sample'"
    ):
        wgcn.predict(None, pd.DataFrame([{"task": "interpolate"}]))
    with pytest.raises(InvalidRequest, match="not class-conditional: drop 'label'"):
        wgcn.predict(None, pd.DataFrame([{"n": 2, "label": 1}]))
    with pytest.raises(InvalidRequest, match="method 'generator' needs a GGCN model"):
        wgcn.predict(
            None, {"task": "inpaint", "images": [BLANK], "masks": "spots", "method": "generator"}
        )
    answer = wgcn.predict(None, {"task": "inpaint", "images": [BLANK], "masks": "spots"})
    assert len(answer) == 1 and answer["label"][0] is None


def test_vector_models_answer_arrays_and_refuse_pngs(ring8):
    answer = ring8.predict(None, [{"n": 5, "seed": 0}])
    assert list(answer["shape"]) == [[2]] * 5 and answer["image"].isna().all()
    expected = ring8.model.sample(5, seed=0).numpy()
    np.testing.assert_allclose(np.array(list(answer["array"])), expected, atol=1e-6)
    with pytest.raises(
        InvalidRequest, match='vectors of shape \\(2,\\), not images: ask for "return": "array"'
    ):
        ring8.predict(None, [{"n": 5, "return": "png"}])
    with pytest.raises(InvalidRequest, match="Inpainting needs an image model"):
        ring8.predict(None, [{"task": "inpaint", "images": [[0.0, 0.0]], "masks": [[1, 0]]}])


def test_check_model_resolves_the_alias_and_names_the_fix_for_a_missing_one(ggcn_run):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    version = mlflow.MlflowClient(uri).get_model_version_by_alias(NAME, "champion").version
    assert (
        check_model(f"models:/{NAME}@champion", uri) == f"{NAME} version {version} (alias champion)"
    )
    with pytest.raises(
        ConfigError, match=r"set_registered_model_alias\('serving-test-ggcn', 'best', VERSION\)"
    ):
        check_model(f"models:/{NAME}@best", uri)
    with pytest.raises(
        ConfigError, match="Cannot load model models:/no-such-model/1.*--tracking-uri"
    ):
        check_model("models:/no-such-model/1", uri)


def test_check_port_refuses_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"Cannot listen on 127.0.0.1:{port}.*another --port"):
            check_port("127.0.0.1", port)


def test_stop_server_ends_the_whole_process_group():
    process = start_server(["bash", "-c", "sleep 120 & sleep 120 & wait"], "sqlite:///unused.db")
    time.sleep(0.5)
    stop_server(process, grace_s=5)
    assert process.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 10  # the two background sleeps end too (once reaped by init)
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.1)


# ----------------------------------------------------------------------------- over HTTP

SERVE = """
import argparse, sys
from distributed_ebm.cli.serve import add_parser, run
parser = argparse.ArgumentParser(prog="debm")
add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["serve", *sys.argv[1:]])
sys.exit(run(args))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(ggcn_run, tmp_path_factory):
    """`debm serve --model models:/NAME@champion` on a free loopback port; its stdout lines."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    command = [
        sys.executable,
        "-c",
        SERVE,
        "--model",
        f"models:/{NAME}@champion",
        "--port",
        str(port),
    ]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   start_new_session=True)  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Tasks:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout=240):
            pytest.fail(
                f"debm serve did not start: {''.join(lines)[-2000:]}{log.read_text()[-3000:]}"
            )
        yield f"http://127.0.0.1:{port}", lines
    finally:
        stop_server(process)  # debm serve, the MLflow CLI and uvicorn share this process group


def _post(url: str, records: list[dict]) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=120)


def test_debm_serve_prints_the_url_and_an_example_request(server):
    url, lines = server
    text = "".join(lines)
    assert f"Serving {NAME} version" in text and f"(alias champion) at {url}/invocations" in text
    example = next(line for line in lines if line.startswith("Example request: "))
    assert f"curl -s {url}/invocations" in example and '"dataframe_records"' in example


def test_http_sample_returns_pngs_equal_to_the_in_process_answer(server, served):
    url, _ = server
    records = [{"task": "sample", "n": 4, "seed": 3, "label": 7, "return": "both"}]
    response = _post(url, records)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 4 and {p["label"] for p in predictions} == {7}
    for prediction in predictions:
        image = _png(prediction["image"])
        assert image.size == (8, 8) and image.mode == "L" and prediction["shape"] == [1, 8, 8]
    local = served.predict(pd.DataFrame(records))
    np.testing.assert_allclose(np.array([p["array"] for p in predictions]),
                               np.array(list(local["array"])), atol=1e-5)  # fmt: skip


def test_http_inpaint_and_interpolate(server):
    url, _ = server
    images, labels = _digits(2)
    response = _post(url, [
        {"task": "inpaint", "images": [png_base64(x) for x in images], "masks": "combined",
         "label": labels.tolist(), "seed": 4},
        {"task": "interpolate", "rows": 1, "midpoints": 2, "label": 0},
    ])  # fmt: skip
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [(p["request"], p["task"]) for p in predictions] == [(0, "inpaint")] * 2 + [
        (1, "interpolate")
    ] * 4
    assert [p["position"] for p in predictions[2:]] == [[0, c] for c in range(4)]
    assert all(_png(p["image"]).size == (8, 8) for p in predictions)


def test_http_invalid_requests_get_400_with_the_message_and_the_server_stays_up(server):
    url, _ = server
    for request_, fragments in INVALID:
        response = _post(url, _records(request_))
        assert response.status_code == 400, (request_, response.text[:500])
        body = response.json()
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        for fragment in fragments:
            assert fragment in body["message"], (fragment, body["message"][-500:])
    broken = requests.post(f"{url}/invocations", data="{not json", timeout=30,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert broken.status_code == 400
    response = _post(url, [{"n": 1}])
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1


def test_same_seed_same_images_over_http(server):
    url, _ = server
    first, second = (_post(url, [{"n": 2, "seed": 9, "return": "array"}]).json() for _ in range(2))
    assert first == second
    assert torch.tensor([p["array"] for p in first["predictions"]]).shape == (2, 1, 8, 8)
