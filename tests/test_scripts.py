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
