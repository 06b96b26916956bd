"""``flexmoe train``: train a GPT-MoE on real text (the Python standard library by default).

Every field of ModelConfig, DTSGateConfig (as --dts-*) and TrainConfig is an option, its help the
field's docstring entry; options left out come from the preset (or, with --resume, from the
checkpoint's run).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing

from ..config import DTSGateConfig
from ..models.gpt import ModelConfig
from .config import PRESETS, TrainConfig

_SKIP = {ModelConfig: {"vocab_size", "dts"}, DTSGateConfig: set(), TrainConfig: set()}
# --help text where the command line needs other words than the field's docstring entry
_CLI_HELP = {
    (TrainConfig, "data"):
        "a text file or folder of text files, or 'site-packages' (every installed package's .py files, "
        "deduplicated by content; ~250 MB) (default: this Python's standard library .py files)",
    (DTSGateConfig, "sparse_step"):
        "gate step from which the DTS gate is plain top-k (default: --dts-anneal-steps)",
    (DTSGateConfig, "top_k"): "experts per token once the DTS gate is sparse (default: --top-k)",
    (ModelConfig, "top_k"): "experts per token (with --router dts: once the gate is sparse, unless --dts-top-k)",
}
_ENTRY = re.compile(r"^ {4}((?:\w+, )*\w+): (.*)$")


def _field_docs(cls) -> dict[str, str]:
    """``{field: meaning}`` from ``cls``'s docstring entries ``name[, name...]: meaning`` (4-space
    indented, continued on more deeply indented lines); one source for the docs and ``--help``."""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in (cls.__doc__ or "").splitlines():
        match = _ENTRY.match(line)
        if match:
            names = match.group(1).split(", ")
            for name in names:
                docs[name] = match.group(2).strip()
        elif names and line.startswith(" " * 8) and line.strip():
            for name in names:
                docs[name] += " " + line.strip()
        else:
            names = []
    return docs


def _default_text(cls, name: str, default) -> str:
    """What a run gets when the option is left out: the preset's value (the default preset's shown),
    else the field's default."""

    def preset_values(preset):
        return preset.model if cls is ModelConfig else preset.train if cls is TrainConfig else {}

    value = preset_values(PRESETS["tiny"]).get(name, default)
    shown = "not set" if value is None else value
    if any(name in preset_values(p) for p in PRESETS.values()):
        return f"(default: the preset's; tiny: {shown})"
    return f"(default: {shown})"


