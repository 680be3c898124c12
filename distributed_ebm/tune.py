"""`debm tune`: Ray Tune searches over run configs, with collapse-aware stopping and a champion.

A search space is a YAML file (see tune_spaces/README.md): a base preset, fixed overrides,
distributions over dotted config keys (`optim.lr: {loguniform: [1.0e-4, 3.0e-2]}`), the metric
and mode, a scheduler (FIFO, ASHA, PBT) and a searcher (random, Optuna). It is validated before
any trial starts; every error names the file and line.

Every trial is one training run in `OUT/trials/TRIAL_ID`: `train_loop` in the trial's own process
(`workers_per_trial` 0), or Ray Train with W workers driven from the trial, whose reports reach
Tune through Ray's `TuneReportCallback`. A trial reports every `report_every` iterations (a report
costs ~1.7 s here) and once at its end. A trial that collapses (metrics/collapse.py) stops itself
(`collapse.stop_on_collapse`) and is marked collapsed; it reports a stand-in worst value so
that no searcher or scheduler prefers it. With MLflow on, the search is a parent run with one
nested run per trial; the best completed trial's model is registered and takes the `champion`
alias only if it beats the current champion.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, _did_you_mean, flatten, load_config, parse_overrides

log = logging.getLogger(__name__)

SMOOTHED_R = "response_distance_smoothed"  # mean R over the last SMOOTHING iterations
SMOOTHING = 10  # iterations averaged into SMOOTHED_R, as summary.json's final_response_distance
REPORT_CALLBACK = "distributed_ebm.tune:report_progress"  # train_loop callback spec of a trial
# Metrics every algorithm reports each iteration, any of which a space may optimise.
METRICS = (SMOOTHED_R, "response_distance", "energy_gap_z", "collapse_r_ratio",
           "collapse_energy_gap", "chain_saturation", "phi_data", "phi_chains", "energy_data",
           "energy_chains", "grad_norm_theta")
TIME_ATTRS = ("iteration", "images_seen")  # the clocks a scheduler may count in
# What a collapsed trial reports (negated when maximising): finite, because ASHA interpolates
# percentiles of the reported values and ∞ − ∞ would make its cut-off NaN.
WORST = 1e300
DRIVER_MEMORY = 256 * 2**20  # bytes a Ray Train trial's driver asks for (no CPU: see _fit)
STATUSES = ("completed", "collapsed", "stopped by scheduler", "error")
MLFLOW_STATUS = {"completed": "FINISHED", "collapsed": "FAILED", "stopped by scheduler": "KILLED",
                 "error": "FAILED"}


# ---------------------------------------------------------------------------------------------
# Distributions, schedulers and searchers a space can name (registries)


def _numbers(args: Any, count: int) -> list[float] | str:
    """`count` numbers (YAML 1.1 reads `1e-4` as text: such text counts), or what is wrong."""
    if not isinstance(args, list) or len(args) != count:
        return f"needs a list of {count} numbers"
    values = []
    for arg in args:
        if isinstance(arg, bool):
            return f"needs numbers, got {arg!r}"
        try:
            values.append(arg if isinstance(arg, (int, float)) else float(arg))
        except (TypeError, ValueError):
            return f"needs numbers, got {arg!r}"
    return values


def _check_bounds(args: Any, *, count: int = 2, positive: bool = False,
                  integer: bool = False) -> str | None:
    """What is wrong with `[low, high(, q)]`, or None."""
    values = _numbers(args, count)
    if isinstance(values, str):
        return values
    low, high = values[:2]
    if integer and not all(float(v).is_integer() for v in values):
        return f"needs whole numbers, got {args}"
    if low >= high:
        return f"needs low < high, got low {low} and high {high}: swap or widen them"
    if positive and low <= 0:
        return f"needs 0 < low (it samples log-uniformly), got low {low}"
    if count == 3 and values[2] <= 0:
        return f"needs a step q > 0, got q {values[2]}"
    return None


def _check_values(args: Any) -> str | None:
    if not isinstance(args, list) or not args:
        return "needs a non-empty list of values"
    return None


def _tune():
    import ray.tune

    return ray.tune


@dataclass(frozen=True)
class Distribution:
    """How a space writes one search distribution and the Tune domain it becomes."""

    arguments: str  # the YAML list it takes, for messages
    check: Callable[[Any], str | None]  # what is wrong with the arguments, or None
    make: Callable[[list], Any]  # the Tune domain (or grid_search) of valid arguments
    examples: Callable[[list], list]  # values it can produce, checked against the config
    numeric: bool = True  # its arguments are numbers (YAML 1.1 reads 1e-4 as text: convert)
    floats: bool = False  # it samples floats (not for integer keys)
    grid: bool = False  # a grid multiplies the trials instead of sampling

    def values(self, args: list) -> list:
        """The (checked) arguments, as numbers for numeric distributions."""
        return _numbers(args, len(args)) if self.numeric else list(args)


def _float_ends(args: list) -> list:
    return [float(args[0]), float(args[1])]


def _int_ends(args: list) -> list:
    return [int(args[0]), int(args[1])]


DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": Distribution("[low, high]", _check_bounds,
                            lambda a: _tune().uniform(*a), _float_ends, floats=True),
    "loguniform": Distribution("[low, high] with 0 < low",
                               functools.partial(_check_bounds, positive=True),
                               lambda a: _tune().loguniform(*a), _float_ends, floats=True),
    "quniform": Distribution("[low, high, q]", functools.partial(_check_bounds, count=3),
                             lambda a: _tune().quniform(*a), _float_ends, floats=True),
    "randint": Distribution("[low, high) of integers",
                            functools.partial(_check_bounds, integer=True),
                            lambda a: _tune().randint(int(a[0]), int(a[1])),
                            lambda a: [int(a[0]), int(a[1]) - 1]),
    "qrandint": Distribution("[low, high, q] of integers, high included",
                             functools.partial(_check_bounds, count=3, integer=True),
                             lambda a: _tune().qrandint(*(int(v) for v in a)), _int_ends),
    "choice": Distribution("[v1, v2, …]", _check_values, lambda a: _tune().choice(a), list,
                           numeric=False),
    "grid": Distribution("[v1, v2, …]", _check_values, lambda a: _tune().grid_search(a), list,
                         numeric=False, grid=True),
}


@dataclass(frozen=True)
class SchedulerKind:
    """A Tune trial scheduler a space can name, with the options it takes."""

    options: dict[str, type]  # option name → its type
    build: Callable[[dict, dict, dict], Any]  # (options, mutations, horizons) → scheduler
    checkpoints: bool = False  # its trials must report checkpoints (PBT copies them)


def _asha(options: dict, mutations: dict, horizon: dict):
    from ray.tune.schedulers import ASHAScheduler

    time_attr = options.get("time_attr", "iteration")
    return ASHAScheduler(time_attr=time_attr, max_t=options.get("max_t", horizon[time_attr]),
                         grace_period=options.get("grace_period", 1),
                         reduction_factor=options.get("reduction_factor", 3),
                         brackets=options.get("brackets", 1))


def _pbt(options: dict, mutations: dict, horizon: dict):
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(
        time_attr=options.get("time_attr", "iteration"),
        perturbation_interval=options["perturbation_interval"],
        burn_in_period=options.get("burn_in_period", 0),
        quantile_fraction=options.get("quantile_fraction", 0.25),
        resample_probability=options.get("resample_probability", 0.25),
        hyperparam_mutations=mutations)


SCHEDULERS: dict[str, SchedulerKind] = {
    "fifo": SchedulerKind({}, lambda options, mutations, horizon: None),
    "asha": SchedulerKind({"time_attr": str, "grace_period": int, "max_t": int,
                           "reduction_factor": float, "brackets": int}, _asha),
    "pbt": SchedulerKind({"time_attr": str, "perturbation_interval": int, "burn_in_period": int,
                          "quantile_fraction": float, "resample_probability": float}, _pbt,
                         checkpoints=True),
}
REQUIRED_OPTIONS = {"pbt": ("perturbation_interval",)}
# Option ranges other than "> 0": (low, high, low included).
OPTION_RANGES = {"seed": (0, math.inf, True), "burn_in_period": (0, math.inf, True),
                 "reduction_factor": (1, math.inf, False), "quantile_fraction": (0, 0.5, False),
                 "resample_probability": (0, 1, True)}


def _random_searcher(options: dict, concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=options.get("seed"), max_concurrent=concurrent)


def _optuna_searcher(options: dict, concurrent: int):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=options.get("seed")), max_concurrent=concurrent)


# name → (its options and their types, (options, trials at once) → Tune search algorithm)
SEARCHERS: dict[str, tuple[dict[str, type], Callable[[dict, int], Any]]] = {
    "random": ({"seed": int}, _random_searcher),
    "optuna": ({"seed": int}, _optuna_searcher),
}


# ---------------------------------------------------------------------------------------------
# The search space file


@dataclass(frozen=True)
class SearchParam:
    """One searched config key and its distribution, with the line it was written on."""

    key: str  # dotted config key, e.g. optim.lr
    distribution: str  # a name in DISTRIBUTIONS
    arguments: tuple  # the distribution's arguments as written
    line: int

    @property
    def is_grid(self) -> bool:
        return DISTRIBUTIONS[self.distribution].grid

    def domain(self) -> Any:
        """The Tune domain (or grid_search) of this parameter."""
        return DISTRIBUTIONS[self.distribution].make(list(self.arguments))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: what every trial shares and what it samples."""

    path: Path
    name: str
    base: RunConfig  # the preset with the space's fixed overrides and the command line's --set
    params: tuple[SearchParam, ...]
    metric: str = SMOOTHED_R
    mode: str = "min"
    report_every: int = 10  # iterations between a trial's reports to Tune
    stop_on_collapse: bool = True  # a collapsed trial stops itself (collapse.stop_on_collapse)
    max_concurrent: int | None = None  # trials at once; None: as many as the CPUs hold
    scheduler: str = "fifo"
    scheduler_options: dict = field(default_factory=dict)
    searcher: str = "random"
    searcher_options: dict = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """The Tune param_space: dotted key → domain."""
        return {p.key: p.domain() for p in self.params}

    def grid_size(self) -> int:
        """How many trials one pass over the grid parameters makes (1 without grids)."""
        return math.prod(len(p.arguments) for p in self.params if p.is_grid)

    def mutations(self) -> dict[str, Any]:
        """PBT's hyperparam_mutations: every sampled (not grid) parameter."""
        return {p.key: p.domain() for p in self.params if not p.is_grid}

    def describe(self) -> dict[str, str]:
        """Flat strings for the search's MLflow params."""
        info = {"space": str(self.path), "metric": self.metric, "mode": self.mode,
                "scheduler": self.scheduler, "searcher": self.searcher,
                "report_every": str(self.report_every),
                "stop_on_collapse": str(self.stop_on_collapse)}
        info.update({f"scheduler.{k}": str(v) for k, v in self.scheduler_options.items()})
        info.update({f"searcher.{k}": str(v) for k, v in self.searcher_options.items()})
        info.update({f"search.{p.key}": f"{p.distribution}{list(p.arguments)}"
                     for p in self.params})
        return info


