"""Measure the cost model's constants on the running machine (a collective over the EP group).

The cost model itself (placement/cost_model.py) is pure arithmetic; this times a grouped expert
FFN, an all-to-all, a pairwise exchange and a point-to-point send so that its constants describe
the hardware at hand.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import collectives
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

    c_tok and c_slot come from a line through two row counts (``rows`` and ``4 * rows``). Over
    ``group`` with more than one rank, the all-to-all (``a2a_bw``), replica gradient sync
    (a pairwise exchange, ``sync_bw``) and replica move (point-to-point, ``move_bw``) bandwidths are timed
    separately; on one rank a device-local copy stands in for ``a2a_bw`` and sync and moves fall
    back to it (state ``a2a_bw`` etc. in ``overrides`` when the real fabric is known). Every rank
    of ``group`` must call this together; ranks agree on the constants through an all-reduce max.
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
        return _best_seconds(lambda: experts(x, offsets, scale, use_triton=False).sum().backward(), None, 1,
                             repeats, sync)

    t1, t4 = ffn_seconds(rows), ffn_seconds(4 * rows)
    c_tok = max((t4 - t1) / (3 * rows), t4 / (4 * rows) * 1e-3)
    c_slot = max((t1 - rows * c_tok) / local_experts, 0.0)

    world = 1 if group is None else dist.get_world_size(group)
    bws = _measure_bandwidths(dev, dtype, group, world, repeats, sync)
    measured = torch.tensor([c_tok, c_slot, *(1.0 / bw for bw in bws)], dtype=torch.float64)
    if world > 1:
        collectives.all_reduce(measured, op=dist.ReduceOp.MAX, group=group)
    c_tok, c_slot, *inv_bws = measured.tolist()
    params = 3 * d_model * d_ff if config.is_gated else 2 * d_model * d_ff
    values = dict(
        c_tok=c_tok,
        c_slot=c_slot,
        bytes_per_token=d_model * elem,
        grad_bytes=params * 4,
        move_bytes=params * 12,
        **{name: 1.0 / inv for name, inv in zip(("a2a_bw", "sync_bw", "move_bw"), inv_bws)},
    )
    values.update(overrides)
    return CostModel(**values)


def _measure_bandwidths(dev, dtype, group, world: int, repeats: int, sync, nbytes: int = 1 << 24) -> list[float]:
    """Bytes per second per rank of an all-to-all, a pairwise exchange (ranks 2i and 2i + 1 send
    each other a gradient's bytes at once, as the replica sum does) and a point-to-point send
    around a ring, each counted as the cost model charges it (bytes a rank sends or receives).
    One rank has no fabric: a device-local copy stands in for the all-to-all and the other two
    are left to fall back to it (None)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    n = nbytes // elem
    if world == 1:
        buf = torch.empty(n, device=dev, dtype=dtype)
        out = torch.empty_like(buf)
        return [nbytes / _best_seconds(lambda: out.copy_(buf), None, 1, repeats, sync)]
    rank = dist.get_rank(group)
    send = torch.empty(n * world, device=dev, dtype=dtype)
    recv = torch.empty_like(send)
    # A ring of point-to-point sends (every rank to its successor), as an uneven all-to-all: a
    # collective, so it needs no p2p tags (gloo's batch_isend_irecv hung after a re-initialised
    # default group) and every rank takes part in the same call.
    to_W = [n if w == (rank + 1) % world else 0 for w in range(world)]
    from_W = [n if w == (rank - 1) % world else 0 for w in range(world)]
    pair_W = [n if w == rank ^ 1 else 0 for w in range(world)]  # the last of an odd world idles

    def ring_send():
        dist.all_to_all_single(recv[:n], send[:n], output_split_sizes=from_W, input_split_sizes=to_W, group=group)

    def exchange():
        dist.all_to_all_single(recv[:n], send[:n], output_split_sizes=pair_W, input_split_sizes=pair_W, group=group)

    t_a2a = _best_seconds(lambda: dist.all_to_all_single(recv, send, group=group), group, world, repeats, sync)
    t_sync = _best_seconds(exchange, group, world, repeats, sync)
    t_move = _best_seconds(ring_send, group, world, repeats, sync)
    return [nbytes * (world - 1) / t_a2a, nbytes / t_sync, nbytes / t_move]


def _best_seconds(fn, group, world: int, repeats: int, sync) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` after one untimed (ranks start together)."""
    best = float("inf")
    for i in range(repeats + 1):
        sync()
        if world > 1:
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        sync()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best
