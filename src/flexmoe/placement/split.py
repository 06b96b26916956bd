"""Token split between the replicas of an expert: the one definition the planner, cost model,
simulator and runtime dispatcher share.

Legend: E logical experts, W ranks, S slots per rank, R the most replicas any expert has.

Each expert's global token sequence, ordered by source rank, is cut into contiguous intervals,
one per replica in (rank, slot) order: replica j of expert e takes ``[B[j-1], B[j])``, its quota
being ``B[j] - B[j-1]``.

Fixed shares (``adaptive=False``): ``B[j] = floor(cumsum(share)[j] / sum(share) * n_e + 0.5)``,
the last boundary forced to ``n_e``: the table's shares decide, whatever the step's counts.

Adaptive (the default): the quotas of replicated experts are chosen from the step's counts to
even out the rank loads, starting from the fixed-share quotas: sweeps over the replicated
experts (heaviest first, ties by index) each re-split one expert's tokens over its ranks by
integer water-filling against the rest of those ranks' loads, until a sweep no longer lowers the
sum of squared rank loads (at most ``MAX_SWEEPS``). A re-split never raises the largest load of the ranks it touches, so the
busiest rank never holds more than under fixed shares; the table's shares only seed the descent.

Both are integer arithmetic after one float rounding per boundary, so every rank computes the
same split from the same all-gathered counts with no communication.
"""

from __future__ import annotations

import numpy as np

from .table import PlacementTable


def _replica_layout(table: PlacementTable):
    """Replicas grouped by expert: flat (rank * S + slot) index, expert and position in the group."""
    se_F = table.slot_expert_WS.reshape(-1)
    valid_F = np.nonzero(se_F >= 0)[0]
    order_R = valid_F[np.argsort(se_F[valid_F], kind="stable")]
    expert_R = se_F[order_R]
    reps_E = np.bincount(expert_R, minlength=table.num_experts)
    start_E = np.cumsum(reps_E) - reps_E
    pos_R = np.arange(order_R.size) - start_E[expert_R]
    return order_R, expert_R, pos_R, reps_E


MAX_SWEEPS = 32


