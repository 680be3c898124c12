"""All rank logic: rank and world size, per-rank seeding, device choice, gradient all-reduce,
and what makes N workers' step the step on the global batch: each worker's share of it
(`batch_shares`), sums over the group (`all_reduce_sum`, differentiable) and the batch norm of the
global batch (`GlobalBatchNorm2d`).

Everything else in the library asks this module who it is; only rank 0 writes files outside
checkpoints or talks to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor goes to a GPU through pinned memory, non-blocking: the
    host does not wait for the GPU (a copy from pageable memory would synchronise)."""
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def shared_generator(base_seed: int, iteration: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that gives the same stream on every rank for this iteration (e.g. the JKO γ,
    which must be one draw per iteration for the whole group)."""
    return make_generator(base_seed, -1, f"shared-{iteration}", torch.device(device))


def group_size() -> int:
    """The number of processes in the training group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over the group (what DDP's reducer does), in one bucket.

    With equal shards that is the global batch's gradient; `batch_shares` weights each worker's
    batch means so that it stays so for unequal shards."""
    if group_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class _SumOverGroup(torch.autograd.Function):
    """Σ over the group, whose gradient is the sum over the group of each rank's gradient: every
    rank's loss depends on every rank's contribution."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverGroup.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the group, differentiable (`tensor` itself in one process).

    Every rank must call it at the same point, and so its backward; torch.distributed.nn's
    all_reduce does the same but is deprecated."""
    return tensor if group_size() == 1 else _SumOverGroup.apply(tensor)


def batch_shares(counts: list[int], device: torch.device) -> tuple[float | torch.Tensor, ...]:
    """Each of this worker's batch sizes (`counts`, e.g. [data images, chains]) as a share of the
    group's total, times the number of workers: 1.0 for equal shards and in one process.

    A batch mean weighted by its share is the worker's part of the global batch's mean, so the
    averaged gradients (`all_reduce_gradients`) are the global batch's, also when a re-split left
    unequal shards (12 chains on 5 workers: 3, 3, 2, 2, 2). One all-reduce of len(counts) + 1 numbers;
    in a group the shares are 0-d float32 tensors on `device`, never read back to the host."""
    if group_size() == 1:
        return (1.0,) * len(counts)
    mine = to_device(torch.tensor([*counts, 1], dtype=torch.float64), device)
    totals = all_reduce_sum(mine)
    return tuple((mine[:-1] * totals[-1] / totals[:-1]).float().unbind())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, training in a group of several processes, normalises with the statistics
    of the group's whole batch and updates its running statistics with them (a synchronised batch
    norm; torch.nn.SyncBatchNorm refuses CPU tensors). In one process, or in eval mode, it is
    BatchNorm2d bit for bit; its parameters and buffers keep BatchNorm2d's names.

    Every rank must run its forward (and backward) at the same points: it all-reduces twice per
    forward (the sums and count, then the sums of squared deviations from the global mean: two
    passes, as accurate as one process's), and its backward as often."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or group_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, 2, 3]
        count = x.new_full((1,), x.numel() / x.shape[1], dtype=torch.float64)
        totals = all_reduce_sum(torch.cat([x.sum(dims).double(), count]))
        n = totals[-1]
        mean = (totals[:-1] / n).to(x.dtype)
        centred = x - mean[None, :, None, None]
        var = (all_reduce_sum(centred.pow(2).sum(dims).double()) / n).to(x.dtype)  # biased, as BatchNorm2d
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * (n / (n - 1)).to(x.dtype))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """BatchNorm2d's update: momentum, or with momentum None the cumulative average."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


class MetricWindow:
    """Scalar metrics of consecutive iterations, kept on the device until a flush.

    Each `add` stacks an iteration's device values (0-d tensors) into one tensor on the device and
    keeps its host values (Python numbers) on the host: nothing is read back. `flush` averages
    every row over the group (`sum_keys` summed) in one all-reduce and reads the window back in
    one transfer: one host sync per flush, however many iterations and metrics it holds. Rows may
    hold different keys (a metric of every k-th iteration); every rank must add the same keys.
    """

    def __init__(self, device: torch.device, sum_keys: tuple[str, ...] = ()):
        self.device, self.sum_keys = device, sum_keys
        self.rows: list[tuple[list[str], torch.Tensor | None, dict[str, float]]] = []

    def add(self, values: dict) -> None:
        """One iteration's metrics: 0-d tensors (read at the flush), Python floats (averaged at
        the flush like the tensors) and other values (kept as they are)."""
        keys = sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
        on_device = torch.stack([values[k].detach().reshape(()).double() for k in keys]) if keys else None
        self.rows.append((keys, on_device, {k: v for k, v in values.items() if k not in keys}))

    def flush(self, rank_zero_flag: bool = False) -> tuple[list[dict], bool]:
        """(every row as a dict of floats, averaged over the group, in the order added; rank 0's
        `rank_zero_flag`, the same on every rank), and empty the window."""
        rows, self.rows = self.rows, []
        host_keys = [sorted(k for k, v in h.items() if isinstance(v, float)) for _, _, h in rows]
        host = [float(h[k]) for (_, _, h), keys in zip(rows, host_keys) for k in keys]
        world = group_size()
        flag = float(rank_zero_flag) if world == 1 or dist.get_rank() == 0 else 0.0
        flat = torch.cat([t for _, t, _ in rows if t is not None]
                         + [to_device(torch.tensor([*host, flag], dtype=torch.float64), self.device)])
        if world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *values, flag = flat.tolist()  # the one read of the window
        segments = [keys for keys, _, _ in rows] + host_keys  # each row's device keys, then its host keys
        it = iter(values)
        parts = [{k: next(it) / (1 if k in self.sum_keys else world) for k in keys} for keys in segments]
        n = len(rows)
        return [{**rows[i][2], **parts[n + i], **parts[i]} for i in range(n)], flag != 0.0


def all_reduce_mean(values: dict, device: torch.device, sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """One iteration's scalar metrics (0-d tensors or numbers) as floats, averaged over the group
    (identity in one process); `sum_keys` are summed. A `MetricWindow` of one row."""
    window = MetricWindow(device, sum_keys)
    window.add(values)
    return window.flush()[0][0]
