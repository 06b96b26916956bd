"""``flexmoe simulate``: replay a routing trace under several placement planners.

    flexmoe simulate TRACE [--planners static,greedy,...] [--world-size W] [--slots-per-rank S] [--plot out.png]
    flexmoe simulate --synthetic [TRACE] [--steps ...]   # generate a trace (saved to TRACE if given), then replay it
"""

from __future__ import annotations

import argparse
import json
import sys

from ..placement.cost_model import CostModel
from ..placement.planner import PLANNERS, make_planner
from .simulator import format_table, plot_results, simulate
from .synthetic import SyntheticTraceConfig, generate_trace
from .trace import read_trace

HELP = "replay a routing trace under placement planners and compare modelled step time"

DEFAULT_PLANNERS = "static,shadow,eplb,proportional,greedy,oracle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", nargs="?", help="trace file (JSON Lines); with --synthetic, where to save it")
    parser.add_argument("--planners", default=DEFAULT_PLANNERS, help=f"comma list of {', '.join(PLANNERS)}")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (divides the trace's; default: the trace's)")
    parser.add_argument("--slots-per-rank", type=int, default=None,
                        help="expert slots per rank (default: ceil(E / W) + 2)")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps")
    parser.add_argument("--plot", default=None, help="write a PNG of balance ratio and step time over steps")
    parser.add_argument("--json", default=None, help="write the summary rows as JSON")
    cost = parser.add_argument_group("cost model (per expert shape and hardware rates)")
    cost.add_argument("--d-model", type=int, default=2048)
    cost.add_argument("--d-ff", type=int, default=768)
    cost.add_argument("--flops", type=float, default=764e12, help="expert GEMM FLOP/s (H100 bf16 measured: 764e12)")
    cost.add_argument("--mem-bw", type=float, default=3.0e12, help="memory bytes/s (H100 measured: 3.0e12)")
    cost.add_argument("--a2a-bw", type=float, default=350e9, help="all-to-all bytes/s per rank within a node")
    cost.add_argument("--a2a-bw-inter", type=float, default=None, help="all-to-all bytes/s per rank across nodes")
    cost.add_argument("--ranks-per-node", type=int, default=None)
    cost.add_argument("--measure", action="store_true",
                      help="time the expert FFN and a local copy on this machine instead of --flops/--mem-bw")
    syn = parser.add_argument_group("synthetic trace")
    syn.add_argument("--synthetic", action="store_true", help="generate a synthetic trace instead of reading TRACE")
    syn.add_argument("--generate-only", action="store_true", help="with --synthetic: only write TRACE")
    defaults = SyntheticTraceConfig()
    syn.add_argument("--num-steps", type=int, default=defaults.num_steps)
    syn.add_argument("--num-layers", type=int, default=defaults.num_layers)
    syn.add_argument("--trace-world-size", type=int, default=defaults.world_size)
    syn.add_argument("--num-experts", type=int, default=defaults.num_experts)
    syn.add_argument("--tokens-per-rank", type=int, default=defaults.tokens_per_rank)
    syn.add_argument("--top-k", type=int, default=defaults.top_k)
    syn.add_argument("--alpha", type=float, default=defaults.alpha, help="Zipf exponent of expert popularity")
    syn.add_argument("--drift", type=float, default=defaults.drift, help="popularity drift rate per step")
    syn.add_argument("--rank-skew", type=float, default=defaults.rank_skew)
    syn.add_argument("--step-noise", type=float, default=defaults.step_noise)
    syn.add_argument("--seed", type=int, default=defaults.seed)


def _cost(args) -> CostModel:
    extra = {"a2a_bw_inter": args.a2a_bw_inter, "ranks_per_node": args.ranks_per_node}
    if args.measure:
        from ..runtime.measure import measure_cost_model

        return measure_cost_model(args.d_model, args.d_ff, a2a_bw=args.a2a_bw, **extra)
    return CostModel.from_shape(args.d_model, args.d_ff, flops=args.flops, mem_bw=args.mem_bw,
                                a2a_bw=args.a2a_bw, **extra)


def run(args) -> int:
    if args.synthetic:
        config = SyntheticTraceConfig(
            num_steps=args.num_steps, num_layers=args.num_layers, world_size=args.trace_world_size,
            num_experts=args.num_experts, tokens_per_rank=args.tokens_per_rank, top_k=args.top_k,
            alpha=args.alpha, drift=args.drift, rank_skew=args.rank_skew, step_noise=args.step_noise,
            seed=args.seed,
        )
        trace = generate_trace(config)
        if args.trace:
            trace.save(args.trace)
            print(f"wrote {args.trace}: {trace.num_steps} steps, {trace.num_layers} layers, "
                  f"{trace.world_size} ranks, {trace.num_experts} experts")
        if args.generate_only:
            return 0
    elif args.trace:
        trace = read_trace(args.trace)
    else:
        print("flexmoe simulate: give a TRACE file or --synthetic", file=sys.stderr)
        return 2
    if args.steps is not None:
        trace.counts_TLWE, trace.steps_T = trace.counts_TLWE[: args.steps], trace.steps_T[: args.steps]
    names = [n.strip() for n in args.planners.split(",") if n.strip()]
    planners = [make_planner(n) for n in names]
    W = args.world_size or trace.world_size
    S = args.slots_per_rank or -(-trace.num_experts // W) + 2
    results = simulate(trace, planners, _cost(args), world_size=W, slots_per_rank=S)
    print(f"{trace.num_steps} steps x {trace.num_layers} layers, {W} ranks, {trace.num_experts} experts, "
          f"{S} slots per rank")
    print(format_table(results))
    if args.plot:
        plot_results(results, args.plot, title=f"{W} ranks, {trace.num_experts} experts, {S} slots per rank")
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.summary() for r in results], f, indent=1)
    return 0
