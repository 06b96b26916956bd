"""One MoE layer, forward and forward+backward: flexmoe against HF Qwen3-MoE blocks and a
torchtitan-style block.

Same weights, same inputs, same process. flexmoe variants: today's kernels ("auto"), the fused
expert kernels (``kernels="fused"``), each of them replayed from a CUDA graph
(``flexmoe.cuda_graph_layer``), optionally under ``torch.compile``; the fused and graph variants
are feature-detected and skipped with a note when this checkout lacks them. Peers: HF
``Qwen3MoeSparseMoeBlock`` with ``experts_implementation`` "grouped_mm" (eager and under
``torch.compile``) and "eager"; "titan": a torchtitan-style block written here from torchtitan's
published design (float32 softmax top-k router, argsort of the flat expert ids, gathered rows,
``torch._grouped_mm`` for w1 / w3 / w2, scatter back and a weighted sum over the k slots).
Prints one table per shape and routing (a failing row prints its error and the run goes on),
then a per-stage breakdown of flexmoe's forward+backward from the CUDA profiler.

GPU:  python benchmarks/layer.py        --quick: Qwen3-like only, uniform + zipf, no HF eager
CPU smoke check (tiny shapes, eager peers only):  python benchmarks/layer.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import datetime
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

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


def header(device: torch.device) -> str:
    """The header line of every benchmark table: date, device, library versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    interp = " (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  device: {name}  "
            f"torch {torch.__version__}  triton {triton_version}{interp}")


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


