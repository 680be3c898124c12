"""Generators g(ζ; ξ) for GGCN: the paper's "v0" deconvolution net and a ResNet variant.

Both map a latent ζ ∈ R^d (and, for conditional models, a class label) to an image in [-1, 1]:
the sigmoid output of v0 (Appendix B of the GGCN paper) is rescaled to the data range. Their batch
norms normalise over the global batch when several workers train (`GlobalBatchNorm2d`), so that
N workers' generator step is the one-process step on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ConfigError, GeneratorConfig
from .distributed import GlobalBatchNorm2d

LEAKY_SLOPE = 0.02  # Appendix B: leaky ReLU tilt
V0_WIDTHS = (8, 4, 4, 2, 1)  # × base_width: 512-256-256-128-64 for the paper's base of 64

# (kernel, stride, padding) of the five deconvolutions per image side. 64 px is the paper's table
# (4/7/5/7/2, no padding: 1 → 4 → 13 → 29 → 63 → 64); the others keep five layers and the widths.
V0_LAYOUTS: dict[int, tuple[tuple[int, int, int], ...]] = {
    64: ((4, 1, 0), (7, 2, 0), (5, 2, 0), (7, 2, 0), (2, 1, 0)),
    32: ((4, 1, 0), (4, 2, 1), (4, 2, 1), (4, 2, 1), (3, 1, 1)),
    28: ((7, 1, 0), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1)),
    16: ((4, 1, 0), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1)),
    8: ((2, 1, 0), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1)),
}


class Generator(nn.Module):
    """Base: concatenates ζ with a label embedding (conditional models) before the network."""

    def __init__(self, latent_dim: int, num_classes: int, embed_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.in_dim = latent_dim + (embed_dim if num_classes else 0)

    def _input(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return z
        if labels is None:
            raise ValueError("This generator is class-conditional: pass labels.")
        return torch.cat([z, self.embed(labels)], dim=1)


class V0Generator(Generator):
    """The GGCN paper's v0: five deconvolutions with batch norm and leaky ReLU 0.02, a 1×1 conv
    and a sigmoid, rescaled to [-1, 1]. Weights start from N(0, 0.02²), biases at 0."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], *, base_width: int = 64,
                 num_classes: int = 0, embed_dim: int = 16):
        super().__init__(latent_dim, num_classes, embed_dim)
        channels, size = image_shape[0], image_shape[1]
        if size not in V0_LAYOUTS or image_shape[1] != image_shape[2]:
            raise ConfigError(
                f"The v0 generator supports square images of {sorted(V0_LAYOUTS)} px, got {image_shape}. "
                "Set data.image_size to one of them, or use generator.arch=resnet."
            )
        layers: list[nn.Module] = []
        in_ch = self.in_dim
        for (kernel, stride, padding), mult in zip(V0_LAYOUTS[size], V0_WIDTHS):
            out_ch = base_width * mult
            layers += [
                nn.ConvTranspose2d(in_ch, out_ch, kernel, stride, padding, bias=False),
                GlobalBatchNorm2d(out_ch),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, channels, 1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self._input(z, labels)[:, :, None, None]
        return torch.sigmoid(self.net(h)) * 2 - 1


class _ResBlockUp(nn.Module):
    """Pre-activation residual block that doubles the resolution (nearest up-sampling)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.main = nn.Sequential(
            GlobalBatchNorm2d(in_ch), nn.LeakyReLU(LEAKY_SLOPE), nn.Upsample(scale_factor=2),
            nn.Conv2d(in_ch, out_ch, 3, padding=1), GlobalBatchNorm2d(out_ch), nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class ResNetGenerator(Generator):
    """A ResNet generator: a linear map to a (base side)² feature map, then residual up-sampling
    blocks that double the side until the image size (8 → 4², 28 → 7², 32 → 4², 64 → 4²)."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], *, base_width: int = 64,
                 num_classes: int = 0, embed_dim: int = 16):
        super().__init__(latent_dim, num_classes, embed_dim)
        channels, size = image_shape[0], image_shape[1]
        start, blocks = size, 0
        while start > 7 and start % 2 == 0:
            start //= 2
            blocks += 1
        if blocks == 0:
            raise ConfigError(f"The ResNet generator needs an even image side ≥ 8, got {size}.")
        width = base_width * 2 ** min(blocks, 3)
        self.start, self.width = start, width
        self.project = nn.Linear(self.in_dim, width * start * start)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers.append(_ResBlockUp(width, max(width // 2, base_width)))
            width = max(width // 2, base_width)
        layers += [GlobalBatchNorm2d(width), nn.LeakyReLU(LEAKY_SLOPE), nn.Conv2d(width, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(self._input(z, labels)).view(-1, self.width, self.start, self.start)
        return torch.tanh(self.net(h))


GENERATORS: dict[str, Callable[..., Generator]] = {"v0": V0Generator, "resnet": ResNetGenerator}


def build_generator(config: GeneratorConfig, image_shape: tuple[int, ...], num_classes: int, seed: int) -> Generator:
    """Build the generator named by config.arch for images of `image_shape`, seeded."""
    if config.arch not in GENERATORS:
        raise ConfigError(f"Unknown generator.arch '{config.arch}'. Choose one of {sorted(GENERATORS)}.")
    if len(image_shape) != 3:
        raise ConfigError(f"GGCN generators make images (C, H, W); the data gives samples of shape {image_shape}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GENERATORS[config.arch](
            config.latent_dim, tuple(image_shape), base_width=config.base_width,
            num_classes=num_classes, embed_dim=config.embed_dim,
        )
