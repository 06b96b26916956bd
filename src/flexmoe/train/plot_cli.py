"""``flexmoe plot RUN_DIR``: PNG plots of a ``flexmoe train`` run (matplotlib, no display needed)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by flexmoe train")
    parser.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from .plot import PlotError, plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except (PlotError, ValueError) as err:
        print(f"flexmoe plot: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
