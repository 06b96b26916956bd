"""``flexmoe simulate``: replay a routing trace under several placement planners.

    flexmoe simulate TRACE [--planners static,greedy,...] [--world-size W] [--slots-per-rank S] [--plot out.png]
                     [--interval N] [--warmup N] [--predictor KIND] [--no-guard]   # the ReplanPolicy
    flexmoe simulate --synthetic [TRACE] [--steps ...]   # generate a trace (saved to TRACE if given), then replay it

"rank balance" here is max / mean token load over *ranks* (what placement changes); training's
"expert balance" is max / mean over *experts*. ``--world-size`` smaller than the trace's merges
neighbouring ranks; larger (a multiple) deals each recorded rank's rows round-robin to virtual
ranks (``deal_to_ranks``), e.g. the one-rank trace of ``flexmoe train`` over 8 ranks.
A bad input is a one-line error with exit status 2, raised before the replay and before any
``--json`` or ``--plot`` file is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from ..placement.cost_model import CostModel
from ..placement.planner import PLANNERS, make_planner
from ..placement.policy import ReplanPolicy
from ..placement.predict import PREDICTORS, PredictorConfig
from .simulator import format_table, plot_results, simulate
from .synthetic import SyntheticTraceConfig, generate_trace
from .trace import RoutingTrace, deal_to_ranks, read_trace


DEFAULT_PLANNERS = "static,shadow,eplb,proportional,greedy,oracle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", nargs="?", help="trace file (JSON Lines); with --synthetic, where to save it")
    parser.add_argument("--planners", default=DEFAULT_PLANNERS,
                        help=f"comma list of planners to compare, of {', '.join(PLANNERS)} (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to simulate: a divisor of the trace's (neighbours merged) or a multiple of it "
                             "(each rank's rows dealt round-robin to virtual ranks) (default: the trace's)")
    parser.add_argument("--slots-per-rank", type=int, default=None,
                        help="expert slots per rank (default: ceil(E / W) + 2)")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS steps (default: all)")
    parser.add_argument("--plot", default=None,
                        help="write a PNG of rank balance and step time over steps (needs matplotlib; default: none)")
    parser.add_argument("--json", default=None, help="write the summary rows as JSON to this file (default: none)")
    _add_policy_arguments(parser)
    cost = parser.add_argument_group("cost model (per expert shape and hardware rates)")
    cost.add_argument("--d-model", type=int, default=2048, help="model width D of the experts (default: %(default)s)")
    cost.add_argument("--d-ff", type=int, default=768, help="expert hidden width F (default: %(default)s)")
    cost.add_argument("--flops", type=float, default=764e12,
                      help="expert GEMM FLOP/s (default: %(default)s, H100 bf16 measured)")
    cost.add_argument("--mem-bw", type=float, default=3.0e12,
                      help="memory bytes/s (default: %(default)s, H100 measured)")
    cost.add_argument("--a2a-bw", type=float, default=350e9,
                      help="all-to-all bytes/s per rank within a node (default: %(default)s, assumed)")
    cost.add_argument("--a2a-bw-inter", type=float, default=None,
                      help="all-to-all bytes/s per rank across nodes (default: same as --a2a-bw)")
    cost.add_argument("--ranks-per-node", type=int, default=None,
                      help="ranks per node, for --a2a-bw-inter (default: all ranks on one node)")
    cost.add_argument("--sync-overlap", type=float, default=0.0,
                      help="fraction in [0, 1] of backward that can hide the replica gradient sum "
                           "(what MoERuntime(overlap_replica_sync=True) posts during backward) "
                           "(default: %(default)s, the plain sync after backward)")
    cost.add_argument("--fixed-split", action="store_true",
                      help="model fixed-share token splits between replicas instead of the runtime's adaptive split")
    cost.add_argument("--measure", action="store_true",
                      help="time the expert FFN and a local copy on this machine instead of --flops/--mem-bw")
    syn = parser.add_argument_group("synthetic trace")
    syn.add_argument("--synthetic", action="store_true", help="generate a synthetic trace instead of reading TRACE")
    syn.add_argument("--generate-only", action="store_true", help="with --synthetic: only write TRACE")
    defaults = SyntheticTraceConfig()
    for flag, kind, help_text in (
        ("--num-steps", int, "training steps in the trace"),
        ("--num-layers", int, "MoE layers"),
        ("--trace-world-size", int, "source ranks recorded in the trace"),
        ("--num-experts", int, "experts per layer"),
        ("--tokens-per-rank", int, "tokens each rank routes per step and layer"),
        ("--top-k", int, "experts per token"),
        ("--alpha", float, "Zipf exponent of expert popularity (0 = uniform)"),
        ("--drift", float, "popularity drift rate per step"),
        ("--rank-skew", float, "how much the ranks' expert mixes differ (0 = same mix everywhere)"),
        ("--step-noise", float, "step-to-step noise of the popularity"),
        ("--seed", int, "random seed"),
    ):
        field = flag[2:].replace("-", "_").replace("trace_world_size", "world_size")
        syn.add_argument(flag, type=kind, default=getattr(defaults, field), help=f"{help_text} (default: %(default)s)")


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ReplanPolicy`` flags: the runtime scheduler's cadence, predictor and guard."""
    pol = parser.add_argument_group("re-plan policy (the runtime scheduler's; the oracle plans before every step)")
    base, pred = ReplanPolicy(), PredictorConfig()
    pol.add_argument("--interval", type=int, default=base.interval,
                     help="steps between plans; a plan is kept that long (default: %(default)s)")
    pol.add_argument("--warmup", type=int, default=None,
                     help="steps observed before the first plan (default: the interval)")
    pol.add_argument("--predictor", choices=("planner", *PREDICTORS), default="planner",
                     help="load predictor of every layer: ema, window_max, mean_std or trend (see "
                          "docs/placement_planning.md), or planner for each planner's own (default: %(default)s)")
    for flag, kind, what in (("--predictor-decay", float, "ema decay (0: the last step)"),
                             ("--predictor-window", int, "steps in the window of window_max, mean_std, trend"),
                             ("--predictor-z", float, "std multiple of mean_std"),
                             ("--predictor-lead", float, "steps ahead trend extrapolates")):
        pol.add_argument(flag, type=kind, default=getattr(pred, flag[12:]), help=f"{what} (default: %(default)s)")
    pol.add_argument("--guard", action=argparse.BooleanOptionalAction, default=base.guard,
                     help="judge past plans on the observed steps (misses, account against static, backtest); "
                          "--no-guard takes every plan (default: on)")
    pol.add_argument("--guard-gain", type=float, default=base.guard_gain,
                     help="hysteresis step: extra relative gain a change needs after each miss (default: %(default)s)")
    pol.add_argument("--bytes-budget", type=float, default=None,
                     help="network bytes one plan may move over all layers (default: no limit)")
    pol.add_argument("--score-window", type=int, default=None,
                     help="last steps a plan is scored on, 0: the prediction alone (default: the interval)")
    pol.add_argument("--noise-z", type=float, default=base.noise_z,
                     help="standard errors of its gain over the window a change must clear (default: %(default)s)")
    pol.add_argument("--trust", type=int, default=base.trust,
                     help="out-of-sample results (holdout, past proposals) whose mean gain must be > 0 before a "
                          "change, 0: off (default: %(default)s)")
    pol.add_argument("--drift-gate", type=float, default=base.drift_gate,
                     help="net relative gain over static EP a change must also show on the window one interval "
                          "earlier (default: off)")
    pol.add_argument("--shed-window", type=int, default=base.shed_window,
                     help="between plans, after every step, drop replicas that did not pay on the last "
                          "SHED_WINDOW steps, on layers where the planner's record is not positive (with the guard and "
                          "--trust > 0; default: off)")


