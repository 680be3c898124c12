"""One checkpoint bundle: models, optimisers, every rank's chain shard, RNG states, counters, config.

A checkpoint is a directory: `state.pt` (what every rank shares: networks, optimisers, counters,
config, collapse tracker) and one `rank-NNNNN.pt` per rank (its chain and latent bank shards and
its random generators). The directory layout lets Ray Train merge the files of all workers into
one checkpoint, and lets a run resume on a different number of workers by re-splitting the banks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from .chains import split_bank_states

SHARED_FILE = "state.pt"
RANK_FILE = "rank-{rank:05d}.pt"
DIR_PATTERN = re.compile(r"^iter-(\d{8})(?:-r(\d+))?$")  # iter-ITERATION, or iter-ITERATION-rRECOVERIES


def checkpoint_name(iteration: int, recoveries: int = 0) -> str:
    """The directory name of the checkpoint of `iteration`, written after `recoveries` collapse
    recoveries: a recovery rolls the run back to an earlier iteration, so the iterations after it
    are written again; the suffix `-rK` keeps their names apart from the abandoned ones."""
    return f"iter-{iteration:08d}" + (f"-r{recoveries}" if recoveries else "")


def checkpoint_order(path: Path) -> tuple[int, int]:
    """(recoveries, iteration) of a checkpoint directory: every checkpoint written after a recovery
    is newer than every one written before it, whatever their iterations."""
    match = DIR_PATTERN.match(path.name)
    return int(match[2] or 0), int(match[1])


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (a full disk, a lost mount, a quota); the partial
    file is removed and the checkpoint stays incomplete, so a resume skips it."""


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)  # a full disk: OSError, or torch's "[enforce fail at inline_container.cc…]"
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):  # a lost mount may refuse this too
            tmp.unlink(missing_ok=True)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointWriteError(f"Writing the checkpoint file {path} failed ({cause})") from err


def write_shared(directory: str | Path, shared: dict) -> None:
    """Write the state every rank shares (rank 0 calls this)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(shared, directory / SHARED_FILE)


def write_rank(directory: str | Path, rank: int, rank_state: dict) -> None:
    """Write one rank's banks and random generators."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(rank_state, directory / RANK_FILE.format(rank=rank))


def read_checkpoint(directory: str | Path) -> tuple[dict, list[dict]]:
    """(shared state, [rank states ordered by rank]) of a checkpoint directory."""
    directory = Path(directory)
    if not (directory / SHARED_FILE).is_file():
        raise FileNotFoundError(f"'{directory}' is not a checkpoint: it has no {SHARED_FILE}.")
    shared = torch.load(directory / SHARED_FILE, map_location="cpu", weights_only=False)
    ranks = sorted(directory.glob("rank-*.pt"))
    rank_states = [torch.load(p, map_location="cpu", weights_only=False) for p in ranks]
    if len(rank_states) != shared["world_size"]:
        raise ValueError(
            f"Checkpoint '{directory}' was written by {shared['world_size']} ranks but holds "
            f"{len(rank_states)} rank files: it is incomplete. Resume from an earlier checkpoint."
        )
    return shared, rank_states


def bank_shard(rank_states: list[dict], rank: int, world_size: int) -> dict:
    """This rank's bank states: its own shard when the world size is unchanged, else a re-split."""
    if len(rank_states) == world_size:
        return rank_states[rank]["banks"]
    names = rank_states[0]["banks"].keys()
    return {name: split_bank_states([r["banks"][name] for r in rank_states], world_size)[rank] for name in names}


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first (see `checkpoint_order`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if DIR_PATTERN.match(p.name) and (p / SHARED_FILE).is_file()]
    return sorted(found, key=checkpoint_order)


def final_trajectory(root: str | Path) -> dict[int, Path]:
    """The checkpoints of the trajectory the run ended on, by iteration. A recovery rolls the run
    back to iteration b and writes iter-b-rK at once, so a checkpoint written before it at an
    iteration past b belongs to a trajectory the run abandoned (and one at b or earlier is
    still on the final one, unless a newer checkpoint of the same iteration replaces it)."""
    found: dict[int, Path] = {}
    limit = float("inf")  # checkpoints of older recoveries past this iteration were abandoned
    by_recoveries: dict[int, list[Path]] = {}
    for path in list_checkpoints(root):
        by_recoveries.setdefault(checkpoint_order(path)[0], []).append(path)
    for recoveries in sorted(by_recoveries, reverse=True):
        paths = by_recoveries[recoveries]
        for path in paths:
            iteration = checkpoint_order(path)[1]
            if iteration <= limit and iteration not in found:
                found[iteration] = path
        limit = min(limit, min(checkpoint_order(path)[1] for path in paths))
    return dict(sorted(found.items()))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


class CheckpointStore(Protocol):
    """Where a run's checkpoints go: a local folder, or Ray Train's storage (trainer.py)."""

    def latest(self) -> Path | None:
        """The checkpoint to resume from, as a local folder, or None."""

    def save(self, name: str, write: Callable[[Path], None], metrics: dict, is_main: bool) -> None:
        """Save the checkpoint `name` (`checkpoint_name`): `write(directory)` puts this rank's files there."""

    def final_checkpoint(self) -> Path | None:
        """The newest checkpoint as a local folder that outlives the run (what a finished run
        registers), or None when the store cannot give one."""


class LocalCheckpointStore:
    """Checkpoints as directories under one local root (one process, or ranks sharing a disk)."""

    def __init__(self, root: str | Path, keep: int):
        self.root, self.keep = Path(root), keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        return latest_checkpoint(self.root)

    def save(self, name: str, write: Callable[[Path], None], metrics: dict, is_main: bool) -> None:
        """Let `write(directory)` put this rank's files into the directory `name`.

        Raises CheckpointWriteError naming the last complete checkpoint when a file cannot be written."""
        try:
            write(self.root / name)
        except OSError as err:  # CheckpointWriteError, or the directory could not be made
            last = self.latest()
            raise CheckpointWriteError(
                f"{err}. If the disk is full, free space under {self.root} (or lower train.keep_checkpoints, "
                f"or put the run elsewhere). The last complete checkpoint is {last or 'none'}: "
                "a resume continues from it.") from err
        if is_main:
            prune_checkpoints(self.root, self.keep)

    def final_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        return self.latest()
