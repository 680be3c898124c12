"""benchmarks/quality.py end to end on a tiny budget: presets and the peer, one table and curve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _digits_npz(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * 255 / 16).astype(np.uint8)
    np.savez(path, x_train=x[:1200], y_train=digits.target[:1200], x_test=x[1200:], y_test=digits.target[1200:])
    return path


def test_quality_benchmark_trains_scores_and_compares(tmp_path):
    from benchmarks.quality import main

    data = _digits_npz(tmp_path / "digits.npz")
    tiny = ["chains.bank_size=16", "chains.batch_size=16", "train.data_batch_size=16", "langevin.langevin_steps=3",
            "langevin.sample_steps=5", "model.channels=[8,16]"]
    peer = ["buffer_size=256", "batch_size=32", "langevin_steps=3", "sample_steps=5"]
    out = tmp_path / "out"
    # a preset trains its own length (here 4 iterations, well inside the budget even on a loaded machine) or the budget
    preset = tmp_path / "digits_wgcn_cond.yaml"
    preset.write_text((ROOT / "configs/digits_wgcn_cond.yaml").read_text().replace("iterations: 300", "iterations: 4"))
    assert main(["--budget-s", "6", "--data", str(data), "--presets", str(preset),
                 "--num", "60", "--curve-num", "30", "--curve-points", "2", "--checkpoint-every", "2",
                 "--classifier-epochs", "1", "--classifier-images", "600", "--kid-subsets", "3",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet",
                 "--steps-scales", "1,2", "--steps-num", "60",
                 *[a for kv in tiny for a in ("--set", kv)], *[a for kv in peer for a in ("--peer-set", kv)]]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["results"]]
    assert names == ["digits_wgcn_cond", "peer (replay-buffer EBM)"]
    for r in results["results"]:
        assert r["final"]["num"] == 60 and np.isfinite(r["final"]["fid"])
        assert 1 <= len(r["curve"]) <= 2
        assert all(c["wall_s"] <= 6.5 for c in r["curve"][:-1])
    assert results["results"][0]["final"]["iterations"] == 4 and results["results"][1]["iterations"] > 0
    # a conditional preset is scored for the class it was asked for; the unconditional peer is not
    agreement = results["results"][0]["final"]["label_agreement"]
    assert 0.0 <= agreement <= 1.0 and results["results"][1]["final"]["label_agreement"] is None
    floor = results["real_vs_real"]["fid"]
    assert floor < min(r["final"]["fid"] for r in results["results"])  # tiny runs stay far from real data
    table = (out / "table.md").read_text()
    assert "real vs real (floor)" in table and "× the peer's" in table and "feature network: SmallClassifier" in table
    assert f"| {agreement:.3f} |" in table
    assert (out / "curve.png").is_file() and (out / "samples-digits_wgcn_cond.png").is_file()
    assert (out / "samples-peer.png").is_file()
    # longer chains: the final model again at its own steps (5; the peer's 5) and twice as many
    for r in results["results"]:
        assert [(c["scale"], c["steps"]) for c in r["longer_chains"]] == [(1.0, 5), (2.0, 10)]
        same, longer = r["longer_chains"]
        assert same["fid"] == r["final"]["fid"]  # 1× with the same seed and number is the final score itself
        assert longer["fid"] != same["fid"] and 0 < longer["max_class_share"] <= 1
    assert "Longer chains" in table and "| digits_wgcn_cond | 10 | 2 |" in table and "| peer (replay-buffer EBM) | 10 | 2 |" in table


def test_quality_benchmark_refuses_a_bad_steps_scale(tmp_path):
    import pytest

    from benchmarks.quality import main

    for bad in ("1,0", "1,x"):
        with pytest.raises(SystemExit, match="every scale must be > 0"):
            main(["--budget-s", "1", "--data", str(tmp_path / "none.npz"), "--steps-scales", bad, "--out", str(tmp_path)])


def test_ema_pairs_scores_live_and_averaged_networks_on_the_same_checkpoints(tmp_path, capsys):
    import pytest

    from benchmarks.ema_pairs import main
    from distributed_ebm.config import load_config
    from distributed_ebm.train_loop import train

    data = _digits_npz(tmp_path / "digits.npz")
    run_dir = tmp_path / "run"
    config = load_config(ROOT / "configs" / "digits_ggcn.yaml", {
        "data.source": "npz", "data.path": str(data), "train.iterations": 4, "train.checkpoint_every": 2,
        "train.sample_every": 4, "train.data_batch_size": 16, "train.ema_decay": 0.5, "train.ema_models": ["energy"],
        "langevin.langevin_steps": 2, "model.channels": [4, 8], "generator.latent_bank_size": 16, "chains.batch_size": 16,
        "tracking.enabled": False,
    })
    train(config, run_dir, progress=False)
    common = ["--data", str(data), "--num", "40", "--steps", "2", "--classifier-epochs", "1",
              "--classifier-images", "600", "--kid-subsets", "3", "--cache-dir", str(tmp_path / "cache")]
    main([str(run_dir), "--checkpoints", "2,4", "--mixes", "live,energy,all", *common])
    out = capsys.readouterr().out
    assert "feature network: SmallClassifier" in out and "| 4 | energy |" in out
    rows = {(r["iteration"], r["mix"]): r for r in json.loads(out.strip().splitlines()[-1])}
    assert sorted(rows) == [(2, "all"), (2, "energy"), (2, "live"), (4, "all"), (4, "energy"), (4, "live")]
    for it in (2, 4):
        assert rows[it, "energy"]["fid"] == rows[it, "all"]["fid"]  # the run averages the energy only
        assert rows[it, "energy"]["fid"] != rows[it, "live"]["fid"]  # same seed, other weights
    with pytest.raises(SystemExit, match=r"no EMA of \['generator'\]"):
        main([str(run_dir), "--checkpoints", "4", "--mixes", "generator", *common])
    with pytest.raises(SystemExit, match=r"no checkpoint of iteration 3 on its final trajectory; it has \[2, 4\]"):
        main([str(run_dir), "--checkpoints", "3", *common])
