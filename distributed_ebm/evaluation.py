"""Scoring generated images, or inpainting, against reference data (the library of `debm evaluate`).

Generation: draw FRESH samples (the persistent bank only with `from_bank`, and the report says
which), pick reference images of the data set, and score them in one feature space
(metrics/generative.py): FID, KID, IS, precision/recall, density/coverage, per-class coverage and
the generated class histogram for labelled data, plus the response distance R of training.
Samples made elsewhere (an .npz file, data/samples.py) are scored the same way, in the same
feature space, into the same report. Inpainting (GGCN paper, Table 3): MSE, PSNR, SSIM and FID of
restored images per mask type.

Every report names its feature network (and its weights file or hash), the sample count and the
sample source. Writing it and logging it to MLflow is the caller's (cli/evaluate.py, tracking.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError, DataConfig, TrainConfig, did_you_mean
from .data import ImageData, load_dataset
from .data.samples import read_samples
from .inference import TrainedModel
from .inpainting import (
    BASELINE,
    MASK_KINDS,
    biharmonic_fill,
    inpainting_scores,
    restoration_estimate,
    restore_each_mask,
)
from .metrics import ResponseDistance
from .metrics.classifier import cached_classifier
from .metrics.generative import (
    ClassifierFeatures,
    FeatureNetwork,
    class_histogram,
    file_digest,
    frechet_inception_distance,
    generative_scores,
    load_inception,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How samples are scored (one field per `debm evaluate` option)."""

    num_samples: int = 1000  # images a model generates and is scored on (inpainting: restores)
    num_real: int | None = None  # reference images; None: the samples scored (at most the data set)
    steps: int | None = None  # Langevin steps of fresh samples; None: the algorithm's default
    from_bank: bool = False  # score states of the persistent chain bank instead of fresh samples
    seed: int = 0  # seed of the samples, the reference subset, the masks and KID/IS's subsets
    features: str = "classifier"  # feature network: a name in FEATURE_NETWORKS
    inception_weights: str | None = None  # local Inception v3 weights file (features "inception")
    classifier_epochs: int = 30  # epochs of the small classifier (features "classifier")
    cache_dir: str | None = None  # cached classifiers; None: ~/.cache/distributed_ebm/classifiers
    nearest_k: int = 5  # k of the k-NN balls of precision/recall and density/coverage
    kid_subsets: int = 100  # KID: number of random subsets
    batch_size: int = 256  # images per forward pass
    method: str = "langevin"  # inpainting: "langevin" (every model) or "generator" (GGCN)
    average: int = 1  # inpainting: restorations averaged per image (K > 1: the posterior-mean estimate)
    device: str = "cpu"
    progress: bool = False  # progress bars while sampling (debm evaluate shows them)


def _classifier_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    if data.y is None:
        raise ConfigError(
            f"The reference data '{data.name}' has no labels to train the feature classifier on: "
            "use --features inception --inception-weights PATH, or labelled data (--data)."
        )
    classifier, info = cached_classifier(
        data,
        data_config,
        epochs=settings.classifier_epochs,
        seed=0,  # one network per data set and epochs, whatever the evaluation's seed
        cache_dir=settings.cache_dir,
    )
    return ClassifierFeatures(classifier, info)


def _inception_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    return load_inception(settings.inception_weights)


FEATURE_NETWORKS: dict[str, Callable[[ImageData, DataConfig, EvalSettings], FeatureNetwork]] = {
    "classifier": _classifier_network,
    "inception": _inception_network,
}


