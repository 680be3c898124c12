"""Quality table of the digits presets (issue: GGCN paper ordering on bundled data).

For each model: train the preset, draw fresh samples, and score them with a small ConvNet
classifier trained on the real digits (metrics/classifier.py): the fraction of the 10 classes
covered by unconditional samples (a class counts when ≥ 2 % of samples are predicted as it),
the Fréchet distance between classifier features of samples and of real digits, and, for the
conditional variants, the agreement between requested and predicted labels.

    .venv/bin/python scripts/quality_table.py --iterations 300 --out docs/quality_digits.md

Other data: `--set` applies overrides to every model (and to the classifier's data), e.g. MNIST:

    .venv/bin/python scripts/quality_table.py --iterations 200 --classifier-epochs 3 \
        --set data.source=npz data.path=../shared/data/mnist/mnist.npz data.num_images=10000 \
              "model.grid_sizes=[1, 7, 14, 28]"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tables import emit_table

from distributed_ebm.config import load_config, parse_overrides
from distributed_ebm.data import load_dataset
from distributed_ebm.inference import load_run
from distributed_ebm.metrics.classifier import frechet_distance, train_classifier
from distributed_ebm.train_loop import train

CONFIGS = Path(__file__).parents[1] / "configs"
MODELS = [  # (label, preset, overrides)
    ("wGCN", "digits_wgcn.yaml", {}),
    ("MGCN", "digits_mgcn.yaml", {}),
    ("wMGCN", "digits_wmgcn.yaml", {}),
    ("GGCN", "digits_ggcn.yaml", {}),
    ("GGCN\\LHS", "digits_ggcn_nolhs.yaml", {}),
    ("GGCN+AMS", "digits_ggcn_ams.yaml", {}),
    ("wGCN (conditional)", "digits_wgcn_cond.yaml", {}),
    ("GGCN (conditional)", "digits_ggcn.yaml", {"model.conditional": True, "chains.batch_size": 100,
                                                 "train.data_batch_size": 100, "generator.latent_bank_size": 500}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--only", nargs="*", help="labels of the models to run (default: all)")
    parser.add_argument("--runs", help="keep run directories here")
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every model")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    args = parser.parse_args(argv)
    common = parse_overrides(args.set)

    digits = load_dataset(load_config(CONFIGS / "digits_wgcn.yaml", common).data)
    started = time.perf_counter()
    classifier = train_classifier(digits, epochs=args.classifier_epochs)
    accuracy = float((classifier.predict(digits.x) == digits.y).float().mean())
    real = classifier.embed(digits.x).numpy()
    print(f"classifier: SmallClassifier (conv32-conv64-fc128) on {digits.name} ({len(digits)} images), "
          f"train accuracy {accuracy:.3f}, "
          f"{time.perf_counter() - started:.0f}s; real-vs-real FD (two halves) "
          f"{frechet_distance(real[::2], real[1::2]):.2f}", flush=True)

    root = Path(args.runs or tempfile.mkdtemp(prefix="debm-quality-"))
    header = ["model", "preset", "classes covered", "Fréchet distance (classifier features)",
              "FD of the persistent bank", "conditional agreement", "train wall s"]
    rows = []
    for label, preset, overrides in MODELS:
        if args.only and label not in args.only:
            continue
        config = load_config(CONFIGS / preset, {**common, **overrides, "train.iterations": args.iterations,
                                                "tracking.enabled": False})
        run_dir = root / label.replace("\\", "-").replace(" ", "_").replace("(", "").replace(")", "")
        summary = train(config, run_dir, progress=False)
        model = load_run(run_dir)
        if model.num_classes:
            per_class = args.samples // 10
            agreement = np.mean([
                float((classifier.predict(model.sample(per_class, label=k, seed=k)) == k).float().mean())
                for k in range(10)
            ])
            covered, fd, bank_fd, agree = "–", "–", "–", f"{agreement:.2f}"
        else:
            samples = model.sample(args.samples, seed=0)
            predicted = classifier.predict(samples)
            share = torch.bincount(predicted, minlength=10).float() / len(samples)
            covered = f"{int((share >= 0.02).sum())}/10"
            fd = f"{frechet_distance(classifier.embed(samples).numpy(), real):.1f}"
            bank = model.state.banks.get("chains")
            bank_fd = f"{frechet_distance(classifier.embed(bank.states).numpy(), real):.1f}" if bank else "–"
            agree = "–"
        rows.append([label, preset + "".join(f" {k}={v}" for k, v in overrides.items()), covered, fd, bank_fd, agree,
                     f"{summary['wall_time_s']:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    emit_table(header, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
