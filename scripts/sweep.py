"""Run a grid of short trainings one after another and print a Markdown table of the outcomes.

Used to pick the shipped defaults and to reproduce the GGCN paper's Fig. 4 stability grid, e.g.

    .venv/bin/python scripts/sweep.py --config configs/digits_wgcn.yaml \\
        --grid model.algorithm=gcn,wgcn optim.lr=1e-3,3e-3,5e-3,1e-2 langevin.step_size=0.1,0.4 \\
        --set train.iterations=300 --out docs/stability_grid.md

Runs go one at a time: on a 2-core machine parallel torch processes slow each other down ~10×.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
from pathlib import Path

import yaml
from tables import emit_table

from distributed_ebm.config import load_config, parse_overrides
from distributed_ebm.metrics.collapse import excess_saturation
from distributed_ebm.train_loop import TrainingDiverged, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="dotted key and its values")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fixed overrides for every run")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--runs", help="keep run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)

    axes = []
    for item in args.grid:
        key, values = item.split("=", 1)
        axes.append([(key, yaml.safe_load(v)) for v in values.split(",")])
    fixed = parse_overrides(args.set)
    root = Path(args.runs or tempfile.mkdtemp(prefix="debm-sweep-"))
    keys = [axis[0][0] for axis in axes]
    header = keys + ["status", "collapse", "recoveries", "final R (mean of last 10)", "excess saturation",
                     "iterations", "wall s"]
    rows = []
    for combo in itertools.product(*axes):
        overrides = {"tracking.enabled": False, **fixed, **dict(combo)}
        config = load_config(args.config, overrides)
        name = "-".join(f"{k.split('.')[-1]}={v}" for k, v in combo)
        run_dir = root / name
        try:
            summary = train(config, run_dir, progress=False)
        except TrainingDiverged:
            summary = json.loads((run_dir / "summary.json").read_text())
        final = summary["final"]
        collapse = summary["collapse"]
        rows.append(
            [str(v) for _, v in combo]
            + [
                summary["status"],
                "no" if collapse is None else f"{collapse['reason']} @ {collapse['iteration']}",
                ", ".join(f"{r['reason']} @ {r['iteration']}" for r in summary.get("recoveries", [])) or "none",
                f"{summary['final_response_distance']:.4f}" if summary["final_response_distance"] is not None else "nan",
                f"{excess_saturation(final.get('chain_saturation', math.nan), final.get('data_saturation', 0.0)):+.2f}",
                str(summary["iterations"]),
                f"{summary['wall_time_s']:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    emit_table(header, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