def _boundaries(table: PlacementTable, counts_E: np.ndarray, adaptive: bool = True):
    """Interval end of every replica (grouped by expert) in its expert's token sequence."""
    order_R, expert_R, pos_R, reps_E = _replica_layout(table)
    n_E = np.asarray(counts_E, dtype=np.int64)
    if n_E.shape != (table.num_experts,):
        raise ValueError(f"counts_E must have shape ({table.num_experts},), got {n_E.shape}")
    if (n_E < 0).any():
        raise ValueError("counts_E must be >= 0")
    share_ER = np.zeros((table.num_experts, int(reps_E.max())))
    share_ER[expert_R, pos_R] = table.share_WS.reshape(-1)[order_R]
    cum_ER = np.cumsum(share_ER, axis=1)
    total_E1 = cum_ER[:, -1:]
    frac_ER = np.divide(cum_ER, total_E1, out=np.zeros_like(cum_ER), where=total_E1 > 0)
    bound_ER = np.minimum(np.floor(frac_ER * n_E[:, None] + 0.5).astype(np.int64), n_E[:, None])
    bound_ER[np.arange(table.num_experts), reps_E - 1] = n_E
    if adaptive and (reps_E > 1).any():
        quota_R = np.diff(bound_ER, axis=1, prepend=0)[expert_R, pos_R]
        quota_R = _even_out(quota_R, order_R // table.slots_per_rank, expert_R, reps_E, n_E, table.world_size)
        bound_ER = np.zeros_like(bound_ER)
        bound_ER[expert_R, pos_R] = quota_R
        bound_ER = np.cumsum(bound_ER, axis=1)
    return order_R, expert_R, pos_R, bound_ER


def water_fill_int(base: list[int], amount: int) -> list[int]:
    """Integer split of ``amount`` over bins at integer levels ``base`` minimising the highest
    resulting level: the lowest bins rise to one level L, the remainder (< number of filled
    bins) adds 1 to the lowest-based of them (ties by position), so the result is deterministic."""
    order = [i for _, i in sorted(zip(base, range(len(base))))]
    acc, m = 0, 0
    for m, i in enumerate(order, start=1):
        acc += base[i]
        if m == len(order) or amount + acc <= m * base[order[m]]:
            break
    level, rem = divmod(amount + acc, m)
    out = [0] * len(base)
    for k, i in enumerate(order[:m]):
        out[i] = level - base[i] + (1 if k < rem else 0)
    return out


def _even_out(quota_R: np.ndarray, rank_R: np.ndarray, expert_R: np.ndarray, reps_E: np.ndarray,
              n_E: np.ndarray, world_size: int) -> np.ndarray:
    """Adaptive quotas (module doc): block coordinate descent on the rank loads from ``quota_R``.
    An expert whose replicas all sit on one rank keeps its quotas; when an expert is re-split, a
    rank holding several of its replicas gives its part to the first of them."""
    quota = quota_R.tolist()
    load_W = np.bincount(rank_R, weights=quota_R, minlength=world_size).astype(np.int64).tolist()
    start_E = (np.cumsum(reps_E) - reps_E).tolist()
    rank = rank_R.tolist()
    multi = sorted((int(e) for e in np.nonzero((reps_E > 1) & (n_E > 0))[0]), key=lambda e: (-int(n_E[e]), e))
    groups = []  # per replicated expert: its distinct ranks, and the replicas on each
    for e in multi:
        first, by_rank = start_E[e], {}
        for j in range(first, first + int(reps_E[e])):
            by_rank.setdefault(rank[j], []).append(j)
        if len(by_rank) > 1:
            groups.append((int(n_E[e]), list(by_rank.items())))
    held = [[sum(quota[j] for j in js) for _, js in bins] for _, bins in groups]  # tokens per distinct rank
    ranks = [[r for r, _ in bins] for _, bins in groups]
    touched = [False] * len(groups)
    spread = sum(x * x for x in load_W)
    for _ in range(MAX_SWEEPS):
        for g, (n, _) in enumerate(groups):
            base = [load_W[r] - h for r, h in zip(ranks[g], held[g])]
            new = water_fill_int(base, n)
            if new == held[g]:
                continue
            for r, b, a in zip(ranks[g], base, new):
                load_W[r] = b + a
            held[g], touched[g] = new, True
        before, spread = spread, sum(x * x for x in load_W)
        if spread >= before:  # no re-split lowered the sum of squares: converged (or cycling on ties)
            break
    for g, (_, bins) in enumerate(groups):
        if touched[g]:
            for (_, js), a in zip(bins, held[g]):
                quota[js[0]] = a
                for j in js[1:]:
                    quota[j] = 0
    return np.array(quota, dtype=np.int64)


def replica_quotas(table: PlacementTable, counts_E: np.ndarray, adaptive: bool = True) -> np.ndarray:
    """Tokens each replica processes, ``int64 [W, S]`` (0 in empty slots); sums to ``counts_E`` per
    expert. ``adaptive``: quotas chosen from the counts (module doc), else the table's fixed shares."""
    order_R, expert_R, pos_R, bound_ER = _boundaries(table, counts_E, adaptive)
    start_ER = np.concatenate([np.zeros_like(bound_ER[:, :1]), bound_ER[:, :-1]], axis=1)
    quota_F = np.zeros(table.slot_expert_WS.size, dtype=np.int64)
    quota_F[order_R] = bound_ER[expert_R, pos_R] - start_ER[expert_R, pos_R]
    return quota_F.reshape(table.slot_expert_WS.shape)


def split_tokens(table: PlacementTable, counts_WE: np.ndarray, prefer_local: bool = True,
                 adaptive: bool = True) -> np.ndarray:
    """``send_WWS[src, dst, slot]``: tokens source rank ``src`` sends to replica (dst, slot).

    Source ``src`` owns the interval ``[sum(counts[:src, e]), sum(counts[:src+1, e]))`` of expert
    e's sequence; what it sends to a replica is the overlap with that replica's interval.
    With ``prefer_local`` (Lazarus), a replicated expert's replicas first take tokens from their
    own rank (up to their quota); the rest is cut as above. Either way every replica gets its
    quota and every source sends all its tokens, so the maths is the same; only traffic changes.
    A source's tokens of one expert go to its replicas in (rank, slot) order. ``adaptive``: as in
    ``replica_quotas``.
    """
    counts_WE = np.asarray(counts_WE, dtype=np.int64)
    if counts_WE.ndim != 2 or counts_WE.shape[1] != table.num_experts:
        raise ValueError(f"counts_WE must have shape (W_src, {table.num_experts}), got {counts_WE.shape}")
    order_R, expert_R, pos_R, bound_ER = _boundaries(table, counts_WE.sum(0), adaptive)
    hi_R = bound_ER[expert_R, pos_R]
    lo_R = np.where(pos_R > 0, bound_ER[expert_R, np.maximum(pos_R - 1, 0)], 0)
    src_hi_WE = np.cumsum(counts_WE, axis=0)
    src_lo_WE = src_hi_WE - counts_WE
    overlap_WR = np.minimum(src_hi_WE[:, expert_R], hi_R[None]) - np.maximum(src_lo_WE[:, expert_R], lo_R[None])
    send_WF = np.zeros((counts_WE.shape[0], table.slot_expert_WS.size), dtype=np.int64)
    send_WF[:, order_R] = np.maximum(overlap_WR, 0)
    if prefer_local:
        _prefer_local_replicas(table, counts_WE, send_WF)
    return send_WF.reshape(counts_WE.shape[0], *table.slot_expert_WS.shape)


def _interval_overlap(len_A: np.ndarray, len_B: np.ndarray) -> np.ndarray:
    """``[A, B]`` overlap of two sequences of back-to-back intervals with lengths ``len_A``, ``len_B``."""
    hi_A, hi_B = np.cumsum(len_A), np.cumsum(len_B)
    overlap = np.minimum(hi_A[:, None], hi_B[None]) - np.maximum((hi_A - len_A)[:, None], (hi_B - len_B)[None])
    return np.maximum(overlap, 0)


def _prefer_local_replicas(table: PlacementTable, counts_WE: np.ndarray, send_WF: np.ndarray) -> None:
    """Re-split the tokens of replicated experts local-first, keeping every quota (in place)."""
    slot_expert_F = table.slot_expert_WS.reshape(-1)
    S = table.slots_per_rank
    for e in np.nonzero(table.num_replicas_E() > 1)[0]:
        replica_F = np.nonzero(slot_expert_F == e)[0]
        left_R = send_WF[:, replica_F].sum(axis=0)
        left_W = counts_WE[:, e].copy()
        send_WR = np.zeros((counts_WE.shape[0], replica_F.size), dtype=np.int64)
        for j, rank in enumerate(replica_F // S):
            take = min(left_W[rank], left_R[j])
            send_WR[rank, j] += take
            left_W[rank] -= take
            left_R[j] -= take
        send_WF[:, replica_F] = send_WR + _interval_overlap(left_W, left_R)


def rank_loads(table: PlacementTable, counts_E: np.ndarray, adaptive: bool = True) -> np.ndarray:
    """Tokens each rank's experts process, ``int64 [W]``."""
    return replica_quotas(table, counts_E, adaptive).sum(axis=1)


def balance_ratio(table: PlacementTable, counts_E: np.ndarray, adaptive: bool = True) -> float:
    """max rank load / mean rank load (1.0 is perfect; 1.0 when there are no tokens)."""
    load_W = rank_loads(table, counts_E, adaptive)
    mean = load_W.mean()
    return float(load_W.max() / mean) if mean > 0 else 1.0