def _policy(args) -> ReplanPolicy:
    """The ``ReplanPolicy`` of the flags (the same object ``PlacementScheduler`` takes)."""
    for flag, value, low in (("--interval", args.interval, 1), ("--warmup", args.warmup, 0),
                             ("--score-window", args.score_window, 0), ("--trust", args.trust, 0), ("--noise-z", args.noise_z, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    predictor = None
    if args.predictor != "planner":
        predictor = PredictorConfig(args.predictor, decay=args.predictor_decay, window=args.predictor_window,
                                    z=args.predictor_z, lead=args.predictor_lead)
    return ReplanPolicy(interval=args.interval, warmup=args.warmup, predictor=predictor, guard=args.guard,
                        guard_gain=args.guard_gain, bytes_budget=args.bytes_budget, score_window=args.score_window,
                        noise_z=args.noise_z, trust=args.trust, drift_gate=args.drift_gate,
                        shed_window=args.shed_window)


def _describe(policy: ReplanPolicy) -> str:
    p = policy.predictor
    predictor = "each planner's own" if p is None else {
        "ema": f"ema decay {p.decay}", "window_max": f"window max {p.window}",
        "mean_std": f"mean + {p.z} std over {p.window}", "trend": f"trend over {p.window}, {p.lead} ahead"}[p.kind]
    budget = "" if policy.bytes_budget is None else f", at most {policy.bytes_budget:.3g} bytes a plan"
    return (f"re-plan every {policy.interval} steps from step {policy.first_plan}, predictor {predictor}, "
            f"guard {'on (gain ' + str(policy.guard_gain) + ', trust ' + str(policy.trust) + ')' if policy.guard else 'off'}"
            f"{budget}, scored on the last {policy.window} steps (noise z {policy.noise_z})"
            f"{'' if policy.drift_gate is None else f', drift gate {policy.drift_gate}'}"
            f"{f', shedding on the last {policy.shed_window} steps' if policy.sheds else ''}")


def _cost(args) -> CostModel:
    extra = {"a2a_bw_inter": args.a2a_bw_inter, "ranks_per_node": args.ranks_per_node,
             "sync_overlap": args.sync_overlap, "adaptive_split": not args.fixed_split}
    if args.measure:
        from ..runtime.measure import measure_cost_model

        return measure_cost_model(args.d_model, args.d_ff, a2a_bw=args.a2a_bw, **extra)
    return CostModel.from_shape(args.d_model, args.d_ff, flops=args.flops, mem_bw=args.mem_bw,
                                a2a_bw=args.a2a_bw, **extra)


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # bad input: TraceError, config errors, unwritable files
        print(f"flexmoe simulate: error: {err}", file=sys.stderr)
        return 2


def _check_args(args) -> tuple[list, ReplanPolicy]:
    """The planners and the policy, after every check that needs no trace (so nothing runs or is
    written first)."""
    if not args.synthetic and not args.trace:
        raise ValueError("give a TRACE file or --synthetic")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'flexmoe[train]' (or leave out --plot)")
    for flag, value in (("--world-size", args.world_size), ("--slots-per-rank", args.slots_per_rank),
                        ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    names = [n.strip() for n in args.planners.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANNERS]
    if unknown or not names:
        what = f"unknown planner {', '.join(map(repr, unknown))}" if unknown else "no planner"
        raise ValueError(f"{what} in --planners; choose from {', '.join(PLANNERS)}")
    return [make_planner(n) for n in names], _policy(args)


def _load_trace(args) -> RoutingTrace | None:
    """The trace to replay (None after --generate-only)."""
    if not args.synthetic:
        return read_trace(args.trace)
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
    return None if args.generate_only else trace


def _ranks(trace: RoutingTrace, world_size: int | None) -> tuple[RoutingTrace, int, str]:
    """The trace over ``world_size`` ranks (virtual ranks dealt when it is a multiple), W, and a note."""
    W0 = trace.world_size
    W = world_size or W0
    if W % W0 == 0 and W > W0:
        dealt = RoutingTrace(deal_to_ranks(trace.counts_TLWE, W), trace.steps_T, trace.meta)
        return dealt, W, (f"note: the trace has {W0} rank{'s' if W0 > 1 else ''}; each one's rows are dealt round-robin to "
                          f"{W // W0} virtual ranks (same expert mix on every rank, so this models expert "
                          "load over ranks, not token locality)")
    if W0 % W:
        raise ValueError(f"--world-size {W} must divide the trace's {W0} ranks or be a multiple of them")
    if W == 1:
        return trace, W, ("note: with 1 rank every planner has rank balance 1.00 and runs at 1.00x static, "
                          "so this compares nothing; pass --world-size W (e.g. --world-size 8) to deal "
                          "the trace's tokens over W virtual ranks")
    return trace, W, ""


def _run(args) -> int:
    planners, policy = _check_args(args)
    trace = _load_trace(args)
    if trace is None:
        return 0
    if args.steps is not None:
        trace = RoutingTrace(trace.counts_TLWE[: args.steps], trace.steps_T[: args.steps], trace.meta)
    if trace.num_steps == 0:
        raise ValueError(f"{args.trace} holds no complete step (every layer recorded) to replay")
    trace, W, note = _ranks(trace, args.world_size)
    S = args.slots_per_rank or -(-trace.num_experts // W) + 2
    results = simulate(trace, planners, _cost(args), world_size=W, slots_per_rank=S, policy=policy)
    print(f"{trace.num_steps} steps x {trace.num_layers} layers, {W} ranks, {trace.num_experts} experts, "
          f"{S} slots per rank")
    print(_describe(policy))
    if note:
        print(note)
    print(format_table(results))
    print("rank balance: max / mean token load over ranks (1 = even); training's expert balance is over experts")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.summary() for r in results], f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(results, args.plot, title=f"{W} ranks, {trace.num_experts} experts, {S} slots per rank")
        print(f"wrote {args.plot}")
    return 0
