"""Adaptive parallelism: bytes per step and modelled time of each method (CPU), or measured
forward + backward times of each method on GPUs (``--gpu``, under torchrun).

CPU (default; no communication, nothing timed): for each shape and simulated world size, every
rank routes ``--tokens`` tokens uniformly at random (k distinct experts of E per token), and the
layout's own exchange plans count the bytes each rank receives per training step
(flexmoe.parallel.adaptive_cost). Modelled time = slowest rank's FLOPs at 764 TFLOP/s (dense
bf16, H100) + slowest rank's bytes at 370 GB/s (NVLink 4, effective) or 50 GB/s (400 Gb/s IB
per GPU), no overlap. bf16 (2 bytes per element).

    python benchmarks/adaptive.py
    python benchmarks/adaptive.py --tokens 512,4096,16384 --worlds 4,8,16
    python benchmarks/adaptive.py --shard-degree world    # every expert sharded over all W ranks (m = W)

GPU: every method of the default layout and what "auto" picks, forward + backward of the real
layer, bf16, slowest rank's median of ``--iters`` steps; rank 0 prints the table.

    torchrun --nproc-per-node 8 benchmarks/adaptive.py --gpu --shape 4096,14336,8,2 --tokens 4096
    torchrun --nproc-per-node 4 benchmarks/adaptive.py --gpu --shape 32,64,2,2 --tokens 64   # CPU smoke
"""

from __future__ import annotations

import argparse
import os

import numpy as np

SHAPES = {"Mixtral-like": (4096, 14336, 8, 2), "Qwen3-like": (2048, 768, 128, 8)}
FLOPS, NVLINK, IB = 764e12, 370e9, 50e9


def _name(code: int, m: int) -> str:
    if code == 0:
        return "dp (r=0)"
    if m == 1:
        return "ep = sharded (r=1)"
    return {1: "ep (r=1)", m: f"sharded (r={m})"}.get(code, f"mix r={code}")


def uniform_routing(rng, W: int, T: int, E: int, k: int, Eg: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows per (rank, expert) and (token, group) pairs per (rank, group) when every token of
    every rank picks k distinct experts uniformly at random."""
    counts_WE, pairs_WG = np.zeros((W, E), dtype=np.int64), np.zeros((W, E // Eg), dtype=np.int64)
    for w in range(W):
        expert_TK = np.argpartition(rng.random((T, E)), k - 1, axis=1)[:, :k]
        counts_WE[w] = np.bincount(expert_TK.reshape(-1), minlength=E)
        hit_TG = np.zeros((T, E // Eg), dtype=bool)
        hit_TG[np.arange(T)[:, None], expert_TK // Eg] = True
        pairs_WG[w] = hit_TG.sum(axis=0)
    return counts_WE, pairs_WG


def cpu_table(tokens: list[int], worlds: list[int], seed: int, shard_degree: str) -> None:
    from flexmoe.parallel.adaptive_cost import method_cost
    from flexmoe.parallel.shard_layout import ShardLayout

    rng = np.random.default_rng(seed)
    print("MODELLED (counted bytes, modelled time): per rank and training step, bf16")
    print(f"| shape | W | m | tokens/rank | method | param MB | token MB | total MB | ms @NVLink | ms @IB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, (D, F, E, k) in SHAPES.items():
        for W in worlds:
            layout = ShardLayout.build(W, E, F, True, W if shard_degree == "world" else None)
            for T in tokens:
                # Uniform routing: each rank's T*k (token, expert) pairs over E experts.
                counts_WE, pairs_WG = uniform_routing(rng, W, T, E, k, layout.experts_per_group)
                costs = [method_cost(layout, counts_WE, pairs_WG, c, D, k, 2) for c in (0,) + layout.spreads]
                best_nv = min(costs, key=lambda c: c.modelled_s(FLOPS, NVLINK)).code
                best_ib = min(costs, key=lambda c: c.modelled_s(FLOPS, IB)).code
                for c in costs:
                    nv, ib = c.modelled_s(FLOPS, NVLINK) * 1e3, c.modelled_s(FLOPS, IB) * 1e3
                    print(f"| {shape} | {W} | {layout.shard_degree} | {T} | {_name(c.code, layout.shard_degree)} | "
                          f"{c.param_bytes / 1e6:.0f} | {c.token_bytes / 1e6:.0f} | {c.total_bytes / 1e6:.0f} | "
                          f"{nv:.2f}{' *' if c.code == best_nv else ''} | {ib:.2f}{' *' if c.code == best_ib else ''} |")
    print("* = fastest modelled method of its (shape, W, tokens) at that bandwidth")


def measured_table(shape: tuple[int, int, int, int], tokens: int, iters: int) -> None:
    """Forward + backward of the real layer per method, and what "auto" picks. On CUDA: NCCL,
    bf16, CUDA events; without CUDA: gloo, float32, wall clock (a smoke check, not a figure)."""
    import time

    import torch
    import torch.distributed as dist

    from flexmoe import AdaptiveConfig, MoEConfig, MoELayer

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device, dtype = (torch.device("cuda"), torch.bfloat16) if on_gpu else (torch.device("cpu"), torch.float32)
    D, F, E, k = shape
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, validate_inputs=False)

    def now() -> float:
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    rows = []
    for method in ("dp",) + tuple(range(1, world + 1)) + ("auto",):
        try:
            layer = MoELayer(cfg, ep_group=dist.group.WORLD, parallel=AdaptiveConfig(method=method))
        except ValueError:
            continue  # r not offered by the layout
        layer = layer.to(device, dtype)
        m = layer.experts.layout.shard_degree
        x = torch.randn(tokens, D, device=device, dtype=dtype, requires_grad=True,
                        generator=torch.Generator(device).manual_seed(rank))
        warmup = 3 + (2 * len(layer.experts.candidates) + 1 if method == "auto" else 0)
        times = []
        for i in range(iters + warmup):
            dist.barrier()
            start = now()
            layer(x).float().square().mean().backward()
            if i >= warmup:
                times.append(now() - start)
        slowest = torch.tensor([float(np.median(times))], device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        label = _name(layer.experts.last_method, m) if method != "auto" else f"auto -> {_name(layer.experts.last_method, m)}"
        rows.append((label, slowest.item() * 1e3))
        del layer, x
        if on_gpu:
            torch.cuda.empty_cache()
    if rank == 0:
        kind = "MEASURED" if on_gpu else "CPU SMOKE CHECK (gloo, float32; not a figure)"
        print(f"{kind}: forward + backward of one layer, D={D} F={F} E={E} k={k}, {tokens} tokens/rank, "
              f"W={world}, m={m}, {dtype}, slowest rank, median of {iters}")
        print("| method | ms |")
        print("|---|---|")
        for label, ms in rows:
            print(f"| {label} | {ms:.2f} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="512,4096,16384", help="tokens per rank (comma separated)")
    parser.add_argument("--worlds", default="4,8,16", help="simulated world sizes (CPU mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-degree", choices=["default", "world"], default="default",
                        help="CPU mode: the default layout (smallest m), or every expert sharded over all W ranks")
    parser.add_argument("--gpu", action="store_true", help="measure the real layer (run under torchrun; "
                        "without CUDA: gloo smoke check)")
    parser.add_argument("--shape", default="4096,14336,8,2", help="D,F,E,k for --gpu")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.gpu:
        measured_table(tuple(int(v) for v in args.shape.split(",")), tokens[0], args.iters)
    else:
        cpu_table(tokens, [int(w) for w in args.worlds.split(",")], args.seed, args.shard_degree)


if __name__ == "__main__":
    main()
