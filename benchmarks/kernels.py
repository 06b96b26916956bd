"""Fused expert kernels against the unfused stages they replace, and the whole layer.

For each shape and routing: first the fused kernels' outputs and gradients are checked against
the unfused path on the same inputs (max errors printed), then each fused kernel is timed against
its unfused stage, then the layer forward+backward: unfused ("auto"), fused, fused in a CUDA
graph, and (few experts only) one cuBLAS GEMM per expert. TFLOP/s and % of a dense bf16 matmul
measured in the same run. A failing case prints its error and the run goes on.

GPU:  python benchmarks/kernels.py            (all shapes)    --quick: one shape, uniform
      --sweep: autotune over a wide tile set (``SWEEP``) and print every config's time per kernel
CPU smoke check (interpreted Triton, tiny shapes):  python benchmarks/kernels.py --tiny
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:  # CPU smoke run: Triton must be interpreted, set before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

import flexmoe  # noqa: E402
from flexmoe.ops import grouped_mm, permute, scaled_activation, unpermute_sum  # noqa: E402
from flexmoe.ops import fused_gemm as fg  # noqa: E402
from flexmoe.ops._backend import fused_path  # noqa: E402
from flexmoe.ops.fused_experts import fused_expert_ffn  # noqa: E402
from flexmoe.ops.activation import swiglu_scaled_backward  # noqa: E402
from flexmoe.ops.grouped_gemm import grouped_mm_loop_wgrad, has_fast_grouped_mm  # noqa: E402
from flexmoe.ops.triton_kernels import gather_sum  # noqa: E402
from flexmoe.plan import make_dispatch_plan  # noqa: E402
from layer import SHAPES, header, matmul_tflops, skew_router_, timed, training_step  # noqa: E402
from layer import flexmoe_variant as same_layer  # noqa: E402

TINY = {"tiny": (64, 32, 8, 2)}
_c = fg._config
SWEEP = {  # wider autotune sets for --sweep: (warps, stages, tile); the library's sets are picked from these
    "gate_up": [_c(4, 4, BN=64, BK=64), _c(8, 4, BN=64, BK=64), _c(8, 3, BN=128, BK=64), _c(8, 4, BN=128, BK=64),
                _c(8, 3, BN=64, BK=128), _c(8, 6, BN=128, BK=32), _c(8, 4, BN=128, BK=64, GROUP=4),
                _c(8, 4, BN=128, BK=64, GROUP=16)],
    "mm": [_c(4, 4, BN=64, BK=64), _c(4, 4, BN=128, BK=64), _c(8, 3, BN=128, BK=64), _c(8, 4, BN=128, BK=64),
           _c(8, 3, BN=256, BK=64), _c(8, 4, BN=256, BK=64), _c(8, 3, BN=128, BK=128), _c(8, 3, BN=256, BK=64, GROUP=16)],
    "dgrad": [_c(4, 4, BN=64, BK=64), _c(8, 3, BN=64, BK=64), _c(8, 3, BN=128, BK=64), _c(8, 4, BN=128, BK=64),
              _c(8, 3, BN=256, BK=64), _c(8, 3, BN=128, BK=128), _c(8, 4, BN=256, BK=64)],
    "wgrad": [_c(4, 4, BM=64, BN=128, BK=64), _c(8, 3, BM=128, BN=128, BK=64), _c(8, 3, BM=128, BN=256, BK=64),
              _c(8, 4, BM=128, BN=128, BK=64), _c(8, 3, BM=128, BN=128, BK=64, PER_SM=0),
              _c(8, 3, BM=128, BN=256, BK=64, PER_SM=0), _c(8, 4, BM=128, BN=128, BK=64, PER_SM=1),
              _c(8, 5, BM=128, BN=128, BK=32), _c(8, 3, BM=256, BN=128, BK=64)],
}


HYBRID_SWEEP = {  # --hybrid --sweep: the hybrid runs one fused kernel, gate_up
    "gate_up": SWEEP["gate_up"] + [_c(8, 5, BN=128, BK=64), _c(8, 3, BN=128, BK=64, GROUP=32)],
}


def use_sweep_configs(sets: dict = SWEEP) -> None:
    """Swap the library's autotuners for ones over ``SWEEP`` (quick timing per config)."""
    for name, configs in sets.items():
        fg._tuned[name] = fg.autotuned(name, configs, warmup=5, rep=25)


