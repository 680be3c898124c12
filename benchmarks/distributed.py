"""Framework overhead and weak scaling of the training step, measured in one run.

(a) Overhead: iterations/s of debm's one-worker training step (`EBMAlgorithm.train_step`, and the
    whole `train_loop.train` iteration with metrics, R, collapse checks and files) against a plain
    PyTorch loop doing the same Langevin steps and JKO update on the same network.
(b) Weak scaling: chains × Langevin steps per second of `train_loop.train` in 2 gloo processes against
    1, per-worker batch fixed, one thread per process; bytes all-reduced per iteration, and an
    extrapolation to 8 GPUs × 8 nodes.

    .venv/bin/python benchmarks/distributed.py [--iterations 60] [--preset configs/digits_wgcn.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ebm.algorithms import ALGORITHMS
from distributed_ebm.config import load_config
from distributed_ebm.data import load_dataset
from distributed_ebm.train_loop import train

ROOT = Path(__file__).parents[1]


def plain_step(energy, opt, data, chains, *, steps, delta, sigma, beta, gen):
    """The obvious hand-written loop: Langevin with autograd.grad, then the wGCN loss."""
    x = chains.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        grad = torch.autograd.grad(energy(x).sum(), x)[0]
        x = (x + delta**2 / 2 * (grad - x / sigma**2) + delta * torch.randn(x.shape, generator=gen)).clamp(-1, 1).detach()
    loss = -(energy(data).mean() - energy(x).mean())
    gamma = torch.rand(())
    penalties = []
    for z in (chains, x):
        z = z.detach().requires_grad_(True)
        g = torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]
        penalties.append(g.flatten(1).pow(2).sum(1).mean())
    loss = loss + beta / 2 * ((1 - gamma) * penalties[0] + gamma * penalties[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return x


def time_it(fn, iterations: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def overhead(preset: str, iterations: int) -> dict:
    config = load_config(ROOT / preset, {"tracking.enabled": False, "train.device": "cpu"})  # CPU: no CUDA in the parent before the fork below
    data = load_dataset(config.data)
    algo = ALGORITHMS[config.model.algorithm]
    state = algo.build(config, data.sample_shape, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                       data_mean=data.x.mean(0, keepdim=True))
    gen = torch.Generator().manual_seed(1)
    batch = data.x[: config.train.data_batch_size]
    counter = iter(range(10**9))
    debm = time_it(lambda: algo.train_step(state, batch, None, generator=gen, iteration=next(counter)), iterations)

    # The plain loop trains θ and w with the penalty reaching all parameters (the simple way).
    energy = algo.build(config, data.sample_shape, device=torch.device("cpu"), generator=torch.Generator(),
                        data_mean=data.x.mean(0, keepdim=True)).energy
    opt = torch.optim.Adam(energy.parameters(), lr=config.optim.lr, betas=config.optim.betas)
    chains = torch.zeros(config.chains.batch_size, *data.sample_shape)
    lang = config.langevin

    def plain():
        nonlocal chains
        chains = plain_step(energy, opt, batch, chains, steps=lang.langevin_steps, delta=lang.step_size,
                            sigma=lang.ref_sigma, beta=config.model.jko_weight, gen=gen)

    base = time_it(plain, iterations)
    with tempfile.TemporaryDirectory() as tmp:
        loop_config = config.replace({"train.iterations": iterations + 5, "train.sample_every": 10**6,
                                      "train.checkpoint_every": 10**6})
        train(loop_config, tmp, progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()][5:]
        loop = statistics.mean(r["seconds"] for r in rows)
    return {"plain_s": base, "train_step_s": debm, "train_loop_s": loop}


def _worker(rank: int, world: int, init: str, preset: str, iterations: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    config = load_config(ROOT / preset, {"tracking.enabled": False, "train.device": "cpu", "train.iterations": iterations,
                                         "train.sample_every": 10**6, "train.checkpoint_every": 10**6})
    train(config, out, progress=False)
    dist.destroy_process_group()


def scaling(preset: str, iterations: int) -> dict:
    result = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(world, f"{tmp}/init", preset, iterations, f"{tmp}/run"), nprocs=world,
                               start_method="fork")
            rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][5:]
            result[world] = statistics.mean(r["seconds"] for r in rows)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/digits_wgcn.yaml")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--bandwidth-gbit", type=float, default=100.0, help="interconnect for the extrapolation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, one thread per process; preset {args.preset}")

    o = overhead(args.preset, args.iterations)
    print(f"(a) plain PyTorch loop   {1 / o['plain_s']:7.2f} it/s")
    print(f"    debm train_step      {1 / o['train_step_s']:7.2f} it/s   ratio {o['plain_s'] / o['train_step_s']:.3f}")
    print(f"    debm train_loop      {1 / o['train_loop_s']:7.2f} it/s   ratio {o['plain_s'] / o['train_loop_s']:.3f}"
          "  (with metrics, R, collapse check, metrics.jsonl)")

    config = load_config(ROOT / args.preset)
    s = scaling(args.preset, args.iterations)
    work = config.chains.batch_size * config.langevin.langevin_steps
    t1, t2 = work / s[1], 2 * work / s[2]
    data = load_dataset(config.data)
    energy = ALGORITHMS[config.model.algorithm].build(config, data.sample_shape, device=torch.device("cpu"),
                                                      generator=torch.Generator(), data_mean=data.x[:1]).energy
    params = sum(p.numel() for p in energy.parameters() if p.requires_grad)
    volume = params * 4
    print(f"(b) 1 worker  {t1:9.0f} chain-steps/s ({s[1] * 1e3:.0f} ms/it)")
    print(f"    2 workers {t2:9.0f} chain-steps/s ({s[2] * 1e3:.0f} ms/it)   weak-scaling efficiency {t2 / (2 * t1):.3f}")
    print(f"    all-reduced per iteration: {params} gradient values = {volume / 1e6:.3f} MB (+ one ~25-value metrics vector)")
    for workers in (8, 64):
        ring = 2 * (workers - 1) / workers * volume
        comm = ring * 8 / (args.bandwidth_gbit * 1e9)
        print(f"    {workers:3d} GPUs: ring all-reduce {ring / 1e6:.3f} MB/iteration ≈ {comm * 1e6:.1f} µs at "
              f"{args.bandwidth_gbit:.0f} Gbit/s, against a compute step of {s[1] * 1e3:.0f} ms here "
              f"(≈ {comm / s[1] * 100:.3f} % — the step is Langevin-bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
