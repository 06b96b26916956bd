"""Expert parallelism: all-to-all bandwidth, layer throughput vs EP size, pipeline degree and
memory strategy. Prints tables (rank 0); every time is the slowest rank's.

One GPU (world size 1: pipeline and bookkeeping overhead against the one-device layer):
    python benchmarks/parallel.py
Several GPUs of one host (NCCL; --ranks-per-node adds hierarchical all-to-all rows):
    torchrun --nproc-per-node 8 benchmarks/parallel.py --ranks-per-node 4
CPU smoke check (gloo, tiny shapes):
    torchrun --nproc-per-node 2 benchmarks/parallel.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import flexmoe
from flexmoe.parallel import EPGroup, ParallelConfig
from flexmoe.parallel.comm import Exchanger
from flexmoe.parallel.stage import dispatch_packer
from flexmoe.placement import PlacementTable
from flexmoe.placement.split import balance_ratio


def init_distributed() -> torch.device:
    """torchrun's environment when present, else a one-process group on a free port."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=datetime.timedelta(minutes=5))
    else:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def timed_ms(fn, device: torch.device, reps: int, trials: int = 5) -> float:
    """Median over trials of the mean time of ``reps`` back-to-back calls; slowest rank's."""
    for _ in range(2):
        fn()
    results = []
    for _ in range(trials):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results.append((time.perf_counter() - start) * 1e3 / reps)
    ms = torch.tensor([statistics.median(results)], device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    if dist.get_rank() != 0:
        return
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------------------------


def bench_all_to_all(args, device, nodes: EPGroup | None) -> None:
    """Uniform traffic: every rank sends ``rows`` dispatch rows (token, k slot ids, k weights)."""
    world = dist.get_world_size()
    ep = EPGroup.create()
    dtype = getattr(torch, args.dtype)
    rows_list = [256, 2048, 16384] if not args.tiny else [16, 128]
    packer = dispatch_packer(dtype, args.d_model, torch.float32, args.top_k)
    out = []
    for rows in rows_list:
        split_WW = np.full((world, world), rows // world, dtype=np.int64)
        packed = torch.randint(0, 255, (int(split_WW[0].sum()), packer.row_bytes), dtype=torch.uint8, device=device)
        plain_out = torch.empty_like(packed)
        flat = Exchanger(ep)
        kinds = [("plain all_to_all_single", lambda: dist.all_to_all_single(plain_out, packed)),
                 ("flexmoe exchange, flat", lambda: flat.start(packed, split_WW).wait())]
        if nodes is not None:
            hier = Exchanger(nodes, hierarchical=True)
            kinds.append(("flexmoe exchange, hierarchical", lambda: hier.start(packed, split_WW).wait()))
        nbytes = packed.numel()
        for name, fn in kinds:
            ms = timed_ms(fn, device, args.reps)
            busbw = nbytes * (world - 1) / world / (ms * 1e-3) / 1e9
            out.append([rows, f"{nbytes / 2**20:.2f}", name, ms, busbw])
    print_table(f"All-to-all, {world} ranks, uniform traffic, dispatch rows of D={args.d_model} {args.dtype} + "
                f"{args.top_k} slot ids + {args.top_k} fp32 weights ({packer.row_bytes} B; "
                "bus bandwidth = bytes * (W-1)/W / time)",
                ["rows/rank", "MiB/rank", "what", "ms", "bus GB/s"], out)


# ----------------------------------------------------------------------------------------------


def make_inputs(args, device, dtype, skew: float, seed: int):
    """Token rows; with ``skew`` > 0 feature 0 is constant 1 so the router column 0 (set by
    ``skew_router_``) makes expert popularity Zipf(skew). They require grad, as a layer's input
    does inside a model (every layer then computes its input gradient)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(args.tokens, args.d_model, generator=gen)
    if skew:
        x[:, 0] = 1.0
    return x.to(device=device, dtype=dtype).requires_grad_()


def skew_router_(layer: flexmoe.MoELayer, skew: float) -> None:
    if not skew:
        return
    E = layer.config.num_experts
    with torch.no_grad():
        popularity_rank = torch.randperm(E, generator=torch.Generator().manual_seed(0)) + 1
        layer.router.weight[:, 0] = -skew * torch.log(popularity_rank.float()).to(layer.router.weight)


def build_layer(args, cfg, dtype, device, group, parallel, state, skew, placement=None):
    with torch.device(device):
        layer = flexmoe.MoELayer(cfg, ep_group=group, parallel=parallel, placement=placement)
    layer.load_state_dict(state)
    skew_router_(layer, skew)
    return layer.to(device=device, dtype=dtype)


def step_fn(layer, x):
    def step():
        y = layer(x)
        y.float().square().mean().backward()
    return step


def rel_error(layer, reference, x) -> float:
    """Output of the EP layer against the one-device layer with the same logical weights on the
    same local tokens (identical routing when dropless)."""
    with torch.no_grad():
        y, y_ref = layer(x).float(), reference(x).float()
    err = torch.tensor([float((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30))], device=x.device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err)


def bench_scaling(args, cfg, device, state) -> None:
    """EP over groups of consecutive ranks (all groups at once); tokens/s over all ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, args.dtype)
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= world and world % s == 0]
    groups = {}
    for size in sizes:
        for start in range(0, world, size):
            made = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                groups[size] = made
    rows = []
    for skew, routing in ((0.0, "uniform"), (args.zipf, f"zipf({args.zipf})")):
        reference = build_layer(args, cfg, dtype, device, None, None, state, skew)
        x = make_inputs(args, device, dtype, skew, seed=rank)
        ms = timed_ms(step_fn(reference, x), device, args.reps)
        rows.append([routing, "one-device layer (data parallel)", "-", ms, world * args.tokens / ms * 1e3, "-"])
        for size in sizes:
            layer = build_layer(args, cfg, dtype, device, groups[size], ParallelConfig(), state, skew)
            ms = timed_ms(step_fn(layer, x), device, args.reps)
            rows.append([routing, f"EP size {size}", f"{_imbalance(layer):.2f}", ms, world * args.tokens / ms * 1e3,
                         rel_error(layer, reference, x)])
    print_table(f"Layer forward+backward vs EP size ({world} ranks, {args.tokens} tokens per rank, "
                f"D={cfg.d_model} F={cfg.d_ff} E={cfg.num_experts} k={cfg.top_k}, {args.dtype}); "
                "imbalance = max/mean expert-rank load",
                ["routing", "layout", "imbalance", "ms/step", "tokens/s (all ranks)", "rel err"], rows)


