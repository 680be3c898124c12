"""The collapse definition fires on each condition, after warm-up and patience, and not otherwise."""

import math

from distributed_ebm.config import CollapseConfig
from distributed_ebm.metrics import CollapseDetector


def _row(r=0.1, gap=1.0, chain_sat=0.5, data_sat=0.5, nonfinite=0.0, phi_data=50.0, phi_chains=-50.0):
    return {"response_distance": r, "energy_gap_z": gap, "chain_saturation": chain_sat,
            "data_saturation": data_sat, "nonfinite": nonfinite, "phi_data": phi_data, "phi_chains": phi_chains}


def _run(rows, energy_l2=0.0, **config):
    detector = CollapseDetector(CollapseConfig(warmup=5, patience=3, ema=0.5, **config), energy_l2=energy_l2)
    return [detector.update(i + 1, row) for i, row in enumerate(rows)], detector


def test_stable_run_never_collapses():
    out, detector = _run([_row(r=0.1 + 0.01 * math.sin(i)) for i in range(100)])
    assert not any(o["collapse"] for o in out) and detector.first is None


def test_diverging_r_collapses_after_patience():
    rows = [_row(r=0.1)] * 20 + [_row(r=0.1 * 2 ** k) for k in range(1, 10)]
    out, detector = _run(rows, r_ratio_max=5.0)
    assert detector.first["reason"] == "r_diverged"
    assert 20 < detector.first["iteration"] <= 29
    assert out[detector.first["iteration"] - 1]["collapse_r_ratio"] > 5.0


def test_energy_gap_and_saturation_and_nonfinite():
    _, det = _run([_row()] * 10 + [_row(gap=500.0)] * 10, energy_gap_max=50.0)
    assert det.first["reason"] == "energy_diverged"
    _, det = _run([_row(chain_sat=0.7, data_sat=0.6)] * 3)  # pushed 0.1 of the free 0.4: 0.25
    assert det.first is None
    _, det = _run([_row(chain_sat=0.95, data_sat=0.6)] * 3)
    assert det.first == {"iteration": 3, "reason": "saturated"}
    out, det = _run([_row(), _row(r=float("nan"))])
    assert det.first == {"iteration": 2, "reason": "nonfinite"} and out[1]["collapse_reason"] == "nonfinite"


def test_warmup_ignores_early_divergence_and_state_round_trips():
    rows = [_row(r=10.0 / (i + 1), gap=100.0) for i in range(4)]
    out, det = _run(rows, energy_gap_max=50.0)
    assert det.first is None
    clone = CollapseDetector(det.config)
    clone.load_state_dict(det.state_dict())
    assert clone.update(5, _row()) == det.update(5, _row())


def test_healthy_only_while_no_condition_is_building():
    """A recovery returns only to a state saved while every condition's streak was zero."""
    detector = CollapseDetector(CollapseConfig(warmup=5, patience=3, ema=0.5))
    assert detector.healthy
    detector.update(1, _row(chain_sat=0.95, data_sat=0.6))  # saturated, for 1 < patience iterations
    assert not detector.healthy and detector.first is None
    detector.update(2, _row())
    assert detector.healthy


