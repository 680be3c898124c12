"""Checkpoints written before the restructuring of issue 11 still load, sample and resume.

The fixtures in tests/fixtures/checkpoints/ were written by the code of commit 5ba31cf (before
`train_loop.train`, `state.RunState` and `outputs.RunOutputs`), from a checkout of that commit:

    COMMON="--workers 0 --no-mlflow --set train.iterations=2 --set train.checkpoint_every=2 \\
        --set chains.bank_size=8 --set chains.batch_size=8 --set train.data_batch_size=8 \\
        --set langevin.langevin_steps=2 --set model.channels=[4,8]"
    python -m distributed_ebm.cli train --config configs/digits_wgcn.yaml $COMMON --run-dir /tmp/fixt/wgcn
    python -m distributed_ebm.cli train --config configs/digits_ggcn.yaml $COMMON \\
        --set generator.latent_dim=8 --set generator.base_width=2 \\
        --set generator.latent_bank_size=8 --set generator.generator_every=1 --run-dir /tmp/fixt/ggcn

and each run's config.yaml and checkpoints/iter-00000002/ copied to tests/fixtures/checkpoints/NAME/.
expected.json holds what that same code drew from them (samples, inpainting, interpolation) and
the metrics of one more iteration resumed from them:

    PYTHONPATH=<that checkout> python tests/fixtures/checkpoints/record_expected.py <copy of the fixtures>
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distributed_ebm.config import load_config
from distributed_ebm.inference import load_run
from distributed_ebm.train_loop import train

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
NEW_COLUMNS = ("step_size", "lr", "recovery", "collapse_energy_pinned")  # metrics added since: δ and λ in use,
# recoveries so far, the energy_pinned average (0 without the energy penalty)


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    assert torch.allclose(actual.flatten(), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["wgcn", "ggcn"])
def test_an_old_checkpoint_loads_and_samples_as_before(name):
    expected = EXPECTED[name]
    model = load_run(FIXTURES / name)
    assert model.iteration == expected["iteration"] == 2
    _close(model.sample(3, steps=3, seed=0), expected["sample"])
    images = torch.linspace(-1, 1, 2 * 64).view(2, 1, 8, 8)
    missing = torch.zeros(2, 1, 8, 8)
    missing[..., 2:6, 2:6] = 1
    _close(model.inpaint(images, missing, steps=3, seed=0), expected["inpaint"])
    if "interpolate" in expected:
        _close(model.interpolate(1, 1, seed=0, steps=2), expected["interpolate"])


@pytest.mark.parametrize("name", ["wgcn", "ggcn"])
def test_an_old_checkpoint_resumes_one_more_iteration_as_before(tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / name, run_dir)
    config = load_config(FIXTURES / name / "config.yaml", {"train.iterations": 3})
    summary = train(config, run_dir, resume=True, progress=False)
    assert summary["iterations"] == 3 and summary["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [3]  # the fixture holds no metrics: only the resumed one
    row = {k: v for k, v in rows[-1].items() if k not in ("seconds", *NEW_COLUMNS)}
    assert row.keys() == EXPECTED[name]["resumed_row"].keys()
    assert (rows[-1]["step_size"], rows[-1]["lr"], rows[-1]["recovery"]) == (
        config.langevin.step_size, config.optim.lr, 0)  # no recoveries: the config's δ and λ
    assert rows[-1]["collapse_energy_pinned"] == 0.0  # the fixtures have no energy penalty
    for key, value in EXPECTED[name]["resumed_row"].items():
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        else:
            assert row[key] == value, key
    assert (run_dir / "checkpoints" / "iter-00000003" / "state.pt").is_file()