def _imbalance(layer) -> float:
    counts_WE = layer.experts.last_counts_WE  # None at world size 1 (the one-device path)
    counts_E = layer.last_counts.cpu().numpy() if counts_WE is None else counts_WE.sum(axis=0)
    return balance_ratio(layer.experts.placement, counts_E)


def bench_pipeline_memory(args, cfg, device, state, nodes: EPGroup | None) -> None:
    """Every pipeline degree and memory strategy on the whole world, and the bounded dispatch.
    At world size 1 the static table runs the one-device FFN (every degree alike); the rows
    "exchange path" use a table with the slots permuted: every expert is held once, so the plan
    is regrouped by slot and the one-device FFN runs over the slots; with local_first=False they
    run pairs, expansion and chunking (or the bounded buffers) with no communication."""
    world = dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    skew = args.zipf
    reference = build_layer(args, cfg, dtype, device, None, None, state, skew)
    x = make_inputs(args, device, dtype, skew, seed=dist.get_rank())
    base_ms = timed_ms(step_fn(reference, x), device, args.reps)
    rows = [["one-device layer", "-", "-", base_ms, 1.0, "-", "-", "-"]]
    a2a_kinds = ["flat"] + (["hierarchical"] if nodes is not None else [])
    configs = [(a, d, "keep") for a in a2a_kinds for d in (1, 2, 4, 8)]
    configs += [("flat", d, m) for d in (1, 4) for m in ("recompute", "recommunicate", "both")]
    configs += [("flat", "auto", "auto")]
    configs += [("flat, local_first=False", d, "keep") for d in (1, 4)]  # every row through the exchange
    configs += [("bounded", 1, "keep")]  # rows_per_rank_pair = tokens: nothing overflows
    if world == 1:
        configs += [("exchange path", d, m) for d in (1, 2, 4, 8) for m in ("keep", "both")]
        configs += [("exchange path, local_first=False", d, "keep") for d in (1, 4)]
        configs += [("bounded exchange path", 1, "keep")]
    permuted = PlacementTable(cfg.num_experts, np.arange(cfg.num_experts)[::-1].reshape(1, -1).copy(),
                              np.ones((1, cfg.num_experts)))
    for a2a, degree, memory in configs:
        group = nodes if a2a == "hierarchical" else EPGroup.create()
        bounded = a2a.startswith("bounded")
        parallel = ParallelConfig(pipeline_degree=degree, memory=memory,
                                  all_to_all="hierarchical" if a2a == "hierarchical" else "flat",
                                  dispatch="bounded" if bounded else "exact",
                                  rows_per_rank_pair=args.tokens if bounded else None,
                                  local_first="local_first=False" not in a2a)
        layer = build_layer(args, cfg, dtype, device, group, parallel, state, skew,
                            permuted if "exchange path" in a2a else None)
        step = step_fn(layer, x)
        for _ in range(12 if "auto" in (degree, memory) else 1):  # let "auto" finish its trials
            step()
        ms = timed_ms(step, device, args.reps)
        activation_mib = _activation_mib(layer, x, device)
        report = layer.experts.memory_report
        kept = f"{report.kept_bytes / 2**20:.1f}" if report is not None else "-"
        strategy = report.strategy if memory == "auto" and report is not None else memory
        rows.append([f"EP {a2a}", layer.experts.last_pipeline_degree if degree == "auto" else degree,
                     strategy, ms, ms / base_ms, kept, activation_mib, rel_error(layer, reference, x)])
    print_table(f"Pipeline degree and memory strategy ({world} ranks, {args.tokens} tokens per rank, zipf({skew}), "
                f"D={cfg.d_model} F={cfg.d_ff} E={cfg.num_experts} k={cfg.top_k}, {args.dtype}); "
                "kept = activations the expert stage keeps (report), measured = whole layer after forward (CUDA)",
                ["layer", "degree", "memory", "ms/step", "x one-device", "kept MiB", "measured MiB", "rel err"], rows)


