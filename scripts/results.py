"""This project's numbers beside the papers' (docs/results.md).

Trains (or takes `--run-dir`s of) a few models on the bundled 8×8 digits and on MNIST, scores
fresh samples with `debm evaluate`'s library (distributed_ebm/evaluation.py: FID, KID, IS,
precision/recall, density/coverage, R) and inpainting (MSE, PSNR, SSIM, FID per mask), and writes
one Markdown page that puts them beside the Inception Scores of the papers' tables (CIFAR-10) and
the GGCN paper's inpainting table (CelebA), saying what is not comparable.

    .venv/bin/python scripts/results.py --out docs/results.md

Smoke test (seconds): tiny models, few samples, a 2-epoch classifier:

    .venv/bin/python scripts/results.py --datasets digits --only wGCN GGCN+AMS --iterations 3 \\
        --samples 48 --inpaint-images 12 --steps 3 --classifier-epochs 2 \\
        --set "model.channels=[8]" generator.base_width=4 --out /tmp/results.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tables import emit_table

from distributed_ebm.config import ConfigError, load_config, parse_overrides
from distributed_ebm.evaluation import (
    EvalSettings,
    default_sample_steps,
    evaluate_generation,
    evaluate_inpainting,
    feature_network,
    reference_data,
    response_distance,
)
from distributed_ebm.inference import load_run
from distributed_ebm.metrics.generative import generative_scores
from distributed_ebm.rundir import save_sample_png, view_scale
from distributed_ebm.train_loop import train

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
MNIST = (
    ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
)  # not part of the project; --mnist elsewhere
CONDITIONAL_GGCN = {
    "model.conditional": True,
    "chains.batch_size": 100,
    "train.data_batch_size": 100,
    "generator.latent_bank_size": 500,
}
MODELS = [  # (label, {data set: (preset, overrides)}, inpainting methods)
    ("wGCN", {"digits": ("digits_wgcn.yaml", {}), "mnist": ("mnist_wgcn.yaml", {})}, ("langevin",)),
    ("MGCN", {"digits": ("digits_mgcn.yaml", {}), "mnist": ("mnist_mgcn.yaml", {})}, ()),
    ("GGCN", {"digits": ("digits_ggcn.yaml", {}), "mnist": ("mnist_ggcn.yaml", {})}, ("generator", "langevin")),
    ("GGCN+AMS", {"digits": ("digits_ggcn_ams.yaml", {})}, ("generator",)),
    ("wGCN (conditional)", {"digits": ("digits_wgcn_cond.yaml", {})}, ()),
    ("GGCN (conditional)", {"digits": ("digits_ggcn.yaml", CONDITIONAL_GGCN), "mnist": ("mnist_ggcn_cond.yaml", {})},
     ()),
]
DATASETS = {  # name: (overrides, classifier epochs); every preset trains for its own length
    "digits": ({}, 30),
    "mnist": ({"data.source": "npz"}, 5),
}

# Inception Scores on CIFAR-10 (32×32), Inception network on ImageNet: GGCN paper Table 2
# (generalizing-generative-convnets.md); the FRAME-revisited paper's Table 1 has the same
# FRAME/wFRAME rows. Keyed by (model, conditional).
PAPER_IS = {
    ("wGCN", False): "4.31 ± 0.12",
    ("GGCN+AMS", False): "6.79 ± 0.08",
    ("wGCN", True): "5.70 ± 0.06",
    ("MGCN", True): "6.57 ± 0.05",
    ("GGCN+AMS", True): "7.01 ± 0.05",
    ("GGCN", True): "7.10 ± 0.07",
}
PAPER_REAL_IS = 11.24  # all real CIFAR-10 images (GGCN paper, Table 2 caption)
# GGCN+AMS inpainting on CelebA (GGCN paper, Table 3): MSE, FID, SSIM, PSNR per mask.
PAPER_INPAINTING = {
    "spots": ("0.0033", "25.44", "0.954", "30.410"),
    "square": ("0.0041", "30.69", "0.934", "30.095"),
    "combined": ("0.0046", "25.03", "0.940", "30.039"),
}
PAPER_MASK_NAMES = {"spots": "Spot", "square": "Square", "combined": "Spot+Square"}


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _paper_ratio(text: str | None) -> str:
    return "–" if text is None else f"{float(text.split()[0]) / PAPER_REAL_IS:.2f}"


def _run_dir(
    label: str, dataset: str, preset: str, overrides: dict, args, common: dict, root: Path
) -> tuple[Path, float | None]:
    """The given run directory of `dataset:label`, or a freshly trained one (and train seconds)."""
    given = dict(item.split("=", 1) for item in args.run_dir).get(f"{dataset}:{label}")
    if given:
        summary = Path(given) / "summary.json"
        return Path(given), json.loads(summary.read_text())["wall_time_s"] if summary.is_file() else None
    data_overrides, _ = DATASETS[dataset]
    iterations = args.iterations
    overrides = {
        **data_overrides,
        **_dataset_paths(dataset, args),
        **overrides,
        **common,
        "tracking.enabled": False,
        **({"train.iterations": iterations} if iterations else {}),
    }
    config = load_config(CONFIGS / preset, overrides)
    run_dir = root / dataset / label.replace(" ", "_").replace("(", "").replace(")", "")
    summary = train(config, run_dir, progress=False)
    return run_dir, summary["wall_time_s"]


def _dataset_paths(dataset: str, args) -> dict:
    if dataset != "mnist":
        return {}
    if not Path(args.mnist).is_file():
        raise ConfigError(
            f"MNIST is not at '{args.mnist}': pass --mnist PATH (an .npz with x_train, "
            "y_train) or --datasets digits."
        )
    return {"data.path": str(args.mnist), **({"data.num_images": args.mnist_images} if args.mnist_images else {})}


def _settings(dataset: str, args, num: int) -> EvalSettings:
    epochs = args.classifier_epochs or DATASETS[dataset][1]
    return EvalSettings(
        num_samples=num, steps=args.steps, classifier_epochs=epochs, cache_dir=args.cache_dir
    )


def _real_row(dataset: str, args, common: dict) -> tuple[list[str], dict, float]:
    """Scores of one half of the real images against the other: the floor of every column."""
    config = load_config(
        CONFIGS / "digits_wgcn.yaml",
        {**DATASETS[dataset][0], **_dataset_paths(dataset, args), **common},
    )
    data, data_config = reference_data(config.data)
    settings = _settings(dataset, args, args.samples)
    network = feature_network(data, data_config, settings)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    half = min(args.samples, len(data) // 2)
    a, b = order[:half], order[half : 2 * half]
    scored = generative_scores(
        data.x[a], data.x[b], network, real_labels=data.y[b], num_classes=data.num_classes
    )
    s = scored["scores"]
    r, _ = response_distance(data.x[a], data.x[b])
    row = [
        dataset,
        f"real data (two halves, {half} each)",
        "–",
        _num(s["is_mean"], 2),
        "1.00",
        "11.24",
        "1.00",
        *_score_cells(s, r),
        "–",
        "–",
    ]
    return row, network.describe(), s["is_mean"]


def _score_cells(s: dict, r: float) -> list[str]:
    """The FID … coverage and R columns shared by the real-data and model rows."""
    return [_num(s["fid"], 2), *(_num(s[k]) for k in ("kid_mean", "precision", "recall", "density", "coverage")),
            _num(r, 4)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--only", nargs="*", help="labels of the models to run (default: all)")
    parser.add_argument(
        "--iterations",
        type=int,
        help="train.iterations of every model (default: each preset's own)",
    )
    parser.add_argument(
        "--samples", type=int, default=1000, help="fresh samples (and reference images) per model"
    )
    parser.add_argument(
        "--inpaint-images", type=int, default=256, help="images masked and restored per model"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="Langevin steps of fresh samples (default: each model's sample_steps)",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        help="feature classifier epochs (default: digits 30, MNIST 5)",
    )
    parser.add_argument(
        "--cache-dir", help="classifier cache (default ~/.cache/distributed_ebm/classifiers)"
    )
    parser.add_argument("--mnist", default=str(MNIST), help="MNIST .npz (x_train, y_train)")
    parser.add_argument(
        "--mnist-images", type=int, help="first N MNIST training images used (default: all)"
    )
    parser.add_argument("--png-dir", help="write each model's first 100 fresh samples here (4×+ up-scaled)")
    parser.add_argument(
        "--run-dir",
        action="append",
        default=[],
        metavar="DATA:LABEL=DIR",
        help="evaluate this trained run instead of training, e.g. 'digits:GGCN=runs/ggcn'",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every model"
    )
    parser.add_argument(
        "--runs", help="keep the trained run directories here (default: a temporary folder)"
    )
    parser.add_argument("--out", help="write the Markdown page here")
    args = parser.parse_args(argv)
    common = parse_overrides(args.set)
    root = Path(args.runs or tempfile.mkdtemp(prefix="debm-results-"))
    started = time.perf_counter()

    generation, inpainting, networks, pictures, agreement = [], [], {}, [], []
    for dataset in args.datasets:
        real_row, networks[dataset], real_is = _real_row(dataset, args, common)
        generation.append(real_row)
        print(" | ".join(real_row), flush=True)
        for label, presets, methods in MODELS:
            if dataset not in presets or (args.only and label not in args.only):
                continue
            preset, overrides = presets[dataset]
            run_dir, train_s = _run_dir(label, dataset, preset, overrides, args, common, root)
            model = load_run(run_dir)
            report = evaluate_generation(model, model.config.data, _settings(dataset, args, args.samples))
            source = report["samples"]
            if args.png_dir:  # 100 more fresh samples, drawn the same way
                fake = model.sample(100, steps=args.steps, seed=1)
                name = f"{dataset}_{label.replace(' ', '_').replace('(', '').replace(')', '').replace('+', '_')}"
                Path(args.png_dir).mkdir(parents=True, exist_ok=True)
                save_sample_png(fake[:100], Path(args.png_dir) / f"{name}.png", nrow=10,
                                scale=max(4, view_scale(fake.shape[-1])))
                pictures.append((dataset, label, f"{Path(args.png_dir).name}/{name}.png"))
            s, conditional = report["scores"], bool(model.num_classes)
            if "label_agreement" in report:
                agreement.append((dataset, label, report["label_agreement"]))
            paper = PAPER_IS.get((label.split(" (")[0], conditional))
            generation.append(
                [
                    dataset,
                    label,
                    f"{report['samples']['num']} {report['samples']['source']}",
                    f"{s['is_mean']:.2f} ± {s['is_std']:.2f}",
                    f"{s['is_mean'] / real_is:.2f}",
                    paper or "–",
                    _paper_ratio(paper),
                    *_score_cells(s, s["response_distance"]),
                    f"{model.iteration} it, "
                    + ("given run" if train_s is None else f"{train_s:.0f} s"),
                    f"{source.get('langevin_steps') or default_sample_steps(model.config)}",
                ]
            )
            print(" | ".join(generation[-1]), flush=True)
            for method in methods:
                settings = dataclasses.replace(
                    _settings(dataset, args, args.inpaint_images), method=method
                )
                report = evaluate_inpainting(model, model.config.data, settings)
                for kind, m in report["masks"].items():
                    b = report["baseline"]["masks"][kind]
                    inpainting.append(
                        [
                            dataset,
                            f"{label} ({method})",
                            kind,
                            f"{m['mse']:.4f}",
                            f"{m['psnr']:.2f}",
                            f"{m['ssim']:.3f}",
                            f"{m['fid']:.2f}",
                            f"{m['missing_psnr']:.2f} / {b['missing_psnr']:.2f}",
                            f"{m['missing_ssim']:.3f} / {b['missing_ssim']:.3f}",
                            "yes" if m["missing_mse"] < b["missing_mse"] else "no",
                            PAPER_MASK_NAMES[kind],
                            *PAPER_INPAINTING[kind],
                        ]
                    )
                    print(" | ".join(inpainting[-1]), flush=True)

    page = _page(argv, generation, inpainting, networks, args, time.perf_counter() - started, pictures, agreement)
    if args.out:
        Path(args.out).write_text(page)
        print(f"written to {args.out}")
    return 0


def _page(argv, generation, inpainting, networks, args, seconds: float, pictures=(), agreement=()) -> str:
    command = shlex.join(["scripts/results.py", *(argv if argv is not None else sys.argv[1:])])
    generation_table = emit_table(
        [
            "data",
            "model",
            "samples",
            "IS (ours)",
            "IS / IS of real data",
            "paper IS (CIFAR-10)",
            "paper IS / 11.24",
            "FID",
            "KID",
            "precision",
            "recall",
            "density",
            "coverage",
            "R",
            "trained",
            "sampling steps",
        ],
        generation,
        None,
    )
    inpainting_table = (
        emit_table(
            [
                "data",
                "model (method)",
                "mask",
                "MSE",
                "PSNR dB",
                "SSIM",
                "FID",
                "hole PSNR dB: ours / biharmonic",
                "hole SSIM: ours / biharmonic",
                "ahead on the hole",
                "paper mask",
                "paper MSE",
                "paper FID",
                "paper SSIM",
                "paper PSNR",
            ],
            inpainting,
            None,
        )
        if inpainting
        else "(no inpainting rows run)"
    )
    agreement_lines = "\n".join(
        [f"Conditional models: the classifier puts {a:.1%} of the {dataset} samples drawn for a class in that class "
         f"({label})." for dataset, label, a in agreement]) if agreement else ""
    picture_lines = "\n\n".join(
        f"{dataset}, {label} (100 fresh samples, nearest-neighbour up-scaled):\n\n![{dataset} {label}]({path})"
        for dataset, label, path in pictures)
    network_lines = "\n".join(
        f"  - **{dataset}**: {n['name']}, hash `{n.get('hash')}`, trained {n.get('epochs')} "
        f"epochs on {n.get('num_images')} images (training accuracy "
        f"{n.get('train_accuracy', 0):.3f}), file `{n.get('file')}`"
        for dataset, n in networks.items()
    )
    return f"""# Results beside the papers'