SETTINGS = ("name", "metric", "mode", "report_every", "stop_on_collapse", "max_concurrent")
SPACE_KEYS = ("base", "fixed", "params", "scheduler", "searcher", *SETTINGS)


class _Located:
    """Errors that name the space file and a line."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{node.start_mark.line + 1}: {message}")

    def pairs(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping node; duplicate keys are an error."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"'{what}' must be a mapping of keys to values.")
        seen, out = set(), []
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise self.error(key_node, f"'{key}' appears twice in '{what}'.")
            seen.add(key)
            out.append((key, key_node, value_node))
        return out


def _value(node: yaml.Node) -> Any:
    """The Python value of a YAML node (safe constructors)."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def load_space(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search space file; `overrides` (--set) apply to its base config.

    Raises ConfigError, naming the file and line, for an unknown key (with the closest valid one),
    an unknown distribution, scheduler or searcher, bad bounds, or a value the config rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Search space '{path}' does not exist. Pass one of tune_spaces/*.yaml "
                          "or your own file (see tune_spaces/README.md).")
    where = _Located(path)
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"Search space '{path}' is not valid YAML: {err}") from None
    if root is None:
        raise ConfigError(f"{path}:1: the search space is empty; see tune_spaces/README.md.")
    top = {}
    for key, key_node, value_node in where.pairs(root, "the search space"):
        if key not in SPACE_KEYS:
            raise where.error(key_node, f"Unknown search space key '{key}'."
                                        f"{_did_you_mean(key, list(SPACE_KEYS))}")
        top[key] = (key_node, value_node)
    if "params" not in top:
        raise where.error(root, "The search space has no 'params': add at least one, e.g. "
                                "`params: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}`.")

    base = _base_config(where, top, overrides or {})
    params = _params(where, top["params"][1], base, overrides or {})
    settings = {key: _value(node) for key, (_, node) in top.items() if key in SETTINGS}
    _check_settings(where, top, settings)
    scheduler, scheduler_options = _block(where, top.get("scheduler"), "scheduler",
                                          {k: v.options for k, v in SCHEDULERS.items()}, "fifo")
    searcher, searcher_options = _block(where, top.get("searcher"), "searcher",
                                        {k: v[0] for k, v in SEARCHERS.items()}, "random")
    space = SearchSpace(path=path.resolve(), name=str(settings.get("name", path.stem)), base=base,
                        params=params, scheduler=scheduler, scheduler_options=scheduler_options,
                        searcher=searcher, searcher_options=searcher_options,
                        **{k: v for k, v in settings.items() if k != "name"})
    _check_combination(where, top, space)
    return space


def _base_config(where: _Located, top: dict, overrides: dict) -> RunConfig:
    """The base preset (relative to the space file) with the space's fixed keys and --set."""
    preset = None
    if "base" in top:
        key_node, node = top["base"]
        preset = Path(str(_value(node)))
        preset = preset if preset.is_absolute() else where.path.parent / preset
        if not preset.is_file():
            raise where.error(node, f"Base preset '{preset}' does not exist: 'base' is a path "
                                    "relative to the space file, e.g. ../configs/digits_wgcn.yaml.")
    config = load_config(preset)
    if "fixed" in top:
        for key, key_node, node in where.pairs(top["fixed"][1], "fixed"):
            try:
                config = config.replace({key: _value(node)})
            except ConfigError as err:
                raise where.error(key_node, f"{err} (in 'fixed')") from None
    return config.replace(overrides)


def _params(where: _Located, node: yaml.Node, base: RunConfig,
            overrides: dict) -> tuple[SearchParam, ...]:
    """The searched keys: one known distribution each, valid arguments, values the config takes."""
    params = []
    names = ", ".join(DISTRIBUTIONS)
    for key, key_node, dist_node in where.pairs(node, "params"):
        if not isinstance(dist_node, yaml.MappingNode) or len(dist_node.value) != 1:
            raise where.error(dist_node, f"'{key}' needs one distribution, e.g. `{key}: {{choice: "
                                         f"[a, b]}}`; distributions: {names}.")
        name_node, args_node = dist_node.value[0]
        name = str(name_node.value)
        if name not in DISTRIBUTIONS:
            raise where.error(name_node, f"Unknown distribution '{name}' for '{key}'."
                                         f"{_did_you_mean(name, list(DISTRIBUTIONS))} "
                                         f"Distributions: {names}.")
        dist, args = DISTRIBUTIONS[name], _value(args_node)
        problem = dist.check(args)
        if problem:
            raise where.error(args_node, f"'{key}': {name} takes {dist.arguments}; it {problem}.")
        if key in overrides:
            raise where.error(key_node, f"'{key}' is searched here and fixed by --set: drop one.")
        args = dist.values(args)
        current = flatten(base.to_dict()).get(key)
        if dist.floats and isinstance(current, int) and not isinstance(current, bool):
            raise where.error(name_node, f"'{key}' takes whole numbers but {name} samples "
                                         "floats: use randint, qrandint, choice or grid.")
        for example in dist.examples(args):
            try:
                base.replace({key: example})
            except ConfigError as err:
                raise where.error(key_node, str(err)) from None
        params.append(SearchParam(key, name, tuple(args), key_node.start_mark.line + 1))
    if not params:
        raise where.error(node, "'params' is empty: search at least one key.")
    return tuple(params)


def _check_settings(where: _Located, top: dict, settings: dict) -> None:
    """metric, mode, report_every, stop_on_collapse, max_concurrent."""
    def fail(key: str, message: str) -> ConfigError:
        return where.error(top[key][1], message)

    if "metric" in settings and settings["metric"] not in METRICS:
        raise fail("metric", f"Unknown metric '{settings['metric']}'."
                             f"{_did_you_mean(str(settings['metric']), list(METRICS))}")
    if "mode" in settings and settings["mode"] not in ("min", "max"):
        raise fail("mode", f"'mode' is 'min' or 'max', got {settings['mode']!r}.")
    for key in ("report_every", "max_concurrent"):
        value = settings.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(key, f"'{key}' must be a whole number ≥ 1, got {value!r}.")
    if not isinstance(settings.get("stop_on_collapse", True), bool):
        raise fail("stop_on_collapse", "'stop_on_collapse' must be true or false.")


def _block(where: _Located, entry: tuple | None, what: str, kinds: dict[str, dict[str, type]],
           default: str) -> tuple[str, dict]:
    """A `scheduler:` or `searcher:` block: `type` from the registry and its typed options."""
    if entry is None:
        return default, {}
    pairs = where.pairs(entry[1], what)
    given = {key: (key_node, node) for key, key_node, node in pairs}
    if "type" not in given:
        raise where.error(entry[1], f"'{what}' needs a 'type': one of {', '.join(kinds)}.")
    kind = str(_value(given["type"][1]))
    if kind not in kinds:
        raise where.error(given["type"][1], f"Unknown {what} '{kind}'."
                                            f"{_did_you_mean(kind, list(kinds))} Choose one of "
                                            f"{', '.join(kinds)}.")
    options = {}
    for key, (key_node, node) in given.items():
        if key == "type":
            continue
        if key not in kinds[kind]:
            valid = list(kinds[kind]) or ["(none)"]
            raise where.error(key_node, f"Unknown option '{key}' for {what} '{kind}'."
                                        f"{_did_you_mean(key, valid)}")
        options[key] = _option(where, node, f"{what}.{key}", _value(node), kinds[kind][key])
    for key in REQUIRED_OPTIONS.get(kind, ()):
        if key not in options:
            raise where.error(given["type"][1], f"{what} '{kind}' needs '{key}'.")
    return kind, options


def _option(where: _Located, node: yaml.Node, name: str, value: Any, kind: type) -> Any:
    """A scheduler or searcher option of the right type and range (clocks from TIME_ATTRS)."""
    if kind is str:
        if value not in TIME_ATTRS:
            raise where.error(node, f"'{name}' is one of {', '.join(TIME_ATTRS)}, got {value!r}.")
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not float(value).is_integer()):
        raise where.error(node, f"'{name}' must be a {'whole ' if kind is int else ''}number, "
                                f"got {value!r}.")
    low, high, low_included = OPTION_RANGES.get(name.split(".")[-1], (0, math.inf, False))
    if value < low or (value == low and not low_included) or value > high:
        bounds = f"{'[' if low_included else '('}{low}, {high}{')' if high == math.inf else ']'}"
        raise where.error(node, f"'{name}' must be in {bounds}, got {value!r}.")
    return kind(value)


def _check_combination(where: _Located, top: dict, space: SearchSpace) -> None:
    """Choices that are valid one by one but not together."""
    grids = [p for p in space.params if p.is_grid]
    node = (top.get("searcher") or top.get("scheduler") or top["params"])[1]
    if space.searcher == "optuna" and grids:
        raise where.error(node, f"The optuna searcher cannot take grid parameters "
                                f"('{grids[0].key}', line {grids[0].line}): use choice, or the "
                                "random searcher.")
    if space.scheduler == "pbt":
        if space.searcher != "random":
            raise where.error(node, "PBT explores by perturbing trials itself: use the random "
                                    "searcher with it.")
        if not space.mutations():
            raise where.error(top["params"][1], "PBT needs at least one sampled (not grid) "
                                                "parameter to mutate.")
    if space.scheduler_options.get("time_attr", "iteration") != "iteration":
        return
    horizon = space.base.train.iterations
    for key in ("grace_period", "max_t", "perturbation_interval"):
        value = space.scheduler_options.get(key, 0)
        if value > horizon:
            raise where.error(top["scheduler"][1], f"scheduler {key} {value} exceeds the trials' "
                                                   f"train.iterations ({horizon}).")


# ---------------------------------------------------------------------------------------------
# One trial


@dataclass
class TrialReporter:
    """Sends a trial's metrics to Tune every `every` iterations; called by train_loop.

    Not at the trial's last iteration (completion or a collapse stop): the trial reports its end
    once, with its status, after training returns.
    """

    every: int  # iterations between reports (each costs ~1.7 s here)
    total: int  # the trial's train.iterations
    stop_on_collapse: bool
    send_to: str  # "tune" (train_loop in the trial's process) or "train" (Ray Train workers)
    checkpoints: str | None = None  # attach RUN_DIR/checkpoints/iter-N to each report (PBT)
    worst: float = float("inf")  # what a collapsed trial reports as the search metric
    metric: str = SMOOTHED_R
    recent: deque = field(default_factory=lambda: deque(maxlen=SMOOTHING))
    collapsed: bool = False

    def __call__(self, iteration: int, rank: int, metrics: dict) -> None:
        self.recent.append(metrics["response_distance"])
        self.collapsed = self.collapsed or bool(metrics["collapse"])
        last = iteration >= self.total or (metrics["collapse"] and self.stop_on_collapse)
        if last or iteration % self.every:
            return
        result = {**_numeric(metrics), SMOOTHED_R: sum(self.recent) / len(self.recent)}
        if self.collapsed:  # from the first collapse on (stop_on_collapse: false keeps it running)
            result[self.metric] = self.worst
        if self.send_to == "train":
            import ray.train

            ray.train.report(result)  # every rank: TuneReportCallback forwards rank 0's
            return
        import ray.tune

        from .checkpoint import checkpoint_name

        checkpoint = None
        if self.checkpoints:
            directory = Path(self.checkpoints) / checkpoint_name(iteration)
            checkpoint = ray.tune.Checkpoint.from_directory(str(directory))
        ray.tune.report(result, checkpoint=checkpoint)


_REPORTER: TrialReporter | None = None  # this process's trial reporter (one trial per process)


def report_progress(iteration: int, rank: int, metrics: dict) -> None:
    """The train_loop callback of a trial (REPORT_CALLBACK): hands over to the trial's reporter."""
    if _REPORTER is None:
        raise RuntimeError(f"{REPORT_CALLBACK} reports to Ray Tune and runs only inside a "
                           "`debm tune` trial.")
    _REPORTER(iteration=iteration, rank=rank, metrics=metrics)


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search shares; it crosses Ray with the trainable."""

    base: dict  # the base RunConfig as a nested dict (tracking already set for the search)
    trials_dir: str  # absolute; trial T trains in trials_dir/T
    metric: str
    mode: str
    report_every: int
    stop_on_collapse: bool
    checkpoints: bool  # reports carry checkpoints (PBT)
    workers: int  # Ray Train workers per trial; 0: train_loop in the trial's process
    gpus_per_worker: float
    storage: str  # Ray storage of the Ray Train trials' checkpoints


def trial_config(setup: TrialSetup, params: dict, trial_id: str) -> RunConfig:
    """The run config of one trial: the base with the trial's sampled values."""
    base = RunConfig.from_dict(setup.base)
    return base.replace({**params, "name": f"{base.name}-{trial_id}",
                         "collapse.stop_on_collapse": setup.stop_on_collapse})


def run_trial(params: dict, setup: TrialSetup) -> None:
    """One trial, as a Tune function trainable: train, report every K iterations, report the end."""
    import ray.tune
    import torch

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(setup, params, trial_id)
    run_dir = Path(setup.trials_dir) / trial_id
    resume = _restore_tune_checkpoint(ray.tune.get_checkpoint(), run_dir, config)
    torch.set_num_threads(1)
    reporter = TrialReporter(setup.report_every, config.train.iterations, setup.stop_on_collapse,
                             "tune" if setup.workers == 0 else "train",
                             str(run_dir / "checkpoints") if setup.checkpoints else None,
                             worst=WORST if setup.mode == "min" else -WORST, metric=setup.metric)
    loop_config = {"config": config.to_dict(), "run_dir": str(run_dir), "resume": resume,
                   "progress": False, "callbacks": [REPORT_CALLBACK]}
    if setup.workers == 0:
        summary = _train_here(loop_config, reporter)
    else:
        summary = _train_with_ray_train(loop_config, reporter, config, setup)
    ray.tune.report(final_result(summary, setup.metric, setup.mode))


def _train_here(loop_config: dict, reporter: TrialReporter) -> dict:
    """train_loop in this process; a NaN/Inf divergence ends the trial as collapsed."""
    global _REPORTER
    from .train_loop import TrainingDiverged, train_loop

    _REPORTER = reporter
    try:
        return train_loop(loop_config)
    except TrainingDiverged:
        return json.loads((Path(loop_config["run_dir"]) / "summary.json").read_text())
    finally:
        _REPORTER = None


def _ray_train_worker(loop_config: dict) -> None:
    """A Ray Train worker of a trial: the trial's reporter, then trainer.ray_worker."""
    global _REPORTER
    from .trainer import ray_worker

    _REPORTER = TrialReporter(**loop_config.pop("reporter"))
    ray_worker(loop_config)


def _forward_search_reports(metric: str):
    """Ray's TuneReportCallback, passing on only the reports that carry the search metric (the
    trial reporter's): train_loop's checkpoint reports do not, and Tune rejects such results."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardSearchReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, None)

    return ForwardSearchReports()


def _train_with_ray_train(loop_config: dict, reporter: TrialReporter, config: RunConfig,
                          setup: TrialSetup) -> dict:
    """Ray Train with `setup.workers` workers driven from this trial (Train V2 inside Tune)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .checkpoint import read_checkpoint

    reporter_settings = {k: v for k, v in asdict(reporter).items() if k != "recent"}
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={**loop_config, "reporter": reporter_settings},
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.workers, use_gpu=setup.gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": setup.gpus_per_worker}
                                               if setup.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=setup.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            callbacks=[_forward_search_reports(setup.metric)]),
    )
    run_dir = Path(loop_config["run_dir"])
    try:
        result = trainer.fit()
        error = result.error
    except Exception as err:  # Train V2 raises when the worker group fails
        result, error = None, err
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if error is not None and summary.get("status") != "diverged":
        raise error
    if result is not None and result.checkpoint is not None:
        # Into RUN_DIR/checkpoints, as train_distributed does: champions are registered from there.
        with result.checkpoint.as_directory() as directory:
            read_checkpoint(directory)  # a complete bundle
            target = run_dir / "checkpoints" / Path(result.checkpoint.path).name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(directory, target)
    return summary


def final_result(summary: dict, metric: str, mode: str) -> dict:
    """A trial's last report: its final metrics, status and the search metric. A collapsed trial
    reports WORST (the measured value under `measured`) so no searcher or scheduler prefers it."""
    stopped = summary["status"] in ("collapsed", "diverged") or bool(summary.get("collapsed"))
    collapse = summary.get("collapse") or {}
    measured = (summary.get("final_response_distance") if metric == SMOOTHED_R
                else summary["final"].get(metric))
    measured = math.nan if measured is None else float(measured)
    worst = WORST if mode == "min" else -WORST
    return {**_numeric(summary["final"]), "iteration": summary["iterations"],
            "images_seen": summary["images_seen"], metric: worst if stopped else measured,
            "measured": measured, "trial_status": "collapsed" if stopped else "completed",
            "collapse_reason": collapse.get("reason", ""),
            "collapse_iteration": collapse.get("iteration", 0)}


def _restore_tune_checkpoint(checkpoint, run_dir: Path, config: RunConfig) -> bool:
    """Put a Tune checkpoint (PBT's exploit, or a restarted trial) into RUN_DIR/checkpoints as the
    only one, with this trial's optimiser settings; True when there was one to resume from."""
    if checkpoint is None:
        return False
    import torch

    from .checkpoint import SHARED_FILE, checkpoint_name

    root = run_dir / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    with checkpoint.as_directory() as directory:
        shared = torch.load(Path(directory) / SHARED_FILE, map_location="cpu", weights_only=False)
        target = root / checkpoint_name(shared["iteration"])
        shutil.copytree(directory, target)
    apply_optimiser_settings(shared, config)
    torch.save(shared, target / SHARED_FILE)
    return True


def apply_optimiser_settings(shared: dict, config: RunConfig) -> None:
    """Set the learning rates (and Adam's betas, weight decay) stored in a checkpoint's optimiser
    states to `config`'s: PBT continues a donor's weights and moments with new hyperparameters,
    and torch's load_state_dict would otherwise bring back the donor's."""
    optim = config.optim
    adam = {"betas": optim.betas} if optim.optimizer == "adam" else {}
    settings = {"energy": {"lr": optim.lr, "weight_decay": optim.weight_decay, **adam},
                "generator": {"lr": config.generator.lr, "betas": config.generator.betas}}
    for name, state in shared["optimizers"].items():
        for group in state["param_groups"]:
            group.update({k: v for k, v in settings.get(name, {}).items() if k in group})


# ---------------------------------------------------------------------------------------------
# The search


@dataclass
class TrialOutcome:
    """How one trial ended, for the summary table and the registry."""

    trial_id: str
    params: dict
    status: str  # one of STATUSES
    iterations: int  # learning iterations run
    planned: int  # the trial's train.iterations
    langevin_steps: int  # the trial's L (cost per iteration ∝ L + 1)
    value: float | None  # the search metric as measured (None: never reported)
    collapse: str  # "saturated @ 5" or ""
    run_dir: Path
    mlflow_run_id: str | None = None
    error: str = ""


@dataclass
class SearchResult:
    """A finished search: every trial's outcome, the best completed trial, the champion decision."""

    name: str
    out_dir: Path
    metric: str
    mode: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None = None
    model_uri: str | None = None
    champion: str = ""  # what happened to the champion alias, in words
    parent_run_id: str | None = None

    def compute(self) -> dict[str, int]:
        """Iterations run and saved against running every trial to its end, and the same in
        Langevin passes (iterations × (L + 1): L chain steps and the learning step's pass each
        cost one forward and backward of Φ), since L is often searched and sets the cost."""
        planned = sum(t.planned for t in self.trials)
        run = sum(t.iterations for t in self.trials)
        saved = {status: sum(t.planned - t.iterations for t in self.trials if t.status == status)
                 for status in ("collapsed", "stopped by scheduler")}
        passes_planned = sum(t.planned * (t.langevin_steps + 1) for t in self.trials)
        passes_run = sum(t.iterations * (t.langevin_steps + 1) for t in self.trials)
        return {"planned": planned, "run": run, "saved_by_collapse": saved["collapsed"],
                "saved_by_scheduler": saved["stopped by scheduler"],
                "passes_planned": passes_planned, "passes_run": passes_run}


def run_search(space: SearchSpace, *, trials: int, out_dir: str | Path, workers_per_trial: int = 0,
               gpus_per_worker: float = 0.0, storage: str | None = None, address: str | None = None,
               name: str | None = None, verbose: int = 1) -> SearchResult:
    """Run a Ray Tune search over `space` and return its outcome.

    Args:
        trials: trials in all (with grid parameters, a multiple of the grid's size).
        out_dir: the search's folder: trials/TRIAL_ID run directories, summary.csv/.md, search.json.
        workers_per_trial: Ray Train workers per trial; 0 runs train_loop in the trial's process.
        storage: Ray storage for Tune (and Ray Train) checkpoints: an absolute path or a URI;
            default OUT_DIR/ray.
        address: an existing Ray cluster ("auto"); None starts a local one unless Ray is running.
        name: the search's name (Tune experiment, MLflow parent run); default the space's.
        verbose: Tune's console output, 0 (silent) to 2.
    """
    import ray

    check_search(space, trials, workers_per_trial, storage)
    name = name or space.name
    kind = SCHEDULERS[space.scheduler]
    out_dir = Path(out_dir).resolve()
    storage = storage or str(out_dir / "ray")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = space.base.replace({"name": name})  # trial T's run is NAME-T
    if kind.checkpoints:  # every report carries the checkpoint written at that iteration
        base = base.replace({"train.checkpoint_every": space.report_every})
    search_run, base = _start_tracking(space, base, name)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 0)
    try:
        grid_result = _fit(space, base, name, trials, out_dir, storage, workers_per_trial,
                           gpus_per_worker, verbose)
    except BaseException as err:
        if search_run is not None:
            search_run.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    setup_dir = out_dir / "trials"
    outcomes = [_outcome(result, base, setup_dir, space.metric) for result in grid_result]
    result = SearchResult(name, out_dir, space.metric, space.mode, outcomes)
    _choose_best(result)
    if search_run is not None:
        _finish_trials(result, search_run, base)
    write_tables(result)
    if search_run is not None:
        _close_search_run(result, search_run)
    return result


def check_search(space: SearchSpace, trials: int, workers_per_trial: int,
                 storage: str | None) -> None:
    """The command line's choices against the space (ConfigError naming the fix)."""
    grid = space.grid_size()
    if trials < 1 or trials % grid:
        raise ConfigError(f"--trials {trials} must be a positive multiple of the grid's {grid} "
                          "combinations: every pass over the grid is one sample of the rest.")
    if workers_per_trial < 0:
        raise ConfigError("--workers-per-trial must be ≥ 0 (0: train_loop in the trial's process).")
    if SCHEDULERS[space.scheduler].checkpoints and workers_per_trial > 0:
        raise ConfigError("PBT copies Tune checkpoints between trials, which Ray Train trials "
                          "(--workers-per-trial > 0) do not report to Tune: use "
                          "--workers-per-trial 0.")
    if storage and "://" not in storage and not Path(storage).is_absolute():
        raise ConfigError(f"--storage '{storage}' must be an absolute path or a URI (s3://…).")


def _fit(space: SearchSpace, base: RunConfig, name: str, trials: int, out_dir: Path, storage: str,
         workers: int, gpus_per_worker: float, verbose: int):
    """Tuner.fit over the space; one trial = run_trial."""
    import ray
    import ray.tune

    kind = SCHEDULERS[space.scheduler]
    setup = TrialSetup(base=base.to_dict(), trials_dir=str(out_dir / "trials"), metric=space.metric,
                       mode=space.mode, report_every=space.report_every,
                       stop_on_collapse=space.stop_on_collapse, checkpoints=kind.checkpoints,
                       workers=workers, gpus_per_worker=gpus_per_worker, storage=storage)
    # A Ray Train trial's driver only waits on its workers, which hold the trial's CPUs: it asks
    # for no CPU (Tune refuses an empty request, hence some memory).
    resources = {"cpu": 1} if workers == 0 else {"cpu": 0, "memory": DRIVER_MEMORY}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = space.max_concurrent or max(1, cpus // max(workers, 1))
    images_per_iteration = base.train.data_batch_size * max(workers, 1)
    horizon = {"iteration": base.train.iterations,
               "images_seen": base.train.iterations * images_per_iteration}
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), resources),
        param_space=space.param_space(),
        tune_config=ray.tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=trials // space.grid_size(),
            scheduler=kind.build(space.scheduler_options, space.mutations(), horizon),
            search_alg=SEARCHERS[space.searcher][1](space.searcher_options, concurrent),
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=verbose,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


def _outcome(result, base: RunConfig, trials_dir: Path, metric: str) -> TrialOutcome:
    """A trial's outcome from its last Tune result and its run directory."""
    from .rundir import RunDirectory

    trial_id = Path(result.path).name
    params = dict(result.config or {})
    run_dir = trials_dir / trial_id
    trial_config = base.replace(params)
    planned, langevin_steps = trial_config.train.iterations, trial_config.langevin.langevin_steps
    last = result.metrics or {}
    rows = RunDirectory(run_dir).read_metrics()
    iterations = rows[-1]["iteration"] if rows else int(last.get("iteration", 0))
    value = last.get("measured", last.get(metric))
    collapse = (f"{last['collapse_reason']} @ {last['collapse_iteration']}"
                if last.get("collapse_reason") else "")
    if result.error is not None:
        status = "error"
    elif "trial_status" in last:
        status = last["trial_status"]
    else:  # the scheduler stopped it before its end (its process was ended mid-training)
        status = "stopped by scheduler"
    error = f"{type(result.error).__name__}: {result.error}" if result.error is not None else ""
    return TrialOutcome(trial_id, params, status, iterations, planned, langevin_steps,
                        None if value is None else float(value), collapse, run_dir, error=error)


def _choose_best(result: SearchResult) -> None:
    """The best completed, never-collapsed trial with a finite metric."""
    eligible = [t for t in result.trials if t.status == "completed" and not t.collapse
                and t.value is not None and math.isfinite(t.value)]
    if eligible:
        pick = min if result.mode == "min" else max
        result.best = pick(eligible, key=lambda t: t.value)


def _start_tracking(space: SearchSpace, base: RunConfig, name: str):
    """The search's MLflow parent run, and the base config that nests every trial under it."""
    if not base.tracking.enabled:
        return None, base
    from .tracking import SearchRun, check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(base.tracking)
    check_tracking(uri)
    experiment = base.tracking.experiment or name
    search_run = SearchRun(uri, experiment, name, space.describe(),
                           tags={"debm.space": str(space.path)})
    base = base.replace({"tracking.uri": uri, "tracking.experiment": experiment,
                         "tracking.parent_run_id": search_run.run_id, "tracking.register": False,
                         "tracking.registered_model": base.tracking.registered_model or name})
    return search_run, base


def _finish_trials(result: SearchResult, search_run, base: RunConfig) -> None:
    """Close every trial's nested run with its status, register the best trial's model and move
    the champion alias to it if it is better."""
    from .checkpoint import latest_checkpoint
    from .tracking import promote_if_better, register_model

    result.parent_run_id = search_run.run_id
    for trial in result.trials:
        trial.mlflow_run_id = search_run.trial_run_id(trial.run_dir)
        if trial.mlflow_run_id is None:
            continue
        tags = {"debm.trial_status": trial.status, "debm.trial_id": trial.trial_id}
        if trial.collapse:
            tags["debm.collapse"] = trial.collapse
        metrics = {"trial_iterations": trial.iterations}
        if trial.value is not None:
            metrics[result.metric] = trial.value
        search_run.finish_trial(trial.mlflow_run_id, MLFLOW_STATUS[trial.status], metrics, tags)

    best = result.best
    if best is None or best.mlflow_run_id is None:
        result.champion = "no completed trial without collapse: nothing registered."
    else:
        checkpoint = latest_checkpoint(best.run_dir / "checkpoints")
        result.model_uri = register_model(search_run.uri, best.mlflow_run_id, checkpoint,
                                          base.tracking.registered_model)
        decision = promote_if_better(search_run.uri, result.model_uri, best.value, result.metric,
                                     result.mode)
        result.champion = decision.message


def _close_search_run(result: SearchResult, search_run) -> None:
    """The parent run's totals, the champion decision as a tag, the result files; then close it."""
    best = result.best
    compute = result.compute()
    counts = {f"trials_{s.replace(' ', '_')}": sum(t.status == s for t in result.trials)
              for s in STATUSES}
    totals = {**compute, **counts, **({f"best_{result.metric}": best.value} if best else {})}
    tags = {"debm.champion": result.champion,
            **({"debm.best_trial": best.trial_id} if best else {})}
    search_run.finish(totals, tags, [result.out_dir / n for n in ("summary.md", "summary.csv",
                                                                   "search.json")])


def write_tables(result: SearchResult) -> str:
    """Write summary.csv, summary.md and search.json into the search folder; return the Markdown."""
    keys = sorted({k for t in result.trials for k in t.params})
    header = ["trial", "status", "iterations", *keys, result.metric, "collapse", "mlflow run"]
    rows = [[t.trial_id, t.status, f"{t.iterations}/{t.planned}",
             *(_short(t.params.get(k)) for k in keys),
             "" if t.value is None else f"{t.value:.4g}", t.collapse, t.mlflow_run_id or ""]
            for t in result.trials]
    with (result.out_dir / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    lines = [f"# Search {result.name}", "", table, "", *_totals(result)]
    (result.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    record = {"name": result.name, "metric": result.metric, "mode": result.mode,
              "best": result.best.trial_id if result.best else None, "model_uri": result.model_uri,
              "champion": result.champion, "parent_run_id": result.parent_run_id,
              "compute": result.compute(),
              "trials": [{**asdict(t), "run_dir": str(t.run_dir), "value": _finite(t.value)}
                         for t in result.trials]}
    (result.out_dir / "search.json").write_text(json.dumps(record, indent=2))
    return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _totals(result: SearchResult) -> list[str]:
    """The lines under the table: counts, compute saved, the best trial and the champion."""
    c = result.compute()
    saved = c["planned"] - c["run"]
    share = saved / c["planned"] if c["planned"] else 0.0
    counts = ", ".join(f"{sum(t.status == s for t in result.trials)} {s}" for s in STATUSES)
    best = (f"Best: trial {result.best.trial_id}, {result.metric} {result.best.value:.4g}"
            if result.best else "Best: none (no trial completed without collapse)")
    errors = [f"Trial {t.trial_id} failed: {t.error.splitlines()[0] if t.error else ''}"
              for t in result.trials if t.status == "error"]
    return [f"Trials: {counts}.",
            f"Iterations: {c['run']} of {c['planned']} run; {saved} saved ({share:.0%}) against "
            f"running every trial to its end: {c['saved_by_collapse']} by collapse stopping, "
            f"{c['saved_by_scheduler']} by the scheduler. Weighted by cost (iterations × (L + 1)): "
            f"{1 - c['passes_run'] / max(1, c['passes_planned']):.0%} saved.",
            best + (f", registered as {result.model_uri}." if result.model_uri else "."),
            f"Champion: {result.champion}" if result.champion else "Champion: MLflow is off.",
            *errors]


# ---------------------------------------------------------------------------------------------
# The command


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm tune` to the CLI's subparsers."""
    tune = subparsers.add_parser("tune", help="search hyperparameters with Ray Tune (tune_spaces/)")
    tune.add_argument("--space", required=True,
                      help="search space YAML (see tune_spaces/README.md)")
    tune.add_argument("--trials", type=int, required=True,
                      help="trials in all (a multiple of the grid's combinations)")
    tune.add_argument("--workers-per-trial", type=int, default=0,
                      help="Ray Train workers per trial; 0: train_loop in the trial's process")
    tune.add_argument("--gpus-per-worker", type=float, default=0.0,
                      help="GPUs per Ray Train worker")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override of the space's base config, e.g. train.iterations=100")
    tune.add_argument("--storage", help="Ray storage (absolute path or URI); default OUT/ray")
    tune.add_argument("--address", help="join this Ray cluster (e.g. auto); default: a local one")
    tune.add_argument("--name",
                      help="search name (Tune experiment, MLflow parent run); default the space's")
    tune.add_argument("--out", help="search folder (default runs/<name>-<time>)")
    tune.add_argument("--no-mlflow", action="store_true", help="no MLflow runs and no registration")
    tune.add_argument("--dry-run", action="store_true", help="validate, print the space and exit")
    tune.set_defaults(func=run)
    return tune


def run(args: argparse.Namespace) -> int:
    """`debm tune`: validate the space, run the search, print the summary table."""
    overrides = parse_overrides(args.set + (["tracking.enabled=false"] if args.no_mlflow else []))
    space = load_space(args.space, overrides)
    name = args.name or space.name
    if args.dry_run:
        check_search(space, args.trials, args.workers_per_trial, args.storage)
        print(yaml.safe_dump({"search": space.describe(), "base": space.base.to_dict()},
                             sort_keys=False), end="")
        return 0
    out = Path(args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_search(space, trials=args.trials, out_dir=out,
                        workers_per_trial=args.workers_per_trial,
                        gpus_per_worker=args.gpus_per_worker, storage=args.storage,
                        address=args.address, name=name)
    print((result.out_dir / "summary.md").read_text(), end="")
    print(f"Search folder {result.out_dir} (summary.csv, summary.md, search.json)"
          + (f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""))
    return 1 if all(t.status == "error" for t in result.trials) else 0
