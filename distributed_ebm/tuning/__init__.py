"""Ray Tune searches over run configs, with collapse-aware stopping and a champion (`debm tune`).

- `space`: search spaces as YAML (tune_spaces/), validated with line numbers; the registries of
  distributions, schedulers and searchers.
- `trial`: one trial: its config, training (in its process or in Ray Train workers), its reports
  to Tune, PBT's checkpoint restore.
- `search`: `run_search`, the outcome table, the champion, the MLflow parent run.
"""

from .search import SearchResult, TrialOutcome, check_search, run_search, write_tables
from .space import METRICS, SMOOTHED_R, SearchParam, SearchSpace, load_space
from .trial import (
    WORST,
    TrialReporter,
    apply_optimiser_settings,
    final_result,
    restore_tune_checkpoint,
)

__all__ = [
    "METRICS", "SMOOTHED_R", "WORST", "SearchParam", "SearchResult", "SearchSpace", "TrialOutcome",
    "TrialReporter", "apply_optimiser_settings", "check_search", "final_result", "load_space",
    "restore_tune_checkpoint", "run_search", "write_tables",
]
