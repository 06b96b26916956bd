"""EvoMoE as its authors built it against top-k, Switch top-1 and upcycling: validation loss per
step and per FLOP (the dense phase counted), over several seeds.

Arms (every arm takes --steps optimizer steps in total, the dense phase included):
  top2      top-2 softmax gate from scratch
  switch    top-1 softmax gate from scratch (Switch)
  upcycle   dense model for --dense-steps, every expert a copy of its FFN, then top-2
  evomoe    dense model for --dense-steps, diversify (random masking --mask), then the authors' DTS
            gate: tau linear 2.0 -> 0.5, a plateau at 0.5, Gumbel top-1, no renormalisation,
            balance loss on the masked gates, top-1 evaluation
  top2_omoe top-2 from scratch with the OMoE optimizer (--omoe)
The dense run of a seed is shared by its upcycle and evomoe arms. A second stage is a new
`flexmoe train` run from the dense checkpoint (its own warm-up and cosine schedule).

Compute is modelled: matmul FLOPs (6 per multiply-add, forward + backward) of attention, router,
LM head and dense FFNs from the shapes, and of every routed (token, expert) row from each run's
routing trace, so the DTS dense phase costs what it actually dispatched. Readings: the validation
loss after --steps steps (per step) and at the smallest total compute of all arms (per FLOP,
interpolated in cumulative FLOPs). A gap to top2 no larger than the seed spread (the larger
standard deviation of the two arms; with one seed, the other arm's) is called a tie.

    python benchmarks/evomoe.py --preset tiny --steps 150 --seeds 0 1 2          # CPU
    python benchmarks/evomoe.py --preset small --steps 2000 --dense-steps 400 --eval-every 100 \
        --data site-packages --threads 0 --arms top2 evomoe switch upcycle top2_omoe   # 1 GPU
(small: 32768 tokens per step; keep steps x 32768 below the training tokens the first run prints,
so every arm stays within one epoch.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dts_vs_topk import step_flops  # noqa: E402

from flexmoe.models.gpt import ModelConfig  # noqa: E402
from flexmoe.sim.trace import read_trace  # noqa: E402
from flexmoe.train.metrics import last_per_step, read_metrics  # noqa: E402
from flexmoe.train.session import RunOptions, execute, prepare  # noqa: E402

ARMS = ("top2", "switch", "upcycle", "evomoe", "top2_omoe")


def authors_dts(args) -> dict:
    """The DTS gate of codecaution/EvoMoE (design.md), annealed over this run's sparse steps."""
    span = args.steps - args.dense_steps
    return {"tau_max": 2.0, "tau_min": 0.5, "schedule": "linear", "threshold": 0.001,
            "anneal_steps": max(1, int(span * args.anneal_fraction)),
            "sparse_step": max(1, int(span * args.switch_fraction)),
            "sparse_gate": "gumbel_top1", "renormalize": False, "balance": "masked", "eval_routing": "top1"}


def train(run_dir: Path, args, seed: int, steps: int, model: dict, dts: dict | None = None,
          train: dict | None = None, init_from: Path | None = None, mask: float = 0.0, noise: float = 0.0) -> dict:
    """One run (skipped when ``run_dir`` already holds it finished: ``--out`` of an earlier call
    continues that comparison); returns its validation curve, cumulative FLOPs per step, time."""
    if not finished(run_dir, steps):
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run that was cut short: start it again
        options = RunOptions(
            preset=args.preset, run_dir=str(run_dir), progress=not args.quiet, model_overrides=model,
            dts_overrides=dts or {}, init_from_dense=None if init_from is None else str(init_from),
            diversify_noise=noise, diversify_mask=mask,
            train_overrides={"steps": steps, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
                             "checkpoint_every": steps, "keep_checkpoints": 1, "seed": seed, "data": args.data,
                             "threads": args.threads, **({"batch_size": args.batch_size} if args.batch_size else {}),
                             **(train or {})},
        )
        execute(prepare(options))
    return read_run(run_dir, steps)


def finished(run_dir: Path, steps: int) -> bool:
    return any(r.get("kind") == "summary" and r.get("finished") and r.get("step") == steps
               for r in read_metrics(run_dir))


def read_run(run_dir: Path, steps: int) -> dict:
    """A finished run's curve and modelled FLOPs, from its config, metrics and routing trace."""
    config = json.loads((run_dir / "config.json").read_text())
    cfg, tcfg = ModelConfig.from_dict(config["model"]), config["train"]
    tokens = tcfg["batch_size"] * tcfg["grad_accum"] * cfg.seq_len * config["world_size"]
    trace_file = run_dir / "routing_trace.jsonl"
    rows_T = (read_trace(trace_file).counts_TLWE.sum(axis=(1, 2, 3)) if trace_file.exists()
              else np.zeros(steps, dtype=np.int64))
    records = read_metrics(run_dir)
    val = last_per_step(records, "val")
    summary = [r for r in records if r.get("kind") == "summary"][-1]
    return {"steps": [r["step"] for r in val], "loss": [r["val_loss"] for r in val],
            "cum_flops": np.concatenate([[0.0], np.cumsum(step_flops(cfg, tokens, rows_T))]).tolist(),
            "weight_cos": [r.get("expert_weight_cos") for r in val], "wall_s": summary["elapsed_s"],
            "rows_per_token": float(rows_T.sum() / max(1, tokens * steps * max(1, len(cfg.moe_block_indices))))}


