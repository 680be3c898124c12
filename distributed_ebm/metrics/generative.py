"""Sample-quality scores in one pluggable feature space.

FID, KID and the Inception Score come from `torchmetrics`, given the chosen network as their
`feature` module; precision/recall (k-nearest-neighbour manifolds, Kynkäänniemi et al. 2019) and
density/coverage (Naeem et al. 2020) use the same features. Precision and density fall when
samples leave the data manifold (over-generalisation, blur); recall and coverage fall when samples
miss parts of it (mode dropping). Per-class coverage splits coverage by the real images' labels.

A feature network maps images in [-1, 1] to (features, class logits). Three are provided: a
`SmallClassifier` trained on the data set (metrics/classifier.py), torch-fidelity's Inception v3
(the TensorFlow FID network the papers' numbers use) and torchvision's ImageNet Inception v3, both
from a local weights file: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .classifier import SmallClassifier

FIDELITY_WEIGHTS = (
    "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception (TF port)
)
TORCHVISION_WEIGHTS = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet Inception v3
INCEPTION_SIZE = 299  # input side of Inception v3 in pixels


class FeatureNetwork(nn.Module):
    """Images (N, C, H, W) in [-1, 1] → features (N, D) and class logits (N, K), in eval mode."""

    num_features: int  # D
    num_classes: int  # K

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of a batch."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a report says about this network: name, and weights file or hash."""
        raise NotImplementedError


class ClassifierFeatures(FeatureNetwork):
    """A SmallClassifier: its 128-d penultimate layer and its logits over the data set's classes."""

    def __init__(self, classifier: SmallClassifier, info: dict):
        super().__init__()
        self.classifier = classifier.eval()
        self.info = info
        self.num_features = classifier.head.in_features
        self.num_classes = classifier.head.out_features

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = self.classifier.features(x)
            return features, self.classifier.head(features)

    def describe(self) -> dict:
        return {"name": "SmallClassifier (conv32-conv64-fc128)", **self.info}


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Grey images repeated to three channels (Inception takes RGB)."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ConfigError(f"Inception takes grey or RGB images, got {x.shape[1]} channels.")
    return x


