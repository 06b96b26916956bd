"""The ``flexmoe`` command. Each subcommand lives in its own module, imported only when it runs.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``; its one-line help
is kept here, so ``flexmoe --help`` imports neither torch nor any subcommand (it starts in a
fraction of a second).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
_SUBCOMMANDS = {
    "train": ("flexmoe.train.cli",
              "Train a GPT-MoE on text (default: this Python's standard library source) with checkpoints "
              "and metrics."),
    "plot": ("flexmoe.train.plot_cli",
             "Plot a training run: loss curves, expert-load balance, per-layer expert-load heatmap (PNG files)."),
    "simulate": ("flexmoe.sim.cli",
                 "Replay a routing trace under placement planners and compare modelled step time."),
}


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its first positional argument), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in _SUBCOMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` (all of them when ``argv`` is None) is imported."""
    parser = argparse.ArgumentParser(prog="flexmoe", description="Train and study Mixture-of-Experts models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen(argv) if argv is not None else None
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