def feature_network(
    data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> FeatureNetwork:
    """The feature network `settings.features` names, on `settings.device`."""
    if settings.features not in FEATURE_NETWORKS:
        hint = did_you_mean(settings.features, FEATURE_NETWORKS, list_choices=False)
        raise ConfigError(
            f"Unknown feature network '{settings.features}'.{hint} "
            f"Choose one of {sorted(FEATURE_NETWORKS)}."
        )
    return FEATURE_NETWORKS[settings.features](data, data_config, settings).to(settings.device)


def reference_data(
    data_config: DataConfig, sample_shape: tuple[int, ...] | None = None
) -> tuple[ImageData, DataConfig]:
    """The reference images (labels kept wherever the source has them) and the config that built
    them; with `sample_shape`, checked against the model's image shape."""
    data_config = dataclasses.replace(data_config, labels=True)
    data = load_dataset(data_config)
    if data.x.dim() != 4:
        raise ConfigError(
            f"'{data.name}' holds vectors, not images: debm evaluate scores images "
            "(for the 2-D mixtures, count modes on the samples instead)."
        )
    if sample_shape is not None and tuple(data.x.shape[1:]) != tuple(sample_shape):
        raise ConfigError(
            f"Reference images have shape {tuple(data.x.shape[1:])}; the model makes "
            f"{tuple(sample_shape)}: pick matching data (--data, --set data.image_size=…)."
        )
    return data, data_config


def reference_subset(data: ImageData, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` images of the data set (all if fewer) and their labels, drawn by `seed`."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    index = order[: min(num, len(data))]
    return data.x[index], None if data.y is None else data.y[index]


def draw_samples(model: TrainedModel, settings: EvalSettings) -> tuple[torch.Tensor, dict]:
    """`num_samples` fresh samples (or bank states) and a description of where they came from."""
    samples = model.sample(
        settings.num_samples, steps=settings.steps, seed=settings.seed, from_bank=settings.from_bank,
        progress=settings.progress,
    )
    if settings.from_bank:
        source = {
            "source": "bank",
            "what": "states of the persistent chain bank (training state, not fresh chains)",
        }
    else:
        lang = model.config.langevin
        source = {
            "source": "fresh",
            "algorithm": model.config.model.algorithm,
            "weights": model.weights_description,
            "langevin_steps": settings.steps,
        }
        if lang.sample_anneal_to is not None:
            source["step_size"] = f"annealed geometrically from {lang.step_size} to {lang.sample_anneal_to}"
        if settings.steps is None:
            source["langevin_steps_note"] = (
                "the algorithm's default: "
                f"langevin.sample_steps = {lang.sample_steps} for fresh chains, "
                f"L = {lang.langevin_steps} per grid (multi-grid); after g(ζ) (GGCN) "
                f"generator.refine_steps = {model.config.generator.refine_steps} (null: L)"
            )
        if model.num_classes:
            source["labels"] = f"cycling through the {model.num_classes} classes"
        elif model.clusters is not None:
            source["labels"] = (f"self-conditioned: {len(model.clusters)} k-means clusters of the training images "
                                "(model.clusters), drawn by their shares; no data label is used")
    source.update(num=len(samples), seed=settings.seed)
    return samples, source


def response_distance(
    fake: torch.Tensor,
    real: torch.Tensor,
    *,
    seed: int = 1234,
    weights: str | None = None,
    batch_size: int = 256,
) -> tuple[float, str]:
    """R between samples and reference images on the filter bank of `seed` (or VGG `weights`),
    as in training (train.response_bank_seed, model.filter_bank); and the bank's name."""
    response = ResponseDistance(tuple(real.shape[1:]), seed=seed, weights=weights)

    def means(x: torch.Tensor) -> torch.Tensor:
        return sum(
            response.channel_means(x[i : i + batch_size]) * len(x[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        ) / len(x)

    return float((means(fake) - means(real)).abs().mean()), response.kind


def model_description(model: TrainedModel, run_dir: str | None, model_uri: str | None) -> dict:
    """What a model report's `model` block says: where the model came from and how far it trained."""
    shared = torch.load(
        Path(model.checkpoint) / ckpt.SHARED_FILE, map_location="cpu", weights_only=False
    )
    return {
        "run_dir": None if run_dir is None else str(Path(run_dir).resolve()),
        "model_uri": model_uri,
        "algorithm": model.config.model.algorithm,
        "weights": model.weights,
        "iteration": model.iteration,
        "images_seen": shared.get("images_seen"),
        "checkpoint": str(model.checkpoint),
    }


def _histogram_classifier(
    network: FeatureNetwork, data: ImageData, data_config: DataConfig, settings: EvalSettings
) -> ClassifierFeatures | None:
    """The classifier that labels generated images: the feature network when it is one, else the
    cached classifier of labelled data (Inception's classes are not the data's)."""
    if isinstance(network, ClassifierFeatures):
        return network
    if data.y is None:
        return None
    return _classifier_network(data, data_config, settings).to(settings.device)


def score_generation(
    fake: torch.Tensor,
    source: dict,
    data: ImageData,
    data_config: DataConfig,
    network: FeatureNetwork,
    settings: EvalSettings,
    *,
    response_bank_seed: int = TrainConfig.response_bank_seed,
    filter_bank: str | None = None,
    fake_labels: torch.Tensor | None = None,
) -> dict:
    """The generation report of images `fake` (described by `source`) against reference images
    of `data` in `network`'s space; R on the filter bank of `response_bank_seed` (or VGG
    `filter_bank`). With `fake_labels` (the class each image was drawn for) and a classifier,
    `label_agreement`: the share of images the classifier puts in their class."""
    real, real_labels = reference_subset(data, settings.num_real or len(fake), settings.seed)
    scored = generative_scores(
        fake,
        real,
        network,
        real_labels=real_labels,
        num_classes=data.num_classes,
        nearest_k=settings.nearest_k,
        kid_subsets=settings.kid_subsets,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    r, response_bank = response_distance(
        fake, real, seed=response_bank_seed, weights=filter_bank, batch_size=settings.batch_size
    )
    scored["scores"]["response_distance"] = r
    report = {
        "task": "generation",
        "samples": source,
        "reference": {
            "data": dataclasses.asdict(data_config),
            "name": data.name,
            "num": len(real),
            "of": len(data),
            "seed": settings.seed,
        },
        "feature_network": network.describe(),
        **scored,
        "response_bank": response_bank,
    }
    classifier = _histogram_classifier(network, data, data_config, settings)
    if classifier is not None:
        predicted = classifier.classifier.predict(
            fake.to(settings.device), batch_size=settings.batch_size
        )
        report["generated_class_share"] = class_histogram(predicted, data.num_classes)
        if classifier is not network:
            report["class_share_network"] = classifier.describe()
        if fake_labels is not None:
            agree = predicted.cpu() == fake_labels.cpu()
            report["label_agreement"] = float(agree.float().mean())
    return report


def default_sample_steps(config) -> int:
    """The Langevin steps of a model's own fresh samples: after g(ζ) generator.refine_steps (else
    L) for GGCN, L per grid for multi-grid models, langevin.sample_steps for the others."""
    if config.model.algorithm.startswith("ggcn"):
        refine = config.generator.refine_steps
        return config.langevin.langevin_steps if refine is None else refine
    if config.model.algorithm in ("mgcn", "wmgcn"):
        return config.langevin.langevin_steps
    return config.langevin.sample_steps


def evaluate_generation(
    model: TrainedModel, data_config: DataConfig, settings: EvalSettings
) -> dict:
    """Score fresh samples (or the bank) of `model` against reference images of `data_config`."""
    started = time.perf_counter()
    data, data_config = reference_data(data_config, model.sample_shape)
    network = feature_network(data, data_config, settings)
    fake, source = draw_samples(model, settings)
    report = score_generation(
        fake,
        source,
        data,
        data_config,
        network,
        settings,
        response_bank_seed=model.config.train.response_bank_seed,
        filter_bank=model.config.model.filter_bank,
        # a conditional model's fresh samples cycle through the classes: score that agreement
        fake_labels=None if settings.from_bank else model.labels_for(len(fake), None),
    )
    report["wall_time_s"] = time.perf_counter() - started
    return report


def evaluate_samples(
    path: str | Path, data_config: DataConfig, settings: EvalSettings, *, limit: int | None = None
) -> dict:
    """Score the samples of an .npz file (ours or another system's; see data/samples.py) against
    reference images of `data_config`, as `evaluate_generation` scores a model's: the same
    feature network, reference subset and report. `limit`: score the file's first `limit`
    samples (None: all); the reference count defaults to the samples scored.

    Raises ConfigError, naming the cause and the fix, for a file whose shape, channels, size,
    range, dtype, labels or arrays do not fit the reference data, before any network is built."""
    started = time.perf_counter()
    data, data_config = reference_data(data_config)
    samples = read_samples(
        path,
        tuple(data.x.shape[1:]),
        num_classes=data.num_classes,
        limit=limit,
        min_samples=settings.nearest_k + 1,
        reference=f"the reference data '{data.name}'",
    )
    network = feature_network(data, data_config, settings)
    source = {
        "source": "file",
        "path": str(samples.path.resolve()),
        "what": "samples read from a file and scored as given (not drawn here)",
        "layout": samples.layout,
        "dtype": samples.dtype,
        "of": samples.total,
    }
    if samples.labels is not None:
        source["labels"] = "given in the file: the class each sample was drawn for"
    source.update(num=len(samples.x), seed=settings.seed)
    report = score_generation(samples.x, source, data, data_config, network, settings,
                              fake_labels=samples.labels)
    report["wall_time_s"] = time.perf_counter() - started
    return report


def samples_description(path: str | Path) -> dict:
    """What a samples-file report's `model` block says: the file and its hash (no model)."""
    path = Path(path).expanduser().resolve()
    return {"samples_file": str(path), "sha256": file_digest(path), "run_dir": None,
            "model_uri": None, "algorithm": None, "iteration": None, "images_seen": None,
            "checkpoint": None}


def inpainting_report(
    restore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    network: FeatureNetwork,
    *,
    kinds: tuple[str, ...] = MASK_KINDS,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """MSE, PSNR, SSIM (whole image and missing pixels) and FID (restored against originals) per
    mask kind, for the model and for the biharmonic baseline on the same masks: (model, baseline).

    restore(images, missing) gives the restored images; masks (1: missing) come from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    ours, baseline = {}, {}
    for kind, missing, restored in restore_each_mask(restore, images, kinds, generator=generator):
        for out, filled in ((ours, restored), (baseline, biharmonic_fill(images, missing))):
            out[kind] = {
                **inpainting_scores(filled, images, missing),
                "fid": frechet_inception_distance(filled, images, network, batch_size=batch_size),
            }
    return ours, baseline


def evaluate_inpainting(
    model: TrainedModel, data_config: DataConfig, settings: EvalSettings
) -> dict:
    """Mask `num_samples` reference images, restore them with the model, score per mask kind."""
    started = time.perf_counter()
    data, data_config = reference_data(data_config, model.sample_shape)
    network = feature_network(data, data_config, settings)
    images, labels = reference_subset(data, settings.num_samples, settings.seed)
    labels = None if not model.num_classes else labels.to(model.device)

    def restore(x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        return model.inpaint(
            x,
            missing,
            method=settings.method,
            steps=settings.steps,
            seed=settings.seed,
            labels=labels,
            average=settings.average,
        )

    masks, baseline = inpainting_report(
        restore, images, network, seed=settings.seed, batch_size=settings.batch_size
    )
    steps = (
        settings.steps
        if settings.steps is not None
        else (
            default_sample_steps(model.config)
            if settings.method == "generator"
            else model.config.langevin.sample_steps
        )
    )
    return {
        "task": "inpainting",
        "samples": {
            "source": "inpainting",
            "method": settings.method,
            "langevin_steps": steps,
            "average": settings.average,
            "estimate": restoration_estimate(settings.average),
            "num": len(images),
            "seed": settings.seed,
            "what": "reference images masked and restored; FID of restored against the originals",
        },
        "reference": {
            "data": dataclasses.asdict(data_config),
            "name": data.name,
            "num": len(images),
            "of": len(data),
            "seed": settings.seed,
        },
        "feature_network": network.describe(),
        "masks": masks,
        "baseline": {"method": BASELINE, "masks": baseline},
        "wall_time_s": time.perf_counter() - started,
    }
