"""`debm evaluate`: score a model's fresh samples, its chain bank or its inpainting, or a file of
samples made anywhere, against reference data; write the JSON report, log it to MLflow, print a
one-line summary. The scoring is distributed_ebm/evaluation.py's; MLflow is tracking.py's."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .. import tracking
from ..config import (
    ConfigError,
    DataConfig,
    RunConfig,
    TrackingConfig,
    load_config,
    parse_overrides,
)
from ..evaluation import (
    FEATURE_NETWORKS,
    EvalSettings,
    evaluate_generation,
    evaluate_inpainting,
    evaluate_samples,
    model_description,
    samples_description,
)
from ..inference import TrainedModel, load_run
from ..inpainting import METHODS, check_average
from ..metrics.generative import find_inception_weights

DEFAULT_NUM = 1000  # images a model generates (or restores) when --num is not given


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm evaluate` to the CLI's subparsers."""
    parser = subparsers.add_parser("evaluate", help="score fresh samples (FID, KID, IS, precision/recall, "
                                   "density/coverage, R), a file of samples, or inpainting")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="a trained run directory")
    which.add_argument("--model", help="an MLflow model URI (e.g. models:/digits-wgcn/latest)")
    which.add_argument("--samples", metavar="FILE.npz",
                       help="score these samples (any system's): an .npz with 'samples' (N,C,H,W) or "
                       "(N,H,W[,C]), floats in [-1, 1] or uint8; optional 'labels'. Needs --data or --config")
    parser.add_argument("--data", help="reference data source (default: the model's training data; "
                        "needed with --samples unless --config names the data)")
    parser.add_argument("--config", help="YAML run config (a preset or a run's config.yaml) whose data "
                        "section is the reference data")
    parser.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override of the reference data config, e.g. data.path=/data/mnist.npz")
    parser.add_argument("--num", type=int, help=f"generated images (default {DEFAULT_NUM}; inpainting: "
                        "images restored; --samples: the file's first NUM, default all)")
    parser.add_argument("--num-real", type=int, help="reference images (default: the images scored, at most the data set)")
    parser.add_argument("--steps", type=int, help="Langevin steps of fresh samples (default langevin.sample_steps)")
    parser.add_argument("--from-bank", action="store_true",
                        help="score the persistent chain bank instead of fresh samples (the report says so)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="classifier", choices=sorted(FEATURE_NETWORKS),
                        help="feature network: a small classifier trained on the data (default) or Inception v3")
    parser.add_argument("--inception-weights", help="local Inception v3 weights file (torch-fidelity or torchvision)")
    parser.add_argument("--classifier-epochs", type=int, default=30, help="training epochs of the feature classifier")
    parser.add_argument("--cache-dir", help="folder of cached classifiers (default ~/.cache/distributed_ebm/classifiers)")
    parser.add_argument("--nearest-k", type=int, default=5, help="k of the k-NN balls (precision/recall, density/coverage)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--inpainting", action="store_true",
                        help="evaluate inpainting (MSE, PSNR, SSIM, FID per mask) instead of generation")
    parser.add_argument("--method", default="langevin", choices=METHODS, help="inpainting method")
    parser.add_argument("--average", type=int, default=1, metavar="K",
                        help="inpainting: average K restorations per image (the posterior mean, what PSNR rewards)")
    parser.add_argument("--out", help="JSON report (default RUN_DIR/evaluation/<task>.json; with --model, "
                        "./evaluation/…; with --samples, ./evaluation/samples-<file name>.json); MLflow keeps a copy")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default="cpu")
    return parser