PER_EXPERT_MAX_E = 16  # the per-expert GEMM loop is only a candidate for few experts
TUNER = {"gate_up": "gate_up", "down": "mm", "dgrad": "dgrad", "wgrad_down": "wgrad", "wgrad_gate_up": "wgrad", "dx": "mm"}


def sweep_stages(st) -> None:
    """Run each fused stage once (autotuning it over ``SWEEP``) and print every config's time."""
    for name in STAGES:
        getattr(st, f"fused_{name}")()
        print_sweep(name, TUNER[name])


def print_sweep(label: str, tuner: str, top: int | None = None) -> None:
    """The last autotuning of kernel ``tuner``: every config's time, fastest first (``top`` of them)."""
    torch.cuda.synchronize()
    timings = getattr(fg._tuned[tuner], "configs_timings", None) or {}
    ranked = sorted(((t[0] if isinstance(t, (list, tuple)) else t, cfg) for cfg, t in timings.items()),
                    key=lambda item: item[0])
    print(f"sweep {label}: " + "; ".join(f"{ms:.3f} ms {cfg}" for ms, cfg in ranked[:top]))


def wgrad_unfused(g_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = g_e^T @ x_e`` as the unfused backward computes it."""
    if has_fast_grouped_mm(g_NO, x_NI.unsqueeze(0)):
        return torch._grouped_mm(g_NO.t(), x_NI, offs=offsets_E)
    return grouped_mm_loop_wgrad(g_NO, x_NI, offsets_E)


class Stages:
    """Inputs of one layer call and both versions of each expert-stage kernel on them."""

    def __init__(self, layer: flexmoe.MoELayer, x_TD: torch.Tensor):
        cfg = layer.config
        self.act = cfg.activation
        with torch.no_grad():
            routing = layer.router(x_TD)
        self.plan = make_dispatch_plan(routing.expert_TK, routing.weight_TK, routing.keep_TK, cfg.num_experts)
        self.x_TD = x_TD
        self.w_gu = layer.experts.gate_up_proj.detach()
        self.w_dn = layer.experts.down_proj.detach()
        self.scale_N = self.plan.row_weight_N.detach().contiguous()
        self.dy_TD = torch.randn_like(x_TD)
        self.schedule = fg.Schedule(self.plan.offsets_E, self.plan.row_token_N.shape[0])
        p = self.plan
        self.x_ND = permute(x_TD, p.row_token_N, p.pair_row_TK, True)
        self.h_NH = grouped_mm(self.x_ND, self.w_gu, p.offsets_E)
        self.a_NF = scaled_activation(self.h_NH, self.scale_N, p.offsets_E[-1:], self.act, True)
        self.dy_ND = permute(self.dy_TD, p.row_token_N, p.pair_row_TK, True)
        self.dh_NH = self.unfused_dgrad()[0]
        self.uses_tma = fg.hopper_tma(self.w_gu) and fg.hopper_tma(self.w_dn)
        self.tma = None  # fused kernels: TMA weight loads where fg.hopper_tma allows (None), or pointer loads (False)
        self.load_variants = self.uses_tma  # also check / time TMA and pointer weight loads explicitly

    # unfused stages
    def unfused_gate_up(self):
        p = self.plan
        x_ND = permute(self.x_TD, p.row_token_N, p.pair_row_TK, True)
        h = grouped_mm(x_ND, self.w_gu, p.offsets_E)
        return h, scaled_activation(h, self.scale_N, p.offsets_E[-1:], self.act, True)

    def unfused_down(self):
        y_ND = grouped_mm(self.a_NF, self.w_dn, self.plan.offsets_E)
        return unpermute_sum(y_ND, self.plan.pair_row_TK, self.plan.row_token_N, True)

    def unfused_dgrad(self):
        p = self.plan
        dy_ND = permute(self.dy_TD, p.row_token_N, p.pair_row_TK, True)
        da = grouped_mm(dy_ND, self.w_dn.transpose(1, 2), p.offsets_E)
        if self.act != "swiglu":
            raise NotImplementedError("the stage benchmark covers swiglu")
        return swiglu_scaled_backward(self.h_NH, self.scale_N, p.offsets_E[-1:], da, True)

    def unfused_wgrad_down(self):
        return wgrad_unfused(self.dy_ND, self.a_NF, self.plan.offsets_E)

    def unfused_wgrad_gate_up(self):
        return wgrad_unfused(self.dh_NH, self.x_ND, self.plan.offsets_E)

    def unfused_dx(self):
        dx_ND = grouped_mm(self.dh_NH, self.w_gu.transpose(1, 2), self.plan.offsets_E)
        return unpermute_sum(dx_ND, self.plan.pair_row_TK, self.plan.row_token_N, True)

    # fused kernels
    def fused_gate_up(self):
        return fg.gate_up(self.x_TD, self.plan.row_token_N, self.w_gu, self.scale_N, self.schedule, self.act, self.tma)

    def fused_down(self):
        return gather_sum(fg.expert_mm(self.a_NF, self.w_dn, True, self.schedule, self.tma), self.plan.pair_row_TK)

    def fused_dgrad(self):
        return fg.down_dgrad(self.dy_TD, self.plan.row_token_N, self.w_dn, self.h_NH, self.scale_N, self.schedule, self.act,
                             self.tma)

    def fused_wgrad_down(self):
        return fg.expert_wgrad(self.dy_TD, self.plan.row_token_N, self.a_NF, None, self.w_gu.shape[0], self.schedule)

    def fused_wgrad_gate_up(self):
        return fg.expert_wgrad(self.dh_NH, None, self.x_TD, self.plan.row_token_N, self.w_gu.shape[0], self.schedule)

    def fused_dx(self):
        return gather_sum(fg.expert_mm(self.dh_NH, self.w_gu, False, self.schedule, self.tma), self.plan.pair_row_TK)


STAGES = ["gate_up", "down", "dgrad", "wgrad_down", "wgrad_gate_up", "dx"]
TMA_STAGES = ("gate_up", "down", "dgrad", "dx")  # the stages whose weight loads can go through TMA


def stage_flops(name: str, N: int, D: int, F: int, H: int) -> float:
    return 2 * N * D * (H if name in ("gate_up", "wgrad_gate_up", "dx") else F)


def max_rel_err(a, b) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) over the kept rows of a and b."""
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    return err, err / max(b.abs().max().item() if b.numel() else 0.0, 1e-30)


def check_stages(st: Stages) -> list[tuple[str, float, float]]:
    """Each fused kernel (both weight-load variants) against its unfused stage; rows past the kept
    ones are not compared."""
    n = int(st.plan.offsets_E[-1])
    out = []
    variants = [(s, tma) for s in TMA_STAGES for tma in (True, False)] if st.load_variants else []
    for name, tma in [(s, None) for s in STAGES] + variants:
        st.tma = tma
        got, want = getattr(st, f"fused_{name}")(), getattr(st, f"unfused_{name}")()
        label = name if tma is None else f"{name} ({'TMA' if tma else 'pointer'} loads)"
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for i, (g, w) in enumerate(zip(got, want)):
            if g.dim() == 2 and g.shape[0] == st.plan.row_token_N.shape[0]:
                g, w = g[:n], w[:n]
            elif g.dim() == 1:
                g, w = g[:n], w[:n]
            out.append((f"{label}[{i}]", *max_rel_err(g, w)))
    st.tma = None
    return out


def check_layer(layer: flexmoe.MoELayer, fused: flexmoe.MoELayer, x: torch.Tensor, label: str = "layer") -> list[tuple[str, float, float]]:
    """Fused layer against the unfused one: output, input gradient, every parameter gradient."""
    grad = torch.randn_like(x)
    results = []
    outs = []
    for module in (layer, fused):
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        outs.append((y, xi.grad, [p.grad for p in module.parameters()]))
        for p in module.parameters():
            p.grad = None
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    results.append((f"{label} y", *max_rel_err(y1, y0)))
    results.append((f"{label} dx", *max_rel_err(gx1, gx0)))
    for (name, _), g0, g1 in zip(layer.named_parameters(), gp0, gp1):
        results.append((f"{label} d{name}", *max_rel_err(g1, g0)))
    return results


def check_graph(fused: flexmoe.MoELayer, x: torch.Tensor) -> list[tuple[str, float, float]]:
    """The CUDA-graphed fused layer against the eager fused layer on a fresh input."""
    graphed = flexmoe.cuda_graph_layer(copy.deepcopy(fused), x.detach().clone().requires_grad_(True))
    x2 = torch.randn_like(x)
    grad = torch.randn_like(x)
    results = []
    ys = []
    for module in (fused, graphed):
        xi = x2.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        ys.append((y.detach().clone(), xi.grad.clone(), [p.grad.clone() for p in module.parameters()]))
        for p in module.parameters():
            p.grad = None
    results.append(("graph y", *max_rel_err(ys[1][0], ys[0][0])))
    results.append(("graph dx", *max_rel_err(ys[1][1], ys[0][1])))
    for (name, _), g0, g1 in zip(fused.named_parameters(), ys[0][2], ys[1][2]):
        results.append((f"graph d{name}", *max_rel_err(g1, g0)))
    return results, graphed


def print_errors(rows) -> None:
    print("| checked | max abs err | max abs err / max abs ref |\n|---|---|---|")
    for name, err, rel in rows:
        print(f"| {name} | {err:.2e} | {rel:.2e} |")


def case_layer(D: int, F: int, E: int, k: int, routing: str, args, device):
    """The layer of a case (seed 0) and its input, the router skewed for ``zipf`` routing."""
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16  # the Triton interpreter's bf16 tl.dot is wrong
    cfg = flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, validate_inputs=False)
    layer = flexmoe.MoELayer(cfg).to(device=device, dtype=dtype)
    x_TD = torch.randn(args.tokens, D, device=device, dtype=dtype)
    if routing == "zipf":
        with torch.no_grad():
            skew_router_(layer.router.weight, x_TD, args.zipf_alpha)
    return layer, x_TD


