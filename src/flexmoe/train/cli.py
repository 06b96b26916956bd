"""``flexmoe train``: train a GPT-MoE on real text (the Python standard library by default).

Every field of ModelConfig, DTSGateConfig (as --dts-*) and TrainConfig is an option; options
left out come from the preset (or, with --resume, from the checkpoint's run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..config import DTSGateConfig
from ..models.gpt import ModelConfig
from .config import PRESETS, TrainConfig

HELP = "Train a GPT-MoE on text (default: this Python's standard library source) with checkpoints and metrics."

_SKIP = {ModelConfig: {"vocab_size", "dts"}, DTSGateConfig: set(), TrainConfig: set()}
_HELP = {
    "num_experts": "routed experts per MoE block (1 = dense model)",
    "moe_every": "MoE FFN in every n-th block (1 = all), dense FFN elsewhere",
    "router": "top-k gate 'softmax' or 'sigmoid', or 'dts' (EvoMoE dense-to-sparse gate)",
    "bias_update_rate": "auxiliary-loss-free balancing (DeepSeek-V3) bias step; 0 = off",
    "data": "a text file or folder of text files, or 'site-packages' (every installed package's .py "
            "files, deduplicated; ~250 MB) (default: the Python standard library's .py files)",
    "tokenizer": "'byte' (256 byte values) or 'bpe' (trained on the training split)",
    "precision": "'fp32', or 'bf16' autocast on CUDA (float32 master weights; MoE experts run in bf16, router in fp32)",
    "steps": "optimizer steps in total (the LR schedule spans them)",
    "batch_size": "sequences per step (per rank)",
    "threads": "torch CPU threads; 0 = torch's default (tiny presets: 1, robust on a busy machine)",
    "threshold": "tempered probability above which a token goes to an expert",
    "sparse_step": "gate step from which the DTS gate is top-k (default: anneal_steps)",
    "top_k": "experts per token (for dts: after sparse_step unless --dts-top-k)",
}


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
    for field in dataclasses.fields(cls):
        if field.name in _SKIP[cls]:
            continue
        flag = "--" + prefix + field.name.replace("_", "-")
        kind, choices, is_bool = _option_type(hints[field.name])
        help_text = _HELP.get(field.name, f"{cls.__name__}.{field.name}")
        dest = dest_prefix + field.name
        if is_bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None,
                               metavar=None if choices else field.name.upper(), help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help=f"starting point ({presets})")
    parser.add_argument("--run-dir", help="output folder (default: runs/<preset>-<date>-<time>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                        help="continue the run in --run-dir from its newest checkpoint, or from PATH "
                             "(a run folder or one checkpoint folder)")
    parser.add_argument("--init-from-dense", metavar="CKPT",
                        help="expert-diversify: spawn every MoE block's experts from this dense model "
                             "checkpoint (num_experts=1, e.g. a run of --preset tiny-dense)")
    parser.add_argument("--diversify-noise", type=float, default=0.1,
                        help="per-expert Gaussian perturbation, relative to each weight's std (default 0.1; "
                             "0 with --diversify-mask 0 is upcycling)")
    parser.add_argument("--diversify-mask", type=float, default=0.0,
                        help="fraction of each expert's weights set to zero, drawn per expert (EvoMoE's "
                             "random masking; default 0)")
    parser.add_argument("--dense-phase-steps", type=int, metavar="N",
                        help="the whole EvoMoE path: train the dense model for N steps in RUN/dense, spawn the "
                             "experts from it (--diversify-*), then train this MoE model for --steps steps")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="stop after this step with a checkpoint, as if killed; --resume continues")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or validation lines")
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
        diversify_noise=args.diversify_noise, diversify_mask=args.diversify_mask, stop_at=args.stop_at, progress=not args.quiet,
        model_overrides=groups["model."], dts_overrides=groups["dts."], train_overrides=groups["train."],
    )


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
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
                    print(summary_line(dense_summary))
        prep = prepare(options, info)
    except (DataError, CheckpointError, ValueError) as err:
        print(f"flexmoe train: error: {err}", file=sys.stderr)
        return 2
    if info.is_main and not args.quiet:
        total, active = prep.trainer.model.num_parameters()
        start = f"resuming {prep.resumed_from} at step {prep.trainer.step}" if prep.resumed_from else "new run"
        print(f"flexmoe train: {start} -> {prep.run_dir} | {prep.corpus.root}: "
              f"{len(prep.corpus.train_docs)} train / {len(prep.corpus.val_docs)} val files, "
              f"{len(prep.train_tokens) / 1e6:.2f}M train tokens ({prep.train_cfg.tokenizer}) | "
              f"{total / 1e6:.2f}M params ({active / 1e6:.2f}M active) on {prep.device}", file=sys.stderr)
    summary = execute(prep)
    if info.is_main:
        print(summary_line(summary))
    return 0
