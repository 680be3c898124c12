"""Memory and speed per worker of the presets for the papers' workloads, one worker, a few iterations.

Each preset trains `--iterations` iterations in a fresh child process (`debm train --workers 0
--no-mlflow`, its own CUDA context) on synthetic images of the preset's size and channels (speed
and memory do not depend on the pictures; labelled, for the conditional presets), with the
preset's own chains per worker, data batch, Langevin steps and networks. It prints, per preset:
chains per worker, the median seconds per iteration after `--warmup`, images/s, and the peak
memory of the worker:

- on CUDA: torch.cuda.max_memory_allocated (what the caching allocator handed out; nvidia-smi shows
  that plus the CUDA context, about 0.5 GiB);
- on the CPU: an **estimate**, the growth of the process's peak resident set while it trains (the
  activations and optimiser state the GPU would hold, plus CPU-only buffers).

    .venv/bin/python benchmarks/preset_memory.py --device cuda
    .venv/bin/python benchmarks/preset_memory.py --device cpu --iterations 3 --presets configs/cifar10_ggcn_cond_paper.yaml
    .venv/bin/python benchmarks/preset_memory.py ... --set langevin.langevin_steps=2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("configs/cifar10_ggcn_ams_paper.yaml", "configs/cifar10_ggcn_cond_paper.yaml",
                 "configs/lsun_bedroom64_ggcn.yaml", "configs/imagenet64_ggcn.yaml",
                 "configs/celeba64_ggcn_ams_inpaint.yaml")


def synthetic_images(path: Path, size: int, channels: int = 3, num: int = 512, seed: int = 0) -> Path:
    """Smooth random size×size images (up-sampled 8×8 noise) with 10 labels, as an .npz (x_train/y_train)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 255, size=(num, channels, 8, 8)).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)
    x = big.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, x_train=x[..., 0] if channels == 1 else x, y_train=rng.integers(0, 10, size=num))
    return path


def measure(preset: str, sets: list[str], args, workdir: Path) -> dict:
    """Train `preset` here (the child process) and return its row."""
    from distributed_ebm.cli import main

    raw = yaml.safe_load((ROOT / preset).read_text())
    size = int(raw.get("data", {}).get("image_size") or 32)
    data = synthetic_images(workdir / f"data{size}.npz", size, num=max(512, 2 * int(raw["train"]["data_batch_size"])))
    run_dir = workdir / "run"
    overrides = ["data.source=npz", f"data.path={data}", "data.urls=null", f"train.iterations={args.iterations}",
                 f"train.device={args.device}", f"train.checkpoint_every={args.iterations}",
                 f"train.sample_every={args.iterations}", "train.time_budget_s=null", "train.log_every=1", *sets]
    if args.device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["train", "--config", str(ROOT / preset), "--workers", "0", "--no-mlflow",
                 "--run-dir", str(run_dir), *[a for kv in overrides for a in ("--set", kv)]])
    if code != 0:
        return {"preset": preset, "error": f"debm train exited {code}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    seconds = statistics.median(r["seconds"] for r in [r for r in rows if r["iteration"] > args.warmup] or rows)
    if args.device == "cuda":
        peak, method = torch.cuda.max_memory_allocated() / 2**20, "measured (torch.cuda.max_memory_allocated)"
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        method = "CPU estimate (growth of the peak resident set)"
    return {
        "preset": preset, "algorithm": config["model"]["algorithm"], "image_size": size,
        "chains_per_worker": config["chains"]["batch_size"], "data_batch": config["train"]["data_batch_size"],
        "langevin_steps": config["langevin"]["langevin_steps"], "channels": config["model"]["channels"],
        "s_per_iteration": seconds, "images_per_s": config["train"]["data_batch_size"] / seconds,
        "peak_mib": peak, "memory": method, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }


def table(rows: list[dict]) -> str:
    lines = ["| preset | algorithm | image | chains per worker | Langevin steps | channels | s/iteration | "
             "images/s | peak MiB per worker |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {Path(r['preset']).stem} | {r['algorithm']} | {r['image_size']}² | {r['chains_per_worker']} | "
                     f"{r['langevin_steps']} | {'-'.join(map(str, r['channels']))} | {r['s_per_iteration']:.3f} | "
                     f"{r['images_per_s']:.0f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PAPER_PRESETS), help="comma-separated preset files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of the median")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one preset, in this process: its row as JSON
    args = parser.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory(prefix="debm-preset-memory-") as tmp:
            print("ROW " + json.dumps(measure(args.child, args.set, args, Path(tmp))))
        return 0
    rows = []
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--child", preset, "--device", args.device, "--iterations",
               str(args.iterations), "--warmup", str(args.warmup), *[a for kv in args.set for a in ("--set", kv)]]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        row = next((json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")), None)
        rows.append(row or {"preset": preset, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"})
        print(f"{preset}: {'error' if 'error' in rows[-1] else 'done'}", file=sys.stderr)
    method = next((r["memory"] for r in rows if "memory" in r), "–")
    print(f"# presets on one worker, {args.iterations} iterations (median after {args.warmup}), "
          f"device {next((r['device'] for r in rows if 'device' in r), args.device)}, torch {torch.__version__}; "
          f"memory: {method}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
