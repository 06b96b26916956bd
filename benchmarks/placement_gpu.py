"""Placement on real kernels: the simulator's plans, each rank's expert stage timed on the GPU.

Legend: T steps, L layers, W ranks, S slots per rank, E experts.

For every planner the placement simulator replays the trace (same re-plan policy as
``benchmarks/placement_sim.py``); at ``--samples`` evenly spaced steps its ``on_step`` hook hands
over that step's tables and true counts. For each sampled (step, layer) and each simulated rank,
the rank's expert stage is run on this device: ``GroupedExperts`` over the rank's S slots
(forward + backward, bf16), with the token rows per slot that the plan gives it
(``replica_quotas``, the same split the cost model charges). Per planner it prints the busiest
rank's measured time next to the cost model's predicted compute (error), and the measured ratio
to static: compute only, and the full step with the measured compute in place of the modelled
one (all-to-all, gradient sync and moves stay modelled: one GPU cannot measure them). A second
error column uses ``c_tok`` / ``c_slot`` fitted (least squares) to this run's own measurements.

GPU:  python benchmarks/placement_gpu.py         (synthetic drifting trace + benchmarks/traces/*.jsonl[.gz])
      python benchmarks/placement_gpu.py --trace run/routing_trace.jsonl --scale 8
      --quick: fewer steps and samples, first layer of each trace
``--layers`` picks the layers replayed and timed (the simulator's CPU time grows with them).
CPU smoke check:  python benchmarks/placement_gpu.py --tiny
Plans made on one machine, timed on another (the simulator is CPU-bound, the GPU's time short):
      python benchmarks/placement_gpu.py ... --save-plans plans.pkl   (CPU: replay only, no timing)
      python benchmarks/placement_gpu.py --load-plans plans.pkl       (GPU: time the saved plans)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import pickle
import sys
import traceback

import numpy as np
import torch

from flexmoe.config import MoEConfig
from flexmoe.experts import GroupedExperts
from flexmoe.placement import CostModel, ReplanPolicy, make_planner
from flexmoe.placement.split import replica_quotas
from flexmoe.sim import RoutingTrace, SyntheticTraceConfig, generate_trace, read_trace
from flexmoe.sim.simulator import simulate_planner, split_ranks
from layer import header, timed

PLANNERS = ["static", "eplb", "shadow", "greedy", "oracle"]
TRACE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")


@dataclasses.dataclass
class Sample:
    """One sampled (step, layer) of one planner: rows per slot of every rank, modelled extras."""

    planner: str
    t: int
    layer: int
    quota_WS: np.ndarray
    other_s: float  # modelled a2a + sync (+ moves) of this layer's step


def collect(trace_LWE_T: np.ndarray, cost: CostModel, slots: int, policy: ReplanPolicy, samples_T: set[int],
            layers: list[int]) -> tuple[dict[str, list[Sample]], dict[str, float]]:
    """Run every planner through the simulator; keep the sampled steps' per-rank slot rows."""
    out: dict[str, list[Sample]] = {}
    modelled: dict[str, float] = {}
    for name in PLANNERS:
        planner = make_planner(name)
        got: list[Sample] = []

        def on_step(t, tables, counts_LWE, got=got):
            if t not in samples_T:
                return
            for layer in layers:
                step = cost.step_time(tables[layer], counts_LWE[layer])
                quota_WS = replica_quotas(tables[layer], counts_LWE[layer].sum(0))
                got.append(Sample(name, t, layer, quota_WS, step.a2a + step.sync))

        result = simulate_planner(planner, trace_LWE_T, cost, slots, policy, on_step)
        for s in got:  # a re-plan's move time belongs to the step it happened before
            s.other_s += result.move_T[s.t] / len(layers)
        out[name] = got
        modelled[name] = float(result.time_T.mean())
    return out, modelled


class RankStage:
    """Times one rank's expert stage: S local experts, given rows per slot, forward + backward."""

    def __init__(self, D: int, F: int, S: int, max_rows: int, device: torch.device, reps: int):
        cfg = MoEConfig(d_model=D, d_ff=F, num_experts=S, top_k=1, validate_inputs=False)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: a smoke check only
        self.experts = GroupedExperts(cfg).to(device=device, dtype=dtype)
        self.use_triton = device.type == "cuda"
        self.x_ND = torch.randn(max_rows, D, device=device, dtype=dtype)
        self.dy_ND = torch.randn(max_rows, D, device=device, dtype=dtype)
        self.scale_N = torch.rand(max_rows, device=device, dtype=dtype)
        self.device, self.reps = device, reps
        self.cache: dict[tuple, float] = {}

    def ms(self, rows_S: np.ndarray) -> float:
        key = tuple(int(r) for r in rows_S)
        if sum(key) == 0:
            return 0.0
        if key not in self.cache:
            N = sum(key)
            offsets_E = torch.tensor(np.cumsum(key), device=self.device, dtype=torch.int32)
            x = self.x_ND[:N].detach().requires_grad_(True)
            dy, scale = self.dy_ND[:N], self.scale_N[:N]
            params = list(self.experts.parameters())

            def step():
                for p in params:
                    p.grad = None
                x.grad = None
                self.experts(x, offsets_E, scale, self.use_triton).backward(dy)

            self.cache[key] = timed(step, self.reps, self.device, trials=3)  # median of 3 x reps calls
        return self.cache[key]


