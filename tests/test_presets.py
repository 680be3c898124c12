"""Every shipped preset resolves (--dry-run) and trains a few iterations at reduced size on
small data that the test makes itself: 28×28 grey digits for the MNIST presets, tiny 32×32 RGB
shards for the CIFAR-10 ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_ebm.cli import main
from distributed_ebm.langevin import cpu_has_native_bf16

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"train.iterations": 3, "train.data_batch_size": 8, "chains.bank_size": 8, "chains.batch_size": 8,
         "langevin.langevin_steps": 2, "langevin.sample_steps": 2, "train.checkpoint_every": 3,
         "train.sample_every": 3, "tracking.enabled": False, "generator.latent_bank_size": 8,
         "generator.base_width": 4}


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory) -> Path:
    """scikit-learn's digits up-sampled to 28×28, in MNIST's .npz layout."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.nn.functional.interpolate(torch.from_numpy(digits.images[:, None] / 16.0).float(), size=28,
                                        mode="bilinear", align_corners=False)
    x = (x[:, 0].clamp(0, 1) * 255).to(torch.uint8).numpy()
    path = tmp_path_factory.mktemp("mnist") / "mnist.npz"
    np.savez(path, x_train=x[:1500], y_train=digits.target[:1500], x_test=x[1500:], y_test=digits.target[1500:])
    return path


@pytest.mark.parametrize("preset", ["mnist_ggcn", "mnist_ggcn_cond", "mnist_wgcn", "mnist_mgcn"])
def test_mnist_presets_train_a_few_iterations(tmp_path, mnist_like, preset):
    run = tmp_path / preset
    small = {**SMALL, "model.channels": [4, 8], "data.path": str(mnist_like)}
    if preset == "mnist_mgcn":
        small.pop("chains.bank_size")
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--workers", "0", "--run-dir", str(run),
                 *_sets(small)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["data"] == "mnist"
    assert (run / "checkpoints").is_dir()
    # langevin.autocast: auto, resolved on this CPU (bf16 where it has bfloat16 in hardware)
    assert summary["langevin_precision"] == ("bf16" if cpu_has_native_bf16() else "float32")


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_resolves(preset, capsys):
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run",
                 "--set", "data.path=/data/x.npz", "--set", "data.urls=/data/shard-{000000..000001}.tar"]) == 0
    assert "name:" in capsys.readouterr().out


def _tiny_rgb_shards(folder: Path, side: int, count: int = 48) -> str:
    """Two shards of smooth random side×side RGB PNGs with 10 classes; their brace URL."""
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(side)
    for s in range(2):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as writer:
            for i in range(count // 2):
                array = rng.integers(0, 255, (side // 4, side // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                writer.write({"__key__": f"{s}{i:05d}", "png": buffer.getvalue(), "cls": str(i % 10).encode()})
    return str(folder / "shard-{000000..000001}.tar")


PAPER_PRESETS = {  # preset: image side of its data
    "cifar10_ggcn_ams_paper": 32, "cifar10_ggcn_cond_paper": 32, "cifar10_ggcn": 32,
    "lsun_bedroom64_ggcn": 64, "imagenet64_ggcn": 64,
}


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_paper_workload_presets_train_a_few_iterations_from_shards(tmp_path, preset):
    urls = _tiny_rgb_shards(tmp_path / "shards", PAPER_PRESETS[preset])
    small = {**SMALL, "model.channels": [4, 8], "generator.latent_dim": 8, "data.urls": urls,
             "data.loader_workers": 1, "data.shuffle_buffer": 8, "data.epoch_batches": 2, "data.num_classes": 10,
             "data.mean_samples": 16}
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--workers", "0", "--run-dir", str(run),
                 *_sets(small)]) == 0
    assert json.loads((run / "summary.json").read_text())["iterations"] == 3


def test_faces_inpainting_preset_trains_and_inpaints_from_a_folder(tmp_path):
    from PIL import Image

    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(faces / f"{i:03d}.png")
    run = tmp_path / "run"
    small = {**SMALL, "model.channels": [4, 8], "generator.latent_dim": 8, "data.path": str(faces)}
    assert main(["train", "--config", str(CONFIGS / "celeba64_ggcn_ams_inpaint.yaml"), "--workers", "0",
                 "--run-dir", str(run), *_sets(small)]) == 0
    assert main(["inpaint", "--run-dir", str(run), "--method", "generator", "--mask", "square", "--num", "4",
                 "--steps", "2", "--out", str(tmp_path / "inpaint")]) == 0
