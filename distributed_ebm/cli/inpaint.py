"""`debm inpaint`: restore masked images of the run's data set and score them (MSE, PSNR, SSIM; whole
image and missing pixels, beside the biharmonic baseline on the same masks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..inpainting import METHODS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm inpaint` to the CLI's subparsers."""
    inpaint = subparsers.add_parser("inpaint", help="restore masked images of the run's data set; MSE, PSNR, SSIM")
    inpaint.add_argument("--run-dir", required=True)
    inpaint.add_argument("--mask", default="all", choices=["all", "square", "spots", "combined"])
    inpaint.add_argument("--method", default="langevin", choices=METHODS,
                         help="masked Langevin on Φ (every model) or g(ζ) fitted to the observed pixels (GGCN)")
    inpaint.add_argument("--num", type=int, default=64, help="images to inpaint")
    inpaint.add_argument("--steps", type=int, help="Langevin steps (default: langevin.sample_steps; after the "
                         "generator: generator.refine_steps, else L)")
    inpaint.add_argument("--average", type=int, default=1, metavar="K",
                         help="average K restorations per image: the posterior mean (sharper scores, blurrier "
                              "where the hole has several answers); 1: one restoration")
    inpaint.add_argument("--seed", type=int, default=0)
    inpaint.add_argument("--out", required=True, help="output folder for inpainting.json and PNG grids")
    inpaint.add_argument("--device", default="cpu")
    return inpaint


def run(args: argparse.Namespace) -> int:
    """`debm inpaint`: inpainting.json and one PNG grid per mask (rows: original, masked, baseline, restored)."""
    import torch
    from tqdm import tqdm

    from ..data import load_dataset
    from ..inference import load_run
    from ..inpainting import (
        BASELINE,
        MASK_KINDS,
        biharmonic_fill,
        check_average,
        describe_scores,
        inpainting_scores,
        restoration_estimate,
        restore_each_mask,
    )
    from ..rundir import save_sample_png

    check_average(args.average)  # before the model is loaded
    model = load_run(args.run_dir, device=args.device)
    data = load_dataset(model.config.data)
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=generator)[: args.num]
    images = data.x[index]
    labels = None if not model.num_classes else data.y[index].to(model.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run_dir": str(Path(args.run_dir).resolve()), "iteration": model.iteration, "method": args.method,
              "average": args.average, "estimate": restoration_estimate(args.average),
              "num_images": len(images), "images": f"{data.name}, seed {args.seed}", "masks": {},
              "baseline": {"method": BASELINE, "masks": {}}}

    def restore(x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        return model.inpaint(x, missing, method=args.method, steps=args.steps, seed=args.seed, labels=labels,
                             average=args.average)

    kinds = MASK_KINDS if args.mask == "all" else (args.mask,)
    masks = tqdm(restore_each_mask(restore, images, kinds, generator=generator), total=len(kinds), unit="mask",
                 desc=f"inpainting {len(images)} images", dynamic_ncols=True)
    for kind, missing, restored in masks:
        report["masks"][kind] = inpainting_scores(restored, images, missing)
        baseline = biharmonic_fill(images, missing)
        report["baseline"]["masks"][kind] = inpainting_scores(baseline, images, missing)
        masked = torch.where(missing[:8].bool(), torch.zeros_like(images[:8]), images[:8])
        shown = torch.cat([images[:8], masked, baseline[:8], restored[:8]])
        save_sample_png(shown, out / f"{kind}.png", nrow=min(8, len(images)))
    (out / "inpainting.json").write_text(json.dumps(report, indent=2))
    for kind, scores in report["masks"].items():
        print(describe_scores(kind, scores, report["baseline"]["masks"][kind]))
    print(f"report and grids (rows: original, masked, biharmonic baseline, restored) in {out}")
    return 0