def run_case(shape: str, D: int, F: int, E: int, k: int, routing: str, args, device, tflops: float) -> None:
    layer, x_TD = case_layer(D, F, E, k, routing, args, device)
    fused = same_layer(layer, "fused")
    hybrid = same_layer(layer, "hybrid")
    unfused = same_layer(layer, "triton")  # Triton permute / activation + grouped GEMMs: "auto" before issue 13
    st = Stages(layer, x_TD)
    st.load_variants &= not args.sweep
    counts = st.plan.counts_E.float()
    N, H = int(st.plan.offsets_E[-1]), st.w_gu.shape[1]
    print(f"\n## {shape} (D={D}, F={F}, E={E}, k={k}), T={args.tokens}, {routing} routing, "
          f"max/mean expert load {(counts.max() / counts.mean()).item():.2f}")

    if args.sweep:
        print("\n### tile sweep (ms per config, fastest first)")
        sweep_stages(st)
    print(f"\n### correctness on this device (fused vs unfused, {x_TD.dtype})")
    errors = (check_stages(st) + check_layer(unfused, fused, x_TD.unsqueeze(0))
              + check_layer(unfused, hybrid, x_TD.unsqueeze(0), "hybrid layer"))
    graphed = None
    if device.type == "cuda" and not (args.sweep or args.no_graph):
        try:
            graph_errors, graphed = check_graph(fused, x_TD.unsqueeze(0))
            errors += graph_errors
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"CUDA graph check FAILED: {type(exc).__name__}: {exc}")
    print_errors(errors)

    print(f"\n### kernels (same inputs; TMA weight loads {'possible' if st.uses_tma else 'not possible'})")
    print("| stage | unfused ms | fused ms | fused speedup | fused TFLOP/s | % of matmul | fused, TMA loads ms "
          "| fused, pointer loads ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in STAGES:
        try:
            t_u = timed(getattr(st, f"unfused_{name}"), args.reps, device)
            t_f = timed(getattr(st, f"fused_{name}"), args.reps, device)
            t_v = {True: float("nan"), False: float("nan")}
            if st.load_variants and name in TMA_STAGES:
                for tma in t_v:
                    st.tma = tma
                    t_v[tma] = timed(getattr(st, f"fused_{name}"), args.reps, device)
                st.tma = None
            tf = stage_flops(name, N, D, F, H) / (t_f * 1e-3) / 1e12
            print(f"| {name} | {t_u:.3f} | {t_f:.3f} | {t_u / t_f:.2f}x | {tf:.0f} | {100 * tf / tflops:.0f}% "
                  f"| {t_v[True]:.3f} | {t_v[False]:.3f} |")
        except Exception as exc:  # noqa: BLE001
            st.tma = None
            print(f"| {name} | FAILED: {type(exc).__name__}: {exc} | | | | | | |")

    p = st.plan
    for label, rows in (("x_TD -> x_ND", st.x_TD), ("dy_TD -> dy_ND", st.dy_TD)):
        print(f"gather {label} (what a hybrid with grouped weight gradients adds): "
              f"{timed(lambda: permute(rows, p.row_token_N, p.pair_row_TK, True), args.reps, device):.3f} ms")
    if device.type == "cuda":
        picked = {name: getattr(tuner, "best_config", None) for name, tuner in fg._tuned.items()}
        print("last autotuned configs: " + "; ".join(f"{name} {cfg}" for name, cfg in picked.items()))


    flops = 18 * args.tokens * k * D * F
    print("\n### layer forward+backward\n| impl | ms | TFLOP/s | % of matmul | vs unfused |\n|---|---|---|---|---|")
    auto_path = fused_path("auto", x_TD, D, F, E, k) or "unfused"
    impls = [(f"unfused{' (auto)' if auto_path == 'unfused' else ''}", unfused), ("fused", fused),
             ("hybrid (fused forward, grouped backward)", hybrid)]
    if auto_path != "unfused":
        impls.insert(1, (f"auto ({auto_path})", layer))
    if graphed is not None:
        impls.append(("fused + CUDA graph", graphed))
    if E <= PER_EXPERT_MAX_E:
        impls.append(("per-expert cuBLAS", same_layer(layer, "per_expert")))
    base = None
    x_BTD = x_TD.unsqueeze(0)
    for name, module in impls:
        try:
            ms = timed(training_step(module, x_BTD), args.reps, device)
            base = base or ms
            tf = flops / (ms * 1e-3) / 1e12
            print(f"| {name} | {ms:.2f} | {tf:.0f} | {100 * tf / tflops:.0f}% | {base / ms:.2f}x |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {name} | FAILED: {type(exc).__name__}: {exc} | | | |")
    print(f"ideal at the measured matmul rate: {flops / (tflops * 1e12) * 1e3:.2f} ms")


def interleaved_trials(steps: dict, args, device):
    """``args.trials`` rounds, each timing every step once in turn (ms per call), so drift in the
    device's clocks reaches all of them alike."""
    for _ in range(args.trials):
        yield {name: timed(step, args.reps, device) for name, step in steps.items()}


def expert_stage_step(st: Stages, impl: str):
    """One forward+backward of the expert stage alone (token rows in and out, every gradient):
    "unfused" (permute, grouped GEMMs, combine) or "hybrid" (fused gate_up, grouped backward)."""
    p = st.plan
    x = st.x_TD.detach().clone().requires_grad_(True)
    w_gu, w_dn = st.w_gu.clone().requires_grad_(True), st.w_dn.clone().requires_grad_(True)
    scale = st.scale_N.clone().requires_grad_(True)
    leaves = [x, w_gu, w_dn, scale]

    def step():
        for t in leaves:
            t.grad = None
        if impl == "unfused":
            x_ND = permute(x, p.row_token_N, p.pair_row_TK, True)
            h = grouped_mm(x_ND, w_gu, p.offsets_E)
            y_ND = grouped_mm(scaled_activation(h, scale, p.offsets_E[-1:], st.act, True), w_dn, p.offsets_E)
            y = unpermute_sum(y_ND, p.pair_row_TK, p.row_token_N, True)
        else:
            y = fused_expert_ffn(x, w_gu, w_dn, p.offsets_E, p.row_token_N, p.pair_row_TK, scale, st.act, True)
        y.backward(st.dy_TD)
        return [t.grad for t in leaves]

    return step


def run_hybrid_case(shape: str, D: int, F: int, E: int, k: int, routing: str, args, device, tflops: float) -> None:
    """``--hybrid``: the hybrid path against the unfused one, lighter than the full run: correctness,
    the gate_up stage, the expert stage alone, the layer (``--trials`` interleaved trials)."""
    layer, x_TD = case_layer(D, F, E, k, routing, args, device)
    hybrid, unfused = same_layer(layer, "hybrid"), same_layer(layer, "triton")
    st = Stages(layer, x_TD)
    counts = st.plan.counts_E.float()
    print(f"\n## hybrid: {shape} (D={D}, F={F}, E={E}, k={k}), T={args.tokens}, {routing} routing, "
          f"max/mean expert load {(counts.max() / counts.mean()).item():.2f}")
    p = st.plan
    errors = check_layer(unfused, hybrid, x_TD.unsqueeze(0), "hybrid layer")
    for i, (g, w) in enumerate(zip(expert_stage_step(st, "hybrid")(), expert_stage_step(st, "unfused")())):
        errors.append((f"expert stage hybrid grad[{i}]", *max_rel_err(g, w)))
    print_errors(errors)
    if args.sweep and device.type == "cuda":
        st.fused_gate_up()
        print_sweep("gate_up", "gate_up", top=6)
    print("\n| stage | ms |\n|---|---|")
    rows = [("gate_up unfused (gather, grouped GEMM, act)", st.unfused_gate_up), ("gate_up fused", st.fused_gate_up),
            ("gather x_TD -> x_ND", lambda: permute(st.x_TD, p.row_token_N, p.pair_row_TK, True)),
            ("row-block table (fg.Schedule)", lambda: fg.Schedule(p.offsets_E, p.row_token_N.shape[0]).tables),
            ("expert stage fwd+bwd, unfused", expert_stage_step(st, "unfused")),
            ("expert stage fwd+bwd, hybrid", expert_stage_step(st, "hybrid"))]
    for label, fn in rows:
        print(f"| {label} | {timed(fn, args.reps, device):.3f} |")
    flops = 18 * args.tokens * k * D * F
    x_BTD = x_TD.unsqueeze(0)
    steps = {"unfused": training_step(unfused, x_BTD), "hybrid": training_step(hybrid, x_BTD)}
    print("\n| trial | unfused ms | hybrid ms | hybrid speedup | hybrid % of matmul |\n|---|---|---|---|---|")
    ratios = []
    for trial, t in enumerate(interleaved_trials(steps, args, device)):
        ratios.append(t["unfused"] / t["hybrid"])
        tf = flops / (t["hybrid"] * 1e-3) / 1e12
        print(f"| {trial} | {t['unfused']:.2f} | {t['hybrid']:.2f} | {ratios[-1]:.3f}x | {100 * tf / tflops:.0f}% |")
    print(f"hybrid speedup over unfused: min {min(ratios):.3f}x, max {max(ratios):.3f}x over {args.trials} trials")


ROWS_SWEEP = {  # --rows --sweep: the epilogue kernels on grouped rows (TMA row and weight tiles), one grid program per tile
    "gate_up": [_c(8, 3, BN=128, BK=64), _c(8, 4, BN=128, BK=64), _c(4, 4, BN=64, BK=64), _c(8, 3, BN=64, BK=64)],
    "dgrad": [_c(8, 4, BN=128, BK=64), _c(4, 4, BN=64, BK=64), _c(8, 3, BN=64, BK=64), _c(4, 3, BN=64, BK=128),
              _c(8, 4, BN=64, BK=64), _c(4, 4, BN=128, BK=64), _c(8, 3, BN=128, BK=64, GROUP=16), _c(4, 5, BN=64, BK=64)],
}


def with_ws(fn, ws: bool):
    """``fn`` (a fused_gemm launcher) with its depth loop warp-specialised or not."""
    return lambda *a, **kw: fn(*a, **kw, ws=ws)


def run_rows_case(shape: str, D: int, F: int, E: int, k: int, routing: str, args, device, tflops: float) -> None:
    """``--rows``: the "epilogue" kernels (gate_up and down dgrad on grouped rows, the activation in
    the epilogue, TMA row and weight tiles on sm90) against the grouped GEMM + activation kernel
    they replace; warp specialisation on and off; then the expert stage and the layer, interleaved."""
    from flexmoe.experts import expert_ffn
    from flexmoe.ops.epilogue_experts import epilogue_ffn

    layer, x_TD = case_layer(D, F, E, k, routing, args, device)
    epi, unfused = same_layer(layer, "epilogue"), same_layer(layer, "triton")
    st = Stages(layer, x_TD)
    p, sch = st.plan, st.schedule
    counts = p.counts_E.float()
    N, H = int(p.offsets_E[-1]), st.w_gu.shape[1]
    tma = True if st.uses_tma else False
    print(f"\n## rows: {shape} (D={D}, F={F}, E={E}, k={k}), T={args.tokens}, {routing} routing, "
          f"max/mean expert load {(counts.max() / counts.mean()).item():.2f}, TMA {tma}")
    valid = p.offsets_E[-1:]

    def u_gate_up():
        h = grouped_mm(st.x_ND, st.w_gu, p.offsets_E)
        return h, scaled_activation(h, st.scale_N, valid, st.act, True)

    def u_dgrad():
        da = grouped_mm(st.dy_ND, st.w_dn.transpose(1, 2), p.offsets_E)
        return swiglu_scaled_backward(st.h_NH, st.scale_N, valid, da, True)

    # variants: (programs per SM, 0: one per tile; warp specialisation; dgrad: h through TMA)
    variants = {"gate_up + act": [(0, False, False), (0, True, False), (1, False, False)],
                "dgrad + act bwd": [(0, False, False), (0, False, True), (1, False, False), (1, False, True)],
                "down": [(0, False, False)], "dx": [(0, False, False)]}
    if args.sweep:
        variants = {name: v[:1] + ([(0, False, True)] if name.startswith("dgrad") else []) for name, v in variants.items()}
    stages = {
        "gate_up + act": (u_gate_up, lambda v: fg.gate_up(st.x_ND, None, st.w_gu, st.scale_N, sch, st.act, tma, v[1], v[0]),
                          "gate_up"),
        "dgrad + act bwd": (u_dgrad, lambda v: fg.down_dgrad(st.dy_ND, None, st.w_dn, st.h_NH, st.scale_N, sch, st.act,
                                                              tma, v[1], v[0], v[2]), "dgrad"),
        "down": (lambda: grouped_mm(st.a_NF, st.w_dn, p.offsets_E),
                 lambda v: fg.expert_mm(st.a_NF, st.w_dn, True, sch, tma, True, v[1]), "mm"),
        "dx": (lambda: grouped_mm(st.dh_NH, st.w_gu.transpose(1, 2), p.offsets_E),
               lambda v: fg.expert_mm(st.dh_NH, st.w_gu, False, sch, tma, True, v[1]), "mm"),
    }
    library = dict(fg._tuned)
    if device.type == "cuda" and not args.sweep:  # explicit grid choices: the library's tiles without their PER_SM
        for name in ("gate_up", "dgrad"):
            plain = [fg._config(c.num_warps, c.num_stages, **{k: v for k, v in c.kwargs.items() if k != "PER_SM"})
                     for c in fg.CONFIGS[name]]
            unique = list({str(c): c for c in plain}.values())
            fg._tuned[name] = fg.autotuned(name, unique, warmup=5, rep=25)
    errors = []
    for name, (unf, fus, _) in stages.items():
        for v in variants[name]:
            try:
                got, want = fus(v), unf()
                got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
                for i, (g, w) in enumerate(zip(got, want)):
                    errors.append((f"{name} {v} [{i}]", *max_rel_err(g[:N], w[:N])))
            except Exception as exc:  # noqa: BLE001 - report and go on
                errors.append((f"{name} {v} FAILED {type(exc).__name__}: {str(exc)[:200]}", float("nan"), float("nan")))
    print_errors(errors)
    print("\n| stage | grouped GEMM (+ act kernel) ms | Triton variant (per SM, warp spec., h TMA): ms | best speedup "
          "| best TFLOP/s (% matmul) |")
    print("|---|---|---|---|---|")
    for name, (unf, fus, tuner) in stages.items():
        t_u = timed(unf, args.reps, device)
        t_v = {}
        for v in variants[name]:
            try:
                fus(v)
                if args.sweep and device.type == "cuda":
                    print_sweep(f"{name} {v}", tuner, top=6)
                t_v[v] = timed(lambda: fus(v), args.reps, device)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} {v} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        best = min((t for t in t_v.values() if t == t), default=float("nan"))
        fl = stage_flops({"gate_up + act": "gate_up", "dgrad + act bwd": "dgrad", "down": "down", "dx": "dx"}[name], N, D, F, H)
        tf = fl / (best * 1e-3) / 1e12
        cells = "; ".join(f"{v}: {t:.3f}" for v, t in t_v.items())
        print(f"| {name} | {t_u:.3f} | {cells} | {t_u / best:.3f}x | {tf:.0f} ({100 * tf / tflops:.0f}%) |")
    if not args.sweep:
        fg._tuned.update(library)

    leaves = [st.x_ND.detach().clone().requires_grad_(True), st.w_gu.clone().requires_grad_(True),
              st.w_dn.clone().requires_grad_(True), st.scale_N.clone().requires_grad_(True)]
    dy = torch.randn(st.x_ND.shape[0], D, device=device, dtype=x_TD.dtype)

    def ffn_step(impl):
        def step():
            for t in leaves:
                t.grad = None
            x, wg, wd, sc = leaves
            if impl == "unfused":
                y = expert_ffn(x, wg, wd, p.offsets_E, sc, st.act, True)
            else:
                y = epilogue_ffn(x, wg, wd, p.offsets_E, sc, st.act)
            y.backward(dy)
            return [t.grad for t in leaves]
        return step

    errs = [(f"expert FFN epilogue grad[{i}]", *max_rel_err(g[:N] if g.dim() and g.shape[0] == dy.shape[0] else g,
                                                             w[:N] if w.dim() and w.shape[0] == dy.shape[0] else w))
            for i, (g, w) in enumerate(zip([t.clone() for t in ffn_step("epilogue")()], ffn_step("unfused")()))]
    errs += check_layer(unfused, epi, x_TD.unsqueeze(0), "epilogue layer")
    print_errors(errs)
    flops = 18 * args.tokens * k * D * F
    x_BTD = x_TD.unsqueeze(0)
    steps = {"ffn unfused": ffn_step("unfused"), "ffn epilogue": ffn_step("epilogue"),
             "layer unfused": training_step(unfused, x_BTD), "layer epilogue": training_step(epi, x_BTD)}
    print("\n| trial | FFN unfused ms | FFN epilogue ms | FFN speedup | layer unfused ms | layer epilogue ms | layer speedup | epilogue % of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for trial, t in enumerate(interleaved_trials(steps, args, device)):
        ratios.append(t["layer unfused"] / t["layer epilogue"])
        tf = flops / (t["layer epilogue"] * 1e-3) / 1e12
        print(f"| {trial} | {t['ffn unfused']:.3f} | {t['ffn epilogue']:.3f} | {t['ffn unfused'] / t['ffn epilogue']:.3f}x "
              f"| {t['layer unfused']:.2f} | {t['layer epilogue']:.2f} | {ratios[-1]:.3f}x | {100 * tf / tflops:.0f}% |")
    print(f"epilogue layer speedup over unfused: min {min(ratios):.3f}x, max {max(ratios):.3f}x over {args.trials} trials")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on CPU (interpreted Triton)")
    parser.add_argument("--quick", action="store_true", help="one shape (olmoe), uniform routing")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph check and timing")
    parser.add_argument("--sweep", action="store_true", help="autotune over the wide SWEEP tile sets, print all timings")
    parser.add_argument("--hybrid", action="store_true", help="only the hybrid path against unfused (layer trials interleaved)")
    parser.add_argument("--rows", action="store_true", help="only the epilogue kernels on grouped rows, the expert FFN and the layer")
    parser.add_argument("--trials", type=int, default=3, help="--hybrid / --rows: interleaved layer trials")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--routing", default="uniform,zipf", help="uniform and/or zipf")
    parser.add_argument("--zipf-alpha", type=float, default=1.2)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed trial (5 trials)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    if args.quick:
        shapes, args.routing = {"olmoe": SHAPES["olmoe"]}, "uniform"
    if args.tiny:
        shapes, args.tokens, args.reps = TINY, 64, 1
    if args.sweep:
        use_sweep_configs(ROWS_SWEEP if args.rows else HYBRID_SWEEP if args.hybrid else SWEEP)
    case = run_rows_case if args.rows else run_hybrid_case if args.hybrid else run_case
    tflops = matmul_tflops(device)
    print(header(device) + f"  dense bf16 matmul: {tflops:.0f} TFLOP/s")
    for shape, (D, F, E, k) in shapes.items():
        for routing in args.routing.split(","):
            try:
                case(shape, D, F, E, k, routing, args, device, tflops)
            except Exception:  # noqa: BLE001 - one failing case must not end the run
                print(f"\n## {shape}, {routing}: FAILED")
                traceback.print_exc(file=sys.stdout)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
