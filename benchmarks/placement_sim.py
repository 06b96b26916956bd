"""Placement planners on routing traces: modelled step time, balance, bytes moved, per layer.

A pure simulation (numpy, CPU): no GPU is used. Every planner runs under the same re-plan policy
(the runtime scheduler's cadence: ``--interval``, ``--warmup``, ``--predictor``); the oracle
re-plans before every step on that step's true counts. The cost model takes stated H100 rates
(design.md): 764 TFLOP/s bf16 expert GEMMs, 3.0 TB/s memory, and an all-to-all / sync / move
bandwidth of 350 GB/s per GPU (stated, not measured). Expert shape Qwen3-like (D=2048, F=768,
SwiGLU), fp32 parameters and gradients, Adam state moved with each replica.

    python benchmarks/placement_sim.py                          # synthetic drifting Zipf trace
    python benchmarks/placement_sim.py --trace run/routing_trace.jsonl --world-size 8 --scale 16
    python benchmarks/placement_sim.py --sweep-predictors       # greedy under each predictor
    python benchmarks/placement_sim.py --sweep-policy           # greedy under window / noise / trust / drift gate variants
    python benchmarks/placement_sim.py --tiny                   # seconds: a smoke check
    python benchmarks/placement_sim.py --trace benchmarks/traces/gpu_small_e64_top4.jsonl.gz --steps 300

With greedy among the planners, a row "greedy (perfect prediction)" replays it with each plan
made on the true counts of the interval it is kept (guard off, noise z 0): its gap to the oracle is search
and cadence, greedy's gap to it is prediction.

A trace recorded by one process has one source rank: ``--world-size`` deals its tokens out to W
ranks at random (``flexmoe.sim.simulator.split_ranks``: no source skew), and ``--scale K``
multiplies every count by K (a stand-in for K times the tokens per step with the same routing
fractions; it keeps the recorded step's sampling noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from flexmoe.placement import CostModel, PredictorConfig, ReplanPolicy, make_planner
from flexmoe.sim import (RoutingTrace, SyntheticTraceConfig, format_table, generate_trace, plot_results, read_trace,
                         simulate)

PLANNERS = ["static", "shadow", "eplb", "proportional", "greedy", "oracle"]
PREDICTORS = {
    "last step": PredictorConfig(),
    "ema 0.5": PredictorConfig(decay=0.5),
    "ema 0.8": PredictorConfig(decay=0.8),
    "window max 10": PredictorConfig("window_max", window=10),
    "mean 10": PredictorConfig("mean_std", window=10, z=0.0),
    "mean+1std 10": PredictorConfig("mean_std", window=10, z=1.0),
    "trend 20": PredictorConfig("trend", window=20, lead=5.0),
}

POLICY_VARIANTS = {
    "no window, no trust (before issue 14's second round)": dict(score_window=0, trust=0),
    "window, noise z 1, no trust": dict(trust=0, noise_z=1.0),
    "window, noise z 2, no trust": dict(trust=0),
    "default (window, noise z 2, trust 3)": {},
    "default, noise z 1": dict(noise_z=1.0),
    "default, score window 20": dict(score_window=20),
    "default, trust 1": dict(trust=1),
    "default + drift gate 0": dict(drift_gate=0.0),
    "default + drift gate 0.02": dict(drift_gate=0.02),
    "default + drift gate 0.1": dict(drift_gate=0.1),
}


def per_layer(results) -> str:
    """Markdown: per layer, static's modelled time / each planner's (moves included)."""
    base = next(r for r in results if r.name == "static").layer_time_TL.sum(0)
    L = base.size
    lines = ["| planner | " + " | ".join(f"layer {i}" for i in range(L)) + " | min |", "|---|" + "---|" * (L + 1)]
    for r in results:
        xs = base / r.layer_time_TL.sum(0)
        lines.append(f"| {r.name} | " + " | ".join(f"{x:.3f}x" for x in xs) + f" | {xs.min():.3f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=None, help="a routing trace (JSON Lines) instead of the synthetic one")
    parser.add_argument("--scale", type=int, default=1, help="multiply every count of --trace by this")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots-per-rank", type=int, default=None, help="default: ceil(E / W) + 2")
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--drift", type=float, default=SyntheticTraceConfig.drift)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--a2a-bw", type=float, default=350e9)
    parser.add_argument("--interval", type=int, default=ReplanPolicy.interval)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--planners", default=",".join(PLANNERS))
    parser.add_argument("--sweep-predictors", action="store_true", help="greedy under each predictor instead")
    parser.add_argument("--sweep-intervals", type=int, nargs="*", default=None, help="greedy at each interval instead")
    parser.add_argument("--sweep-policy", action="store_true",
                        help="greedy under the re-plan policy variants of issue 14 (window, noise z, trust, drift gate) instead")
    parser.add_argument("--sync-overlap", type=float, default=0.0,
                        help="CostModel.sync_overlap: fraction of backward hiding the sync's first phase "
                             "(overlap_replica_sync=True; 0: the plain sync after backward)")
    parser.add_argument("--fixed-split", action="store_true",
                        help="model fixed-share quotas instead of the runtime's adaptive split (CostModel.adaptive_split)")
    parser.add_argument("--plot", default=None, help="PNG of balance ratio and step time over steps")
    parser.add_argument("--tiny", action="store_true", help="4 ranks, 16 experts, 60 steps")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.world_size, args.experts = 60, 4, 16
        args.tokens_per_rank, args.top_k = 2048, 4

    cost = CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=args.a2a_bw,
                                adaptive_split=not args.fixed_split, sync_overlap=args.sync_overlap)
    print(f"cost model: c_tok={cost.c_tok:.3e} s/row, c_slot={cost.c_slot:.2e} s, a2a/sync/move {args.a2a_bw:.3g} B/s, "
          f"grad {cost.grad_bytes / 1e6:.1f} MB and move {cost.move_bytes / 1e6:.1f} MB per expert, "
          f"{'fixed-share' if args.fixed_split else 'adaptive'} split")
    t0 = time.perf_counter()
    if args.trace:
        trace = read_trace(args.trace)
        trace = RoutingTrace(trace.counts_TLWE[: args.steps] * args.scale, trace.steps_T[: args.steps], trace.meta)
        what = (f"trace {args.trace} ({trace.world_size} recorded rank(s) -> {args.world_size}, counts x{args.scale})")
    else:
        config = SyntheticTraceConfig(
            num_steps=args.steps, world_size=args.world_size, num_experts=args.experts,
            tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, alpha=args.alpha, drift=args.drift, seed=args.seed,
        )
        trace = generate_trace(config)
        what = f"synthetic Zipf alpha={args.alpha}, drift={args.drift}, seed={args.seed}"
    W = args.world_size
    S = args.slots_per_rank or -(-trace.num_experts // W) + 2
    policy = ReplanPolicy(interval=args.interval, warmup=args.warmup)
    head = (f"{trace.num_steps} steps x {trace.num_layers} layers, {W} ranks, {trace.num_experts} experts, {S} slots "
            f"per rank, {what}; policy interval {policy.interval}, warmup {policy.first_plan}")
    if args.sweep_predictors or args.sweep_intervals or args.sweep_policy:
        base = simulate(trace, [make_planner("static")], cost, world_size=W, slots_per_rank=S)[0]
        print(head)
        print("| greedy with | interval | vs static | worst layer | balance mean | GB moved | re-plans | share updates |")
        print("|---|---|---|---|---|---|---|---|")
        if args.sweep_predictors:
            runs = [(name, dataclasses.replace(policy, predictor=pc)) for name, pc in PREDICTORS.items()]
        elif args.sweep_policy:
            runs = [(name, dataclasses.replace(policy, **change)) for name, change in POLICY_VARIANTS.items()]
        else:
            runs = [("default", dataclasses.replace(policy, interval=iv)) for iv in args.sweep_intervals]
        for name, pol in runs:
            r = simulate(trace, [make_planner("greedy")], cost, world_size=W, slots_per_rank=S, policy=pol)[0]
            worst = (base.layer_time_TL.sum(0) / r.layer_time_TL.sum(0)).min()
            print(f"| {name} | {pol.interval} | {base.time_T.mean() / r.time_T.mean():.3f}x | {worst:.3f}x "
                  f"| {r.balance_TL.mean():.3f} | {r.bytes_moved / 1e9:.1f} | {r.replans} | {r.share_updates} |", flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)")
        return
    planners = [make_planner(n.strip()) for n in args.planners.split(",") if n.strip()]
    results = simulate(trace, planners, cost, world_size=W, slots_per_rank=S, policy=policy)
    if any(p.name == "greedy" for p in planners):
        results += simulate(trace, [make_planner("greedy")], cost, world_size=W, slots_per_rank=S,
                            policy=dataclasses.replace(policy, guard=False, noise_z=0.0, shed_window=None),
                            perfect_prediction=True)
    print(head + f" ({time.perf_counter() - t0:.0f} s)")
    print(format_table(results))
    by = {r.name: r.time_T.mean() for r in results}
    if "greedy" in by and "oracle" in by and "static" in by:
        print(f"greedy: {by['static'] / by['greedy']:.3f}x static, {by['greedy'] / by['oracle'] - 1:+.1%} vs oracle")
    perfect = by.get("greedy (perfect prediction)")
    if perfect and "greedy" in by:
        print(f"greedy vs greedy with perfect prediction (prediction error): {by['greedy'] / perfect - 1:+.1%}"
              + (f"; perfect prediction vs oracle (search and cadence): {perfect / by['oracle'] - 1:+.1%}"
                 if "oracle" in by else ""))
    if "static" in by:
        print("\nper layer, static time / planner time:")
        print(per_layer(results))
    if args.plot:
        plot_results(results, args.plot, title=head.split(";")[0])
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
