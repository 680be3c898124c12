"""The training state of one process, which saves itself into a checkpoint and loads itself back.

Everything a run needs to continue bit for bit lives here: the algorithm's `TrainState`
(networks, optimisers, this rank's chain and latent bank shards), the counters (iterations,
images seen), this rank's random streams, the collapse detector, the data's read positions and
the collapse recoveries so far with the δ and λ they lowered (recovery.py). A checkpoint is
`checkpoint.py`'s bundle: a shared file (rank 0) and one file per rank; `snapshot` keeps the same
content of one rank in memory, for a recovery to roll back to.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .algorithms import Algorithm, TrainState, get_algorithm
from .clusters import Clusters
from .config import RunConfig
from .distributed import ProcessContext, all_reduce_gradients, make_generator, stream_seed
from .metrics import CollapseDetector

log = logging.getLogger(__name__)


def same_layout(saved: torch.Tensor | None, generator: torch.Generator) -> bool:
    """Whether a saved generator state fits `generator`: CPU and CUDA generators keep states of
    different sizes (5056 and 16 bytes), so a state saved on one device cannot seed the other."""
    return saved is not None and saved.numel() == generator.get_state().numel()


@dataclass
class RunState:
    """One process's training state: the algorithm's state, counters, random streams, collapse
    detector, data read positions and collapse recoveries."""

    config: RunConfig
    algorithm: Algorithm  # the registered algorithm (algorithms.ALGORITHMS) that trains `train`
    train: TrainState  # networks, optimisers and this rank's bank shards
    generators: dict[str, torch.Generator]  # "data" (CPU) and "chains" (training device)
    collapse: CollapseDetector
    data: object  # this rank's data (ImageData share or StreamingData): its read positions
    iteration: int = 0  # learning iterations done
    images_seen: int = 0  # data images consumed by the whole group
    recoveries: list[dict] = field(default_factory=list)  # the collapse recoveries so far (recovery.py)
    # δ (langevin.step_size) and λ (optim.lr) in use, as multiples of the config's: recoveries lower them
    knob_scales: dict[str, float] = field(default_factory=lambda: {"step_size": 1.0, "lr": 1.0})

    @classmethod
    def build(cls, config: RunConfig, ctx: ProcessContext, data, data_mean: torch.Tensor,
              fit_images: torch.Tensor | None = None) -> RunState:
        """A fresh state: networks seeded by model.seed (the same on every rank), this rank's chain
        shard (ids rank·bank_size …) and its random streams from (seed, rank); `fit_images` (the same
        on every rank) for data statistics the algorithm fits (MGCN's model.first_grid)."""
        generators = {  # data batches are drawn on the CPU, chain noise on the training device
            "data": make_generator(config.train.seed, ctx.rank, "data", torch.device("cpu")),
            "chains": make_generator(config.train.seed, ctx.rank, "chains", ctx.device),
        }
        algorithm = get_algorithm(config.model.algorithm)
        train = algorithm.build(config, data.sample_shape, device=ctx.device, generator=generators["chains"],
                                data_mean=data_mean, num_classes=data.num_classes, rank=ctx.rank,
                                fit_images=fit_images)
        train.sync_gradients = all_reduce_gradients
        clusters = getattr(data, "clusters", None)
        if clusters is not None:  # model.clusters: saved with the model; chains carry clusters by their shares
            train.meta["clusters"] = clusters.state_dict()
            for bank in train.banks.values():
                if bank.labels is not None:
                    bank.labels = clusters.label_ids(bank.ids)
        return cls(config, algorithm, train, generators, CollapseDetector(config.collapse, energy_l2=config.model.energy_l2), data)

    def knobs(self) -> dict[str, float]:
        """The δ (step_size) and λ (lr) in use: the config's, times `knob_scales`."""
        return {"step_size": self.train.sampler.step_size,
                "lr": self.train.optimizers["energy"].param_groups[0]["lr"]}

    def set_knob_scales(self, scales: dict[str, float]) -> None:
        """Use δ = langevin.step_size × scales["step_size"] in the sampler and λ = optim.lr ×
        scales["lr"] in the energy's optimiser (the generator's keeps generator.lr)."""
        self.knob_scales = dict(scales)
        step_size = self.config.langevin.step_size * scales["step_size"]
        self.train.sampler = dataclasses.replace(self.train.sampler, step_size=step_size)
        for group in self.train.optimizers["energy"].param_groups:
            group["lr"] = self.config.optim.lr * scales["lr"]

    def rank_state(self, rank: int) -> dict:
        """This rank's part of a checkpoint: bank shards, random streams, data read positions."""
        return {
            "banks": self.train.bank_state(),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "data": self.data.state_dict(),  # a stream's read positions (None for in-memory data)
            "rank": rank,
        }

    def shared_state(self, world_size: int) -> dict:
        """The part of a checkpoint every rank shares (rank 0 writes it)."""
        return {
            **self.train.model_state(),
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "images_seen": self.images_seen,
            "collapse": self.collapse.state_dict(),
            "recovery": {"knob_scales": dict(self.knob_scales), "recoveries": list(self.recoveries)},
            "world_size": world_size,
        }

    def save(self, directory: Path, ctx: ProcessContext) -> None:
        """Write this rank's part of the checkpoint into `directory` (rank 0 adds the shared part)."""
        ckpt.write_rank(directory, ctx.rank, self.rank_state(ctx.rank))
        if ctx.is_main:
            ckpt.write_shared(directory, self.shared_state(ctx.world_size))

    def load(self, directory: Path, ctx: ProcessContext) -> None:
        """Continue from a checkpoint: models, optimisers, this rank's bank shard (re-split when the
        number of ranks changed), counters, collapse detector and recoveries (with the δ and λ they
        lowered, applied to the config's), data positions and random streams."""
        shared, rank_states = ckpt.read_checkpoint(directory)
        self._load(shared, rank_states, ctx, directory)

    def snapshot(self, ctx: ProcessContext) -> bytes:
        """What this rank would write into a checkpoint (its part and the shared part), in memory."""
        buffer = io.BytesIO()
        torch.save({"shared": self.shared_state(ctx.world_size), "rank": self.rank_state(ctx.rank)}, buffer)
        return buffer.getvalue()

    def restore(self, snapshot: bytes, ctx: ProcessContext) -> None:
        """Return to a `snapshot` of this process, exactly as `load` from its checkpoint would."""
        saved = torch.load(io.BytesIO(snapshot), map_location="cpu", weights_only=False)
        # The ranks are the same as when it was taken, so each rank reads only its own part: it
        # stands in for every rank's.
        self._load(saved["shared"], [saved["rank"]] * ctx.world_size, ctx, "a snapshot in memory")

    def _keep_saved_clusters(self, meta: dict) -> None:
        """model.clusters: label data batches with the clusters the checkpoint trained with (a
        refit on the same images finds the same ones; other images would not)."""
        saved = meta.get("clusters")
        if saved is None or getattr(self.data, "clusters", None) is None:
            return
        clusters = Clusters.from_state(saved)
        if not torch.allclose(clusters.centroids, self.data.clusters.centroids, atol=1e-5):
            log.warning("The data's k-means clusters differ from the checkpoint's (other images?): "
                        "labelling batches with the checkpoint's, as the model was trained.")
        self.data.clusters = clusters
        self.train.meta["clusters"] = clusters.state_dict()

    def _load(self, shared: dict, rank_states: list[dict], ctx: ProcessContext, source: Path | str) -> None:
        self.train.load_model_state(shared)
        self._keep_saved_clusters(shared["meta"])
        self.train.load_bank_state(ckpt.bank_shard(rank_states, ctx.rank, ctx.world_size))
        self.collapse.load_state_dict(shared["collapse"])
        self.iteration, self.images_seen = shared["iteration"], shared["images_seen"]
        recovery = shared.get("recovery", {})  # absent from checkpoints written before recoveries
        self.recoveries = list(recovery.get("recoveries", []))
        self.set_knob_scales(recovery.get("knob_scales", {"step_size": 1.0, "lr": 1.0}))
        self.data.load_state_dict([r.get("data") for r in rank_states], ctx.rank)
        saved = rank_states[ctx.rank]["generators"] if len(rank_states) == ctx.world_size else {}
        for key, gen in self.generators.items():
            if same_layout(saved.get(key), gen):
                gen.set_state(saved[key])
            else:
                # A new world size, or a stream that moved between devices (a CPU checkpoint resumed
                # on a GPU, or back): new streams, derived from (seed, rank, resume iteration).
                log.warning("Random stream '%s' cannot continue from %s (%s); reseeded from (seed, rank, "
                            "iteration %d)", key, source, "another number of workers" if not saved
                            else f"its state was saved on another device than {gen.device}", self.iteration)
                gen.manual_seed(stream_seed(self.config.train.seed + self.iteration, ctx.rank, key))
        models = self.train.models.values()
        if not all(bool(torch.isfinite(p).all()) for model in models for p in model.parameters()):
            raise ValueError(f"Checkpoint '{source}' holds non-finite weights; resume from an earlier one.")
