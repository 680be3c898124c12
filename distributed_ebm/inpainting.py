"""Inpainting (GGCN paper, Table 3): masks, Langevin and generator-based restoration, scores.

Masks mark the *missing* pixels with 1. Langevin inpainting runs the sampler on the missing
pixels only (observed pixels are clamped: they never change), which works for every model; the
generator variant (GGCN) first fits ζ so that g(ζ) matches the observed pixels, fills the hole
with g(ζ), then refines it with the same masked Langevin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .config import ConfigError
from .langevin import langevin

MASK_KINDS = ("square", "spots", "combined")
METHODS = ("langevin", "generator")  # masked Langevin on Φ (every model); g(ζ) fitted, then refined (GGCN)


def check_average(average: int) -> None:
    """Refuse a number of restorations to average below 1 (`--average`, `average`)."""
    if average < 1:
        raise ConfigError(f"--average must be ≥ 1 restorations per image, got {average}.")


def restoration_estimate(average: int) -> str:
    """What an inpainting report's restorations are, for `average` restorations per image."""
    if average == 1:
        return "one restoration per image (a draw from the model given the observed pixels)"
    return f"posterior mean: the average of {average} restorations per image"


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


def biharmonic_fill(images: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """The baseline: missing pixels (mask 1) filled by biharmonic interpolation from the observed
    ones (scikit-image's `inpaint_biharmonic`, per image, channels together); observed pixels kept."""
    from skimage.restoration import inpaint_biharmonic

    x = images.detach().cpu().double().numpy()
    holes = missing.detach().cpu().bool().numpy()[:, 0]
    out = [
        inpaint_biharmonic(image, hole, channel_axis=0) if hole.any() and not hole.all() else image
        for image, hole in zip(x, holes)
    ]
    filled = torch.from_numpy(np.stack(out)).to(images.dtype)
    return torch.where(missing.bool().cpu(), filled, images.cpu()).clamp(-1, 1)


BASELINE = "biharmonic interpolation of the missing pixels (scikit-image inpaint_biharmonic)"


def ssim_kernel(size: int) -> int:
    """The largest odd SSIM window ≤ min(11, size)."""
    k = min(11, size)
    return k if k % 2 else k - 1


def _psnr(mse: float, data_range: float) -> float:
    return 10 * math.log10(data_range**2 / mse) if mse > 0 else math.inf


def inpainting_scores(restored: torch.Tensor, original: torch.Tensor, missing: torch.Tensor | None = None, *,
                      data_range: float = 2.0) -> dict[str, float]:
    """MSE, PSNR (dB) and SSIM of restored images against the originals (values in [-1, 1]) over
    the whole image and, given the `missing` mask (1: missing), over the missing pixels only
    (`missing_mse`, `missing_psnr`, `missing_ssim`: the SSIM map averaged over those pixels)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    restored, original = restored.float().cpu(), original.float().cpu()
    mse = float((restored - original).pow(2).mean())
    kernel = ssim_kernel(min(original.shape[-2:]))
    ssim, ssim_map = structural_similarity_index_measure(
        restored, original, data_range=data_range, kernel_size=kernel, sigma=1.5 * kernel / 11,
        return_full_image=True)
    scores = {"mse": mse, "psnr": _psnr(mse, data_range), "ssim": float(ssim), "ssim_window": kernel}
    if missing is not None:
        hole = missing.cpu().bool().expand_as(original)
        if hole.any():
            missing_mse = float((restored - original).pow(2)[hole].mean())
            scores.update(missing_mse=missing_mse, missing_psnr=_psnr(missing_mse, data_range),
                          missing_ssim=float(ssim_map[hole].mean()))
    return scores


def describe_scores(kind: str, scores: dict[str, float], baseline: dict[str, float] | None = None) -> str:
    """One console line per mask: the whole image, then the missing pixels beside the baseline's."""
    line = f"{kind:9s} MSE {scores['mse']:.4f}  PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.3f}"
    if "fid" in scores:
        line += f"  FID {scores['fid']:.2f}"
    if "missing_psnr" in scores:
        line += f" | missing pixels: PSNR {scores['missing_psnr']:.2f} dB  SSIM {scores['missing_ssim']:.3f}"
        if baseline is not None:
            line += (f"  (biharmonic baseline: PSNR {baseline['missing_psnr']:.2f} dB  "
                     f"SSIM {baseline['missing_ssim']:.3f})")
    return line
