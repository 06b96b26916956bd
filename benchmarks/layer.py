"""One MoE layer, forward and forward+backward: flexmoe against HuggingFace Qwen3-MoE blocks.

Same weights, same inputs, same process. Prints one table per routing mode, then a per-stage
breakdown of flexmoe's forward+backward from the CUDA profiler.

GPU:  python benchmarks/layer.py
CPU smoke check (tiny shapes, eager peer only):  python benchmarks/layer.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time

import torch

import flexmoe

SHAPES = {  # name: (D, F, E, k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "mixtral": (4096, 14336, 8, 2),
}
TINY_SHAPES = {"tiny": (64, 32, 8, 2)}


@dataclasses.dataclass
class Row:
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    peak_mib: float
    rel_err: float


def timed(fn, reps: int, device: torch.device, trials: int = 5) -> float:
    """Milliseconds per call: ``reps`` calls back to back between two CUDA events, median of ``trials``.

    Back-to-back calls are how training runs them; one synchronisation per call would add the
    host's launch latency to every figure.
    """
    for _ in range(3):
        fn()
    results = []
    for _ in range(trials):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            results.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            results.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(results)


def matmul_tflops(device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, 10, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def skew_router_(weight_ED: torch.Tensor, x_TD: torch.Tensor, alpha: float) -> None:
    """Make expert popularity Zipf(alpha)-like: logits gain log(1/rank^alpha) through a constant feature."""
    E = weight_ED.shape[0]
    popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float32) ** alpha
    perm = torch.randperm(E)
    x_TD[:, 0] = 1.0
    weight_ED[:, 0] = torch.log(popularity[perm]).to(weight_ED)


def hf_block(impl: str, D: int, F: int, E: int, k: int, layer: flexmoe.MoELayer):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=k,
                         norm_topk_prob=True, experts_implementation=impl)
    block = Qwen3MoeSparseMoeBlock(cfg).to(device=layer.router.weight.device, dtype=layer.router.weight.dtype)
    block.gate.weight = layer.router.weight
    block.experts.gate_up_proj = layer.experts.gate_up_proj
    block.experts.down_proj = layer.experts.down_proj
    return block


def same_choice_mask(layer: flexmoe.MoELayer, block, x_TD: torch.Tensor) -> torch.Tensor:
    """Tokens for which flexmoe's float32 router and HF's bf16-logit router pick the same experts."""
    with torch.no_grad():
        ours = layer.router(x_TD).expert_TK.sort(-1).values
        theirs = block.gate(x_TD)[2].sort(-1).values
    return (ours == theirs).all(-1)


def training_step(module, x_BTD: torch.Tensor):
    """A callable doing what one training step does to ``module``: gradients cleared (set to None),
    forward, backward of a fixed random output gradient."""
    grad = torch.randn_like(x_BTD)
    x = x_BTD.detach().requires_grad_(True)
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return step


def profiled(step, activities, calls: int = 5):
    """The torch profiler over ``calls`` calls of ``step`` (after three warm-up calls)."""
    from torch.profiler import profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return prof


def measure(name: str, module, x_BTD: torch.Tensor, reps: int, reference: torch.Tensor | None,
            mask_T: torch.Tensor | None = None) -> Row:
    device = x_BTD.device
    with torch.no_grad():
        y = module(x_BTD)
    rel_err = float("nan")
    if reference is not None:
        a, b = y.float().reshape(-1, y.shape[-1]), reference.float().reshape(-1, y.shape[-1])
        if mask_T is not None:
            a, b = a[mask_T], b[mask_T]
        rel_err = ((a - b).norm() / b.norm()).item()

    def fwd():
        with torch.no_grad():
            module(x_BTD)

    fwdbwd = training_step(module, x_BTD)
    fwd_ms = timed(fwd, reps, device)
    fwdbwd_ms = timed(fwdbwd, reps, device)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwdbwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for p in module.parameters():
        p.grad = None
    return Row(name, fwd_ms, fwdbwd_ms, peak, rel_err), y


def stage_breakdown(layer: flexmoe.MoELayer, x_BTD: torch.Tensor) -> list[tuple[str, float]]:
    """Device time per stage of one forward+backward, from the CUDA profiler."""
    from torch.profiler import ProfilerActivity

    calls = 5
    prof = profiled(training_step(layer, x_BTD), [ProfilerActivity.CUDA], calls)
    categories = {
        "grouped GEMM": ("gemm", "cutlass", "sm90", "grouped", "xmma", "nvjet"),
        "permute (scatter / gather rows)": ("_scatter_rows", "_zero_unowned", "_gather_rows"),
        "combine (gather sum)": ("_gather_sum",),
        "SwiGLU + weight": ("_swiglu",),
        "sort / histogram / scan": ("sort", "scatter_add", "cumsum", "scan", "radix", "histogram"),
        "router (topk, softmax)": ("topk", "softmax", "gather", "bitonic"),
    }
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        t = event.self_device_time_total / 1e3 / calls
        if t <= 0:
            continue
        label = event.key.lower()
        category = next((c for c, keys in categories.items() if any(k in label for k in keys)), "other elementwise")
        totals[category] = totals.get(category, 0.0) + t
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, eager peer only")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--routing", default="uniform,zipf", help="uniform and/or zipf")
    parser.add_argument("--zipf-alpha", type=float, default=1.2)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed trial (5 trials)")
    parser.add_argument("--peers", default="grouped_mm,grouped_mm+compile,eager")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shapes = TINY_SHAPES if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    tokens = 64 if args.tiny else args.tokens
    peers = ["eager"] if device.type == "cpu" else args.peers.split(",")
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    tflops = matmul_tflops(device)
    print(f"# {datetime.date.today()}  device: {name}  torch {torch.__version__}  dense bf16 matmul: {tflops:.0f} TFLOP/s")

    for shape_name, (D, F, E, k) in shapes.items():
        for routing in args.routing.split(","):
            torch.manual_seed(0)
            cfg = flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, validate_inputs=False)
            layer = flexmoe.MoELayer(cfg).to(device=device, dtype=dtype)
            x_TD = torch.randn(tokens, D, device=device, dtype=dtype)
            if routing == "zipf":
                with torch.no_grad():
                    skew_router_(layer.router.weight, x_TD, args.zipf_alpha)
            x_BTD = x_TD.unsqueeze(0)
            flops = 18 * tokens * k * D * F
            rows: list[Row] = []
            row, y_ref = measure("flexmoe", layer, x_BTD, args.reps, None)
            counts = layer.last_counts.float()
            rows.append(row)
            if device.type == "cuda":
                compiled = torch.compile(layer, fullgraph=True)
                rows.append(measure("flexmoe+compile", compiled, x_BTD, args.reps, y_ref)[0])
            mask_T = None
            for peer in peers:
                impl, _, comp = peer.partition("+")
                block = hf_block(impl, D, F, E, k, layer)
                if mask_T is None:
                    mask_T = same_choice_mask(layer, block, x_TD)
                module = torch.compile(block) if comp else block
                reps = max(2, args.reps // 5) if impl == "eager" else args.reps
                rows.append(measure(f"HF {peer}", module, x_BTD, reps, y_ref, mask_T)[0])
                del block, module
            print(f"\n## {shape_name} (D={D}, F={F}, E={E}, k={k}), T={tokens}, {routing} routing, "
                  f"max/mean expert load {(counts.max() / counts.mean()).item():.2f}")
            if mask_T is not None:
                print(f"HF rows compared on the {100 * mask_T.float().mean().item():.1f}% of tokens where HF's bf16 router "
                      "logits choose the same experts as flexmoe's float32 router")
            print("| impl | fwd ms | fwd+bwd ms | TFLOP/s | % of matmul | peak MiB | flexmoe speedup | rel err vs flexmoe (same-choice tokens) |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                tf = flops / (r.fwdbwd_ms * 1e-3) / 1e12
                print(f"| {r.impl} | {r.fwd_ms:.2f} | {r.fwdbwd_ms:.2f} | {tf:.0f} | {100 * tf / tflops:.0f}% | "
                      f"{r.peak_mib:.0f} | {r.fwdbwd_ms / rows[0].fwdbwd_ms:.2f}x | {r.rel_err:.1e} |")
            ideal_ms = flops / (tflops * 1e12) * 1e3
            print(f"ideal at the measured matmul rate: {ideal_ms:.2f} ms")
            if device.type == "cuda" and not args.no_breakdown and routing == "uniform":
                stages = stage_breakdown(layer, x_BTD)
                total = sum(t for _, t in stages)
                print("\n| stage (fwd+bwd, flexmoe) | ms | share |\n|---|---|---|")
                for stage, t in stages:
                    print(f"| {stage} | {t:.2f} | {100 * t / total:.0f}% |")
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
