"""Langevin sampling speed: debm's sampler and its speed options against a plain PyTorch loop.

For the ConvEnergy networks of the digits (1×8×8), 32×32 RGB and 64×64 RGB settings (channels
32-64-128, θ drawn at random so that ∇ₓΦ is not zero), one run prints, per network:

- chains × steps per second of the reference (the loop a researcher writes first: requires_grad_,
  Φ, autograd.grad, x = x + … + δ·randn_like(x), clamp) and of `distributed_ebm.langevin.langevin`
  with its default path and with each speed option (compile, bf16, channels_last), as ratios
  against the reference; medians of interleaved repeats after one warm-up run each (a repeat
  of a run shorter than 0.2 s times a block of back-to-back runs; `--clock cpu` counts the
  process's CPU time instead of wall time, steadier on a shared CPU machine);
- peak memory per chain: CUDA, torch.cuda.max_memory_allocated above what was allocated before
  the run; CPU, the peak of the bytes torch's allocator holds during the run, replayed from
  torch.profiler's memory events (profile_memory=True; memory that libraries such as oneDNN
  allocate on their own is not counted);
- the largest |x − x_reference| after the run on the same noise (0 for the default path).

    .venv/bin/python benchmarks/langevin.py --quick                      # < 1 minute on 2 CPU cores
    .venv/bin/python benchmarks/langevin.py --device cpu --chains 64 --steps 20 --repeats 5
    .venv/bin/python benchmarks/langevin.py --quick --clock cpu          # on a busy shared CPU
    .venv/bin/python benchmarks/langevin.py --device cuda --chains 256 --steps 50 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from distributed_ebm.config import ModelConfig
from distributed_ebm.energy import Energy, build_energy
from distributed_ebm.langevin import langevin

NETWORKS = {"digits": (1, 8, 8), "rgb32": (3, 32, 32), "rgb64": (3, 64, 64)}  # sample shapes
OPTIONS = {  # variant name → keyword arguments of `langevin`
    "default": {},
    "compile": {"compile": True},
    "bf16": {"autocast": "bf16"},
    "channels_last": {"channels_last": True},
}
STEP_SIZE, REF_SIGMA, DATA_RANGE = 0.2, 1.0, (-1.0, 1.0)  # δ, σ and the clamp of the presets
MIN_BLOCK_SECONDS = 0.2  # shortest timed block: one run, or many short ones back to back
QUICK = {"chains": 8, "steps": 5, "repeats": 3, "options": "default,channels_last,bf16"}
Sampler = Callable[[torch.Tensor, int], torch.Tensor]  # (x0, seed) → final chains


def reference_langevin(
    energy: nn.Module, x0: torch.Tensor, *, steps: int, step_size: float, ref_sigma: float
) -> torch.Tensor:
    """The obvious hand-written loop, noise from the global generator."""
    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_()
        grad = torch.autograd.grad(energy(x).sum(), x)[0]
        x = x + step_size**2 / 2 * (grad - x / ref_sigma**2) + step_size * torch.randn_like(x)
        x = x.clamp(*DATA_RANGE).detach()
    return x


def make_energy(shape: tuple[int, int, int], device: torch.device) -> Energy:
    """The ConvEnergy of the presets (channels 32-64-128) with a random θ (θ = 0 gives ∇Φ = 0)."""
    energy = build_energy(ModelConfig(channels=(32, 64, 128)), shape, "conv")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nn.init.normal_(energy.theta.weight, std=1.0 / math.sqrt(energy.theta.in_features))
    return energy.to(device)


def samplers(
    energy: Energy, steps: int, options: list[str], device: torch.device
) -> dict[str, Sampler]:
    """The reference loop and debm's sampler with each option, all drawing noise from `seed`."""

    def reference(x0: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return reference_langevin(energy, x0, steps=steps, step_size=STEP_SIZE, ref_sigma=REF_SIGMA)

    def debm(kwargs: dict) -> Sampler:
        return lambda x0, seed: langevin(
            energy,
            x0,
            steps=steps,
            step_size=STEP_SIZE,
            ref_sigma=REF_SIGMA,
            clamp=DATA_RANGE,
            generator=torch.Generator(device=device).manual_seed(seed),
            **kwargs,
        )

    return {"reference": reference, **{name: debm(OPTIONS[name]) for name in options}}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # --clock: what a second is


def time_runs(
    sampler: Sampler, x0: torch.Tensor, device: torch.device, runs: int, clock: str = "wall"
) -> float:
    """Seconds per sampling run, over `runs` back-to-back runs."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(runs):
        sampler(x0, 0)
    synchronize(device)
    return (now() - start) / runs


@contextlib.contextmanager
def quiet_stderr():
    """Silence the process's stderr (Kineto logs start and stop of every profile there in C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(sampler: Sampler, x0: torch.Tensor, device: torch.device) -> float:
    """Bytes the run needs at its peak above what was allocated before it (see the module doc)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        sampler(x0, 0)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sampler(x0, 0)
    # Every allocation (+bytes) and free (−bytes) of torch's CPU allocator, in time order.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    in_use = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        in_use += event.nbytes()
        peak = max(peak, in_use)
    return float(peak)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the run"
    return (
        "peak of the bytes torch's CPU allocator holds for the run, from torch.profiler memory "
        "events (allocations outside torch, e.g. oneDNN scratch space, are not counted)"
    )


@dataclass
class Result:
    """One variant on one network."""

    seconds: list[float]
    peak_bytes: float
    max_diff: float
    error: str | None = None


def bench_network(
    name: str, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Result], int]:
    """Warm up every variant, then time them in interleaved repeats; memory and error last.

    Returns the results by variant and the number of runs per timed block."""
    shape = NETWORKS[name]
    energy = make_energy(shape, device)
    x0 = torch.rand((args.chains, *shape), generator=torch.Generator().manual_seed(1))
    x0 = (x0 * 2 - 1).to(device)
    runs = samplers(energy, args.steps, args.options, device)
    # Warm-up; short runs are timed in blocks of ≥ MIN_BLOCK_SECONDS (same block for every variant).
    runs["reference"](x0, 0)
    block = math.ceil(MIN_BLOCK_SECONDS / time_runs(runs["reference"], x0, device, 1, args.clock))
    results = {"reference": Result([], 0.0, 0.0)}
    for variant, sampler in list(runs.items())[1:]:
        try:
            sampler(x0, 0)  # warm-up (compiles for `compile`)
            results[variant] = Result([], 0.0, 0.0)
        except (RuntimeError, ValueError) as error:  # an option this device cannot run
            results[variant] = Result([], math.nan, math.nan, error=str(error).splitlines()[0])
    live = {v: s for v, s in runs.items() if results[v].error is None}
    for _ in range(args.repeats):
        for variant, sampler in live.items():
            results[variant].seconds.append(time_runs(sampler, x0, device, block, args.clock))
    reference = runs["reference"](x0, 0)
    for variant, sampler in live.items():
        results[variant].peak_bytes = peak_memory(sampler, x0, device)
        results[variant].max_diff = float((sampler(x0, 0) - reference).abs().max())
    return results, block


def report(name: str, results: dict[str, Result], block: int, args: argparse.Namespace) -> None:
    """Print one network's table."""
    chain_steps = args.chains * args.steps
    reference = statistics.median(results["reference"].seconds)
    c, h, w = NETWORKS[name]
    print(f"\n{name} ({c}×{h}×{w}), {block} run(s) per timed block")
    print(
        f"  {'variant':<14}{'chain-steps/s':>14}{'ratio':>8}{'ms/run':>10}{'peak KiB/chain':>16}"
        f"{'max|Δ| vs ref':>15}"
    )
    for variant, result in results.items():
        if result.error is not None:
            print(f"  {variant:<14}  n/a: {result.error}")
            continue
        median = statistics.median(result.seconds)
        speed, ratio, ms = chain_steps / median, reference / median, median * 1e3
        per_chain_kib = result.peak_bytes / args.chains / 1024
        print(
            f"  {variant:<14}{speed:>14.0f}{ratio:>8.3f}{ms:>10.1f}{per_chain_kib:>16.1f}"
            f"{result.max_diff:>15.2e}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--chains", type=int, default=64, help="chains per run (batch size)")
    parser.add_argument("--steps", type=int, default=20, help="Langevin steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument(
        "--options",
        default=",".join(OPTIONS),
        help=f"comma-separated variants of debm's sampler: {', '.join(OPTIONS)}",
    )
    parser.add_argument(
        "--networks",
        default=",".join(NETWORKS),
        help=f"comma-separated networks: {', '.join(NETWORKS)}",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (CPU only; steadier on a shared "
        "machine, but it also counts time spent by other threads of the process)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small run: defaults become {QUICK} (explicit flags still win)",
    )
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.options = [o for o in args.options.split(",") if o]
    args.networks = [n for n in args.networks.split(",") if n]
    for given, valid, flag in (
        (args.options, OPTIONS, "--options"),
        (args.networks, NETWORKS, "--networks"),
    ):
        unknown = [v for v in given if v not in valid]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(valid)}.")
    if min(args.chains, args.steps, args.repeats, args.threads) < 1:
        parser.error("--chains, --steps, --repeats and --threads must be at least 1.")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu.")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu cannot time GPU work; use --clock wall with --device cuda.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {args.threads} thread(s)"
    )
    print(
        f"Langevin sampler on {name}, torch {torch.__version__}: {args.chains} chains × "
        f"{args.steps} steps, δ={STEP_SIZE}, σ={REF_SIGMA}, clamp {DATA_RANGE}; median of "
        f"{args.repeats} interleaved repeats after warm-up, {args.clock} clock"
    )
    print(f"ratio: chain-steps/s against the reference loop; peak memory: {memory_method(device)}")
    for network in args.networks:
        results, block = bench_network(network, args, device)
        report(network, results, block, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
