"""Live weights against their EMA (train.ema_decay), paired on the same checkpoints.

The FID of one set of weights moves a lot between checkpoints a few dozen iterations apart, so
comparing two runs' final figures cannot say whether an EMA helps. This scores, for each chosen
checkpoint of one run trained with `train.ema_decay`, fresh samples drawn with the same ζ and
noise seed from several mixes of live and averaged networks, against held-out `x_test` images
in the quality benchmark's feature space (benchmarks/quality.py's `Scorer`).

A mix names the networks taken from the EMA: `live` (none), `all` (every averaged one), or
network names joined by `+` (`energy`, `generator`, `energy+generator`; MGCN's is `grids`).

    .venv/bin/python benchmarks/ema_pairs.py RUN_DIR --data mnist.npz --checkpoints 1200,1500 \\
        --mixes live,energy,generator,all
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import Scorer  # noqa: E402
from distributed_ebm.checkpoint import final_trajectory  # noqa: E402
from distributed_ebm.inference import load_run  # noqa: E402


def checkpoint_at(run_dir: Path, iteration: int) -> Path:
    """The run's checkpoint of `iteration` on the trajectory it ended on (not one a recovery abandoned)."""
    found = final_trajectory(run_dir / "checkpoints")
    if iteration not in found:
        raise SystemExit(f"'{run_dir}' has no checkpoint of iteration {iteration} on its final trajectory; "
                         f"it has {sorted(found)}.")
    return found[iteration]


def mixed(run_dir: Path, checkpoint: Path, mix: str):
    """The run at `checkpoint` with the networks `mix` names swapped for their EMA."""
    model = load_run(run_dir, checkpoint=checkpoint, ema=False)
    if mix == "live":
        return model
    averaged = load_run(run_dir, checkpoint=checkpoint, ema=True)
    names = list(averaged.state.ema) if mix == "all" else mix.split("+")
    missing = [n for n in names if n not in averaged.state.ema]
    if missing:
        raise SystemExit(f"mix '{mix}': the run keeps no EMA of {missing} (it averages {sorted(averaged.state.ema)}); "
                         "train it with train.ema_decay (and train.ema_models naming them).")
    model.state.models = {**model.state.models, **{n: averaged.state.ema[n] for n in names}}
    return model


def agreement(value: float | None) -> str:
    """A conditional model's share of samples in the class asked for; '–' for unconditional ones."""
    return "–" if value is None else f"{100 * value:.1f} %"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run trained with train.ema_decay")
    parser.add_argument("--data", required=True, help=".npz with x_train/y_train/x_test/y_test")
    parser.add_argument("--checkpoints", required=True, help="comma-separated iterations")
    parser.add_argument("--mixes", default="live,all", help="comma-separated: live, all, or names joined by +")
    parser.add_argument("--num", type=int, default=1000, help="fresh samples per mix and checkpoint")
    parser.add_argument("--steps", type=int, help="refinement / sampling steps (default: the run's own)")
    parser.add_argument("--classifier-epochs", type=int, default=5)
    parser.add_argument("--classifier-images", type=int, default=10000)
    parser.add_argument("--kid-subsets", type=int, default=20)
    parser.add_argument("--cache-dir", help="cached feature classifiers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scorer = Scorer(args.data, args)
    network = scorer.network.describe()
    print(f"feature network: {network.get('name')} ({network.get('hash')}); {args.num} fresh samples per row against "
          f"as many held-out test images, seed {args.seed}")
    print("| iteration | mix | FID | precision | recall | coverage | classes ≥ 5 % | label agreement |\n"
          "|---|---|---|---|---|---|---|---|")
    rows = []
    for iteration in (int(i) for i in args.checkpoints.split(",")):
        path = checkpoint_at(args.run_dir, iteration)
        for mix in args.mixes.split(","):
            model = mixed(args.run_dir, path, mix)
            labels = model.labels_for(args.num, None)
            fake = model.sample(args.num, seed=args.seed, steps=args.steps)
            row = {"iteration": iteration, "mix": mix, **scorer.score(fake, f"{mix} @ {iteration}", args.num, labels)}
            rows.append(row)
            print(f"| {iteration} | {mix} | {row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                  f"{row['coverage']:.3f} | {row['classes_at_5pct']} | {agreement(row['label_agreement'])} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
