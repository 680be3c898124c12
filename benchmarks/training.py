"""Training speed: whole `debm train` iterations per speed option, against the fp32 eager path.

One run trains the same preset (in this process, `--workers 0`, no MLflow) once per variant —
fp32 eager (the baseline), `langevin.autocast=bf16`, `langevin.compile=true` and
`langevin.channels_last=true` — and prints, per variant, the median seconds per iteration after
`--warmup` iterations (from metrics.jsonl), images/s (data images per iteration / s),
chain-steps/s (chains × Langevin steps per iteration / s), the peak CUDA memory
(torch.cuda.max_memory_allocated) and the speed-up against the fp32 eager variant measured in
the same run. On a GPU with no data set at hand, `--rgb32` trains on synthetic 32×32 RGB
images written to a temporary .npz (speed does not depend on the pictures).

    .venv/bin/python benchmarks/training.py --device cuda --rgb32 --iterations 40
    .venv/bin/python benchmarks/training.py --device cpu --iterations 20 --variants fp32,bf16
    .venv/bin/python benchmarks/training.py --json out.json ...   # also write the table as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": ["langevin.autocast=null"],  # also where the preset sets autocast: auto (the MNIST ones)
    "bf16": ["langevin.autocast=bf16"],
    "compile": ["langevin.compile=true", "langevin.autocast=null"],
    "channels_last": ["langevin.channels_last=true", "langevin.autocast=null"],
}


def synthetic_rgb32(path: Path, num: int = 2048, seed: int = 0) -> Path:
    """Smooth random 32×32 RGB images (upsampled 8×8 noise) as an .npz with x_train/y_train."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(num, 3, 8, 8)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small), size=32, mode="bilinear", align_corners=False)
    x = big.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, x_train=x, y_train=rng.integers(0, 10, size=num))
    return path


def run_variant(name: str, args, base_sets: list[str], workdir: Path) -> dict:
    from distributed_ebm.cli import main

    run_dir = workdir / name
    sets = [*base_sets, *VARIANTS[name], f"train.iterations={args.iterations}", f"train.device={args.device}",
            f"train.checkpoint_every={args.iterations}", f"train.sample_every={args.iterations}"]
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    code = main(["train", "--config", str(ROOT / args.preset), "--workers", "0", "--no-mlflow",
                 "--run-dir", str(run_dir), *[a for kv in sets for a in ("--set", kv)]])
    if code != 0:
        return {"variant": name, "error": f"debm train exited {code}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    seconds = statistics.median(r["seconds"] for r in [r for r in rows if r["iteration"] > args.warmup] or rows)
    chains = config["chains"]["batch_size"]
    steps = config["langevin"]["langevin_steps"]
    return {
        "variant": name,
        "s_per_iteration": seconds,
        "images_per_s": config["train"]["data_batch_size"] / seconds,
        "chain_steps_per_s": chains * steps / seconds,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "final_R": rows[-1].get("response_distance"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="configs/digits_wgcn.yaml")
    parser.add_argument("--rgb32", action="store_true", help="synthetic 32×32 RGB data (npz source)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the median")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="debm-bench-train-") as tmp:
        workdir = Path(tmp)
        base = list(args.set)
        if args.rgb32:
            base += [f"data.path={synthetic_rgb32(workdir / 'rgb32.npz')}", "data.source=npz"]
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"# training speed: {args.preset}{' on synthetic RGB32' if args.rgb32 else ''}, {args.iterations} "
              f"iterations, median after {args.warmup}, device {device_name}, torch {torch.__version__}")
        results = [run_variant(name, args, base, workdir) for name in args.variants.split(",")]
    baseline = next((r for r in results if r["variant"] == "fp32" and "error" not in r), None)
    print("| variant | s/iteration | images/s | chain-steps/s | peak MiB | speed-up vs fp32 eager |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        ratio = baseline["s_per_iteration"] / r["s_per_iteration"] if baseline else float("nan")
        r["speedup_vs_fp32"] = ratio
        peak = "–" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        print(f"| {r['variant']} | {r['s_per_iteration']:.4f} | {r['images_per_s']:.0f} | "
              f"{r['chain_steps_per_s']:.0f} | {peak} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "preset": args.preset, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
