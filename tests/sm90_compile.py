"""Compile every fused kernel for sm90 without a GPU; run by tests/test_fused.py in a process
without TRITON_INTERPRET. Prints "ok <kernel>" per kernel whose TTGIR uses Hopper tensor cores
(wgmma) with pipelined asynchronous loads (and TMA loads in the TMA variants); exits non-zero
otherwise."""

from __future__ import annotations

import inspect
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from flexmoe.ops import fused_gemm as fg


def ttgir(kernel, types: dict, constexprs: dict, config: triton.Config) -> str:
    """TTGIR with the pointer and integer arguments 16-divisible, as Triton specialises them at launch
    (an argument with a default is a constexpr unless ``types`` names it)."""
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty and n not in types}
    constexprs = {**defaults, **constexprs, **config.kwargs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ttgir"]


def main() -> int:
    tables = {"block_expert_ptr": "*i32", "block_first_ptr": "*i32", "block_end_ptr": "*i32"}
    common = dict(ACC=tl.float32, PREC="tf32")
    cases = [
        (fg._gate_up_kernel, {"x_ptr": "*bf16", "row_token_ptr": "*i64", "w_ptr": "*bf16", "scale_ptr": "*fp32",
                              "h_ptr": "*bf16", "a_ptr": "*bf16"}, dict(GATED=True, ACT=0, BM=128, w_desc=None), fg.CONFIGS["gate_up"]),
        (fg._down_dgrad_kernel, {"dy_ptr": "*bf16", "row_token_ptr": "*i64", "w_ptr": "*bf16", "h_ptr": "*bf16",
                                 "scale_ptr": "*fp32", "dh_ptr": "*bf16", "dscale_part_ptr": "*fp32"},
         dict(GATED=False, ACT=1, BM=128, w_desc=None), fg.CONFIGS["dgrad"]),
        (fg._expert_mm_kernel, {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16"}, dict(stride_wk=1, BM=64, w_desc=None),
         fg.CONFIGS["mm"]),
        (fg._expert_wgrad_kernel, {"g_ptr": "*bf16", "g_index_ptr": "*i64", "x_ptr": "*bf16", "x_index_ptr": "*i32",
                                   "dw_ptr": "*bf16", "part_ptr": "*fp32", "block_slot_ptr": "*i32"},
         dict(GATHER_G=True, GATHER_X=False), fg.CONFIGS["wgrad"]),
    ]
    def desc(mode: int, config: triton.Config) -> dict:  # the descriptor's tile is the config's weight tile
        block = fg._weight_block(mode, config.kwargs["BN"], config.kwargs["BK"])
        return {"w_desc": f"tensordesc<bf16[{block[0]},{block[1]}]>"}

    tma_cases = [  # weight tiles through TMA descriptors (the sm90 default)
        (kernel, {**types, **desc(mode, configs[0])}, {**{k: v for k, v in extra.items() if k != "w_desc"}, "TMA": mode},
         configs)
        for (kernel, types, extra, configs), mode in zip(cases[:3], (1, 2, 1))
    ]
    failed = False
    for kernel, types, extra, configs in tma_cases:
        ir = ttgir(kernel, {**types, **tables}, {**common, **extra}, configs[0])
        if "async_tma_copy_global_to_local" not in ir or "warp_group_dot" not in ir:
            print(f"FAILED {kernel.fn.__name__} TMA={extra['TMA']}: no TMA loads or no wgmma")
            failed = True
        print(f"ok {kernel.fn.__name__} TMA={extra['TMA']}")
    for kernel, types, extra, configs in cases:
        name = kernel.fn.__name__
        for config in configs[:1]:
            ir = ttgir(kernel, {**types, **tables}, {**common, **extra}, config)
            if "warp_group_dot" not in ir or "async_copy_global_to_local" not in ir:
                print(f"FAILED {name} {config}: no wgmma or no pipelined loads")
                failed = True
        print(f"ok {name}")
    rows_cases = [  # grouped-row operands through TMA ("epilogue"), one program per tile and persistent
        (fg._gate_up_kernel, {**cases[0][1], "w_desc": "tensordesc<bf16[128,64]>", "x_desc": "tensordesc<bf16[128,64]>",
                              "used_ptr": "*i32"}, dict(GATED=True, ACT=0, BM=128, TMA=1, GATHER=False)),
        (fg._down_dgrad_kernel, {**cases[1][1], "w_desc": "tensordesc<bf16[64,128]>", "dy_desc": "tensordesc<bf16[128,64]>",
                                 "h_desc": "tensordesc<bf16[128,128]>", "used_ptr": "*i32"},
         dict(GATED=True, ACT=0, BM=128, TMA=2, GATHER=False)),
    ]
    for kernel, types, extra in rows_cases:
        for per_sm in (0, 1):
            config = triton.Config(dict(BN=128, BK=64, PER_SM=per_sm), num_warps=8, num_stages=4)
            ir = ttgir(kernel, {**types, **tables}, {**common, **extra}, config)
            if "async_tma_copy_global_to_local" not in ir or "warp_group_dot" not in ir:
                print(f"FAILED {kernel.fn.__name__} grouped rows PER_SM={per_sm}: no TMA loads or no wgmma")
                failed = True
        print(f"ok {kernel.fn.__name__} grouped rows")
    types = {"part_ptr": "*fp32", "dw_ptr": "*bf16", "blocks_ptr": "*i32", "slot_start_ptr": "*i32"}
    ttgir(fg._wgrad_reduce_kernel, types, dict(BLOCK=4096, ACC=tl.float32), triton.Config({}, num_warps=8, num_stages=1))
    print("ok _wgrad_reduce_kernel")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
