"""`debm sample`: draw fresh samples (or persistent-bank states) from a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm sample` to the CLI's subparsers."""
    sample = subparsers.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("--run-dir", required=True)
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument("--out", required=True, help="output .npz (key x: samples in [-1, 1])")
    sample.add_argument("--png", help="also write a PNG grid here")
    sample.add_argument("--steps", type=int, help="Langevin steps for fresh chains (default langevin.sample_steps)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--label", type=int, help="class label K for conditional models")
    sample.add_argument("--from-bank", action="store_true", help="take states from the persistent chain bank instead")
    sample.add_argument("--device", default="cpu")
    return sample


def run(args: argparse.Namespace) -> int:
    """`debm sample`: samples as .npz (and a PNG grid with --png)."""
    from ..inference import load_run
    from ..rundir import save_sample_png

    model = load_run(args.run_dir, device=args.device)
    samples = model.sample(args.num, steps=args.steps, seed=args.seed, from_bank=args.from_bank, label=args.label,
                           progress=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = "bank" if args.from_bank else (
        f"fresh samples ({model.config.model.algorithm}, steps={args.steps or 'default'}, "
        f"{model.weights_description})"
    )
    labels = model.labels_for(args.num, args.label)
    extra = {} if labels is None else {"y": labels.cpu().numpy()}
    clusters = None if args.from_bank else model.clusters_for(args.num, args.seed)
    if clusters is not None:  # self-conditioned: the k-means cluster each sample was drawn from
        extra["clusters"] = clusters.cpu().numpy()
    np.savez(out, x=samples.numpy(), source=source, iteration=model.iteration, weights=model.weights, **extra)
    if args.png:
        cycled = labels is not None and args.label is None  # one row per class
        save_sample_png(samples, args.png, classes=model.num_classes if cycled else None)
    print(f"{len(samples)} samples ({source}) from iteration {model.iteration} written to {out}")
    return 0
