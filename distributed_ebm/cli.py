"""The `debm` command: parse, build a config, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from .config import ConfigError, load_config, parse_overrides


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, parse_overrides(args.set))
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = Path(args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if args.workers > 0:
        raise ConfigError(
            "--workers N > 0 (Ray Train) is not available in this version; use --workers 0 for one process."
        )
    from .train_loop import train_loop

    summary = train_loop({"config": config.to_dict(), "run_dir": str(run_dir), "resume": args.resume})
    collapse = summary["collapse"]
    print(
        f"{summary['status']}: {summary['iterations']} iterations, {summary['images_seen']} images seen in "
        f"{summary['wall_time_s']:.1f}s; final R {summary['final_response_distance']:.4g}; "
        f"collapse: {'none' if collapse is None else collapse['reason'] + ' at iteration ' + str(collapse['iteration'])}; "
        f"run directory {run_dir}"
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="debm", description="Train and use FRAME-family energy-based models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (one process, or Ray Train workers)")
    train.add_argument("--config", help="YAML preset (see configs/); defaults apply without one")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. langevin.step_size=0.1")
    train.add_argument("--workers", type=int, default=0, help="0: one process without Ray")
    train.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
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
