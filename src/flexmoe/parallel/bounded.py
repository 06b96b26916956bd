"""The bounded-buffer expert-parallel stage: no host synchronisation, fixed-size exchanges.

Legend: T local tokens, D width, K experts per token, W ranks, S slots per rank, C pair rows a
rank may send to each rank (``ParallelConfig.rows_per_rank_pair``), B = W * C buffer rows,
R = B * K expert rows (upper bound), E logical experts, Q the most replicas of one expert.

Everything stays on the device: each rank splits its own rows of a replicated expert between
the replicas by their shares (``local_row_replicas``; the exact mode cuts the global sequence
instead, the maths is the same), groups them into (token, rank) pairs (dispatch.py), and writes
the first C pairs for each destination (token order) into a ``[W, C]`` buffer. Three equal-split
all-to-alls carry tokens, routing weights and slot ids; the receiver expands, runs its experts
over the rows grouped by slot (grouped-GEMM offsets from a device histogram), sums each pair's
rows, and one equal-split all-to-all brings them back. All of it is plain differentiable torch
(functional collectives), so autograd gives backward and ``torch.compile(fullgraph=True)``
captures it.

With ``transport`` (symmetric.py: torch's symmetric-memory ``all_to_all_vdev`` on NVSHMEM
GPUs) the blocks travel with device splits instead: only the used rows move, in one
exchange per tensor, and they are expanded back into the same block layout on arrival.

Overflow rule: pairs past the first C to one destination are dropped, like capacity drops:
their experts on that rank contribute zero to the token, and they are counted
(``BoundedReport``). With C >= the tokens of every rank nothing can overflow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed._functional_collectives as funcol

from .. import collectives
from ..experts import GroupedExperts
from ..placement.table import PlacementTable
from .dispatch import route_pairs
from .stage import _pair_weights
from .symmetric import SymmetricTransport, symmetric_blocks


@dataclasses.dataclass(frozen=True)
class BoundedReport:
    """What the last bounded forward dropped (device tensors: reading them synchronises).

    dropped_pairs_W: (token, rank) pairs that did not fit the buffer to each destination rank.
    dropped_rows: their (token, expert) rows. buffer_rows: pair rows sent per forward (W * C).
    """

    dropped_pairs_W: torch.Tensor
    dropped_rows: torch.Tensor
    buffer_rows: int


FRACTION_BITS = 20


def replica_tables(table: PlacementTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, its replicas' flat ids (rank * S + slot, (rank, slot) order, -1 padded) and
    cumulative share fractions in units of ``2**-FRACTION_BITS`` (padded past any row), both
    int64 ``[E, Q]`` (integers, so moving the layer to another dtype leaves them alone)."""
    flat_F = table.slot_expert_WS.reshape(-1)
    share_F = table.share_WS.reshape(-1)
    Q = int(table.num_replicas_E().max())
    ids_EQ = np.full((table.num_experts, Q), -1, dtype=np.int64)
    frac_EQ = np.full((table.num_experts, Q), 2.0)
    for e in range(table.num_experts):
        reps = np.flatnonzero(flat_F == e)
        ids_EQ[e, :reps.size] = reps
        cum = np.cumsum(share_F[reps])
        frac_EQ[e, :reps.size] = cum / cum[-1]
        frac_EQ[e, reps.size - 1] = 2.0  # the last replica takes the rest
    scaled_EQ = np.round(frac_EQ * 2**FRACTION_BITS).astype(np.int64)
    return torch.from_numpy(ids_EQ), torch.from_numpy(scaled_EQ)