def bench_local_first(args, cfg, device, state) -> None:
    """World size 1: the one-device layer against EP layers with other tables: slots permuted
    (every expert held once: the plan regrouped by slot, the one-device FFN over the slots; with
    local_first=False every row through the self-exchange) and the two hottest experts
    replicated (their rows go through the self-exchange, the others are local rows). Times are the minimum over
    interleaved trials (robust to a shared machine); ops = aten ops dispatched per forward +
    backward (torch.profiler), copies = those that move rows (index_select / index_add_ /
    index_copy_ / gather / scatter_add_ / cat / copy_ / to)."""
    if dist.get_world_size() != 1:
        return
    from torch.profiler import profile

    dtype = getattr(torch, args.dtype)
    E = cfg.num_experts
    x = make_inputs(args, device, dtype, args.zipf, seed=0)
    layers = {"one-device layer": build_layer(args, cfg, dtype, device, None, None, state, args.zipf)}
    with torch.no_grad():
        layers["one-device layer"](x)
    hot = torch.topk(layers["one-device layer"].last_counts, 2).indices.cpu().numpy()
    permuted = PlacementTable(E, np.arange(E)[::-1].reshape(1, -1).copy(), np.ones((1, E)))
    slots = np.concatenate([np.arange(E), hot]).reshape(1, -1)
    replicated = PlacementTable(E, slots, np.where(np.isin(slots, hot), 0.5, 1.0))
    for name, table in (("EP, slots permuted", permuted),
                        ("EP, 2 hottest experts replicated (their rows exchanged)", replicated)):
        for degree, local_first in ((1, True), (4, True), (1, False)):
            label = f"{name}, degree {degree}" + ("" if local_first else ", local_first=False")
            parallel = ParallelConfig(pipeline_degree=degree, local_first=local_first)
            layers[label] = build_layer(args, cfg, dtype, device, EPGroup.create(), parallel, state, args.zipf, table)
    steps = {name: step_fn(layer, x) for name, layer in layers.items()}
    best = {name: float("inf") for name in layers}
    for name, step in steps.items():
        step()
    for _ in range(args.trials):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.reps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3 / args.reps)
    copies = ("aten::index_select", "aten::index_add_", "aten::index_copy_", "aten::gather", "aten::scatter_add_",
              "aten::cat", "aten::copy_", "aten::_to_copy")
    rows = []
    base = best["one-device layer"]
    for name, step in steps.items():
        with profile() as prof:
            step()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        moved = sum(e.count for e in events if e.key in copies)
        stats = getattr(layers[name].experts, "last_exchange", None)
        local = f"{stats.local_fraction:.3f}" if hasattr(stats, "local_fraction") else "-"
        rows.append([name, best[name], best[name] / base, ops, moved, local, rel_error(layers[name], layers["one-device layer"], x)])
    print_table(f"World size 1, EP paths against the one-device layer ({args.tokens} tokens, zipf({args.zipf}), "
                f"D={cfg.d_model} F={cfg.d_ff} E={cfg.num_experts} k={cfg.top_k}, {args.dtype}; forward+backward, "
                f"min of {args.trials} interleaved trials of {args.reps} steps)",
                ["layer", "ms/step", "x one-device", "aten ops", "copies", "local rows", "rel err"], rows)