def test_energy_pinned_at_the_penalty_equilibrium():
    """With α = 1e-4 the penalty allows a gap of at most 1/α = 10⁴ (Φ = ±1/(2α) = ±5000): a run
    sitting there (mnist_ggcn at δ 0.2: α·gap 0.99 from ~140 iterations on, while the gap in data-Φ
    stds read 20-28, under energy_gap_max 50) is caught once it has held energy_pinned_patience
    iterations; a healthy gap of 10², a shorter excursion (the early phase reaches 0.6-0.7 for a
    few iterations) and a run without the penalty are not."""
    pinned = _row(gap=30.0, phi_data=5000.0, phi_chains=-4990.0)
    healthy = [_row(phi_data=60.0 + i, phi_chains=-40.0) for i in range(10)]
    out, det = _run(healthy + [pinned] * 40, energy_l2=1e-4, energy_pinned_patience=25)
    assert det.first["reason"] == "energy_pinned" and 10 + 25 <= det.first["iteration"] <= 10 + 27
    assert out[9]["collapse_energy_pinned"] < 0.05 < 0.8 < out[det.first["iteration"] - 1]["collapse_energy_pinned"]
    assert _run(healthy * 5, energy_l2=1e-4)[1].first is None
    assert _run(healthy + [pinned] * 20 + healthy * 2, energy_l2=1e-4, energy_pinned_patience=25)[1].first is None
    assert _run(healthy + [pinned] * 40)[1].first is None  # α = 0: energy_diverged (50 stds) alone, not reached
    early = _row(gap=30.0, phi_data=3500.0, phi_chains=-3500.0)  # 0.7 of 1/α
    assert _run(healthy + [early] * 40, energy_l2=1e-4)[1].first is None  # against the default 0.8
    _, det = _run(healthy + [early] * 40, energy_l2=1e-4, energy_pinned_max=0.6, energy_pinned_patience=25)
    assert det.first["reason"] == "energy_pinned"


def test_a_detector_state_from_before_energy_pinned_loads():
    """Checkpoints written before the energy_pinned condition have no streak or average for it."""
    _, det = _run([_row()] * 8, energy_l2=1e-4)
    old = det.state_dict()
    del old["pinned_ema"], old["streaks"]["energy_pinned"]
    clone = CollapseDetector(det.config, energy_l2=1e-4)
    clone.load_state_dict(old)
    assert clone.healthy and clone.update(9, _row())["collapse"] == 0.0


def _grids(row, **grids):
    """A multi-grid model's row: the finest grid's values under the plain names (`row`), each other
    grid's under grid{size}_ (`grids`: size -> overrides of _row's keyword arguments)."""
    names = {"gap": "energy_gap_z", "chain_sat": "chain_saturation", "data_sat": "data_saturation",
             "phi_data": "phi_data", "phi_chains": "phi_chains"}
    out = dict(row)
    for size, values in grids.items():
        full = {**dict(gap=1.0, chain_sat=0.5, data_sat=0.5, phi_data=50.0, phi_chains=-50.0), **values}
        out.update({f"grid{size.removeprefix('g')}_{names[k]}": v for k, v in full.items()})
    return out


def test_multigrid_checks_read_the_worst_grid():
    """MGCN on digits28: the 14×14 grid's Φ ran away (its gap in data-Φ stds huge by iteration 59)
    while the finest grid's looked fine until 114. Each check reads the worst grid; a calm model's
    grid rows fire nothing, and keys that are not a grid's (grid_x_…) are not read."""
    calm = _grids(_row(), g7={}, g14={})
    assert _run([calm] * 40)[1].first is None
    _, det = _run([calm] * 10 + [_grids(_row(), g7={}, g14={"gap": 500.0})] * 10, energy_gap_max=50.0)
    assert det.first["reason"] == "energy_diverged" and 11 < det.first["iteration"] <= 15
    _, det = _run([calm] * 10 + [_grids(_row(), g7={"chain_sat": 0.95, "data_sat": 0.0}, g14={})] * 3)
    assert det.first == {"iteration": 13, "reason": "saturated"}
    out, det = _run([calm] * 10 + [_grids(_row(), g14={"phi_data": 5000.0, "phi_chains": -4990.0})] * 40,
                    energy_l2=1e-4, energy_pinned_patience=25)
    assert det.first["reason"] == "energy_pinned" and out[det.first["iteration"] - 1]["collapse_energy_pinned"] > 0.8
    stray = {**calm, "grid_x_energy_gap_z": 500.0, "gridsaturated_chain_saturation": 1.0}
    assert _run([stray] * 20, energy_gap_max=50.0)[1].first is None
