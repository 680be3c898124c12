"""`debm evaluate`: score a trained model's samples, or its inpainting, and report how.

Generation: draw FRESH samples (the persistent bank only with `from_bank`, and the report says
which), pick reference images of the data set, and score them in one feature space
(metrics/generative.py): FID, KID, IS, precision/recall, density/coverage, per-class coverage and
the generated class histogram for labelled data, plus the response distance R of training.
Inpainting (GGCN paper, Table 3): MSE, PSNR, SSIM and FID of restored images per mask type.

Every report names its feature network (and its weights file or hash), the sample count and the
sample source; it is written as JSON and its numbers are logged to MLflow as `eval/…` metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError, DataConfig, RunConfig, TrackingConfig, parse_overrides
from .data import ImageData, load_dataset
from .inference import TrainedModel, load_run
from .inpainting import MASK_KINDS, inpainting_scores, restore_each_mask
from .metrics import ResponseDistance
from .metrics.classifier import cached_classifier
from .metrics.generative import (
    ClassifierFeatures,
    FeatureNetwork,
    class_histogram,
    find_inception_weights,
    frechet_inception_distance,
    generative_scores,
    load_inception,
)

log = logging.getLogger(__name__)

EXPERIMENT = "debm-evaluate"  # MLflow experiment of evaluations that have no training run to join


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a model is scored (one field per `debm evaluate` option)."""

    num_samples: int = 1000  # generated images scored (inpainting: images masked and restored)
    num_real: int | None = None  # reference images; None: num_samples (at most the data set)
    steps: int | None = None  # Langevin steps of fresh samples; None: the algorithm's default
    from_bank: bool = False  # score states of the persistent chain bank instead of fresh samples
    seed: int = 0  # seed of the samples, the reference subset, the masks and KID/IS's subsets
    features: str = "classifier"  # feature network: a name in FEATURE_NETWORKS
    inception_weights: str | None = None  # local Inception v3 weights file (features "inception")
    classifier_epochs: int = 30  # epochs of the small classifier (features "classifier")
    cache_dir: str | None = None  # cached classifiers; None: ~/.cache/distributed_ebm/classifiers
    nearest_k: int = 5  # k of the k-NN balls of precision/recall and density/coverage
    kid_subsets: int = 100  # KID: number of random subsets
    batch_size: int = 256  # images per forward pass
    method: str = "langevin"  # inpainting: "langevin" (every model) or "generator" (GGCN)
    device: str = "cpu"


def _classifier_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    if data.y is None:
        raise ConfigError(
            f"The reference data '{data.name}' has no labels to train the feature classifier on: "
            "use --features inception --inception-weights PATH, or labelled data (--data)."
        )
    classifier, info = cached_classifier(
        data,
        data_config,
        epochs=settings.classifier_epochs,
        seed=0,  # one network per data set and epochs, whatever the evaluation's seed
        cache_dir=settings.cache_dir,
    )
    return ClassifierFeatures(classifier, info)


def _inception_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    return load_inception(settings.inception_weights)


FEATURE_NETWORKS: dict[str, Callable[[ImageData, DataConfig, EvalSettings], FeatureNetwork]] = {
    "classifier": _classifier_network,
    "inception": _inception_network,
}


def feature_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    """The feature network `settings.features` names, on `settings.device`."""
    if settings.features not in FEATURE_NETWORKS:
        raise ConfigError(
            f"Unknown feature network '{settings.features}'. "
            f"Choose one of {sorted(FEATURE_NETWORKS)}."
        )
    return FEATURE_NETWORKS[settings.features](data, data_config, settings).to(settings.device)


def reference_data(
    data_config: DataConfig, sample_shape: tuple[int, ...] | None = None
) -> tuple[ImageData, DataConfig]:
    """The reference images (labels kept wherever the source has them) and the config that built
    them; with `sample_shape`, checked against the model's image shape."""
    data_config = dataclasses.replace(data_config, labels=True)
    data = load_dataset(data_config)
    if data.x.dim() != 4:
        raise ConfigError(
            f"'{data.name}' holds vectors, not images: debm evaluate scores images "
            "(for the 2-D mixtures, count modes on the samples instead)."
        )
    if sample_shape is not None and tuple(data.x.shape[1:]) != tuple(sample_shape):
        raise ConfigError(
            f"Reference images have shape {tuple(data.x.shape[1:])}; the model makes "
            f"{tuple(sample_shape)}: pick matching data (--data, --set data.image_size=…)."
        )
    return data, data_config


