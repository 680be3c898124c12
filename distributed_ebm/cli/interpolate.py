"""`debm interpolate`: rows of images g(ζ_t) between two latents (GGCN models)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm interpolate` to the CLI's subparsers."""
    interp = subparsers.add_parser("interpolate", help="rows of images between two latents (GGCN models)")
    interp.add_argument("--run-dir", required=True)
    interp.add_argument("--rows", type=int, default=4)
    interp.add_argument("--midpoints", type=int, default=8)
    interp.add_argument("--steps", type=int, default=0, help="Langevin refinement steps per image")
    interp.add_argument("--label", type=int, help="class label for conditional models")
    interp.add_argument("--seed", type=int, default=0)
    interp.add_argument("--out", required=True, help="output PNG grid")
    interp.add_argument("--device", default="cpu")
    return interp


def run(args: argparse.Namespace) -> int:
    """`debm interpolate`: one PNG grid, a row per pair of end latents."""
    from ..inference import load_run
    from ..rundir import save_sample_png

    model = load_run(args.run_dir, device=args.device)
    images = model.interpolate(args.rows, args.midpoints, seed=args.seed, steps=args.steps, label=args.label)
    save_sample_png(images.flatten(0, 1), args.out, nrow=args.midpoints + 2)
    print(f"{args.rows} rows × {args.midpoints} midpoints written to {args.out}")
    return 0
