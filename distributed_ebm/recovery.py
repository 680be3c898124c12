"""Collapse recovery: roll a run back to its last healthy state and go on with δ and/or λ lowered.

When the collapse detector (metrics/collapse.py) fires, a NaN/Inf divergence included, and
`collapse.max_recoveries` allows one more, every rank returns to the last *healthy* state, with
its networks, optimisers, chains, random streams and data read positions, multiplies δ
(langevin.step_size), λ (optim.lr) or both (`collapse.recovery_target`) by
`collapse.recovery_factor`, and trains on. The lowered values and the record of every recovery
are part of the training state (`RunState.recoveries`, `RunState.knob_scales`): checkpoints hold
them and a resumed run keeps them.

A state is healthy when no collapse condition is building up: every streak of the detector is
zero (`CollapseDetector.healthy`). A checkpoint written while a condition already held, even for
fewer than `collapse.patience` iterations, is not one to return to. The last healthy state is a
snapshot in memory (`RunState.snapshot`; each rank keeps its own part), taken whenever a
checkpoint is written while healthy and at the start of training (the initial state, or the
checkpoint the run resumed from when that one is healthy). So rolling back works alike with
local checkpoints and with Ray Train's, whose API gives back only the latest one. The collapse
metrics are all-reduced before the detector sees them, so every rank's detector holds the same
state: all ranks decide to recover at the same iteration and return to snapshots of the same
iteration.
"""

from __future__ import annotations

from .config import RunConfig
from .distributed import ProcessContext
from .state import RunState

INITIAL = "the initial state"  # what a recovery returns to when no healthy checkpoint came before


class Recovery:
    """Keeps the last healthy state of this process and rolls the run back to it on collapse."""

    def __init__(self, config: RunConfig, ctx: ProcessContext):
        self.settings, self.ctx = config.collapse, ctx  # collapse.max_recoveries, recovery_factor, recovery_target
        self.snapshot: bytes | None = None  # RunState.snapshot of the last healthy state
        self.source = ""  # the checkpoint it was taken at (or INITIAL)
        self.iteration = 0  # its iteration

    @property
    def enabled(self) -> bool:
        return self.settings.max_recoveries > 0

    def remember(self, state: RunState, source: str) -> None:
        """Keep `state`, written as checkpoint `source` (or INITIAL), as the one to return to, if it
        is healthy (and recovery is on)."""
        if self.enabled and state.collapse.healthy:
            self.snapshot, self.source, self.iteration = state.snapshot(self.ctx), source, state.iteration

    def possible(self, state: RunState) -> bool:
        """Whether a collapse now can be recovered from: recoveries left and a healthy state kept."""
        return self.enabled and len(state.recoveries) < self.settings.max_recoveries and self.snapshot is not None

    def roll_back(self, state: RunState, metrics: dict) -> dict:
        """Return `state` to the last healthy one, lower δ and/or λ, and return the recovery's record:
        collapse iteration and reason, the checkpoint and iteration returned to, δ and λ before and
        after. The records of earlier recoveries and the lowered values survive the rollback."""
        before, recoveries = state.knobs(), state.recoveries
        target, factor = self.settings.recovery_target, self.settings.recovery_factor
        scales = {k: v * factor if target in (k, "both") else v for k, v in state.knob_scales.items()}
        state.restore(self.snapshot, self.ctx)  # also the detector: zero streaks, its averages then
        state.set_knob_scales(scales)
        after = state.knobs()
        record = {
            "recovery": len(recoveries) + 1,
            "iteration": int(metrics["iteration"]),
            "reason": metrics["collapse_reason"],
            "rolled_back_to": self.iteration,
            "checkpoint": self.source,
            "step_size": after["step_size"],
            "lr": after["lr"],
            "step_size_before": before["step_size"],
            "lr_before": before["lr"],
        }
        state.recoveries = [*recoveries, record]
        return record


def collapse_message(config: RunConfig, state: RunState, *, stopped: bool, recovery: Recovery) -> str:
    """One paragraph for a run that ends collapsed: what happened and what to change."""
    first = state.collapse.first or {"reason": "collapse", "iteration": state.iteration}
    what = f"The run collapsed ({first['reason']}) at iteration {first['iteration']}"
    knobs = state.knobs()
    values = f"δ (langevin.step_size) is {knobs['step_size']:.4g}, λ (optim.lr) {knobs['lr']:.4g}"
    if not recovery.enabled:
        ending = "and stopped there (collapse.stop_on_collapse)" if stopped else (
            f"and trained on to iteration {state.iteration} without recovering: its samples since "
            "then are not to be trusted")
        return (f"{what} {ending}; {values}. Set collapse.max_recoveries (e.g. 3) to roll back to the last "
                "healthy checkpoint and lower δ (collapse.recovery_target: step_size, lr or both) "
                "automatically, or train again with a smaller langevin.step_size or optim.lr.")
    done = len(state.recoveries)
    if done < config.collapse.max_recoveries:  # recoveries left, but no healthy state to return to
        return (f"{what} and could not recover: no healthy state to return to (the run resumed from a "
                "checkpoint written while a collapse condition was building, and collapsed before it "
                f"wrote a healthy one); {values}. Resume from an earlier checkpoint (delete the newer "
                "ones) or train again with a smaller langevin.step_size or optim.lr.")
    return (f"{what} after {done} recover{'y' if done == 1 else 'ies'} (collapse.max_recoveries), each of which "
            f"rolled back to the last healthy checkpoint and multiplied {config.collapse.recovery_target} by "
            f"{config.collapse.recovery_factor:g}, and stopped there; {values} (summary.json: recoveries, "
            "effective). Train again with a smaller langevin.step_size or optim.lr, or allow more "
            "recoveries (collapse.max_recoveries) or larger cuts (a smaller collapse.recovery_factor); "
            "keep langevin.clamp on, or set optim.grad_clip.")


def effective_overrides(shared: dict) -> dict[str, float]:
    """The δ and λ a checkpoint's run was training with (its config's, times the factors of its
    recoveries), as overrides of its config: what a loaded run should sample with."""
    scales = shared.get("recovery", {}).get("knob_scales", {"step_size": 1.0, "lr": 1.0})
    config = shared["config"]
    return {"langevin.step_size": config["langevin"]["step_size"] * scales["step_size"],
            "optim.lr": config["optim"]["lr"] * scales["lr"]}
