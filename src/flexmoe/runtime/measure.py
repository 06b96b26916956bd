"""Measure the cost model's constants on the running machine (a collective over the EP group).

The cost model itself (placement/cost_model.py) is pure arithmetic; this times a grouped expert
FFN and an all-to-all so that its constants describe the hardware at hand.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..config import MoEConfig
from ..experts import GroupedExperts
from ..placement.cost_model import CostModel


def measure_cost_model(
    d_model: int,
    d_ff: int,
    *,
    device: str = "cpu",
    group=None,
    rows: int = 512,
    local_experts: int = 4,
    dtype=None,
    repeats: int = 3,
    **overrides,
) -> CostModel:
    """Time a grouped expert FFN (forward + backward) and an all-to-all on this machine.

    c_tok and c_slot come from a line through two row counts (``rows`` and ``4 * rows``). The all-to-all is timed over
    ``group`` when it has more than one rank; otherwise a device-local copy stands in
    (state ``a2a_bw`` in ``overrides`` when the real fabric is known). Every rank of
    ``group`` must call this together; ranks agree on the constants through an all-reduce max.
    """
    if rows < 1 or local_experts < 1 or repeats < 1:
        raise ValueError(f"rows, local_experts and repeats must be >= 1, got {rows}, {local_experts}, {repeats}")

    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    elem = torch.tensor([], dtype=dtype).element_size()
    config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=local_experts, top_k=1)
    experts = GroupedExperts(config).to(dev, dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def ffn_seconds(n: int) -> float:
        x = torch.randn(n, d_model, device=dev, dtype=dtype, requires_grad=True)
        offsets = torch.linspace(0, n, local_experts + 1, device=dev)[1:].round().to(torch.int32)
        scale = torch.ones(n, device=dev, dtype=dtype)
        experts(x, offsets, scale, use_triton=False).sum().backward()
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            experts(x, offsets, scale, use_triton=False).sum().backward()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    t1, t4 = ffn_seconds(rows), ffn_seconds(4 * rows)
    c_tok = max((t4 - t1) / (3 * rows), t4 / (4 * rows) * 1e-3)
    c_slot = max((t1 - rows * c_tok) / local_experts, 0.0)

    nbytes = 1 << 24
    world = 1
    if group is not None:
        world = dist.get_world_size(group)
    buf = torch.empty(nbytes // elem * world, device=dev, dtype=dtype)
    out = torch.empty_like(buf)
    best = float("inf")
    for _ in range(repeats + 1):
        sync()
        if world > 1:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        if world > 1:
            dist.all_to_all_single(out, buf, group=group)
        else:
            out.copy_(buf)
        sync()
        best = min(best, time.perf_counter() - t0)
    a2a_bw = (nbytes * (world - 1) if world > 1 else nbytes) / best

    measured = torch.tensor([c_tok, c_slot, 1.0 / a2a_bw], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(measured, op=dist.ReduceOp.MAX, group=group)
    c_tok, c_slot, inv_bw = measured.tolist()
    params = 3 * d_model * d_ff if config.is_gated else 2 * d_model * d_ff
    values = dict(
        c_tok=c_tok,
        c_slot=c_slot,
        bytes_per_token=d_model * elem,
        a2a_bw=1.0 / inv_bw,
        grad_bytes=params * 4,
        move_bytes=params * 12,
    )
    values.update(overrides)
    return CostModel(**values)
