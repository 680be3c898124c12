"""An exponential moving average of a network's weights (train.ema_decay): pure tensor updates.

After every optimiser step, each trained parameter moves `ema ← decay · ema + (1 − decay) · w`;
frozen parameters and buffers (a fixed filter bank, spectral norm's power-iteration vectors) are
copied. The average starts at the network's initial weights. Every rank holds the same weights,
so every rank holds the same average: nothing to communicate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to average into (its parameters require no gradient)."""
    average = copy.deepcopy(model)
    for param in average.parameters():
        param.requires_grad_(False)
    return average


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, *, decay: float) -> None:
    """One EMA step of `average` towards `model`'s current weights (same architecture)."""
    for avg, param in zip(average.parameters(), model.parameters(), strict=True):
        if param.requires_grad:
            avg.mul_(decay).add_(param.detach(), alpha=1.0 - decay)
        else:
            avg.copy_(param)
    for avg, buffer in zip(average.buffers(), model.buffers(), strict=True):
        avg.copy_(buffer)