def run(args: argparse.Namespace) -> int:
    """`debm evaluate`: evaluate, write the JSON report, log to MLflow, print a summary."""
    if args.inception_weights and args.features != "inception":
        raise ConfigError("--inception-weights is used with --features inception only.")
    if args.samples and (args.inpainting or args.from_bank or args.steps is not None):
        raise ConfigError(
            "--inpainting, --from-bank and --steps ask a model for images; --samples scores the "
            "file's images as they are. Drop them, or evaluate a model (--run-dir, --model)."
        )
    if args.average != 1 and not args.inpainting:
        raise ConfigError("--average K averages inpainting restorations: use it with --inpainting.")
    check_average(args.average)  # before any data, classifier or model is loaded
    settings = settings_from_args(args)
    if settings.features == "inception":  # fail on missing weights before any sampling
        find_inception_weights(settings.inception_weights)
    base = load_config(args.config).data if args.config else None
    if args.samples:
        data_config = resolve_data_config(base, args.data, args.set)
        scored = evaluate_samples(args.samples, data_config, settings, limit=args.num)
        report = {"model": samples_description(args.samples), **scored}
        default_out = Path("evaluation") / f"samples-{Path(args.samples).stem}.json"
    else:
        model = _load_model(args)
        data_config = resolve_data_config(base or model.config.data, args.data, args.set)
        evaluate = evaluate_inpainting if args.inpainting else evaluate_generation
        report = {
            "model": model_description(model, args.run_dir, args.model),
            **evaluate(model, data_config, settings),
        }
        task = tracking.report_name(report) + ("-bank" if settings.from_bank else "")
        default_out = Path(args.run_dir or ".") / "evaluation" / f"{task}.json"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if not args.no_mlflow:
        scored_model = report["model"]
        step = scored_model["images_seen"] or scored_model["iteration"] or 0
        report["mlflow"] = tracking.log_evaluation(report, out, run_dir=args.run_dir, step=step)
        out.write_text(json.dumps(report, indent=2))
    _print_summary(report, out)
    return 0


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from parsed `debm evaluate` options."""
    return EvalSettings(
        num_samples=DEFAULT_NUM if args.num is None else args.num,
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
        average=args.average,
        device=args.device,
        progress=True,
    )


def resolve_data_config(base: DataConfig | None, source: str | None, overrides: list[str]) -> DataConfig:
    """The reference data: `base` (the model's data config, or --config's), or a fresh config of
    the source `source`; then the `data.key=value` overrides."""
    raw = {"source": source} if source else (dataclasses.asdict(base) if base else {})
    for key, value in parse_overrides(overrides).items():
        if not key.startswith("data."):
            raise ConfigError(
                f"'{key}': debm evaluate takes only data.* overrides (the reference data)."
            )
        raw[key[len("data.") :]] = value
    if "source" not in raw:
        raise ConfigError(
            "--samples needs the data set to compare with: --data SOURCE (e.g. --data digits, or "
            "--data npz --set data.path=real.npz), or --config FILE whose data section names it "
            "(a preset in configs/, or a run's config.yaml)."
        )
    return RunConfig.from_dict({"data": raw}).data


def _load_model(args: argparse.Namespace) -> TrainedModel:
    """The run directory's model, or the MLflow model's (a `models:/` URI resolves in the same
    store training registers into: MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if not args.model:
        return load_run(args.run_dir, device=args.device)
    return tracking.load_trained_model(args.model, tracking.resolve_tracking_uri(TrackingConfig()), args.device)


def _print_summary(report: dict, out: Path) -> None:
    network, samples = report["feature_network"], report["samples"]
    print(
        f"{samples['num']} {samples['source']} samples; feature network: {network['name']} "
        f"({network.get('hash') or network.get('weights')})"
    )
    if report["task"] == "inpainting":
        from ..inpainting import describe_scores

        baseline = report.get("baseline", {}).get("masks", {})
        for kind, s in report["masks"].items():
            print(describe_scores(kind, s, baseline.get(kind)))
    else:
        s = report["scores"]
        print(
            f"FID {s['fid']:.2f}  KID {s['kid_mean']:.4g} ± {s['kid_std']:.2g}  "
            f"IS {s['is_mean']:.2f} ± {s['is_std']:.2f}  precision {s['precision']:.3f}  "
            f"recall {s['recall']:.3f}  density {s['density']:.3f}  "
            f"coverage {s['coverage']:.3f}  R {s['response_distance']:.4g}"
        )
        if "label_agreement" in report:
            print(f"label agreement {report['label_agreement']:.3f} (the classifier's class = the file's label)")
    if "mlflow" in report:
        print(
            f"MLflow: {report['mlflow']['metrics']} metrics to run {report['mlflow']['run_id']} "
            f"({report['mlflow']['logged_to']}) at {report['mlflow']['uri']}"
        )
    print(f"report: {out}")
