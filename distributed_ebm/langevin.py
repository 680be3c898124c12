"""Langevin dynamics on p(x) ∝ exp(Φ(x)) · N(0, σ² I): pure functions, nothing else.

One step (ALGORITHMS.md §2):

    x ← x + (δ² / 2) · (∇ₓΦ(x) − x / σ²) + δ · ε,     ε ~ N(0, I)

The sampler knows nothing about optimisers, configs or Ray: its knobs are keyword arguments and
its noise comes from an explicit `torch.Generator`, so that a run can be replayed bit for bit.

The loop allocates nothing per step besides what autograd needs for ∇ₓΦ: the drift and then the
noise go through one preallocated buffer, the update runs in place under `torch.no_grad`, and
nothing reads a tensor back to the host. The default path gives bit for bit the result of the
plain formula above. Two opt-in quality options change the update rule itself:

- `grad_clip`: each entry of ∇ₓΦ is clipped to ±c before the step (Du & Mordatch 2019), which
  bounds the drift of the Φ term per step by δ²/2 · c per entry.
- `anneal_to`: δ decays geometrically over the run, δ_t = δ · (δ_end / δ)^(t / (L − 1)) for
  t = 0 … L − 1 (`step_schedule`); the noise scales with δ_t as in the rule above, so the last
  steps are nearly noise-free. Meant for fresh samples, not for training chains.

Three opt-in speed options change how ∇ₓΦ is computed, never the update rule, the clamp, the
mask or the noise stream:

- `compile`: ∇ₓΦ through `torch.func.grad`, compiled by `torch.compile` (forward and backward in
  one graph). Needs a C++ compiler on the CPU and triton on the GPU. The first call of each new
  network or batch shape compiles (tens of seconds on a CPU); later calls reuse the graph.
- `autocast="bf16"`: Φ's forward and backward under bfloat16 autocast; the chains, the update
  and the noise stay in float32. `autocast="auto"` is bf16 where it was measured to pay, a CPU
  with native bfloat16 (x86 AVX512-BF16 or AMX-BF16: 1.35× per MNIST GGCN iteration on a 2-core
  EPYC, docs/benchmarks.md), and float32 everywhere else (on an H200 bf16 did not pay:
  docs/gpu.md): `resolve_autocast`.
- `channels_last`: the chains (B, C, H, W) are kept in channels-last memory format, which lets
  cuDNN pick its faster NHWC kernels; meant for the GPU (it runs on the CPU too, where the gain
  is small and depends on the network: benchmarks/langevin.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # Φ: a batch of x → one score per sample
GradFn = Callable[[torch.Tensor], torch.Tensor]  # x → ∇ₓΦ(x)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16}  # values of the `autocast` option, besides AUTO
AUTO = "auto"  # autocast where it pays on the device at hand (`resolve_autocast`)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 flags of bfloat16 arithmetic in hardware


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16), read
    from the kernel's flags; False where they cannot be read (not Linux) or name neither."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not NATIVE_BF16_FLAGS.isdisjoint(flags)


def resolve_autocast(autocast: str | None, device: torch.device | str) -> str | None:
    """The `autocast` option as it runs on `device`: AUTO is "bf16" on a CPU with native bfloat16
    (`cpu_has_native_bf16`) and None (float32) elsewhere: on other CPUs bf16 is emulated, and on
    the GPU it did not pay (docs/gpu.md); any other value is returned as it is."""
    if autocast != AUTO:
        return autocast
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else None


def score_grad(score_fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """∇ₓΦ(x) for a batch, without touching the parameters' .grad fields."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(score_fn(x).sum(), x)
    return grad


