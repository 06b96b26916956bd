"""Replica gradient sync after backward vs overlapped with it (MoERuntime(overlap_replica_sync=...)).

    torchrun --nproc-per-node 2 benchmarks/replica_sync_overlap.py

CPU, gloo: a dense layer and LAYERS EP layers whose every expert has a replica on every rank
(the most replica-sync traffic a table can have). Times a step's backward + gradient sync
(``before_backward``, ``backward``, ``after_backward``; the forward is not timed) and, of it, the
part after backward (``after_backward``), plain and overlapped, the trials interleaved; prints the
median and best of TRIALS. Says nothing about GPUs: there the sync runs on NCCL while the backward
runs on the device.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoEConfig, MoELayer, MoERuntime, collectives
from flexmoe.placement import PlacementTable

E, D, F, K, T, LAYERS = 4, 256, 512, 2, 256, 4
TRIALS = 15


def everywhere_table(world: int) -> PlacementTable:
    """Every expert on every rank (shares 1/world)."""
    se = np.tile(np.arange(E), (world, 1))
    return PlacementTable(E, se, np.full(se.shape, 1.0 / world))


class Stack(nn.Module):
    def __init__(self, world: int):
        super().__init__()
        torch.manual_seed(0)
        config = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, kernels="torch")
        self.inp = nn.Linear(D, D)
        self.moes = nn.ModuleList(MoELayer(config, ep_group=dist.group.WORLD, placement=everywhere_table(world))
                                  for _ in range(LAYERS))

    def forward(self, x):
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return h


def step_times(model: Stack, moe: MoERuntime, x: torch.Tensor) -> tuple[float, float]:
    """(backward + sync, sync after backward) of one step, in ms (max over ranks)."""
    loss = model(x).square().mean()
    dist.barrier()
    start = time.perf_counter()
    moe.before_backward()
    loss.backward()
    mid = time.perf_counter()
    moe.after_backward()
    end = time.perf_counter()
    model.zero_grad()
    t = torch.tensor([end - start, end - mid]) * 1e3
    collectives.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), float(t[1])


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    runs = {name: (model, MoERuntime(model, overlap_replica_sync=overlap))
            for name, overlap in (("plain", False), ("overlapped", True)) for model in [Stack(world)]}
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
    for model, moe in runs.values():
        for _ in range(2):
            step_times(model, moe, x)
    times = {name: [] for name in runs}
    for _ in range(TRIALS):
        for name, (model, moe) in runs.items():
            times[name].append(step_times(model, moe, x))
    grad_mb = sum(p.numel() * p.element_size() for m in runs["plain"][0].moes for p in m.experts.parameters()) / 2**20
    if rank == 0:
        print(f"gloo on CPU, {world} processes, 1 thread each; {LAYERS} EP layers, E={E}, d_model={D}, d_ff={F}, "
              f"{T} tokens per rank, every expert on every rank ({grad_mb:.0f} MiB of expert gradients per rank); "
              f"median (best) of {TRIALS} interleaved trials, max over ranks")
        print("| sync | backward + sync (ms) | after backward (ms) |")
        print("|---|---|---|")
        for name, samples in times.items():
            total, after = zip(*samples)
            print(f"| {name} | {statistics.median(total):.1f} ({min(total):.1f}) | "
                  f"{statistics.median(after):.1f} ({min(after):.1f}) |")
    collectives.all_reduce(torch.zeros(1))  # the last collective settles: a clean exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