def chain(first: dict, second: dict) -> dict:
    """The curve of a dense run followed by its MoE continuation (steps and FLOPs offset)."""
    n, f = first["steps"][-1], first["cum_flops"][-1]
    return {"steps": first["steps"] + [n + s for s in second["steps"][1:]],
            "loss": first["loss"] + second["loss"][1:],
            "cum_flops": first["cum_flops"] + [f + c for c in second["cum_flops"][1:]],
            "weight_cos": first["weight_cos"] + second["weight_cos"][1:],
            "wall_s": first["wall_s"] + second["wall_s"], "rows_per_token": second["rows_per_token"]}


def run_seed(arm: str, seed: int, args, out: Path, dense_cache: dict) -> dict:
    top = {"router": "softmax", "top_k": 2}
    if arm in ("top2", "switch", "top2_omoe"):
        model = {"router": "softmax", "top_k": 1 if arm == "switch" else 2}
        extra = {"omoe": True} if arm == "top2_omoe" else {}
        return train(out / f"{arm}_s{seed}", args, seed, args.steps, model, train=extra)
    if seed not in dense_cache:
        dense_cache[seed] = train(out / f"dense_s{seed}", args, seed, args.dense_steps,
                                  {"num_experts": 1, "top_k": 1})
    dense_dir = out / f"dense_s{seed}"
    rest = args.steps - args.dense_steps
    if arm == "upcycle":
        second = train(out / f"{arm}_s{seed}", args, seed, rest, top, init_from=dense_dir)
    else:
        second = train(out / f"{arm}_s{seed}", args, seed, rest, {"router": "dts", "top_k": 1}, authors_dts(args),
                       init_from=dense_dir, mask=args.mask, noise=args.noise)
    return chain(dense_cache[seed], second)


def spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def verdict(gap: float, tol: float) -> str:
    if tol == 0:
        return "one seed each: no spread"
    if abs(gap) <= tol:
        return "tie"
    return "better" if gap < 0 else "worse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per arm, dense phase included")
    parser.add_argument("--dense-steps", type=int, default=30)
    parser.add_argument("--anneal-fraction", type=float, default=0.5,
                        help="DTS anneal steps as a fraction of the sparse stage (authors: 5000 of ~6000 before the switch)")
    parser.add_argument("--switch-fraction", type=float, default=0.6, help="DTS switch to Gumbel top-1, same unit")
    parser.add_argument("--mask", type=float, default=0.2,
                        help="diversify: fraction of weights masked per expert (the ratio is ours: not in the paper or code)")
    parser.add_argument("--noise", type=float, default=0.0, help="diversify: relative Gaussian noise")
    parser.add_argument("--arms", nargs="+", default=["top2", "evomoe", "switch", "upcycle"], choices=ARMS)
    parser.add_argument("--main-arms", nargs="+", default=["top2", "evomoe"], help="arms run with every seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--data", default=None, help="corpus (default: the standard library; 'site-packages')")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", help="run folder (default runs/evomoe/DATE-TIME); finished runs in it are reused")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not 0 < args.dense_steps < args.steps:
        parser.error("--dense-steps must be between 0 and --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs/evomoe") / time.strftime("%Y%m%d-%H%M%S")
    dense_cache: dict = {}
    results: dict[str, list[dict]] = {}
    tic = time.perf_counter()
    for arm in args.arms:
        seeds = args.seeds if arm in args.main_arms else args.seeds[:1]
        results[arm] = [run_seed(arm, seed, args, out, dense_cache) for seed in seeds]
    wall = time.perf_counter() - tic

    budget = min(np.mean([r["cum_flops"][-1] for r in runs]) for runs in results.values())
    ref_flops = np.mean([r["cum_flops"][-1] for r in results["top2"]]) if "top2" in results else budget
    table = {}
    for arm, runs in results.items():
        at_steps = [float(np.interp(args.steps, r["steps"], r["loss"])) for r in runs]
        at_flops = [float(np.interp(budget, np.array(r["cum_flops"])[r["steps"]], r["loss"])) for r in runs]
        table[arm] = {"seeds": len(runs), "compute": np.mean([r["cum_flops"][-1] for r in runs]) / ref_flops,
                      "rows": np.mean([r["rows_per_token"] for r in runs]),
                      "at_steps": at_steps, "at_flops": at_flops, "wall_s": sum(r["wall_s"] for r in runs)}
    print(f"\nEvoMoE comparison: preset {args.preset}, {args.steps} steps per arm (dense phase {args.dense_steps}), "
          f"seeds {args.seeds} for {args.main_arms}, corpus {args.data or 'stdlib'}; compute relative to top2; "
          f"equal-FLOP reading at {budget / ref_flops:.2f} of top2's compute ({budget:.3e} FLOPs, modelled). "
          f"Wall {wall / 60:.1f} min (this call).\n")
    print("| arm | seeds | compute | rows/token/layer (MoE stage) | val loss @ equal steps | vs top2 | "
          "val loss @ equal FLOPs | vs top2 | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = table.get("top2")
    for arm, t in table.items():
        cells = []
        for key in ("at_steps", "at_flops"):
            mean, sd = float(np.mean(t[key])), spread(t[key])
            text = f"{mean:.4f} ± {sd:.4f}" if t["seeds"] > 1 else f"{mean:.4f}"
            if base is None or arm == "top2":
                cells += [text, "-"]
            else:
                gap = mean - float(np.mean(base[key]))
                tol = max(sd, spread(base[key]))
                cells += [text, f"{gap:+.4f} ({verdict(gap, tol)})"]
        print(f"| {arm} | {t['seeds']} | {t['compute']:.2f} | {t['rows']:.2f} | {' | '.join(cells)} | {t['wall_s']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "budget_flops": budget, "runs": results},
                                                 indent=1))
    print(f"\nruns and results.json in {out}")


if __name__ == "__main__":
    main()
