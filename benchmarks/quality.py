"""Sample quality against wall-clock time: the project's presets beside a peer baseline.

Trains each preset (`debm`'s `train`, one process) and the peer — the standard replay-buffer
EBM of Du & Mordatch 2019 with its published settings (benchmarks/peers/replay_ebm.py) — for the
same training budget, one after the other, on the `x_train` images of an .npz (MNIST layout:
x_train/y_train/x_test/y_test). Every score is of **fresh** samples (new chains / new g(ζ) run
through the model's own sampler; the peer's: uniform noise through 256 steps), never a
persistent bank, against held-out `x_test` images, in the feature space of the project's
classifier trained on the training images (named, with its hash, in the output). The
real-vs-real row scores held-out training images the same way: it is the floor.

Quality is measured at `--curve-points` times of each run (the checkpoint nearest below each
time for the presets, a snapshot for the peer) on `--curve-num` samples, and at the full budget
on `--num` samples. Time is training wall time (the sum of the iterations' step seconds);
sampling and scoring are not counted. A preset trains for its own `train.iterations` (the length
it ships with, e.g. mnist_mgcn's 1150) or the budget, whichever
ends first; `--set train.iterations=N` trains it longer.

    .venv/bin/python benchmarks/quality.py --budget-s 900 --data ../shared/data/mnist/mnist.npz
    .venv/bin/python benchmarks/quality.py --budget-s 300 --data mnist.npz --presets configs/mnist_ggcn.yaml
    .venv/bin/python benchmarks/quality.py ... --no-peer --out /tmp/quality   # table.md, curve.png, results.json

With `--steps-scales 1,3,10` the final model of every system also draws `--steps-num` fresh samples
with its own sampling steps times each scale (the same seed; the peer's 256 steps too) and a second
table says whether quality holds as the chains run longer — as a density's samples do — or falls
apart, as a short-run sampler's do (Nijkamp et al. 2020); its largest-class column catches the
drift of samples into one blob class.

Output (in --out): table.md (the table printed at the end), curve.png (FID against wall time),
samples-<name>.png (the final fresh samples, 4× nearest-neighbour upscaled), results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers.replay_ebm import PeerCNN, PeerSettings, ReplayBufferEBM, train_for  # noqa: E402
from distributed_ebm.checkpoint import final_trajectory  # noqa: E402
from distributed_ebm.config import DataConfig, load_config  # noqa: E402
from distributed_ebm.data import load_dataset  # noqa: E402
from distributed_ebm.evaluation import (  # noqa: E402
    EvalSettings,
    default_sample_steps,
    feature_network,
    score_generation,
)
from distributed_ebm.inference import load_run  # noqa: E402
from distributed_ebm.rundir import save_sample_png  # noqa: E402
from distributed_ebm.train_loop import train  # noqa: E402

DEFAULT_PRESETS = ("configs/mnist_ggcn.yaml", "configs/mnist_wgcn.yaml", "configs/mnist_mgcn.yaml")
MIN_CLASS_SHARE = 0.05  # "every class ≥ 5 % of samples"


def upscaled_grid(samples: torch.Tensor, path: Path, scale: int = 4, nrow: int = 10) -> None:
    """A grid of the first 100 samples, each pixel scale×scale (nearest neighbour)."""
    save_sample_png(samples[:100], path, nrow=nrow, scale=scale)


class Scorer:
    """Fresh samples → the report's row, in one feature space against held-out images."""

    def __init__(self, path: str, args):
        self.train_cfg = DataConfig(source="npz", path=path, num_images=args.classifier_images)
        self.test_cfg = DataConfig(source="npz", path=path, split="test")
        self.train_data = load_dataset(self.train_cfg)
        self.test_data = load_dataset(self.test_cfg)
        self.settings = EvalSettings(num_samples=args.num, num_real=args.num, seed=args.seed,
                                     classifier_epochs=args.classifier_epochs, kid_subsets=args.kid_subsets,
                                     cache_dir=args.cache_dir, device=args.device)
        self.network = feature_network(self.train_data, self.train_cfg, self.settings)

    def score(self, fake: torch.Tensor, what: str, num_real: int, labels: torch.Tensor | None = None) -> dict:
        """The row of `fake`; with `labels` (the class each image was drawn for) also the share the
        classifier puts in that class."""
        settings = replace(self.settings, num_real=num_real)
        report = score_generation(fake, {"source": what, "num": len(fake)}, self.test_data, self.test_cfg,
                                  self.network, settings, fake_labels=labels)
        shares = report.get("generated_class_share", {})
        return {
            **{k: report["scores"][k] for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage")},
            "classes_at_5pct": sum(v >= MIN_CLASS_SHARE for v in shares.values()),
            "min_class_share": min(shares.values()) if shares else None,
            "max_class_share": max(shares.values()) if shares else None,
            "num": len(fake),
            "label_agreement": report.get("label_agreement"),
        }

    def real_vs_real(self, num: int) -> dict:
        """Held-out training images (beyond the classifier's) against the test images: the floor."""
        full = load_dataset(replace(self.train_cfg, num_images=None))
        start = min(self.train_cfg.num_images or 0, len(full) - num)
        return self.score(full.x[start : start + num], "real training images (held out from the classifier)", num)


def curve_marks(budget_s: float, points: int) -> list[float]:
    return [budget_s * (i + 1) / points for i in range(points)]


def steps_scales(text: str) -> list[float]:
    """`--steps-scales` '1,3,10' → [1.0, 3.0, 10.0]; each must be positive."""
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        scales = [0.0]
    if any(v <= 0 for v in scales):
        raise SystemExit(f"--steps-scales {text!r}: every scale must be > 0 (e.g. 1,3,10).")
    return scales


def longer_chains(draw, default_steps: int, args, scorer: Scorer, what: str, labels_for=None) -> list[dict]:
    """Fresh samples of one final model at its sampling steps × each `--steps-scales`, the same seed:
    `draw(num, steps=K)` gives the samples, `labels_for(num, None)` the classes a conditional model was
    asked for (None for unconditional ones)."""
    rows = []
    for scale in steps_scales(args.steps_scales):
        steps = max(1, round(default_steps * scale))
        tick = time.perf_counter()
        fake = draw(args.steps_num, steps=steps)
        labels = labels_for(args.steps_num, None) if labels_for else None
        scores = scorer.score(fake, f"fresh samples of {what}, {steps} sampling steps", args.steps_num, labels)
        rows.append({"scale": scale, "steps": steps, **scores, "sampling_scoring_s": time.perf_counter() - tick})
        print(f"   {steps} steps ({scale:g}× {default_steps}): FID {scores['fid']:.1f} precision "
              f"{scores['precision']:.3f} recall {scores['recall']:.3f} largest class {scores['max_class_share']}",
              flush=True)
    return rows


def run_preset(preset: str, args, scorer: Scorer, out: Path) -> dict:
    """Train `preset` for the budget; score its fresh samples at each curve mark."""
    name = Path(preset).stem
    overrides = {
        "data.source": "npz", "data.path": str(Path(args.data).resolve()),
        "train.time_budget_s": args.budget_s, "train.checkpoint_every": args.checkpoint_every,
        "train.keep_checkpoints": 10**6, "tracking.enabled": False, "train.device": args.device,
        **dict(kv.split("=", 1) for kv in args.set),
    }
    config = load_config(ROOT / preset if not Path(preset).is_absolute() else preset,
                         {k: _yaml(v) for k, v in overrides.items()})
    run_dir = out / "runs" / name
    print(f"\n== {name}: training for {args.budget_s:.0f} s ({run_dir})", flush=True)
    summary = train(config, run_dir, progress=not args.quiet)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # training time, including iterations a collapse recovery undid (metrics_rolled_back.jsonl)
    undone = run_dir / "metrics_rolled_back.jsonl"
    lost = sum(json.loads(line)["seconds"] for line in undone.read_text().splitlines()) if undone.is_file() else 0.0
    elapsed = np.cumsum([r["seconds"] for r in rows])
    elapsed = elapsed + lost * (np.arange(1, len(rows) + 1) / len(rows))  # spread: the time line is approximate
    # the checkpoint of each iteration on the final trajectory (not those a recovery abandoned)
    # (iteration 0, a rollback to the initial state, is not a trained model)
    checkpoints = {it: path for it, path in final_trajectory(run_dir / "checkpoints").items() if it > 0}
    curve, longer = [], []
    for i, mark in enumerate(curve_marks(args.budget_s, args.curve_points)):
        final = i == args.curve_points - 1
        iteration = max((it for it in checkpoints if it <= len(rows) and elapsed[it - 1] <= mark + 1e-9), default=None)
        if final:
            iteration = max(checkpoints, default=None)
        if iteration is None:
            continue
        model = load_run(run_dir, checkpoint=checkpoints[iteration], device=args.device)
        num = args.num if final else args.curve_num
        tick = time.perf_counter()
        fake = model.sample(num, seed=args.seed)
        labels = model.labels_for(num, None)  # None for unconditional models; else the classes cycled
        scores = scorer.score(fake, f"fresh samples of {name} (its own sampler)", num, labels)
        curve.append({"wall_s": float(elapsed[iteration - 1]), "iterations": iteration, **scores,
                      "sampling_scoring_s": time.perf_counter() - tick})
        print(f"   t={elapsed[iteration - 1]:.0f}s it={iteration}: FID {scores['fid']:.1f} precision "
              f"{scores['precision']:.3f} recall {scores['recall']:.3f}", flush=True)
        if final:
            upscaled_grid(fake, out / f"samples-{name}.png")
            longer = longer_chains(partial(model.sample, seed=args.seed), default_sample_steps(model.config),
                                   args, scorer, name, model.labels_for)
    return {"name": name, "preset": preset, "status": summary["status"], "curve": curve,
            "final": curve[-1] if curve else None, "longer_chains": longer}


def run_peer(args, scorer: Scorer, out: Path) -> dict:
    """Train the peer for the budget; score its fresh samples at each curve mark."""
    images = load_dataset(DataConfig(source="npz", path=args.data)).x
    settings = PeerSettings(**{k: _yaml(v) for k, v in (kv.split("=", 1) for kv in args.peer_set)})
    torch.manual_seed(args.seed)
    peer = ReplayBufferEBM(PeerCNN(images.shape[1], images.shape[-1], settings.hidden), tuple(images.shape[1:]),
                           settings, seed=args.seed, device=args.device)
    snapshots = []
    print(f"\n== peer (replay-buffer EBM, Du & Mordatch 2019): training for {args.budget_s:.0f} s", flush=True)
    marks = curve_marks(args.budget_s, args.curve_points)
    iterations = train_for(peer, images, budget_s=args.budget_s, seed=args.seed, checkpoint_s=tuple(marks),
                           on_checkpoint=lambda t, it: snapshots.append((t, it, copy.deepcopy(peer.model.state_dict()))))
    curve, longer = [], []
    for i, (wall, it, weights) in enumerate(snapshots):
        final = i == len(snapshots) - 1
        peer.model.load_state_dict(weights)
        num = args.num if final else args.curve_num
        tick = time.perf_counter()
        fake = peer.sample(num, seed=args.seed)
        scores = scorer.score(fake, "fresh samples of the peer (uniform noise, 256 steps)", num)
        curve.append({"wall_s": wall, "iterations": it, **scores, "sampling_scoring_s": time.perf_counter() - tick})
        print(f"   t={wall:.0f}s it={it}: FID {scores['fid']:.1f} precision {scores['precision']:.3f} "
              f"recall {scores['recall']:.3f}", flush=True)
        if final:
            upscaled_grid(fake, out / "samples-peer.png")
            longer = longer_chains(partial(peer.sample, seed=args.seed), settings.sample_steps, args, scorer,
                                   "the peer")
    return {"name": "peer (replay-buffer EBM)", "preset": "benchmarks/peers/replay_ebm.py",
            "status": "completed", "settings": asdict(settings), "iterations": iterations, "curve": curve,
            "final": curve[-1] if curve else None, "longer_chains": longer}


def _yaml(value):
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value


def table(results: list[dict], floor: dict, network: str) -> str:
    lines = [f"Fresh samples against held-out test images; feature network: {network}", "",
             "| system | FID | precision | recall | density | coverage | classes ≥ 5 % | min class share | "
             "iterations | wall s | samples | label agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, r, iterations="–", wall="–"):
        share = "–" if r.get("min_class_share") is None else f"{r['min_class_share']:.3f}"
        return (f"| {name} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['density']:.3f} | "
                f"{r['coverage']:.3f} | {r['classes_at_5pct']} | {share} | {iterations} | {wall} | {r['num']} | "
                f"{'–' if r.get('label_agreement') is None else format(r['label_agreement'], '.3f')} |")

    lines.append(row("real vs real (floor)", floor))
    for result in results:
        final = result["final"]
        if final is None:
            lines.append(f"| {result['name']} | no checkpoint inside the budget | | | | | | | | | | |")
            continue
        lines.append(row(result["name"], final, final["iterations"], f"{final['wall_s']:.0f}"))
    peer = next((r for r in results if r["name"].startswith("peer") and r["final"]), None)
    ours = [r for r in results if not r["name"].startswith("peer") and r["final"]]
    if peer and ours:
        best = min(ours, key=lambda r: r["final"]["fid"])
        lines += ["", f"best preset {best['name']}: FID {best['final']['fid']:.2f} = "
                      f"{best['final']['fid'] / peer['final']['fid']:.2f} × the peer's ({peer['final']['fid']:.2f}); "
                      f"{best['final']['fid'] / floor['fid']:.2f} × real-vs-real ({floor['fid']:.2f})"]
    longer = [(r["name"], row) for r in results for row in r.get("longer_chains", [])]
    if longer:
        lines += ["", f"Longer chains: the final model's fresh samples ({longer[0][1]['num']} each, the same seed) "
                      "at its sampling steps × a scale", "",
                  "| system | steps | × default | FID | precision | recall | coverage | classes ≥ 5 % | "
                  "largest class share |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['steps']} | {row['scale']:g} | {row['fid']:.2f} | {row['precision']:.3f} | "
                  f"{row['recall']:.3f} | {row['coverage']:.3f} | {row['classes_at_5pct']} | "
                  f"{'–' if row['max_class_share'] is None else format(row['max_class_share'], '.3f')} |"
                  for name, row in longer]
    return "\n".join(lines)


def plot(results: list[dict], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        if result["curve"]:
            ax.plot([c["wall_s"] for c in result["curve"]], [c["fid"] for c in result["curve"]], "o-",
                    label=result["name"])
    ax.axhline(floor["fid"], color="grey", linestyle="--", label="real vs real")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("FID (classifier features), fresh samples")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, required=True, help="training wall time of every system")
    parser.add_argument("--data", required=True, help=".npz with x_train/y_train/x_test/y_test")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated preset files")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--num", type=int, default=2000, help="fresh samples scored at the full budget")
    parser.add_argument("--curve-points", type=int, default=4, help="times of the curve (the last is the budget)")
    parser.add_argument("--curve-num", type=int, default=500, help="samples scored at earlier curve points")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="preset checkpoints (curve resolution)")
    parser.add_argument("--steps-scales", default="",
                        help="also score each final model at its sampling steps × these scales, e.g. 1,3,10")
    parser.add_argument("--steps-num", type=int, default=500, help="fresh samples per --steps-scales row")
    parser.add_argument("--classifier-epochs", type=int, default=5)
    parser.add_argument("--classifier-images", type=int, default=10000)
    parser.add_argument("--kid-subsets", type=int, default=50)
    parser.add_argument("--cache-dir", help="cached feature classifiers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    parser.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of a PeerSettings field (only to shrink it for tests)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quality-results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    steps_scales(args.steps_scales)  # a bad list fails before hours of training, not after
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scorer = Scorer(args.data, args)
    network = scorer.network.describe()
    network_name = f"{network.get('name', network)} ({network.get('hash', '')})" if isinstance(network, dict) else str(network)
    floor = scorer.real_vs_real(args.num)
    print(f"real vs real: FID {floor['fid']:.2f} ({network_name})", flush=True)
    results = [run_preset(p, args, scorer, out) for p in args.presets.split(",") if p]
    if not args.no_peer:
        results.append(run_peer(args, scorer, out))
    text = table(results, floor, network_name)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    plot(results, floor, out / "curve.png")
    (out / "results.json").write_text(json.dumps({"budget_s": args.budget_s, "data": args.data,
                                                   "feature_network": network, "real_vs_real": floor,
                                                   "results": results,
                                                   "benchmark_wall_s": time.perf_counter() - started}, indent=2))
    print(f"\nwritten: {out}/table.md, curve.png, samples-*.png, results.json "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
