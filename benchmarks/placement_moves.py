"""Placement moves blocking vs asynchronous: the training step with moves, on the real runtime.

Legend: L MoE layers, W ranks, S slots per rank, E experts.

A model of ``--layers`` expert-parallel MoE layers trains with AdamW under a
``PlacementScheduler`` whose planner rotates the experts of the first ``--moved-slots`` slot
columns one rank on (every rank sends and receives that many slots per layer: weights plus Adam
state) every ``--interval`` steps. Per mode, the median step time (forward, backward, gradient
sync, optimizer step, scheduler step, and ``--host-ms`` of host work standing in for data loading
between the optimizer step and the next forward), each step ended by a device synchronisation:

  static    the same loop without re-plans (the floor)
  blocking  ``async_moves=False``: ``scheduler.step()`` waits for the moves
  async     ``async_moves=True``: posted by ``scheduler.step()``, landed before each layer's forward

It also checks that the blocking and async runs end with the same parameters (bitwise).

GPU:  torchrun --nproc-per-node 8 benchmarks/placement_moves.py          (NCCL, bf16)
      ... --d-model 2048 --d-ff 1408 --experts 64 --top-k 6 --layers 4 --interval 1 --host-ms 2
CPU smoke check:  torchrun --nproc-per-node 2 benchmarks/placement_moves.py --tiny   (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import flexmoe
from flexmoe.placement import CostModel, PlacementTable, ReplanPolicy
from flexmoe.runtime import sync_gradients


class RotatePlanner:
    """Move the experts of the first ``columns`` slot columns one rank on, at every plan."""

    def __init__(self, columns: int):
        self.columns = columns

    def plan(self, table, counts_WE, cost_model):
        se, share = table.slot_expert_WS.copy(), table.share_WS.copy()
        c = self.columns
        se[:, :c], share[:, :c] = np.roll(se[:, :c], 1, axis=0), np.roll(share[:, :c], 1, axis=0)
        return PlacementTable(table.num_experts, se, share, table.version + 1)


def build(args, device, dtype):
    torch.manual_seed(0)
    world = dist.get_world_size()
    cfg = flexmoe.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k)
    slots = args.experts // world + args.spare
    layers = [flexmoe.MoELayer(cfg, ep_group=dist.group.WORLD,
                               placement=PlacementTable.static(args.experts, world, slots))
              for _ in range(args.layers)]
    model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run(args, mode, device, dtype):
    model, opt = build(args, device, dtype)
    sched = None
    if mode != "static":
        cost = CostModel(c_tok=1e-9, bytes_per_token=2 * args.d_model, a2a_bw=1e11, grad_bytes=1, move_bytes=1)
        sched = flexmoe.PlacementScheduler(model, opt, RotatePlanner(args.moved_slots), cost,
                                           policy=ReplanPolicy(interval=args.interval, warmup=1, guard=False),
                                           async_moves=mode == "async")
    g = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, generator=g)
    times, moved = [], 0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(x).float().square().mean().backward()
        sync_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = sched.step() if sched is not None else None
        if metrics:
            moved = max(moved, sum(m["bytes_sent"] for m in metrics["layers"]))
        time.sleep(args.host_ms / 1000)  # the host work before the next forward (data loading)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if sched is not None:
        sched.finish_moves()
    state = [p.detach().clone() for p in model.state_dict().values()]
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's median
    return float(t) * 1e3, moved, state


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--spare", type=int, default=2, help="spare slots per rank")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    parser.add_argument("--moved-slots", type=int, default=2, help="slot columns rotated per plan")
    parser.add_argument("--interval", type=int, default=1, help="re-plan every so many steps")
    parser.add_argument("--host-ms", type=float, default=2.0, help="host work between optimizer step and forward")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shapes, gloo, float64")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.d_model, args.d_ff, args.experts, args.top_k, args.layers = 16, 8, 8, 2, 2
        args.tokens, args.steps, args.warmup, args.moved_slots = 32, 4, 1, 1
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float64
    rows = {mode: run(args, mode, device, dtype) for mode in ("static", "blocking", "async")}
    same = all(torch.equal(a, b) for a, b in zip(rows["blocking"][2], rows["async"][2]))
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  device: {name} x "
              f"{dist.get_world_size()}  torch {torch.__version__}  {dtype}")
        print(f"# D={args.d_model} F={args.d_ff} E={args.experts} k={args.top_k} L={args.layers} "
              f"tokens/rank={args.tokens} moved slot columns={args.moved_slots} interval={args.interval} "
              f"host work={args.host_ms} ms; blocking and async end bitwise equal: {same}")
        print("| mode | step ms (median, slowest rank) | vs static | MB sent per rank per plan |")
        print("|---|---|---|---|")
        for mode, (ms, moved, _) in rows.items():
            print(f"| {mode} | {ms:.2f} | {ms / rows['static'][0]:.3f}x | {moved / 1e6:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
