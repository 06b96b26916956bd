"""Placement planners on a drifting Zipf routing trace: modelled step time, balance, bytes moved.

A pure simulation (numpy, CPU): no GPU is used. The last row, "oracle, free moves", is the oracle
with replica moves costing nothing (a reference for what re-balancing alone could give). The cost model takes stated H100 rates (design.md):
764 TFLOP/s bf16 expert GEMMs, 3.0 TB/s memory, and an all-to-all / sync / move bandwidth of
350 GB/s per GPU (NVLink 4 within one 8-GPU node; NCCL all-to-all bus bandwidth is about this).
Expert shape Qwen3-like (D=2048, F=768, SwiGLU), 16384 tokens per rank, top-8, fp32 parameters
and gradients, Adam state moved with each replica.

    python benchmarks/placement_sim.py                       # the recorded benchmark (a few minutes)
    python benchmarks/placement_sim.py --plot placement.png  # and the balance-over-steps figure
    python benchmarks/placement_sim.py --tiny                # seconds: a smoke check
    python benchmarks/placement_sim.py --drift 0.0005 0.002 0.01   # sensitivity to drift speed
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from flexmoe.placement import CostModel, make_planner
from flexmoe.sim import SyntheticTraceConfig, format_table, generate_trace, plot_results, simulate

PLANNERS = ["static", "shadow", "eplb", "proportional", "greedy", "oracle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots-per-rank", type=int, default=10)
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--drift", type=float, nargs="+", default=[SyntheticTraceConfig.drift])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--a2a-bw", type=float, default=350e9)
    parser.add_argument("--plot", default=None, help="PNG of balance ratio and step time over steps (first drift)")
    parser.add_argument("--tiny", action="store_true", help="4 ranks, 16 experts, 60 steps")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.world_size, args.experts, args.slots_per_rank = 60, 4, 16, 6
        args.tokens_per_rank, args.top_k = 2048, 4

    cost = CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=args.a2a_bw)
    print(f"cost model: c_tok={cost.c_tok:.3e} s/row, c_slot={cost.c_slot:.2e} s, a2a/sync/move {args.a2a_bw:.3g} B/s, "
          f"grad {cost.grad_bytes / 1e6:.1f} MB and move {cost.move_bytes / 1e6:.1f} MB per expert")
    for i, drift in enumerate(args.drift):
        config = SyntheticTraceConfig(
            num_steps=args.steps, world_size=args.world_size, num_experts=args.experts,
            tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, alpha=args.alpha, drift=drift, seed=args.seed,
        )
        t0 = time.perf_counter()
        trace = generate_trace(config)
        results = simulate(trace, [make_planner(n) for n in PLANNERS], cost, slots_per_rank=args.slots_per_rank)
        free = make_planner("oracle")
        free.name = "oracle, free moves"
        results += simulate(trace, [free], dataclasses.replace(cost, move_bytes=0.0), slots_per_rank=args.slots_per_rank)
        print(f"\n{args.steps} steps, {args.world_size} ranks, {args.experts} experts, {args.slots_per_rank} slots "
              f"per rank, Zipf alpha={args.alpha}, drift={drift}, seed={args.seed} "
              f"({time.perf_counter() - t0:.0f} s)")
        print(format_table(results))
        by = {r.name: r.time_T.mean() for r in results}
        print(f"greedy: {by['static'] / by['greedy']:.2f}x faster than static EP, "
              f"{by['greedy'] / by['oracle'] - 1:+.1%} vs oracle, "
              f"{by['greedy'] / by['oracle, free moves'] - 1:+.1%} vs oracle with free moves")
        if args.plot and i == 0:
            plot_results(results, args.plot, title=f"{args.world_size} ranks, {args.experts} experts, "
                         f"Zipf({args.alpha}) drifting popularity, {args.slots_per_rank} slots/rank")
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
