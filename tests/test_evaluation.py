"""`debm evaluate`: the scores move as they should on real digits, and the command reports and
logs what it scored (feature network, sample count, fresh, bank or a file of samples)."""

import argparse
import dataclasses
import importlib
import json
import math
import shutil

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.cli import evaluate
from distributed_ebm.config import ConfigError, DataConfig, load_config
from distributed_ebm.data import load_dataset
from distributed_ebm.evaluation import inpainting_report
from distributed_ebm.metrics.classifier import cached_classifier, classifier_key
from distributed_ebm.metrics.generative import (
    FIDELITY_WEIGHTS,
    TORCHVISION_WEIGHTS,
    ClassifierFeatures,
    find_inception_weights,
    frechet_inception_distance,
    generative_scores,
    load_inception,
    manifold_scores,
)
from distributed_ebm.train_loop import train
from tests.test_train import CONFIGS

EPOCHS = 5  # the feature classifier's epochs: ~0.97 training accuracy on digits in ~2 s
TINY = {
    "train.iterations": 4,
    "train.data_batch_size": 16,
    "train.sample_every": 4,
    "train.checkpoint_every": 4,
    "chains.bank_size": 16,
    "chains.batch_size": 16,
    "langevin.langevin_steps": 3,
    "model.channels": [8, 16],
    "tracking.registered_model": "eval-tiny",
    "name": "eval-tiny",
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def network(digits, cache_dir):
    classifier, info = cached_classifier(digits, DataConfig(), epochs=EPOCHS, cache_dir=cache_dir)
    assert not info["reused"] and info["train_accuracy"] > 0.9
    return ClassifierFeatures(classifier, info)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-iteration wGCN on digits, tracked in MLflow and registered as 'eval-tiny'; the module
    runs in a temporary folder so that MLflow artifacts stay out of the checkout."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        config = load_config(CONFIGS / "digits_wgcn.yaml", TINY)
        summary = train(config, root / "run", progress=False)
        assert summary["model_uri"] == "models:/eval-tiny/1"
        yield root / "run", summary


def _evaluate(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", *map(str, argv)])
    assert evaluate.run(args) == 0
    return args


def _scores(fake, real, network, labels=None):
    return generative_scores(
        fake, real, network, real_labels=labels, num_classes=10, kid_subsets=10
    )


def test_fid_is_zero_against_itself_and_grows_with_noise(digits, network):
    real = digits.x
    fids = [frechet_inception_distance(real, real, network)]
    gen = torch.Generator().manual_seed(0)
    for std in (0.1, 0.2, 0.4, 0.8):
        fids.append(
            frechet_inception_distance(
                (real + std * torch.randn(real.shape, generator=gen)).clamp(-1, 1), real, network
            )
        )
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_manifold_scores_follow_their_definitions():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k = 1: every real ball has radius 1
    fake = torch.tensor([[0.5], [10.0]])  # fake balls: radius 9.5
    scores = manifold_scores(real, fake, k=1)
    assert scores["precision"] == 0.5  # 0.5 lies in the balls of 0 and 1; 10 in none
    assert scores["recall"] == 1.0  # every real point lies within 9.5 of 0.5
    assert scores["density"] == 1.0  # (2 balls + 0 balls) / (k · 2 samples)
    assert scores["coverage"] == 0.5 and scores["covered"].tolist() == [True, True, False, False]


def test_mode_dropping_and_blur_move_the_scores_apart(digits, network):
    """Held-out digits score as a near-perfect generator; half the classes lower recall and
    coverage (not precision); blur lowers precision and density."""
    real, fake, labels, fake_labels = digits.x[0::2], digits.x[1::2], digits.y[0::2], digits.y[1::2]
    base = _scores(fake, real, network)["scores"]
    half_report = _scores(fake[fake_labels < 5], real, network, labels)
    half = half_report["scores"]
    blurred = F.avg_pool2d(F.pad(fake, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = _scores(blurred, real, network)["scores"]

    assert (
        min(base["precision"], base["recall"], base["coverage"]) > 0.9
        and 0.8 < base["density"] < 1.25
    )
    assert half["recall"] < base["recall"] - 0.3 and half["coverage"] < base["coverage"] - 0.3
    assert half["precision"] > base["precision"] - 0.05 and half["density"] > 0.8 * base["density"]
    assert blur["precision"] < base["precision"] - 0.3 and blur["density"] < 0.5 * base["density"]
    assert base["fid"] < min(half["fid"], blur["fid"]) and base["kid_mean"] < min(
        half["kid_mean"], blur["kid_mean"]
    )
    assert half["is_mean"] < base["is_mean"] - 2  # five classes instead of ten

    coverage = half_report["class_coverage"]
    assert max(coverage[str(c)] for c in range(5, 10)) < 0.15  # the removed classes
    assert min(coverage[str(c)] for c in range(5)) > 0.85


def test_classifier_cache_is_keyed_by_data_and_settings(digits, network, cache_dir):
    again, info = cached_classifier(digits, DataConfig(), epochs=EPOCHS, cache_dir=cache_dir)
    assert info["reused"] and info["hash"] == network.info["hash"]
    assert torch.equal(again.embed(digits.x[:20]), network.classifier.embed(digits.x[:20]))
    key = classifier_key(DataConfig(), epochs=EPOCHS, seed=0, lr=3e-3)
    assert key == network.info["hash"]
    assert key != classifier_key(DataConfig(), epochs=EPOCHS + 1, seed=0, lr=3e-3)
    assert key != classifier_key(DataConfig(num_images=100), epochs=EPOCHS, seed=0, lr=3e-3)
    # a data key added later, at its default, keeps the name of a cached classifier
    later = dataclasses.make_dataclass("Later", [("added_key", int, dataclasses.field(default=3))],
                                       bases=(DataConfig,), frozen=True)
    assert classifier_key(later(), epochs=EPOCHS, seed=0, lr=3e-3) == key
    assert classifier_key(later(added_key=4), epochs=EPOCHS, seed=0, lr=3e-3) != key


def test_evaluate_run_dir_reports_fresh_and_bank_samples_and_logs_to_the_run(
    tiny_run, network, cache_dir
):
    run, summary = tiny_run
    common = [
        "--run-dir",
        run,
        "--classifier-epochs",
        EPOCHS,
        "--cache-dir",
        cache_dir,
        "--kid-subsets",
        5,
    ]
    _evaluate(*common, "--num", 40, "--steps", 3)
    report = json.loads((run / "evaluation" / "generation.json").read_text())
    assert report["samples"]["source"] == "fresh" and report["samples"]["num"] == 40
    assert report["samples"]["langevin_steps"] == 3 and report["reference"]["num"] == 40
    described = report["feature_network"]
    assert (
        described["name"].startswith("SmallClassifier")
        and described["hash"] == network.info["hash"]
    )
    assert described["reused"]  # the classifier cached by the fixture, found by its hash
    scores = report["scores"]
    assert set(scores) == {
        "fid",
        "kid_mean",
        "kid_std",
        "is_mean",
        "is_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "response_distance",
    }
    assert scores["fid"] > 0 and 1 <= scores["is_mean"] <= 10 and scores["response_distance"] > 0
    assert len(report["class_coverage"]) == 10
    assert math.isclose(sum(report["generated_class_share"].values()), 1.0)

    _evaluate(*common, "--num", 16, "--from-bank")
    bank = json.loads((run / "evaluation" / "generation-bank.json").read_text())
    assert bank["samples"]["source"] == "bank" and bank["samples"]["num"] == 16

    logged = mlflow.MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"]).data
    assert logged.metrics["eval/fid"] == pytest.approx(scores["fid"])
    assert logged.metrics["eval/bank/fid"] == pytest.approx(bank["scores"]["fid"])
    assert logged.metrics["eval/class_coverage/3"] == pytest.approx(report["class_coverage"]["3"])
    assert logged.tags["eval.generation.samples"] == "40 fresh"
    assert logged.tags["eval.bank.generation.samples"] == "16 bank"
    assert report["feature_network"]["hash"] in logged.tags["eval.generation.feature_network"]


def test_evaluate_model_uri_scores_inpainting_in_a_new_run(tiny_run, cache_dir, tmp_path):
    _evaluate(
        "--model",
        "models:/eval-tiny/latest",
        "--inpainting",
        "--num",
        12,
        "--steps",
        3,
        "--average",
        2,
        "--classifier-epochs",
        EPOCHS,
        "--cache-dir",
        cache_dir,
        "--out",
        tmp_path / "inpaint.json",
    )
    report = json.loads((tmp_path / "inpaint.json").read_text())
    assert (
        report["model"]["model_uri"] == "models:/eval-tiny/latest"
        and report["samples"]["num"] == 12
    )
    assert report["samples"]["average"] == 2 and report["samples"]["estimate"].startswith("posterior mean")
    assert set(report["masks"]) == {"square", "spots", "combined"}
    for kind, scores in report["masks"].items():
        assert {"mse", "psnr", "ssim", "fid", "missing_mse", "missing_psnr", "missing_ssim"} <= set(scores)
        assert scores["mse"] > 0 and scores["fid"] >= 0
        assert set(report["baseline"]["masks"][kind]) == set(scores)
    client = mlflow.MlflowClient(report["mlflow"]["uri"])
    logged = client.get_run(report["mlflow"]["run_id"])
    assert client.get_experiment(logged.info.experiment_id).name == "debm-evaluate"
    assert logged.data.tags["debm_model_uri"] == "models:/eval-tiny/latest"
    # averaged restorations are filed apart from single ones (their errors are about half)
    assert logged.data.metrics["eval/inpainting-mean2/square/fid"] == pytest.approx(
        report["masks"]["square"]["fid"]
    )
    assert logged.data.metrics["eval/inpainting-mean2/baseline/spots/missing_psnr"] == pytest.approx(
        report["baseline"]["masks"]["spots"]["missing_psnr"]
    )
    assert not any(k.startswith("eval/inpainting/") for k in logged.data.metrics)
    assert "eval.inpainting-mean2.samples" in logged.data.tags


def test_single_restorations_file_under_inpainting_and_average_needs_inpainting():
    from distributed_ebm.tracking import evaluation_metrics, report_name

    report = {"task": "inpainting", "samples": {"source": "inpainting", "average": 1},
              "masks": {"square": {"mse": 0.5, "ssim_window": 7}}, "baseline": {"masks": {"square": {"mse": 0.7}}}}
    assert report_name(report) == "inpainting"
    assert evaluation_metrics(report) == {"eval/inpainting/square/mse": 0.5, "eval/inpainting/baseline/square/mse": 0.7}
    report["samples"]["average"] = 8
    assert set(evaluation_metrics(report)) == {"eval/inpainting-mean8/square/mse", "eval/inpainting-mean8/baseline/square/mse"}
    with pytest.raises(ConfigError, match="--average K averages inpainting restorations: use it with --inpainting"):
        _evaluate("--run-dir", "nowhere", "--average", 4, "--no-mlflow")
    with pytest.raises(ConfigError, match="--average must be ≥ 1"):
        _evaluate("--run-dir", "nowhere", "--inpainting", "--average", 0, "--no-mlflow")


def test_identity_restoration_scores_zero_error(digits, network):
    images = digits.x[:40]
    masks, baseline = inpainting_report(lambda x, missing: x.clone(), images, network)
    assert set(masks) == set(baseline) == {"square", "spots", "combined"}
    for kind, scores in masks.items():
        assert (
            scores["mse"] == scores["missing_mse"] == 0
            and scores["psnr"] == scores["missing_psnr"] == math.inf
            and scores["ssim"] == pytest.approx(1.0)
            and scores["missing_ssim"] == pytest.approx(1.0)
        )
        assert abs(scores["fid"]) < 1e-3
        # the baseline only interpolates: it errs on the hole and nowhere else
        assert baseline[kind]["missing_mse"] > baseline[kind]["mse"] > 0


def test_inception_without_weights_names_the_file_to_provide(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    run, _ = tiny_run
    with pytest.raises(
        ConfigError, match=rf"{FIDELITY_WEIGHTS}.*{TORCHVISION_WEIGHTS}.*--inception-weights"
    ):
        _evaluate("--run-dir", run, "--features", "inception", "--no-mlflow")
    missing = tmp_path / "inception.pth"
    with pytest.raises(ConfigError, match=f"'{missing}' does not exist"):
        _evaluate(
            "--run-dir",
            run,
            "--features",
            "inception",
            "--inception-weights",
            missing,
            "--no-mlflow",
        )


def test_inception_weights_are_read_from_the_hub_cache(monkeypatch, tmp_path):
    from torchvision.models import inception_v3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = tmp_path / "hub" / "checkpoints" / TORCHVISION_WEIGHTS
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights
    )
    assert find_inception_weights(None) == weights
    network = load_inception()
    features, logits = network.embed(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert features.shape == (2, 2048) and logits.shape == (2, 1000)
    assert network.describe()["weights"] == str(weights) and len(network.describe()["sha256"]) == 16


def test_results_script_puts_our_numbers_beside_the_papers(
    cache_dir, network, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(CONFIGS.parent / "scripts"))
    results = importlib.import_module("results")
    out = tmp_path / "results.md"
    assert (
        results.main(
            [
                "--datasets",
                "digits",
                "--only",
                "wGCN",
                "GGCN+AMS",
                "--iterations",
                "2",
                "--samples",
                "24",
                "--inpaint-images",
                "8",
                "--steps",
                "2",
                "--classifier-epochs",
                str(EPOCHS),
                "--cache-dir",
                str(cache_dir),
                "--set",
                "model.channels=[8]",
                "generator.base_width=4",
                "--runs",
                str(tmp_path / "runs"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    page = out.read_text()
    rows = [line for line in page.splitlines() if line.startswith("| digits |")]
    assert [r.split(" | ")[1] for r in rows[:3]] == [
        "real data (two halves, 24 each)",
        "wGCN",
        "GGCN+AMS",
    ]
    assert (
        "| 24 fresh |" in rows[1] and "| 4.31 ± 0.12 |" in rows[1] and "| 6.79 ± 0.08 |" in rows[2]
    )
    inpainting = rows[3:]
    assert [r.split(" | ")[1:3] for r in inpainting] == [
        [f"{m} ({method})", mask]
        for m, method in (("wGCN", "langevin"), ("GGCN+AMS", "generator"))
        for mask in ("square", "spots", "combined")
    ]
    assert "| Spot | 0.0033 | 25.44 | 0.954 | 30.410 |" in inpainting[1]
    assert (
        network.info["hash"] in page and "no value of ours" in page
    )  # names the network; says what is not comparable


def test_unreachable_training_store_falls_back_to_a_new_run(tiny_run, cache_dir, tmp_path, caplog):
    run, summary = tiny_run
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    gone = {**summary, "mlflow_uri": f"sqlite:///{tmp_path / 'gone.db'}"}
    (moved / "summary.json").write_text(json.dumps(gone))
    _evaluate(
        "--run-dir",
        moved,
        "--num",
        24,
        "--steps",
        2,
        "--classifier-epochs",
        EPOCHS,
        "--cache-dir",
        cache_dir,
        "--kid-subsets",
        5,
    )
    report = json.loads((moved / "evaluation" / "generation.json").read_text())
    assert report["mlflow"]["logged_to"] == "new run in experiment 'debm-evaluate'"
    assert report["mlflow"]["run_id"] != summary["mlflow_run_id"] and "is not here" in caplog.text
    assert not (tmp_path / "gone.db").exists()  # the missing store was not created empty
    tags = (
        mlflow.MlflowClient(report["mlflow"]["uri"]).get_run(report["mlflow"]["run_id"]).data.tags
    )
    assert tags["debm_run_dir"] == str(moved.resolve())


# ----------------------------------------------------------------------------- --samples FILE.npz


def _score_file(path, cache_dir, *extra) -> dict:
    out = path.with_suffix(".json")
    _evaluate("--samples", path, "--data", "digits", "--classifier-epochs", EPOCHS,
              "--cache-dir", cache_dir, "--kid-subsets", 5, "--out", out, *extra)  # fmt: skip
    return json.loads(out.read_text())


def test_samples_file_of_real_digits_scores_like_real_data(digits, network, cache_dir, tmp_path):
    """Held-out digits saved as another system's samples score as real data does, in the same
    feature space, as floats (N, C, H, W) and as uint8 (N, H, W, C); noise scores far worse."""
    held_out, labels = digits.x[1::2], digits.y[1::2]
    floats = tmp_path / "real.npz"
    np.savez(floats, samples=held_out.numpy(), labels=labels.numpy())
    report = _score_file(floats, cache_dir, "--no-mlflow")
    assert report["task"] == "generation" and report["samples"]["source"] == "file"
    assert report["samples"]["num"] == len(held_out) and report["samples"]["layout"] == "NCHW"
    assert report["model"]["samples_file"] == str(floats.resolve()) and report["model"]["sha256"]
    assert report["feature_network"]["hash"] == network.info["hash"]  # the same feature space
    assert report["reference"]["num"] == len(held_out)  # as many reference images as samples

    real_vs_real = _scores(held_out, digits.x[0::2], network)["scores"]
    scores = report["scores"]
    assert scores["fid"] < 1.5 * real_vs_real["fid"] + 0.5, (scores["fid"], real_vs_real["fid"])
    for key in ("precision", "recall", "coverage"):
        assert scores[key] > real_vs_real[key] - 0.05, key
    assert report["label_agreement"] > 0.9  # the classifier agrees with the file's labels

    pixels = ((held_out + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, H, W, 1)
    as_uint8 = tmp_path / "real_uint8.npz"
    np.savez(as_uint8, samples=pixels.numpy())
    quantised = _score_file(as_uint8, cache_dir, "--no-mlflow")
    assert quantised["samples"]["layout"] == "NHWC" and "label_agreement" not in quantised
    assert quantised["scores"]["fid"] == pytest.approx(scores["fid"], rel=0.2, abs=0.2)

    noise = tmp_path / "noise.npz"
    np.savez(noise, samples=torch.rand(200, 1, 8, 8).mul(2).sub(1).numpy())
    assert _score_file(noise, cache_dir, "--no-mlflow")["scores"]["fid"] > 10 * scores["fid"] + 1


def test_samples_file_is_logged_to_a_new_mlflow_run(digits, cache_dir, tmp_path):
    path = tmp_path / "first.npz"
    np.savez(path, samples=digits.x[:64].numpy(), labels=digits.y[:64].numpy())
    report = _score_file(path, cache_dir, "--num", 40)
    assert report["samples"]["num"] == 40 and report["samples"]["of"] == 64
    client = mlflow.MlflowClient(report["mlflow"]["uri"])
    logged = client.get_run(report["mlflow"]["run_id"])
    assert client.get_experiment(logged.info.experiment_id).name == "debm-evaluate"
    assert logged.data.tags["debm_samples_file"] == str(path.resolve())
    assert logged.data.tags["eval.generation.samples"] == "40 file"
    assert logged.data.metrics["eval/fid"] == pytest.approx(report["scores"]["fid"])
    assert logged.data.metrics["eval/label_agreement"] == pytest.approx(report["label_agreement"])


# (arrays saved in the .npz, fragments of the ConfigError: the cause and the fix)
BAD_FILES = {
    "missing key": (
        {"x": np.zeros((20, 1, 8, 8), np.float32)},
        ["holds the arrays ['x'] but no 'samples'", "numpy.savez(PATH, samples=images)"],
    ),
    "wrong channels": (
        {"samples": np.zeros((20, 8, 8, 3), np.uint8)},
        ["samples are RGB (3 channels)", "images of the reference data 'digits' have 1 channel(s)",
         "data.grayscale=false"],
    ),
    "wrong side": (
        {"samples": np.zeros((20, 1, 16, 16), np.float32)},
        ["samples are 16×16 pixels", "'digits' are 8×8", "Resize the samples to 8×8",
         "data.image_size=16"],
    ),
    "wrong layout": (
        {"samples": np.zeros((20, 64), np.float32)},
        ["has shape (20, 64)", "expected (N, C, H, W), (N, H, W, C) or (N, H, W)"],
    ),
    "wrong range": (
        {"samples": np.full((20, 1, 8, 8), 200.0, np.float32)},
        ["span [200, 200]", "floats in [-1, 1] or uint8 in [0, 255]", "x / 127.5 - 1"],
    ),
    "NaN": (
        {"samples": np.where(np.arange(20)[:, None, None, None] == 3, np.nan,
                             np.zeros((20, 1, 8, 8), np.float32))},
        ["1 of 20 samples hold NaN or infinite values", "Drop or redraw"],
    ),
    "integer dtype": (
        {"samples": np.zeros((20, 1, 8, 8), np.int64)},
        ["dtype int64", "astype(numpy.uint8)"],
    ),
    "labels out of range": (
        {"samples": np.zeros((20, 1, 8, 8), np.float32), "labels": np.full(20, 12)},
        ["'labels' spans 12 … 12", "classes 0 … 9"],
    ),
    "too few": (
        {"samples": np.zeros((3, 1, 8, 8), np.float32)},
        ["holds 3 sample(s)", "at least 6"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_samples_file_that_does_not_fit_names_the_cause_and_the_fix(case, tmp_path):
    arrays, fragments = BAD_FILES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError) as raised:
        _evaluate("--samples", path, "--data", "digits", "--no-mlflow", "--out", tmp_path / "r.json")
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert not (tmp_path / "r.json").exists()


def test_samples_file_needs_reference_data_and_no_model_options(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, samples=np.zeros((20, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="--samples needs the data set to compare with: --data"):
        _evaluate("--samples", path, "--no-mlflow")
    with pytest.raises(ConfigError, match="--samples scores the file's images as they are"):
        _evaluate("--samples", path, "--data", "digits", "--inpainting", "--no-mlflow")
    with pytest.raises(ConfigError, match="does not exist"):
        _evaluate("--samples", tmp_path / "none.npz", "--data", "digits", "--no-mlflow")