def fit(pairs: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Least-squares ``ms = rows * c_tok + active_slots * c_slot`` (both >= 0), in seconds."""
    A = np.array([[r, a] for r, a, _ in pairs], dtype=np.float64)
    y = np.array([m for _, _, m in pairs]) * 1e-3
    c, *_ = np.linalg.lstsq(A, y, rcond=None)
    if (c < 0).any():  # one term only: the one whose fit alone is non-negative and closer
        keep = int(c[1] > c[0])
        c = np.zeros(2)
        c[keep] = max(float(A[:, keep] @ y / (A[:, keep] @ A[:, keep])), 0.0)
    return float(c[0]), float(c[1])


def report(title: str, samples: dict[str, list[Sample]], modelled: dict[str, float], stage: RankStage,
           cost: CostModel) -> None:
    """Time every sampled rank and print the per-planner table."""
    rows = {}
    pairs = []
    for name, got in samples.items():
        meas_busy, pred_busy, meas_step, imbalance = [], [], {}, []
        for s in got:
            ms_W = np.array([stage.ms(q) for q in s.quota_WS])
            pred_W = (s.quota_WS.sum(1) * cost.c_tok + (s.quota_WS > 0).sum(1) * cost.c_slot) * 1e3
            pairs += [(int(q.sum()), int((q > 0).sum()), m) for q, m in zip(s.quota_WS, ms_W) if q.sum()]
            meas_busy.append(ms_W.max())
            pred_busy.append(pred_W.max())
            imbalance.append(ms_W.max() / ms_W.mean() if ms_W.mean() > 0 else 1.0)
            meas_step[s.t] = meas_step.get(s.t, 0.0) + ms_W.max() + s.other_s * 1e3
        rows[name] = dict(meas=np.mean(meas_busy), pred=np.mean(pred_busy), imbalance=np.mean(imbalance),
                          step=np.mean(list(meas_step.values())), n=len(meas_step), got=got)
    c_tok, c_slot = fit(pairs)
    base = rows.get("static")
    print(f"\n## {title}")
    print(f"cost model: c_tok {cost.c_tok:.3e} s/row, c_slot {cost.c_slot:.2e} s; fitted to this run's "
          f"{len(pairs)} rank timings: c_tok {c_tok:.3e}, c_slot {c_slot:.2e}")
    print("| planner | sampled steps | busiest rank measured ms | predicted ms | error | error, fitted constants "
          "| measured rank-time balance | measured compute vs static | step (measured compute) vs static "
          "| modelled step vs static (all steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        fitted = np.mean([((s.quota_WS.sum(1) * c_tok + (s.quota_WS > 0).sum(1) * c_slot) * 1e3).max()
                          for s in r["got"]])
        vs_meas = f"{base['meas'] / r['meas']:.3f}x" if base else "-"
        vs_step = f"{base['step'] / r['step']:.3f}x" if base else "-"
        print(f"| {name} | {r['n']} | {r['meas']:.3f} | {r['pred']:.3f} | {r['pred'] / r['meas'] - 1:+.1%} "
              f"| {fitted / r['meas'] - 1:+.1%} | {r['imbalance']:.3f} | {vs_meas} | {vs_step} "
              f"| {modelled['static'] / modelled[name]:.3f}x |", flush=True)


def load_traces(args) -> list[tuple[str, RoutingTrace, int]]:
    """(title, trace at ``--world-size`` ranks, scale) for the synthetic trace and each recorded one."""
    W = args.world_size
    out = []
    if not args.no_synthetic:
        cfg = SyntheticTraceConfig(num_steps=args.steps, world_size=W, num_experts=args.experts,
                                   tokens_per_rank=args.tokens_per_rank, top_k=args.top_k, seed=0)
        out.append((f"synthetic drifting Zipf(1.0), drift {cfg.drift}, {cfg.num_steps} steps, {W} ranks, "
                    f"{cfg.num_experts} experts top-{cfg.top_k}, {cfg.tokens_per_rank} tokens per rank",
                    generate_trace(cfg), 1))
    paths = args.trace if args.trace is not None else sorted(glob.glob(os.path.join(TRACE_DIR, "*.jsonl")) + glob.glob(os.path.join(TRACE_DIR, "*.jsonl.gz")))
    for path in paths:
        trace = read_trace(path)
        counts = trace.counts_TLWE[: args.steps]
        if trace.world_size < W:
            counts = split_ranks(counts, W)
        per_rank = counts[0, 0].sum() / W
        scale = args.scale or max(1, round(args.tokens_per_rank * args.top_k / max(per_rank, 1)))
        out.append((f"{os.path.basename(path)}: {counts.shape[0]} steps x {counts.shape[1]} layers, "
                    f"{trace.world_size} recorded rank(s) -> {W}, {trace.num_experts} experts, counts x{scale} "
                    f"({per_rank * scale:.0f} rows per rank and layer)",
                    RoutingTrace(counts * scale, trace.steps_T[: counts.shape[0]], trace.meta), scale))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="*", default=None, help="recorded traces (default: benchmarks/traces/*.jsonl and *.jsonl.gz)")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--scale", type=int, default=0,
                        help="multiply recorded counts (default: to --tokens-per-rank x --top-k rows per rank)")
    parser.add_argument("--steps", type=int, default=200, help="steps replayed per trace")
    parser.add_argument("--samples", type=int, default=12, help="sampled steps per trace, timed on the device")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer indices to time")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048, help="expert shape timed (default Qwen3-like)")
    parser.add_argument("--d-ff", type=int, default=768)
    parser.add_argument("--flops", type=float, default=764e12, help="cost model FLOP/s (the simulator's default)")
    parser.add_argument("--mem-bw", type=float, default=3.0e12)
    parser.add_argument("--a2a-bw", type=float, default=350e9)
    parser.add_argument("--reps", type=int, default=1, help="calls per timed trial (3 trials, after 3 warm-up calls)")
    parser.add_argument("--quick", action="store_true", help="150 steps, 8 samples, first layer of each trace")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shapes and traces")
    parser.add_argument("--save-plans", metavar="PATH", help="replay and save the sampled plans; time nothing")
    parser.add_argument("--load-plans", metavar="PATH", help="time plans saved by --save-plans (no replay)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.quick:
        args.steps, args.samples, args.layers = 150, 8, "0"
    if args.tiny:
        args.steps, args.samples, args.world_size, args.experts = 30, 3, 4, 16
        args.tokens_per_rank, args.top_k, args.d_model, args.d_ff, args.reps = 256, 2, 64, 32, 1
    cost = CostModel.from_shape(args.d_model, args.d_ff, flops=args.flops, mem_bw=args.mem_bw, a2a_bw=args.a2a_bw)
    print(header(device))
    dtype = "bf16" if device.type == "cuda" else "float32"
    print(f"expert stage timed: D={args.d_model}, F={args.d_ff}, SwiGLU, {dtype}, forward + backward "
          f"(GroupedExperts, {'Triton + grouped_mm' if device.type == 'cuda' else 'torch'}); "
          f"cost model from_shape(flops={args.flops:.3g}, mem_bw={args.mem_bw:.3g}, a2a_bw={args.a2a_bw:.3g})")
    saved = []
    for title, samples, modelled, S in _plans(args, cost):
        if args.save_plans:
            saved.append((title, samples, modelled, S))
            print(f"replayed: {title}")
            continue
        try:
            max_rows = max(int(s.quota_WS.sum(1).max()) for got in samples.values() for s in got)
            stage = RankStage(args.d_model, args.d_ff, S, max(max_rows, 1), device, args.reps)
            report(title, samples, modelled, stage, cost)
            del stage
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - one failing trace must not end the run
            print(f"\n## {title}: FAILED")
            traceback.print_exc(file=sys.stdout)
    if args.save_plans:
        with open(args.save_plans, "wb") as f:
            pickle.dump(saved, f)
        print(f"plans of {len(saved)} trace(s) saved to {args.save_plans}")


def _plans(args, cost: CostModel):
    """(title, samples, modelled, S) per trace: replayed here, or read from ``--load-plans``."""
    if args.load_plans:
        with open(args.load_plans, "rb") as f:  # our own file, written by --save-plans
            yield from pickle.load(f)
        return
    for title, trace, _ in load_traces(args):
        try:
            counts = trace.counts_TLWE
            L = counts.shape[1]
            picked = list(range(L)) if args.layers == "all" else [int(i) for i in args.layers.split(",") if int(i) < L]
            counts = counts[:, picked]  # only the timed layers are replayed (the bytes budget spans these)
            T, L, W, E = counts.shape
            S = -(-E // W) + 2
            first = min(T - 1, ReplanPolicy().first_plan + 1)
            samples_T = {int(t) for t in np.linspace(first, T - 1, args.samples).round()}
            samples, modelled = collect(counts, cost, S, ReplanPolicy(), samples_T, list(range(L)))
        except Exception:  # noqa: BLE001 - one failing trace must not end the run
            print(f"\n## {title}: FAILED")
            traceback.print_exc(file=sys.stdout)
            continue
        yield f"{title}; {S} slots per rank; layers replayed and timed {picked}", samples, modelled, S

if __name__ == "__main__":
    main()