def functional_score_grad(score_fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """∇ₓΦ(x) by `torch.func.grad`: the form `torch.compile` traces into one graph.

    Gradients reach x only (never the parameters' .grad), also under an outer `torch.no_grad`.
    """
    return torch.func.grad(lambda y: score_fn(y).sum())(x)


@functools.cache
def _compiled_score_grad() -> Callable[[ScoreFn, torch.Tensor], torch.Tensor]:
    # One compiled function for the process: its graphs are cached per network structure and
    # batch shape, so every learning iteration after the first reuses them.
    return torch.compile(functional_score_grad)


def step_schedule(step_size: float, steps: int, anneal_to: float | None = None) -> list[float]:
    """δ_t for t = 0 … steps − 1: constant δ, or with `anneal_to` geometric from δ down to it
    (δ_0 = δ, δ_{L−1} = anneal_to up to rounding; one step keeps δ)."""
    if anneal_to is None:
        return [step_size] * steps
    if anneal_to <= 0 or step_size <= 0:
        raise ValueError(f"Langevin annealing needs positive step sizes, got δ={step_size} → {anneal_to}.")
    ratio = anneal_to / step_size
    return [step_size * ratio ** (t / (steps - 1)) if steps > 1 else step_size for t in range(steps)]


def langevin(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    ref_sigma: float,
    generator: torch.Generator | None = None,
    clamp: tuple[float, float] | None = None,
    mask: torch.Tensor | None = None,
    grad_clip: float | None = None,
    anneal_to: float | None = None,
    compile: bool = False,
    autocast: str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Run `steps` Langevin steps from x0 and return the final (detached) states.

    Args:
        score_fn: Φ, mapping a batch (B, ...) to scores (B,).
        x0: initial states (B, ...); not modified.
        steps: number of steps L.
        step_size: δ; the drift is scaled by δ²/2 and the noise by δ.
        ref_sigma: σ of the Gaussian reference q = N(0, σ² I).
        generator: source of the noise ε (on x0's device); None uses the global generator.
        clamp: (low, high) bounds applied after every step, e.g. the data range (-1, 1).
        mask: optional tensor broadcastable to x0; 1 marks entries that move, 0 entries that stay
            at their x0 value (inpainting with observed pixels clamped).
        grad_clip: clip each entry of ∇ₓΦ to [−c, c] before the step; None: no clipping.
        anneal_to: δ decays geometrically from `step_size` to this over the `steps` steps, the
            noise with it (`step_schedule`); None: constant δ.
        compile: compute ∇ₓΦ with `torch.compile` (results match the default path to float
            rounding, ~1e-7 per step).
        autocast: None (float32), or "bf16": Φ's forward and backward in bfloat16 autocast, the
            chains in float32 (∇ₓΦ carries ~1e-2 relative error); "auto": bf16 where it pays on
            x0's device, else float32 (`resolve_autocast`).
        channels_last: keep image chains (B, C, H, W) in channels-last memory format (GPU).

    The noise stream, and with the default options the result, are the same bit for bit as the
    plain loop `x = x + δ²/2 · (∇ₓΦ(x) − x/σ²) + δ · randn(generator)` followed by clamp and mask
    (with `grad_clip`, ∇ₓΦ(x).clamp(−c, c) in place of ∇ₓΦ(x); with `anneal_to`, δ_t in place of δ).
    The result has x0's memory layout.
    """
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"Langevin grad_clip must be positive, got {grad_clip}.")
    schedule = step_schedule(step_size, steps, anneal_to)
    grad_fn = _grad_fn(score_fn, x0, compile=compile, autocast=autocast)
    memory_format = _memory_format(x0, channels_last)
    inv_var = 1.0 / ref_sigma**2
    with torch.no_grad():
        x = x0.detach().clone(memory_format=memory_format)
        # One work buffer holds the drift, then the noise. It is contiguous whatever x's layout,
        # so that ε for each entry is the one the plain loop draws.
        work = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        move = None if mask is None else mask.to(x.device).bool()
        keep = x0.detach()
        # ∇ₓΦ may be an expanded view (e.g. of a sum), so clipping goes to a buffer of its own
        clipped = None if grad_clip is None else torch.empty_like(work)
        for delta in schedule:
            grad = grad_fn(x)
            if clipped is not None:
                grad = torch.clamp(grad, -grad_clip, grad_clip, out=clipped)
            # δ²/2 · (∇Φ − x/σ²), one operation at a time so that rounding matches the formula
            torch.mul(x, inv_var, out=work)
            torch.sub(grad, work, out=work)
            x.add_(work.mul_(delta**2 / 2.0))
            x.add_(work.normal_(generator=generator).mul_(delta))
            if clamp is not None:
                x.clamp_(clamp[0], clamp[1])
            if move is not None:
                torch.where(move, x, keep, out=x)
    return x.contiguous(memory_format=_layout_of(x0))


@dataclass(frozen=True)
class LangevinSettings:
    """The sampler's knobs, fixed once for a run: calling it runs `langevin` with them.

    Training, `debm sample`/`inpaint`/`interpolate` and serving all sample through one of these,
    so the knobs are mapped from the config in one place (algorithms.langevin_settings).
    """

    steps: int  # L: steps per call unless the call says otherwise
    step_size: float  # δ
    ref_sigma: float  # σ of the Gaussian reference
    clamp: tuple[float, float] | None = None  # bounds after every step (the data range), or none
    grad_clip: float | None = None  # clip each entry of ∇ₓΦ to ±this (see `langevin`), or none
    anneal_to: float | None = None  # δ decays geometrically to this over each call, or constant δ
    sample_anneal_to: float | None = None  # the `anneal_to` of fresh chains (`for_fresh_chains`)
    compile: bool = False  # see `langevin`
    autocast: str | None = None  # see `langevin`
    channels_last: bool = False  # see `langevin`

    def keywords(self, steps: int | None = None) -> dict:
        """The keyword arguments of `langevin` (and inpainting.inpaint_langevin): `steps` steps,
        default L."""
        return {"steps": self.steps if steps is None else steps, "step_size": self.step_size,
                "ref_sigma": self.ref_sigma, "clamp": self.clamp, "grad_clip": self.grad_clip,
                "anneal_to": self.anneal_to, "compile": self.compile, "autocast": self.autocast,
                "channels_last": self.channels_last}

    def for_fresh_chains(self) -> LangevinSettings:
        """These knobs for chains started fresh after training (samples, inpainting, serving):
        δ anneals to `sample_anneal_to` when set. Training chains keep constant δ."""
        return replace(self, anneal_to=self.sample_anneal_to)

    def __call__(self, score_fn: ScoreFn, x0: torch.Tensor, *, generator: torch.Generator | None,
                 steps: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`langevin(score_fn, x0, …)` with these knobs: `steps` steps (default L)."""
        return langevin(score_fn, x0, generator=generator, mask=mask, **self.keywords(steps))


def _grad_fn(score_fn: ScoreFn, x0: torch.Tensor, *, compile: bool, autocast: str | None) -> GradFn:
    """x → ∇ₓΦ(x): eager autograd by default, else with Φ under autocast and/or compiled."""
    autocast = resolve_autocast(autocast, x0.device)
    if autocast is not None:
        score_fn = _autocast_score(score_fn, x0.device.type, _autocast_dtype(autocast, x0))
    if compile:
        _check_compile(x0.device)
        return functools.partial(_compiled_score_grad(), score_fn)
    return functools.partial(score_grad, score_fn)


def _autocast_score(score_fn: ScoreFn, device_type: str, dtype: torch.dtype) -> ScoreFn:
    """Φ with its forward under autocast (its backward follows the forward's dtypes) and float32
    scores."""

    def cast_score(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            scores = score_fn(x)
        return scores.float()

    return cast_score


def _check_compile(device: torch.device) -> None:
    """Fail before the first step, naming the fix, where torch.compile has no backend to run."""
    if device.type == "cpu":
        # The same compiler torch.compile's inductor looks for (torch._inductor.config.cpp.cxx).
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            raise RuntimeError(
                f"Langevin compile=True on the CPU needs a C++ compiler for torch.compile, and "
                f"'{cxx}' is not on PATH. Install g++ (or point $CXX at one), or set "
                "langevin.compile=false."
            )
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError(
                "Langevin compile=True on the GPU needs the triton package for torch.compile. "
                "Install the triton matching your torch, or set langevin.compile=false."
            )
    else:
        raise RuntimeError(
            f"Langevin compile=True is supported on 'cpu' and 'cuda', not '{device.type}'. "
            "Set langevin.compile=false."
        )


def _autocast_dtype(autocast: str, x0: torch.Tensor) -> torch.dtype:
    """The autocast dtype named `autocast`, checked against x0's dtype and device."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(
            f"Unknown Langevin autocast '{autocast}'. Choose one of {sorted(AUTOCAST_DTYPES)}, "
            f"'{AUTO}', or None for float32."
        )
    if x0.dtype != torch.float32:
        raise ValueError(
            f"Langevin autocast keeps the chains in float32, but x0 is {x0.dtype}. Pass float32 "
            "chains or set langevin.autocast=null."
        )
    device_type = x0.device.type
    if not torch.amp.is_autocast_available(device_type):
        raise RuntimeError(
            f"Langevin autocast='{autocast}' is not available on '{device_type}'. "
            "Set langevin.autocast=null."
        )
    if device_type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise RuntimeError(
            f"Langevin autocast='{autocast}' needs a GPU with native bfloat16 (compute capability "
            f"8.0 or newer); '{torch.cuda.get_device_name(x0.device)}' has none. Set "
            "langevin.autocast=null."
        )
    return AUTOCAST_DTYPES[autocast]


def _memory_format(x0: torch.Tensor, channels_last: bool) -> torch.memory_format:
    """The layout the chains live in during the run."""
    if not channels_last:
        return torch.preserve_format
    if x0.dim() != 4:
        raise ValueError(
            f"Langevin channels_last needs image chains (B, C, H, W), got shape {tuple(x0.shape)}. "
            "Set langevin.channels_last=false for vector data."
        )
    return torch.channels_last


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """x's memory format, for handing the result back in the caller's layout."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format
