"""The result scripts run end to end on tiny settings (their real runs are in docs/)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_sweep_writes_a_table_with_a_row_per_combination(tmp_path):
    out = tmp_path / "grid.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config", str(ROOT / "configs" / "digits_wgcn.yaml"),
         "--grid", "model.algorithm=gcn,wgcn", "langevin.step_size=0.2", "--set", "train.iterations=3",
         "model.channels=[4]", "chains.bank_size=8", "chains.batch_size=8", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| model.algorithm | langevin.step_size | status")
    assert len(lines) == 4 and lines[2].startswith("| gcn | 0.2 | completed") and lines[3].startswith("| wgcn")


def test_the_package_has_no_import_cycle_and_no_module_over_600_lines():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no import cycles" in done.stdout


def test_grey28_sets_are_28x28_grey_npz_files_the_presets_read(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import grey28_sets

    from distributed_ebm.config import DataConfig
    from distributed_ebm.data import load_dataset

    assert grey28_sets.main(["--out", str(tmp_path), "--sets", "digits28,faces28,strokes28"]) == 0
    for name, classes in (("digits28", 10), ("faces28", 2), ("strokes28", 3)):
        train = load_dataset(DataConfig(source="npz", path=str(tmp_path / f"{name}.npz")))
        test = load_dataset(DataConfig(source="npz", path=str(tmp_path / f"{name}.npz"), split="test"))
        assert train.x.shape[1:] == test.x.shape[1:] == (1, 28, 28)
        assert -1.0 <= float(train.x.min()) < float(train.x.max()) <= 1.0  # scaled to the data range, not blank
        assert train.num_classes == classes and len(test) < len(train)


def test_preset_memory_benchmark_reports_each_preset_on_the_cpu(tmp_path):
    """benchmarks/preset_memory.py trains a paper preset (shrunk) on synthetic images of its size in
    a child process and reports its chains per worker and a positive peak memory, labelled as a CPU
    estimate; a preset that fails is a row with its error, not a crash."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    shrink = ["model.channels=[8,16]", "generator.base_width=8", "generator.latent_bank_size=8",
              "chains.batch_size=4", "train.data_batch_size=4", "langevin.langevin_steps=2"]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "preset_memory.py"), "--device", "cpu", "--iterations", "3",
         "--warmup", "1", "--presets", "configs/cifar10_ggcn_cond_paper.yaml,configs/missing.yaml",
         "--json", str(out), *[a for kv in shrink for a in ("--set", kv)]],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    good, missing = json.loads(out.read_text())
    assert good["algorithm"] == "ggcn" and good["image_size"] == 32 and good["chains_per_worker"] == 4
    assert good["peak_mib"] > 0 and good["memory"].startswith("CPU estimate") and good["s_per_iteration"] > 0
    assert "error" in missing
    assert "| cifar10_ggcn_cond_paper | ggcn | 32² | 4 | 2 | 8-16 |" in done.stdout


def test_image_tar_npz_converts_class_folders_and_skips_a_corrupt_file(tmp_path):
    """scripts/image_tar_npz.py: train/<class>/ and test/<class>/ images become the .npz the npz
    source reads, labelled by sorted class name, pixels intact; an undecodable file is counted."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from distributed_ebm.config import DataConfig
    from distributed_ebm.data import load_dataset
    from scripts.image_tar_npz import convert

    tar_path, rng = tmp_path / "images.tar", np.random.default_rng(0)
    pixels = {}
    with tarfile.open(tar_path, "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for split, count in (("train", 3), ("test", 2)):
            for cls in ("cat", "airplane"):
                for i in range(count):
                    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    add(f"{split}/{cls}/{i:04d}.png", buffer.getvalue())
                    pixels[(split, cls, image.tobytes())] = True
        add("train/cat/broken.png", b"not an image")
    done = convert(tar_path, tmp_path / "out.npz")
    assert done == {"train": 6, "test": 4, "classes": ["airplane", "cat"], "skipped": 1}
    data = np.load(tmp_path / "out.npz")
    assert data["x_train"].shape == (6, 8, 8, 3) and data["x_test"].shape == (4, 8, 8, 3)
    for split in ("train", "test"):
        for image, label in zip(data[f"x_{split}"], data[f"y_{split}"]):
            assert (split, ["airplane", "cat"][label], image.tobytes()) in pixels  # label follows its image
    loaded = load_dataset(DataConfig(source="npz", path=str(tmp_path / "out.npz")))
    assert tuple(loaded.x.shape) == (6, 3, 8, 8) and loaded.num_classes == 2
