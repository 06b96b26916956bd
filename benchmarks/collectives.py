"""What settling costs: flexmoe.collectives.all_reduce against torch's dist.all_reduce on gloo.

    torchrun --nproc-per-node 2 benchmarks/collectives.py

flexmoe's collectives on CPU tensors keep the tensors gloo's worker thread still holds when they
return, until it lets go (flexmoe/collectives.py says why). This times both, best of 9
interleaved trials of 300 calls, per size; on CUDA tensors nothing is kept, so there is nothing
to time.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from flexmoe import collectives

SIZES = (64, 65536)
CALLS, TRIALS = 300, 9


def best_us(fns) -> list[float]:
    """Per function, the best of TRIALS trials of CALLS calls, the functions' trials interleaved."""
    for fn in fns:
        for _ in range(50):
            fn()
    times = [[] for _ in fns]
    for _ in range(TRIALS):
        for fn, out in zip(fns, times):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            out.append((time.perf_counter() - start) / CALLS * 1e6)
    return [min(t) for t in times]


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = []
    for n in SIZES:
        x = torch.ones(n)
        plain, settled = best_us([lambda: dist.all_reduce(x), lambda: collectives.all_reduce(x)])
        rows.append((n, plain, settled))
    if dist.get_rank() == 0:
        print(f"gloo, {dist.get_world_size()} processes, best of {TRIALS} x {CALLS} calls")
        print("| float32 elements | dist.all_reduce (us) | flexmoe.collectives.all_reduce (us) | ratio |")
        print("|---|---|---|---|")
        for n, plain, settled in rows:
            print(f"| {n} | {plain:.0f} | {settled:.0f} | {settled / plain:.2f} |")
    collectives.all_reduce(torch.zeros(1))  # the last collective settles: a clean exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
