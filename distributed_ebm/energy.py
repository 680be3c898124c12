"""Score networks Φ(x; θ, w) of the FRAME family (ALGORITHMS.md §1).

Every energy maps a batch (B, *sample_shape) to one score per sample (B,); higher means more
likely. Its last linear layer is θ, everything trained before it is w; `theta_names()` says which
parameters are θ, so that the JKO penalty can reach θ only. Builders are registered in ENERGIES.

model.spectral_norm puts spectral normalisation (torch.nn.utils.parametrizations) on the conv
and linear layers of w: their parameters become `….parametrizations.weight.original` (still w)
and each layer gains two power-iteration buffers, both in the state dict. θ stays free: it
starts at zero, which has no spectral normalisation, and its norm is the scale of Φ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# The first four conv layers of torchvision's VGG-16 (`features[0, 2, 5, 7]`), with the max-pool
# that sits between the second and the third.
VGG16_LAYOUT = ((3, 64), (64, 64), "pool", (64, 128), (128, 128))
VGG16_FEATURE_INDEX = (0, 2, 5, 7)  # indices of those conv layers in torchvision's `features`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


class Energy(nn.Module):
    """Base class: a score network whose last linear layer is θ."""

    def theta_names(self) -> set[str]:
        """Names (as in named_parameters) of the parameters that form θ."""
        raise NotImplementedError

    def split_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(θ, w): the last linear layer and every other trained parameter."""
        theta_names = self.theta_names()
        theta, w = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (theta if name in theta_names else w).append(param)
        return theta, w

    def score_fn(self, labels: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Φ(·) for a fixed batch of labels (class-conditional energies), as the sampler wants it."""
        return self if labels is None else (lambda x: self(x, labels))

    def score_reaching(self, params: str, labels: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Φ as a function whose gradients reach only θ (`"theta"`) or every parameter (`"all"`).

        Used for the JKO penalty: Algorithm 1 of the GGCN paper lets the penalty move θ only.
        """
        if params == "all":
            return self.score_fn(labels)
        if params != "theta":
            raise ConfigError(f"model.penalty_params must be 'theta' or 'all', got '{params}'.")
        theta_names = self.theta_names()
        detached = {n: (p if n in theta_names else p.detach()) for n, p in self.named_parameters()}
        args = () if labels is None else (labels,)
        return lambda x: torch.func.functional_call(self, detached, (x, *args))


class FilterBank(nn.Module):
    """A fixed filter bank laid out like the first conv layers of VGG-16; never trained.

    Weights come from a local file holding torchvision's VGG-16 state dict (never downloaded);
    without one the bank is a deterministic random one drawn from `seed`. `kind` says which, and
    every run logs it. Inputs are images in [-1, 1] with 1 or 3 channels (grey is repeated).
    """

    def __init__(self, layers: int = 4, weights: str | Path | None = None, seed: int = 0):
        super().__init__()
        if not 1 <= layers <= 4:
            raise ConfigError(f"model.filter_layers must be between 1 and 4, got {layers}.")
        self.layers = layers
        modules: list[nn.Module] = []
        convs: list[nn.Conv2d] = []
        for spec in VGG16_LAYOUT:
            if len(convs) == layers:
                break
            if spec == "pool":
                modules.append(nn.MaxPool2d(2, 2))
                continue
            conv = nn.Conv2d(spec[0], spec[1], kernel_size=3, padding=1)
            convs.append(conv)
            modules += [conv, nn.ReLU()]
        self.net = nn.Sequential(*modules)
        self.out_channels = convs[-1].out_channels
        if weights is not None:
            self._load(convs, Path(weights))
            self.kind = f"vgg16:{Path(weights).name}"
        else:
            gen = torch.Generator().manual_seed(seed)
            for conv in convs:
                fan_in = conv.in_channels * 9
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                conv.bias.data.zero_()
            self.kind = f"random:seed={seed}"
        self.normalise = weights is not None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for param in self.parameters():
            param.requires_grad_(False)

    def _load(self, convs: list[nn.Conv2d], path: Path) -> None:
        if not path.is_file():
            raise ConfigError(
                f"Filter bank weights '{path}' do not exist. Give a local file holding torchvision's "
                "VGG-16 state dict (torch.save(vgg16(weights=...).state_dict(), path) on a machine "
                "with internet), or leave model.filter_bank empty for a fixed random bank."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, nn.Module):
            state = state.state_dict()
        for conv, index in zip(convs, VGG16_FEATURE_INDEX):
            for part in ("weight", "bias"):
                key = next((k for k in (f"features.{index}.{part}", f"{index}.{part}") if k in state), None)
                if key is None:
                    raise ConfigError(
                        f"'{path}' has no key features.{index}.{part}: it is not a VGG-16 state dict."
                    )
                getattr(conv, part).data.copy_(state[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU responses F(x) of the last layer: (B, K, H', W')."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalise:
            x = ((x + 1) / 2 - self.mean) / self.std
        return self.net(x)


class FrameEnergy(Energy):
    """FRAME: Φ(x) = Σ_k Σ_pos θ_{k,pos} · F_k(x)[pos] on a fixed filter bank F.

    θ has one weight per channel (`layout="channel"`, stationary textures) or one per channel and
    position (`layout="position"`, aligned objects). θ starts at 0, so the model starts at q.
    """

    def __init__(self, bank: FilterBank, sample_shape: tuple[int, ...], layout: str = "position"):
        super().__init__()
        if layout not in ("channel", "position"):
            raise ConfigError(f"model.theta_layout must be 'channel' or 'position', got '{layout}'.")
        self.bank = bank
        with torch.no_grad():
            _, k, h, w = bank(torch.zeros(1, *sample_shape)).shape
        shape = (k, 1, 1) if layout == "channel" else (k, h, w)
        self.theta = nn.Parameter(torch.zeros(shape))

    def theta_names(self) -> set[str]:
        return {"theta"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bank(x) * self.theta).flatten(1).sum(1)


class ConvEnergy(Energy):
    """GCN: Φ(x) = θ · f(x; w), a ConvNet f with ReLU filters and a last linear layer θ.

    The first conv keeps the resolution, each following one halves it (down to 2 px). With
    `num_classes` the last layer also projects f onto a label embedding (class-conditional Φ):
    Φ(x, k) = θ · f(x) + e_k · f(x); the embedding belongs to θ.
    """

    def __init__(self, sample_shape: tuple[int, ...], channels: tuple[int, ...], activation: str = "relu",
                 num_classes: int = 0):
        super().__init__()
        if len(sample_shape) != 3:
            raise ConfigError(
                f"The conv energy needs images (C, H, W); the data gives samples of shape {sample_shape}. "
                "Use model.energy=mlp for vector data."
            )
        act = _activation(activation)
        layers: list[nn.Module] = []
        in_ch, size = sample_shape[0], sample_shape[1]
        for i, out_ch in enumerate(channels):
            if i == 0 or size <= 2:
                layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1))
            else:
                layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1))
                size //= 2
            layers.append(act())
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            dim = self.features(torch.zeros(1, *sample_shape)).numel()
        self.theta = nn.Linear(dim, 1)
        nn.init.zeros_(self.theta.weight)
        nn.init.zeros_(self.theta.bias)
        self.num_classes = num_classes
        self.class_theta = nn.Embedding(num_classes, dim) if num_classes else None
        if self.class_theta is not None:
            nn.init.zeros_(self.class_theta.weight)

    def theta_names(self) -> set[str]:
        return _names_under(self, ("theta", "class_theta"))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(x).flatten(1)
        phi = self.theta(features).squeeze(1)
        if self.class_theta is not None:
            if labels is None:
                raise ValueError("This energy is class-conditional: pass labels.")
            phi = phi + (self.class_theta(labels) * features).sum(1)
        return phi


