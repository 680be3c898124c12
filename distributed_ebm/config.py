"""The run configuration: frozen dataclasses, one per concern, composed into `RunConfig`.

Configs cross process boundaries (Ray workers, MLflow params, YAML files) as plain nested dicts:
`RunConfig.from_dict` validates such a dict and rejects unknown keys with a did-you-mean hint,
`RunConfig.to_dict` gives it back. Overrides use dotted keys (`langevin.step_size=0.05`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration a user wrote is invalid; the message names the cause and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from and how they are shaped."""

    source: str = "digits"  # a name in distributed_ebm.data.SOURCES, or "webdataset"
    path: str | None = None  # file or folder for the `npz` and `folder` sources
    split: str = "train"  # npz: "train" (arrays x_train/y_train, or x/y) or "test" (x_test/y_test, held out)
    image_size: int | None = None  # side in pixels after resizing; None keeps the source's size
    grayscale: bool | None = None  # force one channel (True) or three (False); None keeps the source's
    num_images: int | None = None  # keep only the first N images (few-sample setting); None keeps all
    texture: str = "brick"  # scikit-image texture for the `texture` source
    crops: int = 256  # number of random crops drawn from the texture image
    num_points: int = 4096  # samples drawn for the 2-D mixture sources
    mixture_std: float = 0.05  # standard deviation of each mixture component (in data units)
    labels: bool = True  # keep class labels where the source has them
    # WebDataset shards (source `webdataset`; see distributed_ebm/data/stream.py):
    urls: str | None = None  # path, brace pattern, http(s):// or pipe: URL(s) of the shards
    loader_workers: int = 2  # DataLoader worker processes per rank that read and decode shards
    prefetch: int = 4  # batches each loader worker prepares ahead
    shuffle_shards: bool = True  # permute the shard list every epoch (same permutation on all ranks)
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer (1: no shuffling)
    resampled: bool = False  # draw shards with replacement; an epoch is epoch_batches per rank
    epoch_batches: int | None = None  # resampled: batches per rank per epoch (None: from manifest.json)
    num_classes: int | None = None  # classes of labelled shards (None: from manifest.json)
    manifest: str | None = None  # manifest.json path/URL/pipe: (None: next to local or http shards)
    mean_samples: int = 256  # first samples read before training (data mean, image size, checks)
    cluster_samples: int = 10_000  # with model.clusters: samples read (spread over every shard) to fit the k-means clusters on


@dataclass(frozen=True)
class ModelConfig:
    """The energy network Φ (the score function; higher means more likely)."""

    algorithm: str = "wgcn"  # a name in distributed_ebm.algorithms.ALGORITHMS
    energy: str | None = None  # a name in distributed_ebm.energy.ENERGIES; None: the algorithm's default
    channels: tuple[int, ...] = (32, 64, 128)  # widths of the ConvNet / MLP hidden layers (w)
    activation: str = "relu"  # nonlinearity h of the ConvNet filters (the papers use ReLU)
    filter_bank: str | None = None  # local .pt/.pth file with VGG-16 weights; None: fixed random bank
    filter_layers: int = 4  # conv layers of the VGG-16 layout used as the FRAME filter bank
    theta_layout: str = "position"  # FRAME θ: one weight per "channel" (textures) or per "position"
    jko_weight: float = 1e-4  # β: weight of the JKO / Wasserstein time piece (measured: docs/defaults.md)
    penalty_params: str = "theta"  # which parameters the JKO penalty's gradient reaches: "theta" | "all"
    conditional: bool = False  # class-conditional Φ (label projection on θ) and generator input
    clusters: int = 0  # K ≥ 2: self-conditioning, the conditional networks on K k-means clusters of the images (clusters.py); 0: off
    grid_sizes: tuple[int, ...] = (1, 4, 8)  # MGCN / wMGCN: image side of each grid, coarse to fine
    upsample: str = "nearest"  # MGCN: how chains move to the next grid, "nearest" or "bilinear"
    first_grid: str = "data_mean"  # MGCN: the first grid's chains start at the "data_mean" (ALGORITHMS.md) or
                                   # are drawn from a "gaussian" fitted to the data down-sampled to that grid
    seed: int = 0  # seed of the network initialisation and of the fixed filter bank
    energy_l2: float = 0.0  # α: adds α·(mean Φ(y)² + mean Φ(x)²) to the energy loss (Du & Mordatch 2019); 0: off
    spectral_norm: bool = False  # spectral normalisation of the ConvNet's conv and linear layers (w)


