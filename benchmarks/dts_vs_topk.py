"""DTS gate (EvoMoE dense-to-sparse) vs top-2 softmax gate at equal compute, on the default corpus.

Three runs of the same GPT-MoE (the ``tiny`` preset shape by default) on this Python's standard library:
  1. top-2 softmax gate for S steps; its compute is the budget;
  2. DTS gate for the same S steps (its dense phase routes each token to many experts: more compute);
  3. DTS gate for S_eq < S steps, S_eq chosen from run 2's routed rows so its compute matches the budget.
Compute counts what each run actually did: matmul FLOPs (6 per multiply-add, forward + backward) of
attention, router, LM head, and of every routed (token, expert) row read from the run's routing trace.
Target: the validation loss run 1 has at half its steps (or --target); the step and FLOPs at which a run
first reaches it are interpolated linearly between evaluations.

    python benchmarks/dts_vs_topk.py                       # CPU, ~6-10 minutes on 2 free cores
    python benchmarks/dts_vs_topk.py --preset small --steps 3000 --eval-every 100 --threads 0   # 1 GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from flexmoe.models.gpt import ModelConfig
from flexmoe.sim.trace import read_trace
from flexmoe.train.metrics import last_per_step, read_metrics
from flexmoe.train.session import RunOptions, execute, prepare


def step_flops(cfg: ModelConfig, tokens: int, expert_rows: np.ndarray) -> np.ndarray:
    """FLOPs of each step: dense parts from the shapes, experts from the routed rows per step."""
    D, F, L, S, V, E = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.seq_len, cfg.vocab_size, cfg.num_experts
    moe_blocks = len(cfg.moe_block_indices)
    dense_params = L * 4 * D * D + V * D + moe_blocks * E * D + (L - moe_blocks) * 3 * D * F
    dense = 6 * tokens * dense_params + 6 * tokens * L * S * D
    return dense + 6 * expert_rows * 3 * D * F


def run_one(name: str, out: Path, args, model: dict, dts: dict, steps: int) -> dict:
    run_dir = out / name
    options = RunOptions(
        preset=args.preset, run_dir=str(run_dir), progress=not args.quiet,
        model_overrides=model, dts_overrides=dts,
        train_overrides={"steps": steps, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                         "checkpoint_every": steps, "keep_checkpoints": 1, "seed": args.seed,
                         **({"batch_size": args.batch_size} if args.batch_size else {})},
    )
    tic = time.perf_counter()
    prep = prepare(options)
    execute(prep)
    wall = time.perf_counter() - tic
    cfg = prep.model_cfg
    tokens = prep.train_cfg.batch_size * prep.train_cfg.grad_accum * cfg.seq_len
    trace = read_trace(run_dir / "routing_trace.jsonl")
    rows_T = trace.counts_TLWE.sum(axis=(1, 2, 3))
    flops_T = step_flops(cfg, tokens, rows_T)
    records = read_metrics(run_dir)
    val = last_per_step(records, "val")
    return {
        "name": name, "steps": steps, "wall_s": wall, "tokens_per_step": tokens,
        "rows_per_token": float(rows_T.sum() / (tokens * len(rows_T) * len(cfg.moe_block_indices))),
        "cum_flops": np.concatenate([[0.0], np.cumsum(flops_T)]).tolist(),
        "val_steps": [r["step"] for r in val], "val_loss": [r["val_loss"] for r in val],
    }


def crossing(run: dict, target: float) -> tuple[float | None, float | None]:
    """(step, FLOPs) at which the validation loss first reaches ``target`` (linear interpolation)."""
    steps, loss = run["val_steps"], run["val_loss"]
    for i in range(1, len(steps)):
        if loss[i] <= target:
            a = (loss[i - 1] - target) / max(loss[i - 1] - loss[i], 1e-12)
            step = steps[i - 1] + a * (steps[i] - steps[i - 1])
            flops = np.interp(step, np.arange(len(run["cum_flops"])), run["cum_flops"])
            return step, float(flops)
    return None, None


def loss_at(run: dict, step: float) -> float:
    return float(np.interp(step, run["val_steps"], run["val_loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--dense-steps", type=int, default=40, help="DTS dense phase: anneal and sparse step")
    parser.add_argument("--tau-max", type=float, default=2.0)
    parser.add_argument("--tau-min", type=float, default=0.3)
    parser.add_argument("--target", type=float, help="validation-loss target (default: top-2's at half its steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="runs/dts_vs_topk")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    moe = {"router": "softmax", "top_k": 2}
    dts_model = {"router": "dts", "top_k": 2}
    dts = {"tau_max": args.tau_max, "tau_min": args.tau_min, "anneal_steps": args.dense_steps,
           "sparse_step": args.dense_steps, "schedule": "exponential", "threshold": 0.001}

    topk = run_one("top2", out, args, moe, {}, args.steps)
    dts_same = run_one("dts_same_steps", out, args, dts_model, dts, args.steps)
    per_step = topk["cum_flops"][-1] / args.steps
    extra = dts_same["cum_flops"][-1] - topk["cum_flops"][-1]
    eq_steps = max(args.dense_steps + 1, int(round(args.steps - extra / per_step)))
    dts_eq = run_one("dts_equal_compute", out, args, dts_model, dts, eq_steps)

    target = args.target if args.target is not None else loss_at(topk, args.steps / 2)
    budget = topk["cum_flops"][-1]
    rows = []
    for run in (topk, dts_same, dts_eq):
        step, flops = crossing(run, target)
        rows.append({
            "run": run["name"], "steps": run["steps"], "rows/token": run["rows_per_token"],
            "compute": run["cum_flops"][-1] / budget,
            "steps_to_target": step, "compute_to_target": None if flops is None else flops / budget,
            "final_val_loss": run["val_loss"][-1], "wall_s": run["wall_s"],
        })
    print(f"\nDTS vs top-2 on the standard library, preset {args.preset}, seed {args.seed}; "
          f"target val loss {target:.4f}; compute relative to the top-2 run ({budget:.3e} FLOPs)\n")
    print("| run | steps | routed rows / token / layer | compute | steps to target | compute to target "
          "| final val loss | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        to_step = "not reached" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
        to_flops = "-" if r["compute_to_target"] is None else f"{r['compute_to_target']:.2f}"
        print(f"| {r['run']} | {r['steps']} | {r['rows/token']:.2f} | {r['compute']:.2f} | {to_step} | {to_flops} "
              f"| {r['final_val_loss']:.4f} | {r['wall_s']:.0f} |")
    (out / "results.json").write_text(json.dumps({"target": target, "rows": rows,
                                                  "runs": [topk, dts_same, dts_eq]}, indent=1))
    print(f"\nruns and results.json in {out}")


if __name__ == "__main__":
    main()