def _option_type(hint):
    """argparse (type, choices, is_bool) for a dataclass field type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, list(typing.get_args(hint)), False
    if args and typing.get_origin(hint) is not typing.Literal:
        return _option_type(args[0])
    if hint is bool:
        return None, None, True
    return hint, None, False


def _add_fields(group, cls, prefix: str, dest_prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in _SKIP[cls]:
            continue
        flag = "--" + prefix + field.name.replace("_", "-")
        kind, choices, is_bool = _option_type(hints[field.name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = _CLI_HELP.get((cls, field.name)) or docs.get(field.name, f"{cls.__name__}.{field.name}")
        if "(default:" not in help_text:
            help_text = f"{help_text.rstrip('.')} {_default_text(cls, field.name, default)}"
        help_text = help_text.replace("``", "").replace("%", "%%")
        dest = dest_prefix + field.name
        if is_bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None,
                               metavar=None if choices else field.name.upper(), help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help=f"starting point (default: %(default)s): {presets}")
    parser.add_argument("--run-dir", help="output folder (default: runs/<preset>-<date>-<time>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                        help="continue the run in --run-dir from its newest checkpoint, or from PATH "
                             "(a run folder or one checkpoint folder) (default: start a new run)")
    parser.add_argument("--override", metavar="OPTIONS",
                        help="with --resume: the options that may differ from the resumed run's, comma-separated "
                             "as on the command line (e.g. --override steps,lr); each change is recorded in "
                             "config.json. Without it a changed option is refused; model and data options "
                             "(shape, top-k, seq-len, tokenizer, data, seed) can never change (default: none)")
    parser.add_argument("--init-from-dense", metavar="CKPT",
                        help="expert-diversify: spawn every MoE block's experts from this dense model "
                             "checkpoint (num_experts=1, e.g. a run of --preset tiny-dense) "
                             "(default: none, random init)")
    parser.add_argument("--diversify-noise", type=float, default=0.1,
                        help="per-expert Gaussian perturbation, relative to each weight's std (default: %(default)s)")
    parser.add_argument("--diversify-mask", type=float, default=0.0,
                        help="fraction of each expert's weights set to zero, drawn per expert (EvoMoE's random "
                             "masking; 0 with --diversify-noise 0 is upcycling) (default: %(default)s)")
    parser.add_argument("--dense-phase-steps", type=int, metavar="N",
                        help="the whole EvoMoE path: train the dense model for N steps in RUN/dense, spawn the "
                             "experts from it (--diversify-*), then train this MoE model for --steps steps "
                             "(default: no dense stage)")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="stop after this step with a checkpoint, as if killed; --resume continues "
                             "(default: run to --steps)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or validation lines (default: show them)")
    parser.epilog = ("Options left out take the preset's value, else the field's default, as shown; with --resume "
                     "they keep the run's saved value.")
    _add_fields(parser.add_argument_group("model (ModelConfig)"), ModelConfig, "", "model.")
    _add_fields(parser.add_argument_group("DTS gate (DTSGateConfig, with --router dts)"), DTSGateConfig,
                "dts-", "dts.")
    _add_fields(parser.add_argument_group("training (TrainConfig)"), TrainConfig, "", "train.")


def options_from_args(args: argparse.Namespace):
    from .session import RunOptions

    groups = {"model.": {}, "dts.": {}, "train.": {}}
    for key, value in vars(args).items():
        for prefix, bucket in groups.items():
            if key.startswith(prefix) and value is not None:
                bucket[key[len(prefix):]] = value
    return RunOptions(
        preset=args.preset, run_dir=args.run_dir, resume=args.resume, init_from_dense=args.init_from_dense,
        diversify_noise=args.diversify_noise, diversify_mask=args.diversify_mask,
        stop_at=args.stop_at, override=args.override, progress=not args.quiet,
        model_overrides=groups["model."], dts_overrides=groups["dts."], train_overrides=groups["train."],
    )


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import shown
    from .guard import DivergenceError
    from .session import execute, prepare, setup_distributed, summary_line

    try:
        info = setup_distributed()
        options = options_from_args(args)
        if args.dense_phase_steps is not None:
            from .evomoe import plan_stages

            options, dense = plan_stages(options, args.dense_phase_steps)
            if dense is not None:
                dense_summary = execute(prepare(dense, info))
                if info.is_main:
                    shown(print, summary_line(dense_summary))
        prep = prepare(options, info)
    except (DataError, CheckpointError, ValueError) as err:
        shown(print, f"flexmoe train: error: {err}", file=sys.stderr)
        return 2
    if info.is_main and not args.quiet:
        total, active = prep.trainer.model.num_parameters()
        start = f"resuming {prep.resumed_from} at step {prep.trainer.step}" if prep.resumed_from else "new run"
        shown(print, f"flexmoe train: {start} -> {prep.run_dir} | {prep.corpus.root}: "
                     f"{len(prep.corpus.train_docs)} train / {len(prep.corpus.val_docs)} val files, "
                     f"{len(prep.train_tokens) / 1e6:.2f}M train tokens ({prep.train_cfg.tokenizer}) | "
                     f"{total / 1e6:.2f}M params ({active / 1e6:.2f}M active) on {prep.device}", file=sys.stderr)
    try:
        summary = execute(prep)
    except (DivergenceError, CheckpointError) as err:
        if info.is_main:
            shown(print, f"flexmoe train: error: {err}", file=sys.stderr)
        return 2
    if info.is_main:
        shown(print, summary_line(summary))
    return 0
