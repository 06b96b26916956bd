"""Exploration (issue 14): shed replicas between plans, patched into the simulator.

Since built into the policy as ``ReplanPolicy(shed_window=K)`` (off by default;
``benchmarks/placement_matrix.py`` replays it); this script keeps the exploration's figures
reproducible (its accounting differs: see below).

Replays a trace like ``placement_sim.py`` (same cost constants, default ``ReplanPolicy()``, 8
ranks, 10 slots per rank) with one addition patched into the simulator's ``Replanner``: after the
first plan, every ``--every`` steps between plans, each layer holding replicas drops those that
did not pay on the last ``--m`` observed steps (modelled mean time; dropping moves nothing):
single copies greedily (the lowest-quota copy of an expert, never its static home) and, for a
table on the static base, static EP itself (``--only-static``: that candidate alone). The guard's
accounting is not adjusted for the mid-interval change (it judges the shed table on the whole
interval). ``--off`` reproduces ``placement_sim.py --planners static,greedy``; ``--diag L`` prints
layer L's per-interval time against static EP.

The patch replaces ``flexmoe.sim.simulator.Replanner`` for this process only.

    python benchmarks/placement_shed.py --trace benchmarks/traces/train_tiny_cpu_e64_top4_aux001.jsonl --scale 16 --m 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import flexmoe.sim.simulator as simulator
from flexmoe.placement import CostModel, ReplanPolicy, make_planner
from flexmoe.placement.planner import on_static_base
from flexmoe.placement.policy import LayerPlan, Replanner, _finish_as, shed_replicas
from flexmoe.sim import RoutingTrace, SyntheticTraceConfig, generate_trace, read_trace, simulate


def shed(table, steps_NWE, cost, only_static: bool):
    """``table`` less the replicas that did not pay on ``steps_NWE`` (mean modelled time): the
    policy's ``shed_replicas``, or (``only_static``) static EP alone, for a table on its base."""
    if not only_static:
        return shed_replicas(table, steps_NWE, cost)
    if not on_static_base(table):
        return table
    def mean_time(tb) -> float:
        return float(np.mean([cost.step_time(tb, c_WE).total for c_WE in steps_NWE]))
    static = table.static_like()
    return _finish_as(table, static) if mean_time(static) < mean_time(table) else table


def shedding_replanner(args):
    class ShedReplanner(Replanner):
        def due(self):
            self._full = super().due()
            if args.off:
                return self._full
            return self._full or (self.steps_done > self.policy.first_plan and self.steps_done % args.every == 0)

        def plan(self, tables, cost, true_LWE=None, future_NLWE=None):
            if self._full:
                return super().plan(tables, cost, true_LWE, future_NLWE)
            recent_NLWE = np.stack(list(self._window)[-args.m:])
            return [LayerPlan(tb if (tb.num_replicas_E() <= 1).all() else
                              shed(tb, recent_NLWE[:, i], cost, args.only_static), 0.0, 0.0)
                    for i, tb in enumerate(tables)]

    return ShedReplanner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=None, help="a routing trace (default: the synthetic one)")
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--m", type=int, default=2, help="observed steps a shed is judged on")
    ap.add_argument("--every", type=int, default=1, help="a shed check every EVERY steps")
    ap.add_argument("--only-static", action="store_true", help="shed to static EP only")
    ap.add_argument("--off", action="store_true", help="no shedding: placement_sim.py's greedy")
    ap.add_argument("--diag", type=int, default=None, help="print this layer's per-interval time against static")
    args = ap.parse_args()
    if args.trace:
        trace = read_trace(args.trace)
        trace = RoutingTrace(trace.counts_TLWE[: args.steps] * args.scale, trace.steps_T[: args.steps], trace.meta)
    else:
        trace = generate_trace(SyntheticTraceConfig(num_steps=args.steps or 1000, world_size=8, num_experts=64,
                                                    tokens_per_rank=16384, top_k=8, alpha=1.0, seed=0))
    cost = CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=350e9, adaptive_split=True)
    simulator.Replanner = shedding_replanner(args)
    t0 = time.perf_counter()
    static, greedy = simulate(trace, [make_planner("static"), make_planner("greedy")], cost, world_size=8,
                              slots_per_rank=-(-trace.num_experts // 8) + 2)
    per_layer_L = static.layer_time_TL.sum(0) / greedy.layer_time_TL.sum(0)
    print(f"greedy {static.time_T.mean() / greedy.time_T.mean():.4f}x static, layers "
          + " ".join(f"{x:.3f}" for x in per_layer_L)
          + f", min {per_layer_L.min():.3f}, {greedy.bytes_moved / 1e9:.1f} GB moved, {greedy.replans} re-plans "
          f"({time.perf_counter() - t0:.0f} s)")
    if args.diag is not None:
        iv = ReplanPolicy().interval
        st_T, gr_T = static.layer_time_TL[:, args.diag], greedy.layer_time_TL[:, args.diag]
        for k in range(0, len(st_T), iv):
            d = st_T[k:k + iv] - gr_T[k:k + iv]
            if abs(d.sum()) > 1e-6:
                print(f"steps {k}-{k + iv - 1}: static - greedy {d.sum() * 1e3:+.3f} ms, per step "
                      + " ".join(f"{x * 1e3:+.2f}" for x in d))


if __name__ == "__main__":
    main()