@dataclass(frozen=True)
class GeneratorConfig:
    """GGCN's generator g(ζ; ξ) and its learned hidden space (LHS)."""

    arch: str = "v0"  # "v0" (the paper's Appendix B deconvolutions) or "resnet"
    latent_dim: int = 128  # d: dimension of ζ
    base_width: int = 64  # widths are base × (8, 4, 4, 2, 1): 512-256-256-128-64 as in the paper
    embed_dim: int = 16  # label embedding size for conditional generators
    lr: float = 2e-4  # Adam learning rate of ξ
    betas: tuple[float, float] = (0.5, 0.999)  # Adam moment decays of ξ
    latent_lr: float = 1e-2  # ε: SGD learning rate of ζ (LHS only)
    generator_every: int = 4  # update ξ (and ζ) every K iterations
    latent_bank_size: int = 256  # persistent latents ζ (LHS), per process
    refine_steps: int | None = None  # fresh samples: Langevin steps after g(ζ); None: L (the paper's)
    latent_temperature: float = 1.0  # fresh samples: ζ ~ N(0, T² I); T < 1 trades diversity for fidelity


@dataclass(frozen=True)
class LangevinConfig:
    """Langevin dynamics on x: x ← x + (δ²/2)(∇Φ(x) − x/σ²) + δ·ε."""

    langevin_steps: int = 20  # L: steps per learning iteration
    step_size: float = 0.2  # δ (measured on digits: see docs/defaults.md)
    ref_sigma: float = 1.0  # σ: standard deviation of the Gaussian reference q
    clamp: bool = True  # clamp chains to the data range after every step
    sample_steps: int = 200  # steps for fresh chains drawn after training (`debm sample`)
    grad_clip: float | None = None  # clip each entry of ∇ₓΦ to ±this before the step (Du & Mordatch 2019); None: off
    sample_anneal_to: float | None = None  # fresh sampling only: δ decays geometrically to this over the run; None: constant δ
    # Speed options (same update rule and noise; see distributed_ebm/langevin.py):
    compile: bool = False  # torch.compile ∇ₓΦ (C++ compiler on the CPU, triton on the GPU)
    autocast: str | None = None  # "bf16": Φ's forward/backward in bfloat16, chains in float32; "auto": bf16 where
                                  # it pays (a CPU with native bfloat16), float32 elsewhere (langevin.resolve_autocast)
    channels_last: bool = False  # keep image chains in channels-last memory format (GPU)

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16", "auto"):
            raise ConfigError(
                f"langevin.autocast must be null (float32), 'bf16' or 'auto', got {self.autocast!r}. "
                "Fix the YAML file or the --set override."
            )