class MLPEnergy(Energy):
    """An MLP score for vector data (the 2-D mixtures): hidden layers w, last linear layer θ."""

    def __init__(self, sample_shape: tuple[int, ...], channels: tuple[int, ...], activation: str = "silu"):
        super().__init__()
        act = _activation(activation)
        layers: list[nn.Module] = []
        in_dim = int(torch.tensor(sample_shape).prod())
        for width in channels:
            layers += [nn.Linear(in_dim, width), act()]
            in_dim = width
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.theta = nn.Linear(in_dim, 1)

    def theta_names(self) -> set[str]:
        return _names_under(self, ("theta",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta(self.features(x)).squeeze(1)


def _names_under(module: nn.Module, children: tuple[str, ...]) -> set[str]:
    """The parameter names under the given child modules (whatever parametrizations rename them to)."""
    return {name for name, _ in module.named_parameters() if name.split(".", 1)[0] in children}


def spectral_normalise(features: nn.Module) -> nn.Module:
    """Spectral normalisation on every conv and linear layer of `features` (w), in place."""
    for layer in features.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            spectral_norm(layer)
    return features


def _activation(name: str) -> Callable[[], nn.Module]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unknown model.activation '{name}'. Choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def _frame(config: ModelConfig, sample_shape: tuple[int, ...]) -> Energy:
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ConfigError(
            f"The FRAME energy needs grey or RGB images (1 or 3, H, W), got samples of shape {sample_shape}."
        )
    bank = FilterBank(config.filter_layers, config.filter_bank, seed=config.seed)
    log.info("FRAME filter bank: %s", bank.kind)
    return FrameEnergy(bank, sample_shape, config.theta_layout)


ENERGIES: dict[str, Callable[[ModelConfig, tuple[int, ...]], Energy]] = {
    "frame": _frame,
    "conv": lambda c, shape, num_classes=0: ConvEnergy(shape, c.channels, c.activation, num_classes),
    "mlp": lambda c, shape: MLPEnergy(shape, c.channels, c.activation),
}
CONDITIONAL_ENERGIES = ("conv",)
SPECTRAL_ENERGIES = ("conv", "mlp")  # energies whose w model.spectral_norm normalises


def check_energy(config: ModelConfig, energy: str, conditional: bool) -> None:
    """Refuse an energy that cannot be built as configured: an unknown name, labels or clusters
    (`conditional`) for an energy without a conditional variant, spectral normalisation of an
    energy without trained filters. Cheap: the training loop calls it before reading any data."""
    if energy not in ENERGIES:
        raise ConfigError(f"Unknown model.energy '{energy}'. Choose one of {sorted(ENERGIES)}.")
    if conditional and energy not in CONDITIONAL_ENERGIES:
        key = "model.clusters" if config.clusters else "model.conditional"
        raise ConfigError(f"{key} needs a conditional energy ({CONDITIONAL_ENERGIES}), not '{energy}'. "
                          f"Set model.energy to one of them, or {key} off.")
    if config.spectral_norm and energy not in SPECTRAL_ENERGIES:
        raise ConfigError(
            f"model.spectral_norm applies to the trained filters w of {SPECTRAL_ENERGIES}; the '{energy}' "
            "energy has none (FRAME's filter bank is fixed). Set model.spectral_norm=false."
        )


def build_energy(
    config: ModelConfig, sample_shape: tuple[int, ...], energy: str, num_classes: int = 0, seed_offset: int = 0
) -> Energy:
    """Build the energy named `energy` for samples of `sample_shape`, seeded by config.seed.

    `num_classes` > 0 builds the class-conditional variant (model.conditional, model.clusters).
    """
    check_energy(config, energy, conditional=num_classes > 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + seed_offset)
        net = ENERGIES[energy](config, tuple(sample_shape), *((num_classes,) if num_classes else ()))
        if config.spectral_norm:
            spectral_normalise(net.features)  # its power-iteration vectors drawn from the same seed
        return net
