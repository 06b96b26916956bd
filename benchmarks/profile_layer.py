"""Top CUDA kernels of one flexmoe forward+backward (for finding where time goes).

python benchmarks/profile_layer.py --shape qwen3-30b-a3b
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

import flexmoe
from layer import SHAPES, profiled, timed, training_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    D, F, E, k = SHAPES[args.shape]
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, validate_inputs=False))
    layer = layer.to("cuda", torch.bfloat16)
    x = torch.randn(1, args.tokens, D, device="cuda", dtype=torch.bfloat16)
    step = training_step(layer, x)
    calls = 5
    wall_ms = timed(step, calls, torch.device("cuda"), trials=1)
    prof = profiled(step, [ProfilerActivity.CPU, ProfilerActivity.CUDA], calls)
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
    kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / calls
    print(f"wall {wall_ms:.2f} ms per fwd+bwd, kernels {kernel_ms:.2f} ms: GPU busy {100 * kernel_ms / wall_ms:.0f}%")
    syncs = [e for e in events if any(s in e.key for s in ("Synchronize", "MemcpyDtoH", "_local_scalar_dense", "item", "nonzero"))]
    for e in syncs:
        print(f"sync-like: {e.key} calls={e.count} cpu_total={e.cpu_time_total / 1e3:.2f} ms")
    cpu_ms = max(e.cpu_time_total for e in events) / 1e3 / calls
    print(f"largest CPU total per step: {cpu_ms:.2f} ms")


if __name__ == "__main__":
    main()
