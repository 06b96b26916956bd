"""What routing every training forward through the tuner's trial clock costs (pipeline_degree="auto").

Under pipeline_degree="auto" the expert-parallel stage routes its inputs (rows, routing weights,
both expert weights) through ``TrainingTrialClock.wrap_inputs``, an autograd identity, on every
training forward, because whether a forward is a tuner trial is known only after the counts are
read. Once the tuner has timed every candidate no forward is a trial, so the wrapper is pure
overhead. Three layers on the same weights and inputs, forward + backward, after the tuner has
finished (checked):
  auto            pipeline_degree="auto", as shipped (inputs wrapped on every forward)
  auto, no wrap   the same, with ``wrap_inputs`` an identity that builds no node (what wrapping
                  on trial forwards only would leave on these forwards)
  fixed           pipeline_degree = the degree "auto" chose (no tuner at all)
Trials interleave the three (A B C A B C ...); a figure is the median (and the fastest) trial's
mean step time, the slowest rank's. CPU, gloo. Prints a table (rank 0).

    python benchmarks/trial_clock.py                           # world size 1 (expert 0 replicated:
                                                               # the exchange path, no all-to-all)
    torchrun --nproc-per-node 2 benchmarks/trial_clock.py      # gloo, 2 ranks
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import flexmoe
from flexmoe.parallel import EPGroup, ParallelConfig
from flexmoe.parallel.tuning import TrainingTrialClock
from flexmoe.placement import PlacementTable
from parallel import print_table


def build(cfg: flexmoe.MoEConfig, state: dict, degree, table) -> flexmoe.MoELayer:
    layer = flexmoe.MoELayer(cfg, ep_group=EPGroup.create(), parallel=ParallelConfig(pipeline_degree=degree),
                             placement=table)
    layer.load_state_dict(state)
    return layer


def step(layer: flexmoe.MoELayer, x_TD: torch.Tensor) -> None:
    layer(x_TD).square().mean().backward()
    layer.zero_grad(set_to_none=True)


def unwrapped(layer: flexmoe.MoELayer, x_TD: torch.Tensor) -> None:
    """``step`` with the clock's input wrapper an identity that builds no autograd node."""
    wrap = TrainingTrialClock.wrap_inputs
    TrainingTrialClock.wrap_inputs = lambda self, *tensors: tensors
    try:
        step(layer, x_TD)
    finally:
        TrainingTrialClock.wrap_inputs = wrap


def init_gloo() -> None:
    """torchrun's environment when present, else a one-process group (CPU, gloo, on a free port)."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def measure(variants: dict, x_TD: torch.Tensor, reps: int, trials: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) over interleaved trials of the mean ms of ``reps`` steps; the slowest rank's."""
    times = {name: [] for name in variants}
    for _ in range(trials):
        for name, (fn, layer) in variants.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                fn(layer, x_TD)
            times[name].append((time.perf_counter() - start) * 1e3 / reps)
    ms = torch.tensor([[statistics.median(times[name]), min(times[name])] for name in variants], dtype=torch.float64)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return dict(zip(variants, map(tuple, ms.tolist())))


def wrapper_alone_us(layer: flexmoe.MoELayer, x_TD: torch.Tensor, reps: int = 2000) -> tuple[float, float]:
    """(with, without) the wrapper: fastest of 5 trials of the mean us of a forward + backward that
    routes the stage's four inputs (rows, routing weights, both expert weights) through
    ``wrap_inputs`` into a sum; nothing else of the layer runs. The difference is the wrapper's own
    cost (its node and four views each way), free of the layer's noise."""
    experts = layer.experts
    weight_N = torch.rand(x_TD.shape[0], requires_grad=True)
    inputs = (x_TD, weight_N, experts.gate_up_proj, experts.down_proj)
    clock = TrainingTrialClock(time.perf_counter, lambda seconds: None)

    def run(wrap: bool) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                tensors = clock.wrap_inputs(*inputs) if wrap else inputs
                sum(t.sum() for t in tensors).backward()
            best = min(best, (time.perf_counter() - start) * 1e6 / reps)
        return best

    return run(True), run(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32,32,8,2,64;64,128,8,2,256;128,256,16,2,1024",
                        help="D,F,E,k,tokens per rank; ';' between shapes")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_gloo()
    device = torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows, alone = [], []
    for shape in args.shapes.split(";"):
        D, F, E, k, T = (int(v) for v in shape.split(","))
        cfg = flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k)
        torch.manual_seed(0)
        state = flexmoe.MoELayer(cfg).state_dict()
        table = None
        if world == 1:  # expert 0 replicated takes the exchange path (one slot per expert runs the one-device FFN)
            fraction_WS = np.ones((1, E + 1))
            fraction_WS[0, [0, E]] = 0.5
            table = PlacementTable(E, np.append(np.arange(E), 0).reshape(1, -1), fraction_WS)
        x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(rank)).to(device).requires_grad_()
        auto = build(cfg, state, "auto", table)
        for _ in range(40):  # every candidate degree tried once per load level
            step(auto, x_TD)
        tuner = auto.experts.tuner
        finished = bool(tuner.best) and not tuner.choose(next(iter(tuner.best)))[1]
        chosen = auto.experts.last_pipeline_degree
        fixed = build(cfg, state, chosen, table)
        ms = measure({"auto": (step, auto), "auto, no wrap": (unwrapped, auto), "fixed": (step, fixed)},
                     x_TD, args.reps, args.trials)
        assert finished and len(tuner.best) == len(tuner.times_ns), "the tuner is still running trials"
        (auto_ms, auto_min), (bare_ms, bare_min), (fixed_ms, fixed_min) = ms.values()
        alone.append([f"D={D} F={F} E={E} k={k}", T, *wrapper_alone_us(auto, x_TD)])
        alone[-1] += [alone[-1][2] - alone[-1][3], f"{(alone[-1][2] - alone[-1][3]) / (auto_min * 1e3) * 100:.2f}%"]
        rows.append([f"D={D} F={F} E={E} k={k}", T, chosen, f"{auto_ms:.3f} / {auto_min:.3f}",
                     f"{bare_ms:.3f} / {bare_min:.3f}", f"{fixed_ms:.3f} / {fixed_min:.3f}",
                     f"{(auto_ms - bare_ms) * 1e3:+.0f} / {(auto_min - bare_min) * 1e3:+.0f}",
                     f"{(auto_ms / bare_ms - 1) * 100:+.1f}% / {(auto_min / bare_min - 1) * 100:+.1f}%"])
    if rank == 0:
        print(f"{datetime.date.today()}  {world} rank(s)  {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores  torch {torch.__version__}")
    print_table(f"Trial clock overhead: forward + backward of one layer, {world} rank(s), gloo, CPU float32, "
                f"{args.threads} thread(s) per rank; median / fastest of {args.trials} interleaved trials of "
                f"{args.reps} steps", ["shape", "tokens/rank", "degree chosen", "auto ms", "auto, no wrap ms",
                                       "fixed ms", "wrap us/step", "wrap cost"], rows)
    print_table("The wrapper alone (rank 0 of the same run): a forward + backward of a sum of the stage's four inputs, "
                "fastest of 5 trials of 2000", ["shape", "tokens/rank", "with wrap us", "without us", "wrap us",
                                               "of the fastest auto step"], alone)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
