"""Config: presets load, overrides apply, unknown keys fail with a did-you-mean hint."""

from pathlib import Path

import pytest

from distributed_ebm.cli import main
from distributed_ebm.config import (
    RANGES,
    ConfigError,
    RunConfig,
    did_you_mean,
    load_config,
    parse_overrides,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_validates_and_round_trips(path):
    config = load_config(path)
    assert RunConfig.from_dict(config.to_dict()) == config


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"Unknown config key 'langevin.step_szie'.*Did you mean 'step_size'"):
        RunConfig.from_dict({"langevin": {"step_szie": 0.1}})
    with pytest.raises(ConfigError, match=r"Unknown config key 'optimm'.*Did you mean 'optim'"):
        RunConfig.from_dict({"optimm": {}})


def test_did_you_mean_names_the_closest_choice_or_lists_them():
    assert did_you_mean("stpe", ["step", "seed"]) == " Did you mean 'step'?"
    assert did_you_mean("xyz", ["b", "a"]) == " Valid keys: a, b."
    assert did_you_mean("xyz", ["b", "a"], list_choices=False) == ""


def test_overrides_are_typed_and_dotted():
    config = load_config(None, parse_overrides(["langevin.step_size=0.2", "model.channels=[8, 16]", "optim.grad_clip=null"]))
    assert config.langevin.step_size == 0.2
    assert config.model.channels == (8, 16)
    assert config.optim.grad_clip is None
    assert config.replace({"train.iterations": 5}).train.iterations == 5


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="'train.iterations' must be a int"):
        RunConfig.from_dict({"train": {"iterations": "many"}})


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--config", str(CONFIGS[0]), "--set", "train.iterations=7", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "iterations: 7" in printed and "step_size:" in printed


def test_cli_reports_unknown_key_without_traceback(capsys):
    assert main(["train", "--set", "chains.bank_sise=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'chains.bank_sise'" in err and "bank_size" in err and "Traceback" not in err


def _numeric_keys(cls=RunConfig, prefix=""):
    """Every dotted key of RunConfig whose value is a number or a tuple of numbers."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_keys(hint, f"{prefix}{f.name}.")
        elif hint is not bool and {int, float} & set(typing.get_args(hint) or (hint,)) | (
                {int, float} & set(typing.get_args(typing.get_args(hint)[0]) if typing.get_args(hint) else ())):
            yield f"{prefix}{f.name}"


def test_every_numeric_key_has_a_range():
    keys = set(_numeric_keys())
    assert "langevin.step_size" in keys and "model.grid_sizes" in keys and "optim.betas" in keys
    assert keys == set(RANGES), f"no range: {sorted(keys - set(RANGES))}; stale: {sorted(set(RANGES) - keys)}"


def _outside(rule, example):
    """A value just outside `rule`, of the type of `example` (int or float)."""
    if rule.low is not None:
        bad = rule.low if rule.low_open else rule.low - 1
    else:
        bad = rule.high if rule.high_open else rule.high + 1
    return type(example)(bad)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_value_outside_its_range_is_refused_naming_key_value_and_range(key):
    import typing

    section, name = key.split(".")
    rule, default = RANGES[key], RunConfig().to_dict()[section][name]
    hint = typing.get_type_hints(type(getattr(RunConfig(), section)))[name]
    number_type = int if int in (typing.get_args(hint) or (hint,)) or hint == tuple[int, ...] else float
    bad = _outside(rule, number_type(0))
    value = [bad, *default[1:]] if isinstance(default, list) else bad
    with pytest.raises(ConfigError) as refused:
        RunConfig().replace({key: value})
    message = str(refused.value)
    assert f"'{key}' must be" in message and rule.describe() in message and repr(bad) in message
    if rule.nullable:
        assert RunConfig().replace({key: None}).to_dict()[key.split(".")[0]][key.split(".")[1]] is None


def test_cli_refuses_a_negative_step_size_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", "langevin.step_size=-1", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "'langevin.step_size' must be > 0, got -1.0" in err and "Traceback" not in err
    assert not run.exists()


def test_keys_that_contradict_each_other_are_refused():
    with pytest.raises(ConfigError, match=r"'chains.batch_size' must be ≤ chains.bank_size \(16\)"):
        RunConfig().replace({"chains.bank_size": 16, "chains.batch_size": 32})
    RunConfig().replace({"model.algorithm": "ggcn", "chains.bank_size": 16, "chains.batch_size": 32})  # no bank
    with pytest.raises(ConfigError, match="'model.grid_sizes' must be increasing"):
        RunConfig().replace({"model.grid_sizes": [1, 8, 8]})


def test_version_is_printed(capsys):
    from distributed_ebm import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"debm {__version__} (distributed_ebm)"


def test_inside_a_ray_job_the_run_directory_goes_to_the_storage(tmp_path, monkeypatch, capsys):
    """Ray's job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR; the job's working directory is a
    temporary copy Ray deletes: a relative or missing --run-dir is refused, --storage hosts runs."""
    import argparse

    from distributed_ebm.cli.train import RAY_JOB_ENV, _default_run_dir

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    assert main(["train", "--run-dir", "runs/x", "--set", "train.iterations=1"]) == 2
    assert "--run-dir 'runs/x' is relative: inside a Ray job" in capsys.readouterr().err
    assert main(["train", "--set", "train.iterations=1"]) == 2
    assert "pass --storage /path/every/node/mounts" in capsys.readouterr().err
    run_dir = _default_run_dir(argparse.Namespace(storage=str(tmp_path)), "demo")
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("demo-")
    monkeypatch.delenv(RAY_JOB_ENV)
    assert _default_run_dir(argparse.Namespace(storage=None), "demo").parent == Path("runs")


def test_usage_reports_are_off_in_tests():
    """conftest turns off Ray's usage stats and MLflow's telemetry for the suite and its subprocesses."""
    from mlflow.telemetry.utils import is_telemetry_disabled
    from ray._common.usage.usage_lib import usage_stats_enabled

    assert is_telemetry_disabled() and not usage_stats_enabled()