class TorchvisionInception(FeatureNetwork):
    """torchvision's Inception v3 with ImageNet weights: 2048-d pool features, 1000 logits.

    Not the network of published FIDs (that is torch-fidelity's TF port), so its FIDs are
    comparable only with each other."""

    def __init__(self, state_dict: dict, weights: Path):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(state_dict)
        self.head, net.fc = net.fc, nn.Identity()
        self.net = net.eval().requires_grad_(False)
        self.head.requires_grad_(False)
        self.weights = weights
        self.num_features, self.num_classes = 2048, 1000

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Google's weights take inputs in [-1, 1], which is our data range.
        x = F.interpolate(
            _rgb(x),
            size=(INCEPTION_SIZE, INCEPTION_SIZE),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        with torch.no_grad():
            features = self.net(x)
            return features, self.head(features)

    def describe(self) -> dict:
        return {
            "name": "Inception v3 (torchvision, ImageNet weights; not the TF FID network)",
            "weights": str(self.weights),
            "sha256": file_digest(self.weights),
        }


class FidelityInception(FeatureNetwork):
    """torch-fidelity's Inception v3 (the TensorFlow FID network): 2048-d pool features and the
    unbiased 1008 logits its Inception Score uses."""

    def __init__(self, weights: Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ConfigError(
                f"'{weights}' holds torch-fidelity's FID Inception, which needs the torch-fidelity "
                "package: pip install torch-fidelity (or give torchvision's Inception v3 weights, "
                f"{TORCHVISION_WEIGHTS})."
            ) from None
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights),
        )
        self.weights = weights
        self.num_features, self.num_classes = 2048, 1008

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = ((_rgb(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        with torch.no_grad():
            features, logits = self.net(pixels)
        return features, logits

    def describe(self) -> dict:
        return {
            "name": "Inception v3 (torch-fidelity, TF FID weights)",
            "weights": str(self.weights),
            "sha256": file_digest(self.weights),
        }


def file_digest(path: Path, length: int = 16) -> str:
    """The first `length` hex digits of a file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def find_inception_weights(weights: str | None) -> Path:
    """The Inception weights file: `weights` if given, else torch-fidelity's or torchvision's file
    in the torch hub cache; a ConfigError naming the files to provide when there is none."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Inception weights file '{path}' does not exist. Give the path of "
                f"{FIDELITY_WEIGHTS} (torch-fidelity) or {TORCHVISION_WEIGHTS} (torchvision)."
            )
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (FIDELITY_WEIGHTS, TORCHVISION_WEIGHTS):
        if (cache / name).is_file():
            return cache / name
    raise ConfigError(
        "--features inception needs Inception v3 weights, and nothing is downloaded here. Copy "
        f"{cache / FIDELITY_WEIGHTS} (torch-fidelity's FID network, the one published FIDs use; "
        "needs "
        f"pip install torch-fidelity) or {cache / TORCHVISION_WEIGHTS} (torchvision's ImageNet "
        "Inception v3) onto this machine, or pass --inception-weights PATH; or drop --features "
        "inception to score with a small classifier trained on the data set."
    )


def load_inception(weights: str | None = None) -> FeatureNetwork:
    """The Inception network of the weights `find_inception_weights` finds (the format is read
    off the file)."""
    path = find_inception_weights(weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    classes = (
        state.get("fc.weight", torch.empty(0, 0)).shape[0] if isinstance(state, dict) else None
    )
    if classes == 1008:
        return FidelityInception(path)
    if classes == 1000:
        return TorchvisionInception(state, path)
    raise ConfigError(
        f"'{path}' is not an Inception v3 state dict (expected an 'fc.weight' of 1008 "
        "classes, torch-fidelity, or 1000, torchvision)."
    )


class _SharedEmbedding:
    """Runs the network once per batch; FID, KID and IS each take their output from it."""

    def __init__(self, network: FeatureNetwork):
        self.network = network
        self.batch: torch.Tensor | None = None
        self.output: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not self.batch:
            self.batch, self.output = x, self.network.embed(x)
        return self.output


class _Output(nn.Module):
    """One output (0: features, 1: logits) of the shared embedding: torchmetrics' `feature`."""

    def __init__(self, shared: _SharedEmbedding, index: int):
        super().__init__()
        self.shared = shared
        self.index = index
        self.num_features = (
            shared.network.num_features if index == 0 else shared.network.num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[self.index]


def _batches(x: torch.Tensor, batch_size: int, device: torch.device):
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size].to(device)


def frechet_inception_distance(
    fake: torch.Tensor, real: torch.Tensor, network: FeatureNetwork, *, batch_size: int = 256
) -> float:
    """FID (torchmetrics) between two image sets in the network's feature space."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = _device(network)
    shared = _SharedEmbedding(network)
    fid = FrechetInceptionDistance(feature=_Output(shared, 0)).to(device)
    for is_real, images in ((True, real), (False, fake)):
        for batch in _batches(images, batch_size, device):
            fid.update(batch, real=is_real)
    return float(fid.compute())


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def knn_radii(features: torch.Tensor, k: int, *, chunk: int = 1024) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample in the same set."""
    if len(features) <= k:
        raise ConfigError(
            f"k-nearest-neighbour balls need more than k = {k} samples, got {len(features)}: "
            "score more samples (--num) or lower k (--nearest-k)."
        )
    return torch.cat(
        [
            torch.cdist(features[i : i + chunk], features).topk(k + 1, largest=False).values[:, k]
            for i in range(0, len(features), chunk)
        ]
    )


def manifold_scores(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, chunk: int = 1024
) -> dict:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    A sample lies in the real manifold when it falls inside some real sample's k-NN ball (radius:
    distance to its k-th nearest real neighbour); likewise for the fake manifold. Returns the four
    scores and `covered`, a bool per real sample: some fake sample lies in its ball.
    """
    real, fake = real.double(), fake.double()
    real_radii, fake_radii = knn_radii(real, k, chunk=chunk), knn_radii(fake, k, chunk=chunk)
    in_real = torch.zeros(len(fake), dtype=torch.bool)
    balls_per_fake = torch.zeros(len(fake), dtype=torch.float64)
    in_fake, covered = [], []
    for start in range(0, len(real), chunk):
        dist = torch.cdist(real[start : start + chunk], fake)  # (chunk, M)
        inside = dist < real_radii[start : start + chunk, None]  # fake j in real i's ball
        in_real |= inside.any(0).cpu()
        balls_per_fake += inside.sum(0).double().cpu()
        covered.append(inside.any(1).cpu())
        in_fake.append((dist < fake_radii[None, :]).any(1).cpu())  # real i in some fake ball
    covered_t = torch.cat(covered)
    return {
        "precision": float(in_real.double().mean()),
        "recall": float(torch.cat(in_fake).double().mean()),
        "density": float(balls_per_fake.mean() / k),
        "coverage": float(covered_t.double().mean()),
        "covered": covered_t,
    }


def per_class_coverage(
    covered: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float | None]:
    """Coverage of each class's real samples (None for a class with no real sample)."""
    labels = labels.cpu()
    return {
        str(c): float(covered[labels == c].double().mean()) if (labels == c).any() else None
        for c in range(num_classes)
    }


def class_histogram(predicted: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Share of samples predicted as each class."""
    counts = torch.bincount(predicted.cpu(), minlength=num_classes).double()
    return {str(c): float(counts[c] / max(len(predicted), 1)) for c in range(num_classes)}


def generative_scores(
    fake: torch.Tensor,
    real: torch.Tensor,
    network: FeatureNetwork,
    *,
    real_labels: torch.Tensor | None = None,
    num_classes: int = 0,
    nearest_k: int = 5,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Every score of generated images `fake` against real images `real`, in `network`'s space.

    FID, KID (mean and std over `kid_subsets` subsets of min(`kid_subset_size`, N) samples) and
    IS (over `is_splits` splits of the network's logits) through torchmetrics; precision,
    recall, density and coverage with `nearest_k` neighbours. With `real_labels`, per-class
    coverage for `num_classes` classes. KID's subsets and IS's splits are drawn from `seed`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    if fake.shape[1:] != real.shape[1:]:
        raise ConfigError(
            f"Samples have shape {tuple(fake.shape[1:])} but the reference images "
            f"{tuple(real.shape[1:])}: score them against data of the model's shape."
        )
    device = _device(network)
    shared = _SharedEmbedding(network)
    subset = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=_Output(shared, 0)).to(device)
    with warnings.catch_warnings():  # keeping every feature is what KID and IS need here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=_Output(shared, 0), subsets=kid_subsets, subset_size=subset
        )
        inception = InceptionScore(feature=_Output(shared, 1), splits=min(is_splits, len(fake)))
    kid, inception = kid.to(device), inception.to(device)
    features: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for is_real, images in ((True, real), (False, fake)):
        for batch in _batches(images, batch_size, device):
            features[is_real].append(shared(batch)[0].cpu())
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
            if not is_real:
                inception.update(batch)
    with torch.random.fork_rng(devices=[]):  # KID's subsets and IS's splits use the global stream
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
        is_mean, is_std = inception.compute()
    manifold = manifold_scores(torch.cat(features[True]), torch.cat(features[False]), k=nearest_k)
    scores = {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "is_mean": float(is_mean),
        "is_std": float(is_std),
        **{key: manifold[key] for key in ("precision", "recall", "density", "coverage")},
    }
    report = {
        "scores": scores,
        "settings": {
            "nearest_k": nearest_k,
            "kid_subsets": kid_subsets,
            "kid_subset_size": subset,
            "is_splits": min(is_splits, len(fake)),
        },
    }
    if real_labels is not None:
        report["class_coverage"] = per_class_coverage(manifold["covered"], real_labels, num_classes)
    return report
