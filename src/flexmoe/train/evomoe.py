"""``flexmoe train --dense-phase-steps N``: the whole EvoMoE path in one command.

Stage 1 trains the dense model of the same shape (one FFN per block: ``num_experts = 1``) for N
steps in ``RUN/dense``; stage 2 spawns every MoE block's experts from it (expert-diversify, with
``--diversify-mask`` / ``--diversify-noise``) and trains the MoE model for ``--steps`` steps in
``RUN`` (with ``--router dts``: the dense-to-sparse gate). Running the command again continues a
dense stage that was stopped and skips a finished one; once stage 2 has started, continue it with
``--resume`` as any run.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from .metrics import read_metrics
from .session import RunOptions, _resolve_configs

DENSE_DIR = "dense"


def plan_stages(options: RunOptions, dense_steps: int) -> tuple[RunOptions, RunOptions | None]:
    """(MoE-stage options, dense-stage options or None when that stage is finished). Checks both
    stages' configs first, so a bad option fails before anything is trained."""
    if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 1:
        raise ValueError(f"--dense-phase-steps must be an int >= 1, got {dense_steps!r}")
    if options.resume is not None or options.init_from_dense is not None:
        raise ValueError("--dense-phase-steps starts a new EvoMoE run: it does not take --resume or --init-from-dense "
                         "(resume a started MoE stage with --run-dir RUN --resume)")
    run_dir = Path(options.run_dir) if options.run_dir else Path("runs") / (
        f"{options.preset}-evomoe-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    dense_dir = run_dir / DENSE_DIR
    dts_model = {k: v for k, v in options.model_overrides.items() if k not in ("router", "top_k", "num_experts")}
    dense = dataclasses.replace(
        options, run_dir=str(dense_dir), stop_at=None, dts_overrides={},
        model_overrides={**dts_model, "num_experts": 1, "top_k": 1, "router": "softmax"},
        train_overrides={**options.train_overrides, "steps": dense_steps})
    moe = dataclasses.replace(options, run_dir=str(run_dir), init_from_dense=str(dense_dir))
    for stage in (dense, moe):
        _resolve_configs(stage, None)
    if not _resolve_configs(moe, None)[0].is_moe:
        raise ValueError("--dense-phase-steps needs an MoE model (--num-experts > 1)")
    records = read_metrics(dense_dir)
    if any(r.get("kind") == "summary" and r.get("finished") and r.get("step") == dense_steps for r in records):
        return moe, None
    if records:
        dense = dataclasses.replace(dense, resume="latest")
    return moe, dense