Produced by

    .venv/bin/python {command}

in {seconds / 60:.1f} minutes on the 2-core CPU machine. Every sample is **fresh** (new chains or
new g(ζ) run through the model's own sampler, steps in the column "sampling steps"; never the persistent bank), {args.samples} per
model, scored against as many reference images of the training data; inpainting restores
{args.inpaint_images} masked reference images per mask. Library: `distributed_ebm/evaluation.py`
(the same code as `debm evaluate`).

## What is comparable, and what is not

- **Feature network.** Every number of ours is in the feature space of a small classifier
  trained on the data set itself (`SmallClassifier`, `distributed_ebm/metrics/classifier.py`):
{network_lines}

  The papers use an Inception network trained on ImageNet, on 32×32 CIFAR-10 (Inception Score)
  and 64×64 CelebA (inpainting FID). FID, KID and IS depend on the network, so **no value of ours
  can be compared with a value of the papers**; only the ordering of models within a column can.
- **Inception Score.** Ours is over the classifier's 10 classes (at most 10; real digits score
  the value in the "real data" row); the papers' is over Inception's 1000 ImageNet classes on
  CIFAR-10 (all real images: 11.24). "IS / IS of real data" puts both on the scale of their own
  real data; it is still not a like-for-like comparison (different data, classes and network).
