"""All rank logic: rank and world size, per-rank seeding, device choice, gradient all-reduce.

Everything else in the library asks this module who it is; only rank 0 writes files outside
checkpoints or talks to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessContext:
    """Who this process is in the training group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def current_context(device: str = "auto") -> ProcessContext:
    """The context of this process: from torch.distributed when initialised, else single-process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            resolved = torch.device("cuda", torch.cuda.current_device())
        return ProcessContext(rank, world, resolved)
    return ProcessContext(0, 1, resolve_device(device))


def stream_seed(base_seed: int, rank: int, stream: str) -> int:
    """A 63-bit seed derived from (base seed, rank, stream name): independent, reproducible streams."""
    key = [base_seed, rank + 1] + list(stream.encode())  # rank −1 marks streams shared by all ranks
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_generator(base_seed: int, rank: int, stream: str, device: torch.device) -> torch.Generator:
    """A torch.Generator on `device` seeded from (base seed, rank, stream)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(base_seed, rank, stream))
    return gen


def shared_generator(base_seed: int, iteration: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that gives the same stream on every rank for this iteration (e.g. the JKO γ,
    which must be one draw per iteration for the whole group)."""
    return make_generator(base_seed, -1, f"shared-{iteration}", torch.device(device))


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over the group (what DDP's reducer does), in one bucket."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(values: dict[str, float], device: torch.device, sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Average scalar metrics over the group (identity in one process); `sum_keys` are summed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(k for k, v in values.items() if isinstance(v, float))
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    scale = torch.tensor([1.0 if k in sum_keys else 1.0 / dist.get_world_size() for k in keys],
                         dtype=torch.float64, device=device)
    return {**values, **dict(zip(keys, (tensor * scale).tolist()))}


def rank_zero_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (one broadcast), so that all ranks take rank 0's decision."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