def resolve_data_config(
    model: TrainedModel, source: str | None, overrides: list[str]
) -> DataConfig:
    """The model's own data config, or the source `source`; then `data.key=value` overrides."""
    raw = {"source": source} if source else dataclasses.asdict(model.config.data)
    for key, value in parse_overrides(overrides).items():
        if not key.startswith("data."):
            raise ConfigError(
                f"'{key}': debm evaluate takes only data.* overrides (the reference data)."
            )
        raw[key[len("data.") :]] = value
    return RunConfig.from_dict({"data": raw}).data


def _subset(data: ImageData, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` images of the data set (all if fewer) and their labels, drawn by `seed`."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    index = order[: min(num, len(data))]
    return data.x[index], None if data.y is None else data.y[index]


def draw_samples(model: TrainedModel, settings: EvalSettings) -> tuple[torch.Tensor, dict]:
    """`num_samples` fresh samples (or bank states) and a description of where they came from."""
    samples = model.sample(
        settings.num_samples, steps=settings.steps, seed=settings.seed, from_bank=settings.from_bank
    )
    if settings.from_bank:
        source = {
            "source": "bank",
            "what": "states of the persistent chain bank (training state, not fresh chains)",
        }
    else:
        lang = model.config.langevin
        source = {
            "source": "fresh",
            "algorithm": model.config.model.algorithm,
            "langevin_steps": settings.steps,
        }
        if settings.steps is None:
            source["langevin_steps_note"] = (
                "the algorithm's default: "
                f"langevin.sample_steps = {lang.sample_steps} for fresh chains, "
                f"L = {lang.langevin_steps} per grid (multi-grid) or after g(ζ) (GGCN)"
            )
        if model.num_classes:
            source["labels"] = f"cycling through the {model.num_classes} classes"
    source.update(num=len(samples), seed=settings.seed)
    return samples, source


def response_distance(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    seed: int = 1234,
    weights: str | None = None,
    batch_size: int = 256,
) -> tuple[float, str]:
    """R between samples and reference images on the filter bank of `seed` (or VGG `weights`),
    as in training (train.response_bank_seed, model.filter_bank); and the bank's name."""
    response = ResponseDistance(tuple(real.shape[1:]), seed=seed, weights=weights)

    def means(x: torch.Tensor) -> torch.Tensor:
        return sum(
            response.channel_means(x[i : i + batch_size]) * len(x[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        ) / len(x)

    return float((means(fake) - means(real)).abs().mean()), response.kind


def _model_description(model: TrainedModel, run_dir: str | None, model_uri: str | None) -> dict:
    shared = torch.load(
        Path(model.checkpoint) / ckpt.SHARED_FILE, map_location="cpu", weights_only=False
    )
    return {
        "run_dir": None if run_dir is None else str(Path(run_dir).resolve()),
        "model_uri": model_uri,
        "algorithm": model.config.model.algorithm,
        "iteration": model.iteration,
        "images_seen": shared.get("images_seen"),
        "checkpoint": str(model.checkpoint),
    }


def _histogram_classifier(
    network: FeatureNetwork, data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> ClassifierFeatures | None:
    """The classifier that labels generated images: the feature network when it is one, else the
    cached classifier of labelled data (Inception's classes are not the data's)."""
    if isinstance(network, ClassifierFeatures):
        return network
    if data.y is None:
        return None
    return _classifier_network(data, data_config, settings).to(settings.device)


def evaluate_generation(
    model: TrainedModel, data_config: DataConfig, settings: EvalSettings
) -> dict:
    """Score fresh samples (or the bank) of `model` against reference images of `data_config`."""
    started = time.perf_counter()
    data, data_config = reference_data(data_config, model.sample_shape)
    network = feature_network(data, data_config, settings)
    fake, source = draw_samples(model, settings)
    real, real_labels = _subset(data, settings.num_real or settings.num_samples, settings.seed)
    scored = generative_scores(
        fake,
        real,
        network,
        real_labels=real_labels,
        num_classes=data.num_classes,
        nearest_k=settings.nearest_k,
        kid_subsets=settings.kid_subsets,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    r, response_bank = response_distance(
        fake,
        real,
        seed=model.config.train.response_bank_seed,
        weights=model.config.model.filter_bank,
        batch_size=settings.batch_size,
    )
    scored["scores"]["response_distance"] = r
    report = {
        "task": "generation",
        "samples": source,
        "reference": {
            "data": dataclasses.asdict(data_config),
            "name": data.name,
            "num": len(real),
            "of": len(data),
            "seed": settings.seed,
        },
        "feature_network": network.describe(),
        **scored,
        "response_bank": response_bank,
    }
    classifier = _histogram_classifier(network, data, data_config, settings)
    if classifier is not None:
        predicted = classifier.classifier.predict(
            fake.to(settings.device), batch_size=settings.batch_size
        )
        report["generated_class_share"] = class_histogram(predicted, data.num_classes)
        if classifier is not network:
            report["class_share_network"] = classifier.describe()
    report["wall_time_s"] = time.perf_counter() - started
    return report


def inpainting_report(
    restore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    network: FeatureNetwork,
    *,
    kinds: tuple[str, ...] = MASK_KINDS,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """MSE, PSNR, SSIM and FID (restored against originals) per mask kind.

    restore(images, missing) gives the restored images; masks (1: missing) come from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for kind, _, restored in restore_each_mask(restore, images, kinds, generator=generator):
        out[kind] = {
            **inpainting_scores(restored, images),
            "fid": frechet_inception_distance(restored, images, network, batch_size=batch_size),
        }
    return out


def evaluate_inpainting(
    model: TrainedModel, data_config: DataConfig, settings: EvalSettings
) -> dict:
    """Mask `num_samples` reference images, restore them with the model, score per mask kind."""
    started = time.perf_counter()
    data, data_config = reference_data(data_config, model.sample_shape)
    network = feature_network(data, data_config, settings)
    images, labels = _subset(data, settings.num_samples, settings.seed)
    labels = None if not model.num_classes else labels.to(model.device)

    def restore(x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        return model.inpaint(
            x,
            missing,
            method=settings.method,
            steps=settings.steps,
            seed=settings.seed,
            labels=labels,
        )

    masks = inpainting_report(
        restore, images, network, seed=settings.seed, batch_size=settings.batch_size
    )
    steps = (
        settings.steps
        if settings.steps is not None
        else (
            model.config.langevin.langevin_steps
            if settings.method == "generator"
            else model.config.langevin.sample_steps
        )
    )
    return {
        "task": "inpainting",
        "samples": {
            "source": "inpainting",
            "method": settings.method,
            "langevin_steps": steps,
            "num": len(images),
            "seed": settings.seed,
            "what": "reference images masked and restored; FID of restored against the originals",
        },
        "reference": {
            "data": dataclasses.asdict(data_config),
            "name": data.name,
            "num": len(images),
            "of": len(data),
            "seed": settings.seed,
        },
        "feature_network": network.describe(),
        "masks": masks,
        "wall_time_s": time.perf_counter() - started,
    }


def report_metrics(report: dict) -> dict[str, float]:
    """The report's finite numbers under MLflow metric names (eval/fid, eval/bank/fid,
    eval/inpainting/square/mse, …)."""
    prefix = "eval/bank/" if report["samples"]["source"] == "bank" else "eval/"
    if report["task"] == "inpainting":
        flat = {
            f"inpainting/{kind}/{k}": v
            for kind, scores in report["masks"].items()
            for k, v in scores.items()
            if k != "ssim_window"
        }
    else:
        flat = dict(report["scores"])
        flat.update({f"class_coverage/{c}": v for c, v in report.get("class_coverage", {}).items()})
        flat.update(
            {f"class_share/{c}": v for c, v in report.get("generated_class_share", {}).items()}
        )
    return {prefix + k: float(v) for k, v in flat.items() if v is not None and math.isfinite(v)}


def _training_run(run_dir: str | None) -> tuple[str, str] | None:
    """(tracking URI, run id) of a run directory's MLflow run, when summary.json names one and its
    store answers; None (with the reason logged) otherwise."""
    if run_dir is None:
        return None
    summary_file = Path(run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    run_id, uri = summary.get("mlflow_run_id"), summary.get("mlflow_uri")
    if not run_id or not uri:
        log.info("%s names no MLflow run: logging to a new run in '%s'", summary_file, EXPERIMENT)
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        log.warning(
            "The training run's MLflow store %s is not here: logging to a new run in '%s'",
            uri,
            EXPERIMENT,
        )
        return None
    import mlflow

    from .tracking import check_tracking

    try:
        check_tracking(uri)
        mlflow.MlflowClient(uri).get_run(run_id)
    except (ConfigError, mlflow.exceptions.MlflowException) as err:
        log.warning(
            "The training run %s at %s cannot be reached (%s): logging to a new run in '%s'",
            run_id,
            uri,
            err,
            EXPERIMENT,
        )
        return None
    return uri, run_id


def log_to_mlflow(report: dict, report_path: Path, *, run_dir: str | None, step: int) -> dict:
    """Log the report's metrics (at `step`, images seen) and file to the training run, or to a new
    run in experiment `debm-evaluate`; return where they went."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from .tracking import check_tracking, experiment_id_for, resolve_tracking_uri

    target = _training_run(run_dir)
    if target is not None:
        uri, run_id = target
        client = mlflow.MlflowClient(uri)
        where = "training run"
    else:
        uri = resolve_tracking_uri(TrackingConfig())
        check_tracking(uri)
        client = mlflow.MlflowClient(uri)
        experiment_id = experiment_id_for(client, EXPERIMENT)
        model = report["model"]
        tags = {
            k: v
            for k, v in (("debm_run_dir", model["run_dir"]), ("debm_model_uri", model["model_uri"]))
            if v
        }
        run_id = client.create_run(
            experiment_id, run_name=f"evaluate-{report['task']}", tags=tags
        ).info.run_id
        where = f"new run in experiment '{EXPERIMENT}'"
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in report_metrics(report).items()]
    network, samples = report["feature_network"], report["samples"]
    tag = f"eval.{'bank.' if samples['source'] == 'bank' else ''}{report['task']}"
    tags = [
        RunTag(
            f"{tag}.feature_network",
            f"{network['name']} {network.get('hash') or network['weights']}",
        ),
        RunTag(f"{tag}.samples", f"{samples['num']} {samples['source']}"),
    ]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.log_artifact(run_id, str(report_path), "evaluation")
    if target is None:
        client.set_terminated(run_id)
    return {"uri": uri, "run_id": run_id, "logged_to": where, "metrics": len(metrics)}


def _load_model(args: argparse.Namespace) -> TrainedModel:
    """The run directory's model, or the MLflow model's (a `models:/` URI resolves in the same
    store training registers into: MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if not args.model:
        return load_run(args.run_dir, device=args.device)
    import mlflow.pyfunc

    from .tracking import resolve_tracking_uri

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(resolve_tracking_uri(TrackingConfig()))
    try:
        pyfunc = mlflow.pyfunc.load_model(args.model)
    finally:
        mlflow.set_tracking_uri(previous)
    return pyfunc.unwrap_python_model().model


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from parsed `debm evaluate` options."""
    return EvalSettings(
        num_samples=args.num,
        num_real=args.num_real,
        steps=args.steps,
        from_bank=args.from_bank,
        seed=args.seed,
        features=args.features,
        inception_weights=args.inception_weights,
        classifier_epochs=args.classifier_epochs,
        cache_dir=args.cache_dir,
        nearest_k=args.nearest_k,
        kid_subsets=args.kid_subsets,
        batch_size=args.batch_size,
        method=args.method,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """`debm evaluate`: evaluate, write the JSON report, log to MLflow, print a summary."""
    if args.inception_weights and args.features != "inception":
        raise ConfigError("--inception-weights is used with --features inception only.")
    settings = settings_from_args(args)
    if settings.features == "inception":  # fail on missing weights before any sampling
        find_inception_weights(settings.inception_weights)
    model = _load_model(args)
    data_config = resolve_data_config(model, args.data, args.set)
    evaluate = evaluate_inpainting if args.inpainting else evaluate_generation
    report = {
        "model": _model_description(model, args.run_dir, args.model),
        **evaluate(model, data_config, settings),
    }
    task = report["task"] + ("-bank" if settings.from_bank else "")
    out = Path(args.out) if args.out else Path(args.run_dir or ".") / "evaluation" / f"{task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if not args.no_mlflow:
        step = report["model"]["images_seen"] or report["model"]["iteration"]
        report["mlflow"] = log_to_mlflow(report, out, run_dir=args.run_dir, step=step)
        out.write_text(json.dumps(report, indent=2))
    _print_summary(report, out)
    return 0


def _print_summary(report: dict, out: Path) -> None:
    network, samples = report["feature_network"], report["samples"]
    print(
        f"{samples['num']} {samples['source']} samples; feature network: {network['name']} "
        f"({network.get('hash') or network.get('weights')})"
    )
    if report["task"] == "inpainting":
        for kind, s in report["masks"].items():
            print(
                f"{kind:9s} MSE {s['mse']:.4f}  PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.3f}  "
                f"FID {s['fid']:.2f}"
            )
    else:
        s = report["scores"]
        print(
            f"FID {s['fid']:.2f}  KID {s['kid_mean']:.4g} ± {s['kid_std']:.2g}  "
            f"IS {s['is_mean']:.2f} ± {s['is_std']:.2f}  precision {s['precision']:.3f}  "
            f"recall {s['recall']:.3f}  density {s['density']:.3f}  "
            f"coverage {s['coverage']:.3f}  R {s['response_distance']:.4g}"
        )
    if "mlflow" in report:
        print(
            f"MLflow: {report['mlflow']['metrics']} metrics to run {report['mlflow']['run_id']} "
            f"({report['mlflow']['logged_to']}) at {report['mlflow']['uri']}"
        )
    print(f"report: {out}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm evaluate` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score fresh samples (FID, KID, IS, precision/recall, density/coverage, R) "
        "or inpainting",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="a trained run directory")
    which.add_argument("--model", help="an MLflow model URI (e.g. models:/digits-wgcn/latest)")
    parser.add_argument("--data", help="reference data source (default: the model's training data)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="override of the reference data config, e.g. data.path=/data/mnist.npz",
    )
    parser.add_argument(
        "--num", type=int, default=1000, help="generated images (inpainting: images restored)"
    )
    parser.add_argument(
        "--num-real", type=int, help="reference images (default: --num, at most the data set)"
    )
    parser.add_argument(
        "--steps", type=int, help="Langevin steps of fresh samples (default langevin.sample_steps)"
    )
    parser.add_argument(
        "--from-bank",
        action="store_true",
        help="score the persistent chain bank instead of fresh samples (the report says so)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--features",
        default="classifier",
        choices=sorted(FEATURE_NETWORKS),
        help="feature network: a small classifier trained on the data (default) or Inception v3",
    )
    parser.add_argument(
        "--inception-weights",
        help="local Inception v3 weights file (torch-fidelity or torchvision)",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        default=30,
        help="training epochs of the feature classifier",
    )
    parser.add_argument(
        "--cache-dir",
        help="folder of cached classifiers (default ~/.cache/distributed_ebm/classifiers)",
    )
    parser.add_argument(
        "--nearest-k",
        type=int,
        default=5,
        help="k of the k-NN balls (precision/recall, density/coverage)",
    )
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--inpainting",
        action="store_true",
        help="evaluate inpainting (MSE, PSNR, SSIM, FID per mask) instead of generation",
    )
    parser.add_argument(
        "--method", default="langevin", choices=["langevin", "generator"], help="inpainting method"
    )
    parser.add_argument(
        "--out",
        help="JSON report (default RUN_DIR/evaluation/<task>.json; with --model, ./evaluation/…); "
        "MLflow keeps a copy",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)
    return parser