def _activation_mib(layer, x, device) -> str:
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    y.float().square().mean().backward()
    for p in layer.parameters():
        p.grad = None
    return f"{held / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="expert-parallel benchmarks")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke check")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank")
    parser.add_argument("--shape", default=None, help="D,F,E,k (default 2048,768,128,8: Qwen3-30B-A3B-like)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float64"])
    parser.add_argument("--zipf", type=float, default=1.2, help="skew of the skewed routing")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--ranks-per-node", type=int, default=None, help="also measure hierarchical all-to-all")
    parser.add_argument("--trials", type=int, default=15, help="interleaved trials of the local-first section")
    parser.add_argument("--sections", default="a2a,scaling,pipeline,local")
    args = parser.parse_args()
    device = init_distributed()
    on_gpu = device.type == "cuda"
    shape = args.shape or ("32,32,8,2" if args.tiny or not on_gpu else "2048,768,128,8")
    D, F, E, k = (int(v) for v in shape.split(","))
    args.d_model, args.top_k = D, k
    args.tokens = args.tokens or (64 if args.tiny or not on_gpu else 16384)
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.reps = args.reps or (10 if on_gpu else 3)
    world = dist.get_world_size()
    nodes = None
    if args.ranks_per_node and 1 < args.ranks_per_node < world:
        nodes = EPGroup.create(ranks_per_node=args.ranks_per_node)
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
        print(f"{datetime.date.today()}  {world} x {name}  torch {torch.__version__}  backend {dist.get_backend()}")
    cfg = flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k)
    torch.manual_seed(0)
    state = flexmoe.MoELayer(cfg).state_dict()
    sections = args.sections.split(",")
    if "a2a" in sections:
        bench_all_to_all(args, device, nodes)
    if "scaling" in sections:
        bench_scaling(args, cfg, device, state)
    if "pipeline" in sections:
        bench_pipeline_memory(args, cfg, device, state, nodes)
    if "local" in sections:
        bench_local_first(args, cfg, device, state)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