def local_row_replicas(ids_EQ: torch.Tensor, frac_EQ: torch.Tensor, counts_E: torch.Tensor,
                       offsets_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Flat replica of each of this rank's expert-grouped rows (-1 past the kept rows): row i of
    expert e's n rows goes to replica j when ``round(frac[j-1] * n) <= i < round(frac[j] * n)``."""
    E = counts_E.shape[0]
    row_N = torch.arange(num_rows, device=counts_E.device)
    expert_N = torch.searchsorted(offsets_E.to(torch.int64), row_N, right=True)
    kept_N = expert_N < E
    expert_N = expert_N.clamp_max(E - 1)
    start_E = offsets_E.to(torch.int64) - counts_E
    within_N = row_N - start_E[expert_N]
    half = 1 << (FRACTION_BITS - 1)
    bound_EQ = (frac_EQ * counts_E.unsqueeze(1) + half) >> FRACTION_BITS
    replica_N = (within_N.unsqueeze(1) >= bound_EQ[expert_N]).sum(dim=1)
    flat_N = ids_EQ[expert_N, replica_N.clamp_max(ids_EQ.shape[1] - 1)]
    return torch.where(kept_N, flat_N, -1)


def bounded_stage(stage: GroupedExperts, x_TD: torch.Tensor, plan, ids_EQ, frac_EQ, *, rank: int, world: int,
                  rows_per_rank_pair: int, group, use_triton: bool,
                  transport: SymmetricTransport | None = None) -> tuple[torch.Tensor, BoundedReport]:
    """``sum_k weight * FFN_k(token)`` for the local tokens, experts anywhere in the group
    (through ``transport`` when given, else equal-split all-to-alls)."""
    T, D = x_TD.shape
    K = plan.pair_row_TK.shape[1]
    W, C, S = world, rows_per_rank_pair, stage.num_experts
    B = W * C
    device = x_TD.device
    replica_N = local_row_replicas(ids_EQ, frac_EQ, plan.counts_E, plan.offsets_E, plan.num_rows)
    route = route_pairs(replica_N, plan.pair_row_TK, W, S, 1, rank)
    pairs_W = route.counts_nWC[0, :, 0]
    entry = torch.arange(W * T, device=device)
    dst_P = route.dst_P
    position_P = entry - (torch.cumsum(pairs_W, 0) - pairs_W)[dst_P.clamp_max(W - 1)]
    valid_P = entry < pairs_W.sum()
    keep_P = valid_P & (position_P < C)
    target_P = torch.where(keep_P, dst_P * C + position_P, B)
    # Unused buffer rows read token T, a zero row appended to the tokens (so T may be 0).
    token_B = torch.full((B + 1,), T, dtype=torch.int64, device=device).scatter_(0, target_P, route.token_P)[:B]
    slot_BK = torch.full((B + 1, K), -1, dtype=torch.int32, device=device).index_copy_(0, target_P, route.slot_PK)[:B]
    overflow_P = valid_P & ~keep_P
    dropped_pairs_W = torch.zeros(W + 1, dtype=torch.int64, device=device).scatter_add_(
        0, torch.where(overflow_P, dst_P, W), overflow_P.to(torch.int64))[:W]
    dropped_rows = ((route.slot_PK >= 0).sum(dim=1) * overflow_P).sum()

    used_BK = slot_BK >= 0
    w_TK = _pair_weights(plan.row_weight_N, plan.pair_row_TK)
    w_BK = torch.where(used_BK, torch.cat([w_TK, w_TK.new_zeros((1, K))]).index_select(0, token_B), 0)
    x_BD = torch.cat([x_TD, x_TD.new_zeros((1, D))]).index_select(0, token_B)
    if transport is not None:
        used_W = pairs_W.clamp_max(C)
        x_recv, w_recv, slot_recv, recv_used_W = symmetric_blocks(transport, used_W, (x_BD, w_BK, slot_BK), (0, 0, -1))
    else:
        slot_recv = _exchange(slot_BK, group, W)
        x_recv, w_recv = (x_BD, w_BK) if W == 1 else _PairExchange.apply(group, x_BD, w_BK)

    # Receiver: rows grouped by slot, invalid rows last (past the grouped-GEMM offsets).
    flat_R = torch.arange(B * K, device=device)
    slot_R = slot_recv.reshape(-1).to(torch.int64)
    valid_R = slot_R >= 0
    order_R = torch.sort(torch.where(valid_R, slot_R * (B * K) + flat_R, S * B * K)).indices
    rows_S = torch.zeros(S + 1, dtype=torch.int64, device=device).scatter_add_(
        0, torch.where(valid_R, slot_R, S), valid_R.to(torch.int64))[:S]
    offsets_S = torch.cumsum(rows_S, 0).to(torch.int32)
    sorted_valid_R = valid_R.index_select(0, order_R)
    pair_R = order_R // K
    x_RD = x_recv.index_select(0, pair_R)
    w_R = torch.where(sorted_valid_R, w_recv.reshape(-1).index_select(0, order_R), 0)
    y_RD = GroupedExperts.forward(stage, x_RD, offsets_S, w_R, use_triton)
    y_RD = torch.where(sorted_valid_R.unsqueeze(1), y_RD, 0)
    y_BD = torch.zeros((B, D), dtype=y_RD.dtype, device=device).index_add(0, pair_R, y_RD)
    if transport is not None:
        y_back = symmetric_blocks(transport, recv_used_W, (y_BD,), (0,))[0]
    else:
        y_back = y_BD if W == 1 else _PairExchange.apply(group, y_BD)[0]
    y_back = torch.where(used_BK.any(dim=1, keepdim=True), y_back, 0)
    y_TD = torch.zeros((T + 1, D), dtype=y_back.dtype, device=device).index_add(0, token_B, y_back)[:T]
    return y_TD, BoundedReport(dropped_pairs_W, dropped_rows, B)



def _exchange(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """Equal-split all-to-all of the rows of ``t``: block r goes to rank r."""
    if world == 1:
        return t
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_to_all_single(t, None, None, group))
    counts = collectives.use_counts([t])
    out = funcol.wait_tensor(funcol.all_to_all_single(t, None, None, group))
    collectives.settle([t, out], None if counts is None else [*counts, 1])  # out: only ours
    return out


class _PairExchange(torch.autograd.Function):
    """Equal-split all-to-all of several tensors, their gradients back in the same order: one
    node, so every rank runs the backward exchanges in the same order (separate differentiable
    collectives could be ordered differently by the autograd engine on different ranks)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_exchange(t, group, 2) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(_exchange(g.contiguous(), ctx.group, 2) for g in grads))