@dataclass(frozen=True)
class ChainConfig:
    """The persistent chain bank."""

    bank_size: int = 64  # number of persistent chains (per process)
    batch_size: int = 64  # chains updated per iteration (M); equal to bank_size reproduces Algorithm 1
    reinit_prob: float = 0.0  # probability per sampled chain of restarting from the initial state
    init: str = "zeros"  # initial state of a chain: "zeros" (Algorithm 1), "noise" or "data_mean"


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser of θ and w."""

    optimizer: str = "adam"  # "sgd" reproduces the papers' update rule, "adam"
    lr: float = 3e-3  # λ: learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam moment decays
    weight_decay: float = 0.0
    grad_clip: float | None = None  # clip the global gradient norm; None: no clipping


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's clock, outputs and seeds."""

    iterations: int = 300  # learning iterations T
    data_batch_size: int = 64  # N: data images per iteration
    seed: int = 0  # base seed; process streams derive from (seed, rank)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    log_every: int = 1  # write metrics every K iterations
    sample_every: int = 100  # save a PNG grid of the chains every K iterations
    checkpoint_every: int = 100  # save a checkpoint bundle every K iterations
    keep_checkpoints: int = 3  # how many checkpoint bundles to keep
    response_bank_seed: int = 1234  # seed of the fixed filter bank behind the response distance R
    ema_decay: float | None = None  # keep an EMA of the model weights (decay per iteration); sampling uses it; None: off
    ema_models: tuple[str, ...] | None = None  # the networks the EMA averages ("energy", "generator", "grids"); None: all
    time_budget_s: float | None = None  # stop (and checkpoint) after this many seconds of training; None: no budget


RECOVERY_TARGETS = ("step_size", "lr", "both")  # collapse.recovery_target: δ, λ or both


