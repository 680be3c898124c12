"""Search spaces as YAML files (tune_spaces/README.md), validated before any trial starts.

A space names a base preset, fixed overrides, distributions over dotted config keys
(`optim.lr: {loguniform: [1.0e-4, 3.0e-2]}`), the metric and mode, a scheduler (FIFO, ASHA, PBT)
and a searcher (random, Optuna), each from a registry below. Every error names the file and line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, did_you_mean, flatten, load_config
from .quality import FRESH_FID, FreshFID

SMOOTHED_R = "response_distance_smoothed"  # mean R over the last SMOOTHING iterations
SMOOTHING = 10  # iterations averaged into SMOOTHED_R, as summary.json's final_response_distance
# Metrics every algorithm reports each iteration, any of which a space may optimise.
METRICS = (SMOOTHED_R, FRESH_FID, "response_distance", "energy_gap_z", "collapse_r_ratio",
           "collapse_energy_gap", "collapse_energy_pinned", "chain_saturation", "phi_data", "phi_chains", "energy_data",
           "energy_chains", "grad_norm_theta")
TIME_ATTRS = ("iteration", "images_seen")  # the clocks a scheduler may count in


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
    fid_samples: int = 500  # metric fresh_fid: fresh samples per score (tuning/quality.py)
    fid_steps: int | None = None  # metric fresh_fid: their Langevin steps; None: the model's default

    def fresh_fid(self, cache_dir: str) -> FreshFID | None:
        """How trials score their fresh samples, when the search ranks by them."""
        if self.metric != FRESH_FID:
            return None
        return FreshFID(cache_dir=cache_dir, samples=self.fid_samples, steps=self.fid_steps)

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
        if self.metric == FRESH_FID:
            info.update(fid_samples=str(self.fid_samples), fid_steps=str(self.fid_steps))
        info.update({f"scheduler.{k}": str(v) for k, v in self.scheduler_options.items()})
        info.update({f"searcher.{k}": str(v) for k, v in self.searcher_options.items()})
        info.update({f"search.{p.key}": f"{p.distribution}{list(p.arguments)}"
                     for p in self.params})
        return info


SETTINGS = ("name", "metric", "mode", "report_every", "stop_on_collapse", "max_concurrent", "fid_samples",
            "fid_steps")
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
                                        f"{did_you_mean(key, list(SPACE_KEYS))}")
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
    if "fixed" in top:  # together: keys that must agree (a batch within its bank) are set at once
        pairs = where.pairs(top["fixed"][1], "fixed")
        try:
            config = config.replace({key: _value(node) for key, _, node in pairs})
        except ConfigError as err:  # point at the line of the key the message names
            line = next((key_node for key, key_node, _ in pairs if f"'{key}'" in str(err)), top["fixed"][0])
            raise where.error(line, f"{err} (in 'fixed')") from None
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
                                         f"{did_you_mean(name, list(DISTRIBUTIONS))} "
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
                             f"{did_you_mean(str(settings['metric']), list(METRICS))}")
    if "mode" in settings and settings["mode"] not in ("min", "max"):
        raise fail("mode", f"'mode' is 'min' or 'max', got {settings['mode']!r}.")
    for key in ("report_every", "max_concurrent", "fid_samples"):
        value = settings.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(key, f"'{key}' must be a whole number ≥ 1, got {value!r}.")
    steps = settings.get("fid_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise fail("fid_steps", f"'fid_steps' must be null (the model's default) or a step count ≥ 0, got {steps!r}.")
    for key in ("fid_samples", "fid_steps"):
        if key in settings and settings.get("metric") != FRESH_FID:
            raise fail(key, f"'{key}' only applies with 'metric: {FRESH_FID}'.")
    if settings.get("metric") == FRESH_FID and settings.get("mode", "min") != "min":
        raise fail("mode", f"'{FRESH_FID}' is a distance: use 'mode: min'.")
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
                                            f"{did_you_mean(kind, list(kinds))} Choose one of "
                                            f"{', '.join(kinds)}.")
    options = {}
    for key, (key_node, node) in given.items():
        if key == "type":
            continue
        if key not in kinds[kind]:
            valid = list(kinds[kind]) or ["(none)"]
            raise where.error(key_node, f"Unknown option '{key}' for {what} '{kind}'."
                                        f"{did_you_mean(key, valid)}")
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
