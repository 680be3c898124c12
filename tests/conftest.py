"""Shared fixtures: fast, exact, CPU-only; threads pinned so timings and results are stable."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides():
    """Overrides that make any preset run in a second or two."""
    return {
        "train.iterations": 6,
        "train.data_batch_size": 16,
        "train.sample_every": 3,
        "train.checkpoint_every": 3,
        "chains.bank_size": 16,
        "chains.batch_size": 16,
        "langevin.langevin_steps": 3,
        "model.channels": [8, 16],
    }
