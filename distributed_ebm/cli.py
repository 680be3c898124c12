"""The `debm` command: parse, build a config, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from .config import ConfigError, load_config, parse_overrides


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, parse_overrides(args.set + (["tracking.enabled=false"] if args.no_mlflow else [])))
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = Path(args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if args.workers > 0:
        from .trainer import train_distributed

        summary = train_distributed(
            config, run_dir=run_dir, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            address=args.address, storage=args.storage, max_failures=args.max_failures,
        )
    else:
        from .train_loop import train_loop

        summary = train_loop({"config": config.to_dict(), "run_dir": str(run_dir), "resume": args.resume})
    collapse = summary["collapse"]
    print(
        f"{summary['status']}: {summary['iterations']} iterations, {summary['images_seen']} images seen in "
        f"{summary['wall_time_s']:.1f}s; final R {summary['final_response_distance']:.4g}; "
        f"collapse: {'none' if collapse is None else collapse['reason'] + ' at iteration ' + str(collapse['iteration'])}; "
        f"run directory {run_dir}"
    )
    if summary.get("mlflow_run_id"):
        uri = summary["mlflow_uri"]
        print(f"MLflow: run {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) at {uri}"
              + (f"; registered {summary['model_uri']}" if summary.get("model_uri") else ""))
        ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
        print(f"Look at it: {ui}  (then http://127.0.0.1:5000/#/experiments/{summary['mlflow_experiment_id']})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .inference import load_run
    from .rundir import save_sample_png

    model = load_run(args.run_dir, device=args.device)
    samples = model.sample(args.num, steps=args.steps, seed=args.seed, from_bank=args.from_bank, label=args.label)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = "bank" if args.from_bank else f"fresh samples ({model.config.model.algorithm}, steps={args.steps or 'default'})"
    labels = model.labels_for(args.num, args.label)
    extra = {} if labels is None else {"y": labels.cpu().numpy()}
    np.savez(out, x=samples.numpy(), source=source, iteration=model.iteration, **extra)
    if args.png:
        save_sample_png(samples, args.png)
    print(f"{len(samples)} samples ({source}) from iteration {model.iteration} written to {out}")
    return 0


def _inpaint(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .inference import load_run
    from .inpainting import MASK_KINDS, inpainting_scores, restore_each_mask
    from .rundir import save_sample_png

    model = load_run(args.run_dir, device=args.device)
    data = load_dataset(model.config.data)
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=generator)[: args.num]
    images = data.x[index]
    labels = None if not model.num_classes else data.y[index].to(model.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run_dir": str(Path(args.run_dir).resolve()), "iteration": model.iteration, "method": args.method,
              "num_images": len(images), "images": f"{data.name}, seed {args.seed}", "masks": {}}
    def restore(x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        return model.inpaint(x, missing, method=args.method, steps=args.steps, seed=args.seed, labels=labels)

    kinds = MASK_KINDS if args.mask == "all" else (args.mask,)
    for kind, missing, restored in restore_each_mask(restore, images, kinds, generator=generator):
        report["masks"][kind] = inpainting_scores(restored, images)
        shown = torch.cat([images[:8], torch.where(missing[:8].bool(), torch.zeros_like(images[:8]), images[:8]), restored[:8]])
        save_sample_png(shown, out / f"{kind}.png", nrow=min(8, len(images)))
    (out / "inpainting.json").write_text(json.dumps(report, indent=2))
    for kind, scores in report["masks"].items():
        print(f"{kind:9s} MSE {scores['mse']:.4f}  PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.3f}")
    print(f"report and grids (rows: original, masked, restored) in {out}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from .inference import load_run
    from .rundir import save_sample_png

    model = load_run(args.run_dir, device=args.device)
    images = model.interpolate(args.rows, args.midpoints, seed=args.seed, steps=args.steps, label=args.label)
    save_sample_png(images.flatten(0, 1), args.out, nrow=args.midpoints + 2)
    print(f"{args.rows} rows × {args.midpoints} midpoints written to {args.out}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from .data.shards import ShardOptions, write_shards

    options = ShardOptions(
        samples_per_shard=args.samples_per_shard, image_size=args.image_size, quality=args.quality,
        shuffle=not args.no_shuffle, seed=args.seed, prefix=args.prefix, upload_cmd=args.upload_cmd,
        split=args.split, progress=not args.quiet,
    )
    manifest = write_shards(args.source, args.out, options)
    where = args.out.rstrip("/")
    print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards at {where} "
          f"({', '.join(f'{k}: {v}' for k, v in manifest['formats'].items())}); "
          f"{manifest['num_skipped']} unreadable inputs skipped (listed in manifest.json); "
          f"{len(manifest['classes'])} classes")
    urls = f"{where}/{manifest['urls']}"
    if where.startswith("s3://"):
        urls = f"pipe:aws s3 cp {urls} -"
    elif where.startswith("gs://"):
        urls = f"pipe:gsutil cat {urls}"
    print(f"Train from them with: --set data.source=webdataset --set 'data.urls={urls}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="debm", description="Train and use FRAME-family energy-based models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (one process, or Ray Train workers)")
    train.add_argument("--no-mlflow", action="store_true", help="do not track to MLflow (same as --set tracking.enabled=false)")
    train.add_argument("--config", help="YAML preset (see configs/); defaults apply without one")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. langevin.step_size=0.1")
    train.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0: one process without Ray")
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (NCCL when > 0)")
    train.add_argument("--address", help="join this Ray cluster (e.g. auto); default: start a local one")
    train.add_argument("--storage", help="Ray storage for checkpoints: absolute path or URI (s3://…); default RUN_DIR/ray")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    train.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --run-dir (Ray runs resume by run name and storage)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("--run-dir", required=True)
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument("--out", required=True, help="output .npz (key x: samples in [-1, 1])")
    sample.add_argument("--png", help="also write a PNG grid here")
    sample.add_argument("--steps", type=int, help="Langevin steps for fresh chains (default langevin.sample_steps)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--label", type=int, help="class label K for conditional models")
    sample.add_argument("--from-bank", action="store_true", help="take states from the persistent chain bank instead")
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(func=_sample)

    inpaint = sub.add_parser("inpaint", help="restore masked images of the run's data set; MSE, PSNR, SSIM")
    inpaint.add_argument("--run-dir", required=True)
    inpaint.add_argument("--mask", default="all", choices=["all", "square", "spots", "combined"])
    inpaint.add_argument("--method", default="langevin", choices=["langevin", "generator"],
                         help="masked Langevin on Φ (every model) or g(ζ) fitted to the observed pixels (GGCN)")
    inpaint.add_argument("--num", type=int, default=64, help="images to inpaint")
    inpaint.add_argument("--steps", type=int, help="Langevin steps (default: sample_steps, or L after the generator)")
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--out", required=True, help="output folder for inpainting.json and PNG grids")
    inpaint.add_argument("--device", default="cpu")
    inpaint.set_defaults(func=_inpaint)

    shards = sub.add_parser("shards", help="write WebDataset shards from an image tree, tar, LMDB, .npz or bundled set")
    shards.add_argument("source", help="folder or .tar of <class>/<image> folders, LMDB folder, .npz, or a "
                        "bundled data set name (digits, faces, ...)")
    shards.add_argument("--out", required=True, help="local folder, or s3://… / gs://… (uploaded per shard)")
    shards.add_argument("--samples-per-shard", type=int, default=10_000)
    shards.add_argument("--image-size", type=int, help="resize the shorter side and centre-crop (default: keep the encoded bytes)")
    shards.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding after --image-size")
    shards.add_argument("--split", help="only this top-level folder of the tree (e.g. train)")
    shards.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--prefix", default="shard", help="shard file names: PREFIX-NNNNNN.tar")
    shards.add_argument("--upload-cmd", help="command template with {src} and {dst} for remote --out "
                        "(default: aws s3 cp {src} {dst} / gsutil cp {src} {dst})")
    shards.add_argument("--quiet", action="store_true", help="no progress bar")
    shards.set_defaults(func=_shards)

    interp = sub.add_parser("interpolate", help="rows of images between two latents (GGCN models)")
    interp.add_argument("--run-dir", required=True)
    interp.add_argument("--rows", type=int, default=4)
    interp.add_argument("--midpoints", type=int, default=8)
    interp.add_argument("--steps", type=int, default=0, help="Langevin refinement steps per image")
    interp.add_argument("--label", type=int, help="class label for conditional models")
    interp.add_argument("--seed", type=int, default=0)
    interp.add_argument("--out", required=True, help="output PNG grid")
    interp.add_argument("--device", default="cpu")
    interp.set_defaults(func=_interpolate)

    from .evaluation import add_parser as add_evaluate

    add_evaluate(sub)

    from .serve import add_parser as add_serve

    add_serve(sub)

    from .tune import add_parser as add_tune

    add_tune(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"debm: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .train_loop import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"debm: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
