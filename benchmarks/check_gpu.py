"""GPU correctness: the CUDA layer (Triton kernels, grouped GEMM) against the float64 reference.

For bf16, fp16 and fp32 and awkward routings it prints the relative error of output, input
gradient and each parameter gradient against a float64 copy of the same layer on the CPU
(whose torch path the test suite checks against the per-expert loop), for ``kernels="auto"``
and, where this checkout has them, the fused kernels (``kernels="fused"``); then checks that
``torch.compile(fullgraph=True)`` with inductor matches eager. A case that raises is a failure
row, and the run goes on.

python benchmarks/check_gpu.py
"""

from __future__ import annotations

import copy
import dataclasses

import torch

import flexmoe

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(cfg: flexmoe.MoEConfig, dtype: torch.dtype, T: int, skew: bool) -> dict[str, float]:
    torch.manual_seed(T + cfg.num_experts)
    ref = flexmoe.MoELayer(dataclasses.replace(cfg, kernels="torch")).double()
    x = torch.randn(T, cfg.d_model, dtype=torch.float64)
    if skew:
        with torch.no_grad():
            ref.router.weight[:, 0] = torch.log(1.0 / torch.arange(1, cfg.num_experts + 1.0) ** 2)
        x[:, 0] = 1.0
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).double())
    x = x.to(dtype).double()
    gpu = copy.deepcopy(ref).to(device="cuda", dtype=dtype)
    gpu.config = cfg
    gpu.router.config = cfg
    gpu.experts.config = cfg
    probe = torch.randn(T, cfg.d_model, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (ref(xr) * probe).sum().backward()
    xg = x.to("cuda", dtype).requires_grad_(True)
    yg = gpu(xg)
    (yg.double() * probe.cuda()).sum().backward()
    # Inputs and weights are rounded to ``dtype`` first, so only the arithmetic differs.
    errs = {"out": rel(yg, ref(x.clone()).detach()), "dx": rel(xg.grad, xr.grad)}
    for (name, p), pr in zip(gpu.named_parameters(), ref.parameters()):
        if pr.grad is not None and pr.grad.norm() > 0:
            errs[name] = rel(p.grad, pr.grad)
    return errs


def kernel_choices() -> list[str]:
    """"auto", plus "fused" when this checkout's MoEConfig accepts it."""
    try:
        flexmoe.MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=1, kernels="fused")
        return ["auto", "fused"]
    except ValueError:
        return ["auto"]


def main() -> None:
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    cases = [
        ("swiglu k=2", flexmoe.MoEConfig(d_model=256, d_ff=128, num_experts=8, top_k=2, init_std=0.05), 512, False),
        ("top_k = E", flexmoe.MoEConfig(d_model=128, d_ff=64, num_experts=4, top_k=4, init_std=0.05), 256, False),
        ("empty experts", flexmoe.MoEConfig(d_model=128, d_ff=64, num_experts=64, top_k=2, init_std=0.05), 8, False),
        ("one token", flexmoe.MoEConfig(d_model=128, d_ff=64, num_experts=8, top_k=2, init_std=0.05), 1, False),
        ("zipf skew", flexmoe.MoEConfig(d_model=256, d_ff=128, num_experts=16, top_k=4, init_std=0.05), 512, True),
        ("capacity 1.0", flexmoe.MoEConfig(d_model=128, d_ff=64, num_experts=8, top_k=2, capacity_factor=1.0, init_std=0.05), 256, True),
        ("gelu + shared", flexmoe.MoEConfig(d_model=128, d_ff=64, num_experts=8, top_k=2, activation="gelu", num_shared_experts=1, init_std=0.05), 256, False),
        ("odd widths", flexmoe.MoEConfig(d_model=100, d_ff=60, num_experts=6, top_k=2, init_std=0.05), 99, False),
    ]
    failures = 0
    print("| case | kernels | dtype | out | dx | worst param grad | tol | ok |\n|---|---|---|---|---|---|---|---|")
    for kernels in kernel_choices():
        for label, cfg, T, skew in cases:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                try:
                    errs = compare(dataclasses.replace(cfg, kernels=kernels), dtype, T, skew)
                except Exception as exc:  # noqa: BLE001 - a failure row, the run goes on
                    failures += 1
                    print(f"| {label} | {kernels} | {str(dtype)[6:]} | FAILED: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''} | | | | NO |")
                    continue
                worst = max(v for k, v in errs.items() if k not in ("out", "dx"))
                ok = max(errs.values()) <= TOLERANCE[dtype]
                failures += not ok
                print(f"| {label} | {kernels} | {str(dtype)[6:]} | {errs['out']:.1e} | {errs['dx']:.1e} | {worst:.1e} "
                      f"| {TOLERANCE[dtype]:.0e} | {'yes' if ok else 'NO'} |", flush=True)

    cfg = flexmoe.MoEConfig(d_model=256, d_ff=128, num_experts=8, top_k=2, aux_loss_coef=0.01, validate_inputs=False)
    eager = flexmoe.MoELayer(cfg).to("cuda", torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    ye, yc = eager(x), compiled(x)
    err = rel(yc, ye)
    print(f"inductor fullgraph vs eager (bf16): rel err {err:.1e}")
    failures += err > 1e-2
    print("ALL OK" if failures == 0 else f"{failures} FAILURES")


if __name__ == "__main__":
    main()
