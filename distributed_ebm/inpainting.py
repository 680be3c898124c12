"""Inpainting (GGCN paper, Table 3): masks, Langevin and generator-based restoration, scores.

Masks mark the *missing* pixels with 1. Langevin inpainting runs the sampler on the missing
pixels only (observed pixels are clamped: they never change), which works for every model; the
generator variant (GGCN) first fits ζ so that g(ζ) matches the observed pixels, fills the hole
with g(ζ), then refines it with the same masked Langevin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .langevin import langevin

MASK_KINDS = ("square", "spots", "combined")


def make_masks(kind: str, num: int, size: int, *, generator: torch.Generator, square_fraction: float = 0.5,
               spot_fraction: float = 0.5) -> torch.Tensor:
    """(num, 1, size, size) masks with 1 on missing pixels.

    square: a centred square of side `square_fraction` × size; spots: each pixel missing with
    probability `spot_fraction`; combined: the union of both.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"Unknown mask '{kind}'. Choose one of {MASK_KINDS}.")
    masks = torch.zeros(num, 1, size, size)
    if kind in ("square", "combined"):
        side = max(1, round(size * square_fraction))
        top = (size - side) // 2
        masks[..., top : top + side, top : top + side] = 1
    if kind in ("spots", "combined"):
        spots = (torch.rand(num, 1, size, size, generator=generator) < spot_fraction).float()
        masks = torch.maximum(masks, spots)
    return masks


def restore_each_mask(
    restore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor, kinds: tuple[str, ...],
    *, generator: torch.Generator,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(kind, missing, restored) for each mask kind: masks (1 = missing) drawn from `generator`,
    `restore(images, missing)` fills them (the loop behind `debm inpaint` and `debm evaluate`)."""
    for kind in kinds:
        missing = make_masks(kind, len(images), images.shape[-1], generator=generator)
        yield kind, missing, restore(images, missing)


def inpaint_langevin(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    missing: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    ref_sigma: float,
    generator: torch.Generator,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    init: torch.Tensor | None = None,
    grad_clip: float | None = None,
    anneal_to: float | None = None,
    compile: bool = False,
    autocast: str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Fill the missing pixels by Langevin on Φ with the observed pixels clamped.

    The hole starts from `init` (default: zeros) and every observed pixel keeps its value.
    `grad_clip` and `anneal_to` are the sampler's quality options, `compile`, `autocast` and
    `channels_last` its speed options (see `langevin`).
    """
    start = torch.where(missing.bool(), torch.zeros_like(images) if init is None else init, images)
    return langevin(score_fn, start, steps=steps, step_size=step_size, ref_sigma=ref_sigma,
                    generator=generator, clamp=clamp, mask=missing.expand_as(images), grad_clip=grad_clip,
                    anneal_to=anneal_to, compile=compile, autocast=autocast, channels_last=channels_last)


def fit_latents(
    generator_net: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    missing: torch.Tensor,
    *,
    latent_dim: int,
    steps: int = 200,
    lr: float = 0.05,
    generator: torch.Generator,
) -> torch.Tensor:
    """ζ minimising ‖(1 − M) ⊙ (g(ζ) − y)‖² (observed pixels only), by Adam from ζ ~ N(0, I)."""
    z = torch.randn((len(images), latent_dim), generator=generator, device=images.device).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    observed = 1 - missing
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((generator_net(z) - images) * observed).pow(2).flatten(1).sum(1).mean()
        loss.backward()
        optimizer.step()
    return z.detach()


def ssim_kernel(size: int) -> int:
    """The largest odd SSIM window ≤ min(11, size)."""
    k = min(11, size)
    return k if k % 2 else k - 1


def inpainting_scores(restored: torch.Tensor, original: torch.Tensor, *, data_range: float = 2.0) -> dict[str, float]:
    """MSE, PSNR (dB) and SSIM of restored images against the originals (values in [-1, 1])."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    mse = float((restored - original).pow(2).mean())
    psnr = 10 * math.log10(data_range**2 / mse) if mse > 0 else math.inf
    kernel = ssim_kernel(min(original.shape[-2:]))
    ssim = float(structural_similarity_index_measure(restored.float(), original.float(), data_range=data_range,
                                                     kernel_size=kernel, sigma=1.5 * kernel / 11))
    return {"mse": mse, "psnr": psnr, "ssim": ssim, "ssim_window": kernel}