@dataclass(frozen=True)
class CollapseConfig:
    """The measurable definition of collapse, checked every iteration (see metrics/collapse.py)."""

    warmup: int = 20  # iterations before divergence checks start
    ema: float = 0.9  # smoothing of R and of the energy gap before they are compared
    r_ratio_max: float = 5.0  # collapse when smoothed R exceeds this multiple of its best value
    energy_gap_max: float = 50.0  # collapse when |Φ(data) − Φ(chains)| exceeds this many data-Φ stds
    energy_pinned_max: float = 0.8  # collapse when |Φ(data) − Φ(chains)| exceeds this share of 1/α (model.energy_l2 = α > 0)
    energy_pinned_patience: int = 25  # ... for this many consecutive iterations (early transients reach 0.6 for a few)
    saturation_max: float = 0.5  # collapse when chains push this share of data's unsaturated pixels to the bounds
    patience: int = 5  # consecutive iterations a condition must hold
    stop_on_collapse: bool = False  # stop training at collapse (NaN/Inf always stops)
    max_recoveries: int = 0  # on collapse: roll back to the last healthy checkpoint and go on, at most this often; 0: off
    recovery_factor: float = 0.5  # each recovery multiplies the lowered knob(s) by this
    recovery_target: str = "step_size"  # what a recovery lowers: "step_size" (δ), "lr" (λ) or "both"

    def __post_init__(self) -> None:
        _check(self.recovery_target in RECOVERY_TARGETS, "collapse.recovery_target", self.recovery_target,
               f"must be one of {', '.join(repr(t) for t in RECOVERY_TARGETS)}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True  # log params, metrics, artifacts and the final model to MLflow
    uri: str | None = None  # tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db
    experiment: str | None = None  # experiment name; None: the run name
    registered_model: str | None = None  # registered model name; None: the run name
    flush_every: int = 20  # send buffered metrics every K iterations
    register: bool = True  # register the final model (debm tune registers only its best trial's)
    parent_run_id: str | None = None  # nest this run under that MLflow run (a debm tune search)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, composed of one dataclass per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    chains: ChainConfig = field(default_factory=ChainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str = "debm"  # run name (also the default MLflow experiment / registered model name)

    def __post_init__(self) -> None:
        check_ranges(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RunConfig:
        """Build a validated config from nested plain values; unknown keys raise ConfigError."""
        return _build(cls, raw or {}, prefix="")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (tuples as lists), the inverse of from_dict."""
        return _plain(dataclasses.asdict(self))

    def replace(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides applied (`{"langevin.step_size": 0.1}`)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return RunConfig.from_dict(raw)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: low/high bounds (open or closed), and whether null is allowed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low bound itself is not allowed
    high_open: bool = False
    nullable: bool = False  # null means "off" / "the default"

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        return ((self.low is None or value > self.low or (not self.low_open and value == self.low))
                and (self.high is None or value < self.high or (not self.high_open and value == self.high)))

    def describe(self) -> str:
        lo = None if self.low is None else f"{self.low:g}"
        hi = None if self.high is None else f"{self.high:g}"
        if lo is not None and hi is not None:
            text = f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        elif lo is not None:
            text = f"{'>' if self.low_open else '≥'} {lo}"
        else:
            text = f"{'<' if self.high_open else '≤'} {hi}"
        return f"{text} or null" if self.nullable else text


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
PROBABILITY, DECAY = Range(0, 1), Range(0, 1, high_open=True)
RANGES: dict[str, Range] = {  # every numeric key (a test walks RunConfig and finds each here)
    "data.image_size": Range(1, nullable=True), "data.num_images": Range(1, nullable=True),
    "data.crops": AT_LEAST_1, "data.num_points": AT_LEAST_1, "data.mixture_std": POSITIVE,
    "data.loader_workers": AT_LEAST_0, "data.prefetch": AT_LEAST_1, "data.shuffle_buffer": AT_LEAST_1,
    "data.epoch_batches": Range(1, nullable=True), "data.num_classes": Range(1, nullable=True),
    "data.mean_samples": AT_LEAST_1, "data.cluster_samples": AT_LEAST_1,
    "model.channels": AT_LEAST_1, "model.filter_layers": AT_LEAST_1, "model.jko_weight": AT_LEAST_0,
    "model.grid_sizes": AT_LEAST_1, "model.seed": AT_LEAST_0, "model.energy_l2": AT_LEAST_0,
    "model.clusters": AT_LEAST_0,
    "generator.latent_dim": AT_LEAST_1, "generator.base_width": AT_LEAST_1, "generator.embed_dim": AT_LEAST_1,
    "generator.lr": POSITIVE, "generator.betas": DECAY, "generator.latent_lr": POSITIVE,
    "generator.generator_every": AT_LEAST_1, "generator.latent_bank_size": AT_LEAST_1,
    "generator.refine_steps": Range(0, nullable=True), "generator.latent_temperature": Range(0, 2, low_open=True),
    "langevin.langevin_steps": AT_LEAST_1, "langevin.step_size": POSITIVE, "langevin.ref_sigma": POSITIVE,
    "langevin.sample_steps": AT_LEAST_1, "langevin.grad_clip": Range(0, low_open=True, nullable=True),
    "langevin.sample_anneal_to": Range(0, low_open=True, nullable=True),
    "chains.bank_size": AT_LEAST_1, "chains.batch_size": AT_LEAST_1, "chains.reinit_prob": PROBABILITY,
    "optim.lr": POSITIVE, "optim.betas": DECAY, "optim.weight_decay": AT_LEAST_0,
    "optim.grad_clip": Range(0, low_open=True, nullable=True),
    "train.iterations": AT_LEAST_1, "train.data_batch_size": AT_LEAST_1, "train.seed": AT_LEAST_0,
    "train.log_every": AT_LEAST_1, "train.sample_every": AT_LEAST_1, "train.checkpoint_every": AT_LEAST_1,
    "train.keep_checkpoints": AT_LEAST_1, "train.response_bank_seed": AT_LEAST_0,
    "train.ema_decay": Range(0, 1, high_open=True, nullable=True),
    "train.time_budget_s": Range(0, low_open=True, nullable=True),
    "collapse.warmup": AT_LEAST_0, "collapse.ema": DECAY, "collapse.r_ratio_max": Range(1, low_open=True),
    "collapse.energy_gap_max": POSITIVE, "collapse.energy_pinned_max": POSITIVE,
    "collapse.energy_pinned_patience": AT_LEAST_1, "collapse.saturation_max": Range(0, 1, low_open=True),
    "collapse.patience": AT_LEAST_1, "collapse.max_recoveries": AT_LEAST_0,
    "collapse.recovery_factor": Range(0, 1, low_open=True, high_open=True),
    "tracking.flush_every": AT_LEAST_1,
}
PERSISTENT_CHAINS = ("frame", "wframe", "gcn", "wgcn")  # algorithms that draw a batch from the chain bank
FIRST_GRIDS = ("data_mean", "gaussian")  # model.first_grid: where MGCN's first-grid chains start


def check_ranges(config: RunConfig) -> None:
    """Refuse, before any work, a numeric value outside its key's range (naming the key, the value
    and the range) and keys that contradict each other."""
    for key, rule in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        values = value if isinstance(value, tuple) else (value,)
        _check(all(rule.contains(v) for v in values), key, value,
               f"must be {'a list of values ' if isinstance(value, tuple) else ''}{rule.describe()}")
    sizes = config.model.grid_sizes
    _check(len(sizes) > 0 and list(sizes) == sorted(set(sizes)), "model.grid_sizes", list(sizes),
           "must be increasing image sides, coarse to fine, ending at the image side")
    _check(config.model.first_grid in FIRST_GRIDS, "model.first_grid", config.model.first_grid,
           "must be 'data_mean' (the data mean down-sampled, ALGORITHMS.md) or 'gaussian' (draws from a Gaussian "
           "fitted to the data down-sampled to the first grid)")
    _check(len(config.model.channels) > 0, "model.channels", list(config.model.channels), "must name ≥ 1 width")
    _check(config.train.ema_models is None or config.train.ema_decay is not None, "train.ema_models",
           config.train.ema_models, "needs train.ema_decay (the EMA it selects networks for)")
    _check(config.model.clusters != 1, "model.clusters", config.model.clusters,
           "must be 0 (off) or the number of clusters, at least 2")
    _check(not (config.model.clusters and config.model.conditional), "model.clusters", config.model.clusters,
           "replaces the labels of model.conditional with clusters of the images: set one of them "
           "(model.conditional=false for clusters, model.clusters=0 for labels)")
    if config.model.algorithm in PERSISTENT_CHAINS:
        _check(config.chains.batch_size <= config.chains.bank_size, "chains.batch_size", config.chains.batch_size,
               f"must be ≤ chains.bank_size ({config.chains.bank_size}): each iteration updates that many of the "
               "bank's chains")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise a ConfigError naming `key`, its value and the rule it breaks, unless `ok`."""
    if not ok:
        raise ConfigError(f"'{key}' {rule}, got {value!r}. Fix the YAML file or the --set override.")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def did_you_mean(word: str, choices, *, list_choices: bool = True) -> str:
    """The hint for an unknown name: " Did you mean 'X'?" with the closest of `choices`; when
    none is close, " Valid keys: …." (or "" with list_choices=False, for messages that list
    the choices themselves)."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys: {', '.join(sorted(choices))}." if list_choices else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the run config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys to values, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"Unknown config key '{prefix}{key}'.{did_you_mean(key, fields)}"
                " Fix the YAML file or the --set override."
            )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a leaf value against its annotation, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"'{key}' must have {len(args)} entries, got {value!r}.")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"'{key}' must be a {hint.__name__}, got {value!r}.")
    return value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `raw[a][b] = value` for the dotted key `a.b`, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}': '{part}' is a value, not a section.")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `--set section.key=value` items; values are read as YAML (numbers, lists, null)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like section.key=value.")
        key, text = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return overrides


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to dotted keys (for MLflow params and search spaces)."""
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML preset (or the defaults), apply dotted overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Config file '{path}' does not exist. Pass one of the presets in configs/ "
                "(e.g. configs/digits_wgcn.yaml) or a path to your own YAML file."
            )
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections.")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return RunConfig.from_dict(raw)
