"""The `debm` command: parse, build a config, call the library. Nothing else lives here.

One module per subcommand, each with `add_parser(subparsers) -> ArgumentParser` and
`run(args) -> int`; COMMANDS lists them in the order `debm --help` shows them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..config import ConfigError
from ..tracking import quiet_mlflow
from . import evaluate, inpaint, interpolate, sample, serve, shards, train, tune

COMMANDS = (train, sample, inpaint, shards, interpolate, evaluate, serve, tune)  # as `debm --help` lists them


def build_parser() -> argparse.ArgumentParser:
    """The `debm` parser: every subcommand's, each dispatching to its module's `run`."""
    parser = argparse.ArgumentParser(prog="debm", description="Train and use FRAME-family energy-based models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"debm {__version__} (distributed_ebm)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `debm` with `argv` (default: the command line); return the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # e.g. for a resume command line
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_mlflow(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"debm: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from ..train_loop import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"debm: error: {err}", file=sys.stderr)
            return 1
        raise
