"""The persistent chain bank (ALGORITHMS.md §2): chains that carry over between iterations.

Each chain has a stable integer id that survives checkpoints and re-sharding, so a resumed or
re-split run can prove that no chain was lost or duplicated. The bank is training state.
"""

from __future__ import annotations

import torch

INITS = ("zeros", "noise", "data_mean", "gaussian")


class ChainBank:
    """A bank of persistent Langevin chains with optional random re-initialisation.

    Args:
        states: the chains (size, *sample_shape).
        ids: a stable id per chain (size,), int64.
        init: how a (re-)initialised chain starts: "zeros" (Algorithm 1, line 1), "noise"
            (uniform in [-1, 1]), "data_mean" (the `init_value` image) or "gaussian" (N(0, I),
            for banks of latents ζ).
        reinit_prob: probability that a sampled chain restarts from its initial state.
        init_value: the image used by "data_mean".
        labels: a fixed class label per chain (class-conditional models), or None.
    """

    def __init__(
        self,
        states: torch.Tensor,
        ids: torch.Tensor,
        *,
        init: str = "zeros",
        reinit_prob: float = 0.0,
        init_value: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        if init not in INITS:
            raise ValueError(f"chains.init must be one of {INITS}, got '{init}'.")
        if init == "data_mean" and init_value is None:
            raise ValueError("chains.init='data_mean' needs the data mean as init_value.")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"chains.reinit_prob must be in [0, 1], got {reinit_prob}.")
        if len(states) != len(ids):
            raise ValueError(f"{len(states)} chain states but {len(ids)} ids.")
        self.states = states
        self.ids = ids.to(torch.int64)
        self.init = init
        self.reinit_prob = reinit_prob
        self.init_value = init_value
        self.labels = labels

    @classmethod
    def create(
        cls,
        size: int,
        sample_shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        first_id: int = 0,
        device: torch.device | str = "cpu",
        num_classes: int = 0,
        **kwargs,
    ) -> ChainBank:
        """A new bank of `size` chains in their initial state, with ids first_id … first_id+size−1.

        With num_classes > 0 chain `id` carries the fixed label `id mod num_classes`.
        """
        ids = torch.arange(first_id, first_id + size, device=device)
        bank = cls(
            torch.zeros(size, *sample_shape, device=device),
            ids,
            labels=ids % num_classes if num_classes else None,
            **kwargs,
        )
        bank.states = bank.initial_states(size, generator)
        return bank

    def __len__(self) -> int:
        return len(self.states)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape[1:])

    def initial_states(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n chains in the bank's initial state."""
        shape = (n, *self.sample_shape)
        device = self.states.device
        if self.init == "zeros":
            return torch.zeros(shape, device=device)
        if self.init == "noise":
            return torch.rand(shape, generator=generator, device=device) * 2 - 1
        if self.init == "gaussian":
            return torch.randn(shape, generator=generator, device=device)
        return self.init_value.to(device).expand(shape).clone()

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick `batch_size` chains (all of them, in order, when it equals the bank size).

        Returns (index, states): the bank positions and a copy of their states, with each chain
        re-initialised with probability `reinit_prob`.
        """
        size = len(self)
        if batch_size > size:
            raise ValueError(f"chains.batch_size ({batch_size}) exceeds chains.bank_size ({size}).")
        if batch_size == size:
            index = torch.arange(size, device=self.states.device)
        else:
            index = torch.randperm(size, generator=generator, device=self.states.device)[:batch_size]
        states = self.states[index].clone()
        if self.reinit_prob > 0:
            restart = torch.rand(batch_size, generator=generator, device=states.device) < self.reinit_prob
            fresh = self.initial_states(batch_size, generator)
            states = torch.where(restart.view(-1, *[1] * (states.dim() - 1)), fresh, states)
        return index, states

    def write(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """Store updated states back at their bank positions."""
        self.states[index] = states.detach().to(self.states.dtype)

    def labels_at(self, index: torch.Tensor) -> torch.Tensor | None:
        """The fixed labels of the chains at `index` (None for unconditional banks)."""
        return None if self.labels is None else self.labels[index]

    def state_dict(self) -> dict:
        state = {"states": self.states.detach().cpu().clone(), "ids": self.ids.cpu().clone()}
        if self.labels is not None:
            state["labels"] = self.labels.cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        device = self.states.device
        self.states = state["states"].to(device).clone()
        self.ids = state["ids"].to(device).clone()
        self.labels = state["labels"].to(device).clone() if "labels" in state else None


def split_bank_states(states: list[dict], world_size: int) -> list[dict]:
    """Re-split saved bank shards (one dict per old rank) into `world_size` new shards.

    Chains are concatenated in id order and cut into contiguous, near-equal pieces: every chain
    lands in exactly one new shard.
    """
    keys = [k for k in ("states", "ids", "labels") if k in states[0]]
    merged = {k: torch.cat([s[k] for s in states]) for k in keys}
    order = torch.argsort(merged["ids"])
    merged = {k: v[order] for k, v in merged.items()}
    if len(torch.unique(merged["ids"])) != len(merged["ids"]):
        raise ValueError("Saved chain shards contain duplicate chain ids.")
    pieces = {k: torch.tensor_split(v, world_size) for k, v in merged.items()}
    return [{k: pieces[k][r].clone() for k in keys} for r in range(world_size)]
