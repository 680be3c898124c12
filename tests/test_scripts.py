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
