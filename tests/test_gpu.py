"""The GPU layer: the CUDA path end to end. Marked `gpu`; skipped where no CUDA device is visible.

Run with `DEBM_TEST_GPU=1 pytest -m gpu` (scripts/gpu_check.sh does): without DEBM_TEST_GPU the
test session hides CUDA (tests/conftest.py) so that the CPU suite runs unchanged on a GPU host.
Every test drives the library the way a user does (`debm …` through `main([...])`), on tiny
settings: these tests check that the CUDA path runs and agrees with the CPU, not speed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (set DEBM_TEST_GPU=1 on a GPU host)"),
]

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "train.iterations=6", "train.data_batch_size=16", "train.sample_every=3", "train.checkpoint_every=3",
    "chains.bank_size=16", "chains.batch_size=16", "langevin.langevin_steps=3", "langevin.sample_steps=5",
]
PRESETS = {
    "wgcn": ("configs/digits_wgcn.yaml", ["model.channels=[8,16]"]),
    "mgcn": ("configs/digits_mgcn.yaml", ["model.channels=[8,16]"]),
    "ggcn": ("configs/digits_ggcn.yaml", ["model.channels=[8,16]", "generator.base_width=8",
                                          "generator.latent_bank_size=16"]),
    "wgcn_noise": ("configs/digits_wgcn.yaml", ["model.channels=[8,16]", "chains.init=noise"]),
}


def debm(*argv: str) -> int:
    from distributed_ebm.cli import main

    return main(list(argv))


def train(run_dir: Path, preset: str, *extra: str, workers: int = 0) -> dict:
    config, overrides = PRESETS[preset]
    sets = [a for kv in [*TINY, *overrides, *extra] for a in ("--set", kv)]
    assert debm("train", "--config", str(ROOT / config), "--workers", str(workers), "--no-mlflow",
                "--run-dir", str(run_dir), *sets) == 0
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_process_run_and_fresh_samples_on_cuda(tmp_path, preset):
    summary = train(tmp_path / "run", preset, "train.device=cuda")
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    out = tmp_path / "samples.npz"
    assert debm("sample", "--run-dir", str(tmp_path / "run"), "--num", "8", "--out", str(out), "--device", "cuda") == 0
    x = np.load(out)["x"]
    assert x.shape[0] == 8 and np.isfinite(x).all()


def test_cuda_samples_match_cpu_samples_in_distribution(tmp_path):
    """The same trained run sampled on both devices: same shapes, means within noise."""
    train(tmp_path / "run", "wgcn", "train.device=cpu")
    means = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.npz"
        assert debm("sample", "--run-dir", str(tmp_path / "run"), "--num", "256", "--out", str(out),
                    "--device", device) == 0
        means[device] = np.load(out)["x"].mean()
    assert abs(means["cpu"] - means["cuda"]) < 0.05


@pytest.mark.parametrize("preset", ["wgcn", "ggcn"])
def test_cpu_checkpoint_resumes_on_cuda(tmp_path, preset):
    """A checkpoint written on the CPU continues on the GPU (generator states of another layout)."""
    run = tmp_path / "run"
    train(run, preset, "train.device=cpu")
    summary_cpu = json.loads((run / "summary.json").read_text())
    assert summary_cpu["iterations"] == 6
    config, overrides = PRESETS[preset]
    sets = [a for kv in [*TINY, *overrides, "train.iterations=9", "train.device=cuda"] for a in ("--set", kv)]
    assert debm("train", "--config", str(ROOT / config), "--workers", "0", "--no-mlflow", "--run-dir", str(run),
                "--resume", *sets) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 9 and summary["status"] == "completed" and summary["device"].startswith("cuda")


def test_inpaint_interpolate_and_evaluate_on_cuda(tmp_path):
    run = tmp_path / "run"
    train(run, "ggcn", "train.device=cuda")
    assert debm("inpaint", "--run-dir", str(run), "--num", "8", "--mask", "square", "--steps", "3",
                "--out", str(tmp_path / "inpaint"), "--device", "cuda") == 0
    assert debm("inpaint", "--run-dir", str(run), "--num", "8", "--mask", "square", "--method", "generator",
                "--steps", "3", "--out", str(tmp_path / "inpaint_g"), "--device", "cuda") == 0
    assert debm("interpolate", "--run-dir", str(run), "--rows", "2", "--midpoints", "3",
                "--out", str(tmp_path / "interp.png"), "--device", "cuda") == 0
    report = tmp_path / "eval.json"
    assert debm("evaluate", "--run-dir", str(run), "--num", "64", "--classifier-epochs", "1", "--kid-subsets", "5",
                "--no-mlflow", "--device", "cuda", "--cache-dir", str(tmp_path / "cache"), "--out", str(report)) == 0
    assert np.isfinite(json.loads(report.read_text())["scores"]["fid"])


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed on this GPU host")
def test_ray_train_one_gpu_worker(tmp_path):
    config, overrides = PRESETS["wgcn"]
    sets = [a for kv in [*TINY, *overrides] for a in ("--set", kv)]
    assert debm("train", "--config", str(ROOT / config), "--workers", "1", "--gpus-per-worker", "1", "--no-mlflow",
                "--run-dir", str(tmp_path / "run"), *sets) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")


@pytest.mark.parametrize("option,tolerance", [({"autocast": "bf16"}, 2e-2), ({"channels_last": True}, 1e-4),
                                              ({"compile": True}, 1e-4)])
def test_langevin_speed_options_match_the_plain_path_on_cuda(option, tolerance):
    from distributed_ebm.config import ModelConfig
    from distributed_ebm.energy import build_energy
    from distributed_ebm.langevin import langevin

    device = torch.device("cuda")
    energy = build_energy(ModelConfig(channels=(16, 32)), (3, 32, 32), "conv").to(device)
    with torch.no_grad():
        for p in energy.parameters():
            p.normal_(0, 0.05)
    x0 = torch.rand(32, 3, 32, 32, device=device) * 2 - 1
    knobs = dict(steps=10, step_size=0.2, ref_sigma=1.0, clamp=(-1.0, 1.0))
    plain = langevin(energy, x0, generator=torch.Generator(device=device).manual_seed(0), **knobs)
    fast = langevin(energy, x0, generator=torch.Generator(device=device).manual_seed(0), **knobs, **option)
    assert (fast - plain).abs().max().item() <= tolerance
    assert not torch.equal(plain, x0)


def test_langevin_loop_has_no_host_sync_on_cuda():
    from distributed_ebm.config import ModelConfig
    from distributed_ebm.energy import build_energy
    from distributed_ebm.langevin import langevin

    device = torch.device("cuda")
    energy = build_energy(ModelConfig(channels=(16, 32)), (1, 28, 28), "conv").to(device)
    x0 = torch.zeros(16, 1, 28, 28, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    knobs = dict(steps=5, step_size=0.2, ref_sigma=1.0, clamp=(-1.0, 1.0), generator=gen)
    langevin(energy, x0, **knobs)  # warm-up: cuDNN set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        langevin(energy, x0, **knobs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("preset", ["wgcn", "ggcn", "mgcn"])
def test_training_loop_syncs_once_per_log_every_on_cuda(tmp_path, preset):
    """CUDA's own sync detector (set_sync_debug_mode "warn"): 20 more iterations at log_every 10
    cost at most 2 more synchronising calls (the flushes), as the CPU counter in test_train.py says."""
    import warnings

    from distributed_ebm.config import load_config
    from distributed_ebm.train_loop import train as train_loop

    config_path, overrides = PRESETS[preset]
    sets = dict(kv.split("=", 1) for kv in [*TINY, *overrides])
    base = {k: json.loads(v) for k, v in sets.items()}
    counts, places = {}, {}
    for iterations in (10, 30):
        config = load_config(ROOT / config_path, {**base, "train.iterations": iterations, "train.log_every": 10,
                                                  "train.checkpoint_every": 1000, "train.sample_every": 1000,
                                                  "train.device": "cuda", "tracking.enabled": False})
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_loop(config, tmp_path / f"run-{iterations}", progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts[iterations] = len(syncs)
        places[iterations] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    assert counts[30] - counts[10] <= 2, (counts, places)