def _grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``x @ w[e]^T`` per row group: ``torch._grouped_mm`` on CUDA, a loop elsewhere (CPU smoke run)."""
    if x_NI.is_cuda:
        return torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E)
    out, start = [], 0
    for e, end in enumerate(offsets_E.tolist()):
        out.append(x_NI[start:end] @ w_EOI[e].t())
        start = end
    return torch.cat(out)


class TitanStyleMoE(nn.Module):
    """A torchtitan-style MoE block (its design, our code) holding copies of ``layer``'s weights.

    Router: float32 softmax over ``x @ gate^T``, top-k, renormalised like ``layer``. Dispatch:
    stable argsort of the flat expert ids, rows gathered in that order, per-expert counts by
    ``histc``; experts: ``silu(x w1^T) * (x w3^T) -> w2^T`` in three ``torch._grouped_mm`` calls
    (no padding of the groups: the sm90 kernel takes any offsets); combine: rows written back to
    (token, slot) order, weighted by the scores in float32 and summed over the slots.
    """

    def __init__(self, layer: flexmoe.MoELayer):
        super().__init__()
        cfg = layer.config
        F_ = cfg.d_ff
        gate_up = layer.experts.gate_up_proj.detach()
        self.gate = nn.Parameter(layer.router.weight.detach().clone())
        self.w1 = nn.Parameter(gate_up[:, :F_].clone())
        self.w3 = nn.Parameter(gate_up[:, F_:].clone())
        self.w2 = nn.Parameter(layer.experts.down_proj.detach().clone())
        self.top_k, self.norm = cfg.top_k, cfg.norm_topk_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        E, k = self.w1.shape[0], self.top_k
        rdt = torch.promote_types(x_TD.dtype, torch.float32)  # float32 router; float64 in the check
        scores_TE = F.linear(x_TD.to(rdt), self.gate.to(rdt)).softmax(-1)
        top_TK, expert_TK = scores_TE.topk(k, dim=-1)
        if self.norm:
            top_TK = top_TK / top_TK.sum(-1, keepdim=True)
        flat_N = expert_TK.reshape(-1)
        counts_E = torch.histc(flat_N.float(), bins=E, min=0, max=E - 1)
        order_N = flat_N.argsort(stable=True)
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        x_ND = x_TD[order_N // k]
        h_NF = F.silu(_grouped_mm(x_ND, self.w1, offsets_E)) * _grouped_mm(x_ND, self.w3, offsets_E)
        y_ND = _grouped_mm(h_NF, self.w2, offsets_E)
        y_TKD = torch.empty_like(y_ND).index_put((order_N,), y_ND).view(-1, k, y_ND.shape[-1])
        y_TD = (y_TKD.to(rdt) * top_TK.unsqueeze(-1)).sum(1)
        return y_TD.to(x.dtype).view(x.shape)


def titan_float64_error() -> float:
    """The torchtitan-style block against flexmoe's layer in float64 on CPU, forward and input
    gradient (rounding-level agreement shows the peer computes the same function)."""
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=24, d_ff=16, num_experts=6, top_k=2, kernels="torch", init_std=0.1)
    layer = flexmoe.MoELayer(cfg).double()
    titan = TitanStyleMoE(layer)
    x = torch.randn(40, 24, dtype=torch.float64)
    errs = []
    grads = []
    for module in (layer, titan):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad))
    for a, b in zip(*grads):
        errs.append(((a - b).norm() / b.norm()).item())
    return max(errs)


def flexmoe_variant(layer: flexmoe.MoELayer, kernels: str) -> flexmoe.MoELayer:
    """A copy of ``layer`` (same weights) with another ``kernels`` choice; ValueError where this
    checkout does not have that choice."""
    cfg = dataclasses.replace(layer.config, kernels=kernels)
    weight = layer.experts.gate_up_proj
    other = flexmoe.MoELayer(cfg).to(device=weight.device, dtype=weight.dtype)
    other.load_state_dict(layer.state_dict())
    return other


def graphed(layer: flexmoe.MoELayer, x_BTD: torch.Tensor) -> nn.Module:
    """``layer`` replayed from a CUDA graph; RuntimeError where this checkout has no helper."""
    capture = getattr(flexmoe, "cuda_graph_layer", None)
    if capture is None:
        raise RuntimeError("this checkout has no flexmoe.cuda_graph_layer")
    return capture(copy.deepcopy(layer), x_BTD.detach().clone().requires_grad_(True))


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


VARIANTS = ["auto", "fused", "auto+graph", "fused+graph"]  # also "auto+compile", "fused+compile"
PEERS = ["titan", "grouped_mm", "grouped_mm+compile", "eager"]


def build(name: str, layer: flexmoe.MoELayer, x_BTD: torch.Tensor, D: int, F_: int, E: int, k: int):
    """(module, reference rows compared on: "all" or "same-choice") for a variant or peer name."""
    impl, _, how = name.partition("+")
    if impl in ("auto", "fused"):
        module = layer if impl == "auto" else flexmoe_variant(layer, "fused")
        if how == "graph":
            return graphed(module, x_BTD), "all"
        return (torch.compile(module, fullgraph=True) if how == "compile" else module), "all"
    if impl == "titan":
        module = TitanStyleMoE(layer).to(x_BTD.device)
        return (torch.compile(module) if how == "compile" else module), "all"
    block = hf_block(impl, D, F_, E, k, layer)
    return (torch.compile(block) if how == "compile" else block), "same-choice"


def run_case(shape_name: str, D: int, F_: int, E: int, k: int, routing: str, args, device, tflops: float) -> None:
    dtype = torch.bfloat16
    tokens = args.tokens
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=k, validate_inputs=False)
    layer = flexmoe.MoELayer(cfg).to(device=device, dtype=dtype)
    x_TD = torch.randn(tokens, D, device=device, dtype=dtype)
    if routing == "zipf":
        with torch.no_grad():
            skew_router_(layer.router.weight, x_TD, args.zipf_alpha)
    x_BTD = x_TD.unsqueeze(0)
    flops = 18 * tokens * k * D * F_
    row, y_ref = measure("flexmoe auto", layer, x_BTD, args.reps, None)
    counts = layer.last_counts.float()
    rows: list[Row | str] = [row]
    mask_T = None
    for name in args.variants + args.peers:
        if name == "auto":
            continue
        impl = name.split("+")[0]
        label = {"titan": "torchtitan-style", "grouped_mm": "HF grouped_mm", "eager": "HF eager"}.get(impl, f"flexmoe {impl}")
        label += name[len(impl):]
        try:
            module, compare = build(name, layer, x_BTD, D, F_, E, k)
            if compare == "same-choice" and mask_T is None:
                mask_T = same_choice_mask(layer, module if not hasattr(module, "_orig_mod") else module._orig_mod, x_TD)
            reps = max(2, args.reps // 5) if name == "eager" else args.reps
            rows.append(measure(label, module, x_BTD, reps, y_ref, mask_T if compare == "same-choice" else None)[0])
            del module
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
            rows.append(f"| {label} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n## {shape_name} (D={D}, F={F_}, E={E}, k={k}), T={tokens}, {routing} routing, "
          f"max/mean expert load {(counts.max() / counts.mean()).item():.2f}")
    if mask_T is not None:
        print(f"HF rows compared on the {100 * mask_T.float().mean().item():.1f}% of tokens where HF's bf16 router "
              "logits choose the same experts as flexmoe's float32 router; the others on all tokens")
    print("| impl | fwd ms | fwd+bwd ms | TFLOP/s | % of matmul | peak MiB | flexmoe speedup | rel err vs flexmoe auto |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if isinstance(r, str):
            print(r)
            continue
        tf = flops / (r.fwdbwd_ms * 1e-3) / 1e12
        print(f"| {r.impl} | {r.fwd_ms:.2f} | {r.fwdbwd_ms:.2f} | {tf:.0f} | {100 * tf / tflops:.0f}% | "
              f"{r.peak_mib:.0f} | {r.fwdbwd_ms / rows[0].fwdbwd_ms:.2f}x | {r.rel_err:.1e} |")
    print(f"ideal at the measured matmul rate: {flops / (tflops * 1e12) * 1e3:.2f} ms", flush=True)
    if device.type == "cuda" and not args.no_breakdown and routing == "uniform":
        stages = stage_breakdown(layer, x_BTD)
        total = sum(t for _, t in stages)
        print("\n| stage (fwd+bwd, flexmoe auto) | ms | share |\n|---|---|---|")
        for stage, t in stages:
            print(f"| {stage} | {t:.2f} | {100 * t / total:.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, eager peers only")
    parser.add_argument("--quick", action="store_true", help="Qwen3-like only, no HF eager, 5 calls per trial")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--routing", default="uniform,zipf", help="uniform and/or zipf")
    parser.add_argument("--zipf-alpha", type=float, default=1.2)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed trial (5 trials)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="flexmoe: auto / fused, each optionally +graph or +compile (default: %(default)s)")
    parser.add_argument("--peers", default=",".join(PEERS), help="titan[+compile], grouped_mm[+compile], eager")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shapes = TINY_SHAPES if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    args.variants, args.peers = args.variants.split(","), args.peers.split(",")
    if args.quick:
        shapes = {"qwen3-30b-a3b": SHAPES["qwen3-30b-a3b"]}
        args.peers, args.reps = [p for p in args.peers if p != "eager"], 5
    if device.type == "cpu":  # graphs, compiled peers and Triton kernels need CUDA
        args.tokens = 64
        args.variants = [v for v in args.variants if "+" not in v and v != "fused"]
        args.peers = [p for p in args.peers if p in ("titan", "eager")]
    tflops = matmul_tflops(device)
    print(header(device) + f"  dense bf16 matmul: {tflops:.0f} TFLOP/s")
    if args.tiny:
        print(f"torchtitan-style block vs flexmoe in float64 (CPU): rel err {titan_float64_error():.1e}")
    for shape_name, (D, F_, E, k) in shapes.items():
        for routing in args.routing.split(","):
            try:
                run_case(shape_name, D, F_, E, k, routing, args, device, tflops)
            except Exception:  # noqa: BLE001 - one failing case must not end the run
                print(f"\n## {shape_name}, {routing}: FAILED")
                traceback.print_exc(file=sys.stdout)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
