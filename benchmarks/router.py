"""The top-k router alone: time and kernel count per forward for the default config and for each
routing option of docs/routing.md (run it on main and on a branch to compare the default row).

GPU:  python benchmarks/router.py
CPU smoke check (tiny shapes):  python benchmarks/router.py --tiny
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

import flexmoe
from layer import timed


VARIANTS = {
    "default": {},
    "routed scale 2.5": dict(routed_scaling_factor=2.5),
    "sigmoid + groups 8/4": dict(router="sigmoid", num_groups=8, top_groups=4),
    "capacity 1.25 prob": dict(capacity_factor=1.25),
    "capacity 1.25 weight": dict(capacity_factor=1.25, capacity_priority="weight"),
    "router bias": dict(router_bias=True),
}


def variants(base: flexmoe.MoEConfig) -> dict[str, flexmoe.MoEConfig]:
    """The configs to time; options this flexmoe does not have are skipped (so the script also
    runs on older code, for the default row)."""
    out = {}
    for name, fields in VARIANTS.items():
        try:
            out[name] = dataclasses.replace(base, **fields)
        except TypeError:
            continue
    return out


def kernels_per_call(fn, device: torch.device) -> int:
    """Device kernels one call launches (CPU: operator count)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    fn()
    with profile(activities=[activity]) as prof:
        fn()
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    T, D, E, k = (64, 32, 16, 2) if args.tiny else (16384, 2048, 128, 8)
    reps = 3 if args.tiny else 50
    base = flexmoe.MoEConfig(d_model=D, d_ff=64, num_experts=E, top_k=k)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    print(f"router only, T={T} D={D} E={E} k={k}, input bf16, router float32, {device}")
    print(f"{'config':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'kernels/fwd':>13}")
    for name, cfg in variants(base).items():
        router = flexmoe.MoELayer(cfg).to(device).router.train()
        if getattr(cfg, "router_bias", False):
            router.bias.data.normal_()

        def fwd():
            with torch.no_grad():
                r = router(x)
            return r

        def fwd_bwd():
            r = router(x)
            (r.weight_TK.sum() + r.probs_TE.sum()).backward()

        print(f"{name:<24}{timed(fwd, reps, device):>10.3f}{timed(fwd_bwd, reps, device):>12.3f}"
              f"{kernels_per_call(fwd, device):>13d}")


if __name__ == "__main__":
    main()
