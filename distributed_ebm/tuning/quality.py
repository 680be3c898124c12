"""Ranking trials by the quality of their fresh samples (`metric: fresh_fid` in a search space).

The training R is measured on the persistent chains, which can look like data while fresh samples
do not (wGCN on MNIST: bank FID 120 against 483 for fresh ones). With `metric: fresh_fid` every
report of a trial (its ASHA milestones) and its end score `fid_samples` fresh samples of the
trial's newest checkpoint — drawn the model's own way, as `debm sample` does — against as many
images of the trial's data set, in the feature space of the project's small classifier trained
on that data set. The search's driver trains that classifier once, before the first trial, into
the search folder's cache; every trial loads it from there, so all trials share one feature space.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

FRESH_FID = "fresh_fid"


@dataclass(frozen=True)
class FreshFID:
    """How a trial's fresh samples are scored; it crosses Ray inside the trial setup."""

    cache_dir: str  # absolute: the search's feature-network cache
    samples: int = 500  # fresh samples per score, and as many reference images
    steps: int | None = None  # Langevin steps of the samples; None: the model's own default
    classifier_epochs: int = 5
    seed: int = 0

    def settings(self):
        from ..evaluation import EvalSettings

        return EvalSettings(num_samples=self.samples, steps=self.steps, seed=self.seed,
                            classifier_epochs=self.classifier_epochs, cache_dir=self.cache_dir)

    def prepare(self, data_config) -> dict:
        """Train (or find in the cache) the feature network of `data_config`; its description."""
        from ..evaluation import feature_network, reference_data

        data, data_config = reference_data(data_config)
        return feature_network(data, data_config, self.settings()).describe()

    def score(self, run_dir: str | Path, checkpoint: str | Path | None = None) -> dict:
        """{fresh_fid, fresh_fid_iteration, fresh_fid_seconds} of the run's newest (or the given)
        checkpoint: the FID of its fresh samples against the run's data."""
        from ..evaluation import feature_network, reference_data, reference_subset
        from ..inference import load_run
        from ..metrics.generative import frechet_inception_distance

        tick = time.perf_counter()
        model = load_run(run_dir, checkpoint=checkpoint)
        data, data_config = reference_data(model.config.data, model.sample_shape)
        network = feature_network(data, data_config, self.settings())
        fake = model.sample(self.samples, steps=self.steps, seed=self.seed)
        real, _ = reference_subset(data, self.samples, self.seed)
        fid = frechet_inception_distance(fake, real, network)
        return {FRESH_FID: float(fid), "fresh_fid_iteration": model.iteration,
                "fresh_fid_seconds": time.perf_counter() - tick}
