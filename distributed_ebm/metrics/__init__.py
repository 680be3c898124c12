"""Metrics: response distance R, the collapse definition, and sample-quality scores (FID, KID, IS,
precision/recall, density/coverage) in a pluggable feature space."""

from .collapse import CollapseDetector
from .generative import (
    ClassifierFeatures,
    FeatureNetwork,
    generative_scores,
    load_inception,
    manifold_scores,
)
from .response import ResponseDistance

__all__ = [
    "ClassifierFeatures",
    "CollapseDetector",
    "FeatureNetwork",
    "ResponseDistance",
    "generative_scores",
    "load_inception",
    "manifold_scores",
]
