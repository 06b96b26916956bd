"""Host cost of the token split per forward: fixed-share quotas against the adaptive split.

The runtime's host-side dispatch calls ``split_tokens(table, counts_WE)`` on every EP forward,
with every rank's all-gathered counts. This times it (median of ``--repeats`` calls, one thread
of this machine) for tables of the shapes the planners make: static EP, static EP plus replicas
in its spare slots (``spare_search``), and greedy tables, each planned on one step of the trace
and split on the next step's counts; and prints the busiest rank's load under both splits.

    python benchmarks/placement_split.py                     # W=8, E=64, 10 slots, synthetic Zipf trace
    python benchmarks/placement_split.py --trace benchmarks/traces/train_tiny_cpu_e64_top4_aux0.jsonl --scale 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flexmoe.placement import CostModel, PlacementTable, make_planner, split_tokens
from flexmoe.placement.planner import spare_search
from flexmoe.placement.split import rank_loads
from flexmoe.sim import SyntheticTraceConfig, generate_trace, read_trace
from flexmoe.sim.simulator import split_ranks


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=None)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--slots-per-rank", type=int, default=None, help="default: ceil(E / W) + 2")
    parser.add_argument("--steps", type=int, default=8, help="trace steps planned on (each split on the next)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    W = args.world_size
    if args.trace:
        counts_TLWE = read_trace(args.trace).counts_TLWE[: args.steps + 1] * args.scale
        if counts_TLWE.shape[2] < W:
            counts_TLWE = split_ranks(counts_TLWE, W)
        what = f"{args.trace} x{args.scale}"
    else:
        config = SyntheticTraceConfig(num_steps=args.steps + 1, world_size=W, num_experts=64, tokens_per_rank=16384,
                                      top_k=8)
        counts_TLWE = generate_trace(config).counts_TLWE
        what = "synthetic Zipf 1.0, 16384 tokens per rank, top-8"
    E = counts_TLWE.shape[3]
    S = args.slots_per_rank or -(-E // W) + 2
    cost = CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=350e9)
    static = PlacementTable.static(E, W, S)
    greedy = make_planner("greedy", min_gain=0.0)
    rows = {"static": [], "static + spare replicas": [], "greedy": []}
    for t in range(args.steps):
        plan_WE, next_WE = counts_TLWE[t, 0], counts_TLWE[t + 1, 0]
        spare = spare_search(static, plan_WE, lambda tab: cost.step_time(tab, plan_WE).total)
        tables = {"static": static, "static + spare replicas": spare[0][0] if spare else static,
                  "greedy": greedy.plan(static, plan_WE, cost)}
        for name, table in tables.items():
            fixed = median_ms(lambda: split_tokens(table, next_WE, adaptive=False), args.repeats)
            adaptive = median_ms(lambda: split_tokens(table, next_WE), args.repeats)
            load_f = rank_loads(table, next_WE.sum(0), adaptive=False).max()
            load_a = rank_loads(table, next_WE.sum(0)).max()
            rows[name].append((int((table.num_replicas_E() > 1).sum()), fixed, adaptive, load_f, load_a))
    print(f"W={W}, E={E}, {S} slots per rank, {what}; layer 0, {args.steps} steps; median of {args.repeats} calls")
    print("| table | replicated experts | fixed-share split ms | adaptive split ms | busiest rank, fixed | busiest rank, adaptive |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        a = np.array(r, dtype=np.float64)
        print(f"| {name} | {a[:, 0].mean():.1f} | {a[:, 1].mean():.3f} | {a[:, 2].mean():.3f} | {a[:, 3].mean():.0f} "
              f"| {a[:, 4].mean():.0f} |")


if __name__ == "__main__":
    main()