- **FID and the rest.** The papers report no generation FID, KID, precision/recall or
  density/coverage; those columns are ours only. Their floor is the "real data" row (two
  disjoint halves of the real images). Precision and density fall with blurry or off-manifold
  samples; recall and coverage fall with dropped modes (k = 5 nearest neighbours). KID is an
  unbiased estimate (torchmetrics, 100 subsets): it can be negative when two sets are alike.
- **R** is the response distance of training (fixed random filter bank), as in both papers'
  curves; the papers give it only as curves, not numbers.
- **Inpainting.** The paper's GGCN+AMS inpaints 64×64 CelebA faces with a ResNet-50
  autoencoder generator fed the masked image; ours fits ζ to the observed pixels and refines by
  masked Langevin (`generator`), or runs masked Langevin on Φ (`langevin`), on 8×8 digits or 28×28
  MNIST. Our MSE is on pixels in [-1, 1] and PSNR uses data range 2; the paper does not state its
  pixel range. Our FID compares restored with original images in the classifier's space.
- **Training length.** Our models train for minutes on a CPU (column "trained"); the papers'
  for far longer on GPUs. The conditional rows sample every class in turn.

## Generation (Inception Score, FID, KID, precision/recall, density/coverage, R)

{generation_table}

{agreement_lines}

{picture_lines}

## Inpainting (GGCN paper, Table 3)

"hole" columns score the missing pixels only, ours beside a baseline on the same images and masks:
the hole filled by biharmonic interpolation from the observed pixels (scikit-image's
`inpaint_biharmonic`). The other columns are over the whole image (observed pixels included, as
the paper's).

{inpainting_table}
"""


if __name__ == "__main__":
    sys.exit(main())
