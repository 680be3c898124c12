"""Config: presets load, overrides apply, unknown keys fail with a did-you-mean hint."""

from pathlib import Path

import pytest

from distributed_ebm.cli import main
from distributed_ebm.config import (
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
