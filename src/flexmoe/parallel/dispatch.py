"""Once-per-rank dispatch: a token travels once to each rank that holds one of its replicas.

Legend: T local tokens, K experts per token, W ranks, S slots per rank, n pipeline chunks,
N local expert-grouped rows, P (token, rank) pairs, F flat replicas (rank * S + slot).

Every kept (token, k) pair has a destination replica (dst rank, slot), fixed by the layout
(``placement.split`` of the all-gathered counts). The pairs of one token that go to one rank
form a *pair* (token, dst): the token row travels once, with K slot ids on dst (-1: that k is
not for dst) and K routing weights. The receiver expands a pair to its rows, runs its experts,
sums the pair's weighted rows and sends ONE row back. Pairs to one destination are in token
order; chunk c of n takes pair p of destination d when ``floor(p * n / P_d) == c``, so every
token still goes once per rank however many chunks there are.

**Local rows first.** A row of an expert whose ONLY replica is on this rank is served by that
slot whatever the other ranks' counts are (the split cannot send it elsewhere), so its output can
be computed before the counts all-gather is read (``local_rows``): gathered straight from the
tokens, one grouped GEMM over the local slots, added straight into the output; it never enters a
pair. Rows of replicated experts (whose replica is chosen by the split) go through the exchange,
even when the chosen replica is here. With the slot-keyed plans of device-limited routing every
"expert" is one slot, so every row for a slot of this rank is local.

Interface used by the stage (stage.py) and by code that wants to read the routing per rank
(device-limited routing, adaptive parallelism): ``row_replicas`` (host layout -> replica of
every grouped row), ``route_pairs`` (device: pairs in send order and their per-chunk counts,
no host synchronisation), ``PairRoute.finish`` (host: every rank's counts, after one
all-gather), ``ExchangeStats`` (what a forward sent).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..placement.table import PlacementTable
from ..plan import DispatchPlan
from .comm import ranges_and_offsets


def local_slots(table: PlacementTable, rank: int) -> np.ndarray:
    """Slot on ``rank`` of every expert whose only replica is there, else -1: ``int64 [E]``."""
    return local_slots_WE(table)[rank]


def local_slots_WE(table: PlacementTable) -> np.ndarray:
    """``local_slots`` of every rank: ``int64 [W, E]`` (constant per table: build it once)."""
    slot_WS = table.slot_expert_WS
    single_WS = (slot_WS >= 0) & (table.num_replicas_E()[np.maximum(slot_WS, 0)] == 1)
    rank_P, slot_P = np.nonzero(single_WS)
    out_WE = np.full((table.world_size, table.num_experts), -1, dtype=np.int64)
    out_WE[rank_P, slot_WS[rank_P, slot_P]] = slot_P
    return out_WE


@dataclasses.dataclass
class LocalRows:
    """This rank's rows served by its own slots whatever the other ranks' counts (the rows of
    experts whose only replica is here), grouped by slot.

    row_R: the plan's grouped row of each; token_R: its token; rows_S: rows per local slot
    (host); offsets_S: int32 grouped-GEMM offsets over all S slots (device).
    """

    row_R: torch.Tensor
    token_R: torch.Tensor
    rows_S: np.ndarray
    offsets_S: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.rows_S.sum())

    @classmethod
    def none(cls, num_slots: int, device: torch.device) -> "LocalRows":
        """No local rows (``ParallelConfig.local_first=False``)."""
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(empty, empty, np.zeros(num_slots, dtype=np.int64), torch.zeros(num_slots, dtype=torch.int32, device=device))

    def mask_N(self, num_rows: int) -> torch.Tensor:
        """``bool [N]``: which grouped rows are local."""
        return torch.zeros(num_rows, dtype=torch.bool, device=self.row_R.device).index_fill_(0, self.row_R, True)


def local_rows(local_slot_E: np.ndarray, counts_E: np.ndarray, row_token_N: torch.Tensor,
               num_slots: int) -> LocalRows:
    """The local rows of a plan from this rank's own counts (host; no communication): one
    host-to-device copy, none when they are one contiguous run of the plan (the static table)."""
    counts_E = np.asarray(counts_E, dtype=np.int64)
    start_E = np.cumsum(counts_E) - counts_E
    held_E = np.nonzero(local_slot_E >= 0)[0]
    rows_S = np.zeros(num_slots, dtype=np.int64)
    start_S = np.zeros(num_slots, dtype=np.int64)
    rows_S[local_slot_E[held_E]] = counts_E[held_E]
    start_S[local_slot_E[held_E]] = start_E[held_E]
    device = row_token_N.device
    used = np.nonzero(rows_S)[0]
    contiguous = used.size == 0 or (start_S[used[1:]] == start_S[used[:-1]] + rows_S[used[:-1]]).all()
    if contiguous:
        first = int(start_S[used[0]]) if used.size else 0
        row_R = torch.arange(first, first + int(rows_S.sum()), device=device)
        offsets_S = torch.from_numpy(np.cumsum(rows_S).astype(np.int32)).to(device)
    else:
        row_R, offsets_S = ranges_and_offsets(start_S, rows_S, device)
    return LocalRows(row_R, row_token_N.index_select(0, row_R), rows_S, offsets_S)


def regroup_by_slot(plan: DispatchPlan, slot_E: torch.Tensor, num_slots: int) -> DispatchPlan:
    """The plan with its rows grouped by slot instead of by expert, when every expert has
    exactly one slot (``slot_E``, int64 on the device; spare slots get no rows): the expert
    blocks move, each keeping its row order, so the one-device FFN over the slots computes what
    it computes over the experts. Device only, no host synchronisation."""
    N, E = plan.num_rows, plan.counts_E.shape[0]
    device = plan.counts_E.device
    counts_S = torch.zeros(num_slots, dtype=torch.int64, device=device).index_copy_(0, slot_E, plan.counts_E)
    end_S = torch.cumsum(counts_S, 0)
    end_E = plan.offsets_E.to(torch.int64)
    row_N = torch.arange(N, device=device)
    expert_N = torch.searchsorted(end_E, row_N, right=True).clamp_max(E - 1)
    slot_N = slot_E[expert_N]
    moved_N = (end_S - counts_S)[slot_N] + row_N - (end_E - plan.counts_E)[expert_N]
    new_N = torch.where(row_N < end_E[-1:], moved_N, row_N)  # dropped rows stay at the end
    old_N = torch.empty_like(new_N).index_copy_(0, new_N, row_N)
    pair_row_TK = torch.where(plan.pair_row_TK >= 0, new_N[plan.pair_row_TK.clamp_min(0)], -1)
    return DispatchPlan(counts_S, end_S.to(torch.int32), plan.row_token_N[old_N], pair_row_TK,
                        plan.row_weight_N[old_N], plan.row_pair_N[old_N])


def row_replicas(table: PlacementTable, send_WWS: np.ndarray, counts_E: np.ndarray, rank: int, num_rows: int,
                 device: torch.device) -> torch.Tensor:
    """Flat replica (dst * S + slot) of each of this rank's expert-grouped rows; -1 for rows past
    the kept ones. ``send_WWS`` is ``placement.split.split_tokens`` of all ranks' counts and
    ``counts_E`` this rank's row of them: an expert's rows go to its replicas in (rank, slot) order.
    """
    slot_expert_F = table.slot_expert_WS.reshape(-1)
    len_F = send_WWS[rank].reshape(-1)
    used_F = np.nonzero(len_F > 0)[0]
    # Pieces of one expert are consecutive in (rank, slot) order; experts in expert order.
    order = used_F[np.lexsort((used_F, slot_expert_F[used_F]))]
    kept = int(counts_E.sum())
    out = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    if kept:
        host = torch.from_numpy(np.stack([order, len_F[order]]).astype(np.int64)).to(device)
        out[:kept] = torch.repeat_interleave(host[0], host[1], output_size=kept)
    return out


@dataclasses.dataclass
class PairRoute:
    """This rank's pairs in send order (chunk, dst, token), and every rank's pair counts.

    token_P / dst_P: local token and destination rank of each pair. slot_PK: slot id on the destination for each k (-1: none).
    counts_nWC: device ``[n, W, 1 + S]``: pairs, then rows per destination slot, per (chunk, dst);
        all-gathered by the stage before any data moves.
    own_pairs_dev: device scalar, the tokens with a row on this rank, local rows included.
    After ``finish``: pairs_nWW[c, src, dst] and rows_nWS[c, src, slot] (rows this rank's slots
    get from src) on the host, identical on all ranks; own_pairs on the host.
    """

    rank: int
    num_slots: int
    token_P: torch.Tensor
    dst_P: torch.Tensor
    slot_PK: torch.Tensor
    counts_nWC: torch.Tensor
    own_pairs_dev: torch.Tensor | None = None
    own_pairs: int = 0
    pairs_nWW: np.ndarray | None = None
    rows_nWS: np.ndarray | None = None
    routed_rows: int = 0
    _send_start_n: np.ndarray | None = None
    _offsets_nS: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return self.counts_nWC.shape[0]

    def finish(self, counts_WnWC: np.ndarray, own_pairs: int = 0) -> None:
        """Take every rank's ``counts_nWC`` (indexed by source rank first) and this rank's
        ``own_pairs_dev`` read on the host."""
        self.own_pairs = int(own_pairs)
        self.pairs_nWW = np.ascontiguousarray(counts_WnWC[..., 0].transpose(1, 0, 2))
        self.rows_nWS = np.ascontiguousarray(counts_WnWC[:, :, self.rank, 1:].transpose(1, 0, 2))
        self.routed_rows = int(counts_WnWC[self.rank, ..., 1:].sum())
        sent_n = self.pairs_nWW[:, self.rank].sum(axis=1)
        self._send_start_n = np.concatenate([[0], np.cumsum(sent_n)])

    def send_slice(self, chunk: int) -> slice:
        """Pairs of ``chunk`` in ``token_P`` / ``slot_PK`` (ordered by destination rank)."""
        return slice(int(self._send_start_n[chunk]), int(self._send_start_n[chunk + 1]))

    def split_WW(self, chunk: int) -> np.ndarray:
        return self.pairs_nWW[chunk]

    def recv_rows_S(self, chunk: int) -> np.ndarray:
        """Rows every local slot computes in ``chunk``."""
        return self.rows_nWS[chunk].sum(axis=0)

    def offsets_nS(self, device: torch.device) -> torch.Tensor:
        """int32 grouped-GEMM offsets of the local slots, per chunk: one host-to-device copy
        per forward (a copy from pageable host memory waits for the stream)."""
        if self._offsets_nS is None or self._offsets_nS.device != device:
            host = np.cumsum(self.rows_nWS.sum(axis=1), axis=1).astype(np.int32)
            self._offsets_nS = torch.from_numpy(host).to(device)
        return self._offsets_nS


def route_pairs(row_replica_N: torch.Tensor, pair_row_TK: torch.Tensor, world: int, num_slots: int,
                num_chunks: int, rank: int, local_N: torch.Tensor | None = None) -> PairRoute:
    """Group this rank's (token, k) pairs into (token, dst) pairs, chunked; all on the device.
    Rows marked in ``local_N`` (the local rows, computed apart) enter no pair."""
    T, K = pair_row_TK.shape
    W, S, n = world, num_slots, num_chunks
    device = pair_row_TK.device
    pair_row = pair_row_TK.reshape(-1)
    replica = torch.where(pair_row >= 0, row_replica_N[pair_row.clamp_min(0)], -1) if T * K else pair_row
    own_pairs = (replica.view(T, K) // S == rank).logical_and(replica.view(T, K) >= 0).any(dim=1).sum()
    if local_N is not None and T * K:
        replica = torch.where(pair_row >= 0, torch.where(local_N[pair_row.clamp_min(0)], -1, replica), -1)
    dst_TK = torch.where(replica >= 0, replica // S, -1).view(T, K)
    slot_TK = torch.where(replica >= 0, replica % S, -1).view(T, K)
    rank_W = torch.arange(W, device=device)
    hit_WTK = dst_TK.unsqueeze(0) == rank_W.view(W, 1, 1)
    present_WT = hit_WTK.any(dim=2)
    pairs_W = present_WT.sum(dim=1)
    position_WT = present_WT.cumsum(dim=1) - 1
    chunk_WT = position_WT * n // pairs_W.clamp_min(1).unsqueeze(1)
    token_T = torch.arange(T, device=device)
    key_WT = (chunk_WT * W + rank_W.unsqueeze(1)) * T + token_T
    key_WT = torch.where(present_WT, key_WT, n * W * T)
    order = torch.sort(key_WT.reshape(-1)).indices
    slot_PK = torch.where(hit_WTK, slot_TK.unsqueeze(0), -1).view(W * T, K).index_select(0, order)
    # Per (chunk, dst): pairs, and rows per destination slot (overflow bin at the end, dropped).
    pair_bin_WT = torch.where(present_WT, chunk_WT * W + rank_W.unsqueeze(1), n * W)
    pairs_n1 = torch.zeros(n * W + 1, dtype=torch.int64, device=device)
    pairs_n1.scatter_add_(0, pair_bin_WT.reshape(-1), torch.ones_like(pair_bin_WT.reshape(-1)))
    row_bin = torch.where(hit_WTK, pair_bin_WT.unsqueeze(2) * S + slot_TK.unsqueeze(0), n * W * S)
    rows_n1 = torch.zeros(n * W * S + 1, dtype=torch.int64, device=device)
    rows_n1.scatter_add_(0, row_bin.reshape(-1), torch.ones_like(row_bin.reshape(-1)))
    counts_nWC = torch.cat([pairs_n1[:-1].view(n, W, 1), rows_n1[:-1].view(n, W, S)], dim=2)
    return PairRoute(rank, S, order % max(T, 1), order // max(T, 1), slot_PK.to(torch.int32), counts_nWC, own_pairs)


def pairs_per_rank(expert_rank_E: torch.Tensor, offsets_E: torch.Tensor, pair_row_TK: torch.Tensor,
                   world: int) -> torch.Tensor:
    """(token, rank) pairs this rank sends to each rank, ``int64 [W]`` on the device, when every
    expert's replicas sit on one rank (``expert_rank_E``): then the destination rank of a row does
    not depend on the other ranks' counts, and the pair counts can travel with them. An expert
    whose rank is -1 sends nothing (the local experts, whose rows are computed apart)."""
    T, K = pair_row_TK.shape
    E = expert_rank_E.shape[0]
    pair_row = pair_row_TK.reshape(-1)
    expert = torch.searchsorted(offsets_E.to(torch.int64), pair_row.clamp_min(0), right=True).clamp_max(E - 1)
    dst_TK = torch.where(pair_row >= 0, expert_rank_E[expert], -1).view(T, K)
    hit_WT = (dst_TK.unsqueeze(0) == torch.arange(world, device=dst_TK.device).view(world, 1, 1)).any(dim=2)
    return hit_WT.sum(dim=1)


def known_counts(pairs_WW: np.ndarray, send_WWS: np.ndarray) -> np.ndarray:
    """``PairRoute.finish``'s input for one chunk from the all-gathered pair counts and the split."""
    W, _, S = send_WWS.shape
    counts_WnWC = np.zeros((W, 1, W, 1 + S), dtype=np.int64)
    counts_WnWC[:, 0, :, 0] = pairs_WW
    counts_WnWC[:, 0, :, 1:] = send_WWS
    return counts_WnWC


def expand_pairs(slot_PK: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows of received pairs, grouped by slot (then pair, then k): the flat (pair * K + k) index
    of each of the ``rows`` rows (host count: ``PairRoute.recv_rows_S(chunk).sum()``)."""
    P, K = slot_PK.shape
    S_bound = P * K
    flat = torch.arange(P * K, device=slot_PK.device)
    slot = slot_PK.reshape(-1).to(torch.int64)
    key = torch.where(slot >= 0, slot * S_bound + flat, torch.iinfo(torch.int64).max)
    return torch.sort(key).indices[:rows] if rows else flat[:0]


@dataclasses.dataclass(frozen=True)
class ExchangeStats:
    """What one forward of an EP layer moved, seen from this rank. A token's pair with its own
    rank counts once, whether its rows went through the exchange (replicated experts) or the
    local-first path (they never leave the rank either way).

    dispatch_rows: (token, rank) pairs this rank sent (its own rank included; one row each).
    dispatch_bytes: their bytes (``dispatch_rows * dispatch_row_bytes``).
    combine_rows / combine_bytes: rows this rank's experts sent back (one per received pair).
    local_rows: pairs this rank sent to itself (they do not cross the network).
    expert_rows: (token, expert) rows this rank's experts computed.
    routed_rows: this rank's kept (token, expert) pairs (what a per-expert dispatch would send).
    local_first_rows: this rank's rows computed before the counts were read (``LocalRows``).
    local_fraction: local_first_rows / routed_rows (1.0 without rows).
    At world size 1 with every row local, ``local_rows`` (and the three numbers that include it)
    is counted on the device and read when first asked for (a synchronisation).
    """

    remote_sent: int
    remote_received: int
    own: "int | torch.Tensor"
    dispatch_row_bytes: int
    combine_row_bytes: int
    expert_rows: int
    routed_rows: int
    local_first_rows: int

    @property
    def local_rows(self) -> int:
        return int(self.own)

    @property
    def dispatch_rows(self) -> int:
        return self.remote_sent + self.local_rows

    @property
    def dispatch_bytes(self) -> int:
        return self.dispatch_rows * self.dispatch_row_bytes

    @property
    def combine_rows(self) -> int:
        return self.remote_received + self.local_rows

    @property
    def combine_bytes(self) -> int:
        return self.combine_rows * self.combine_row_bytes

    @property
    def local_fraction(self) -> float:
        return self.local_first_rows / self.routed_rows if self.routed_rows else 1.0

    @classmethod
    def of(cls, route: PairRoute | None, local: LocalRows, dispatch_row_bytes: int, combine_row_bytes: int,
           own_pairs: "int | torch.Tensor | None" = None) -> "ExchangeStats":
        """From the route of the exchanged rows (None when nothing was exchanged: then
        ``own_pairs``, a device count, gives the pairs to this rank) and the local rows."""
        if route is None:
            return cls(0, 0, own_pairs, dispatch_row_bytes, combine_row_bytes, local.count, local.count, local.count)
        pairs_WW, r = route.pairs_nWW.sum(axis=0), route.rank
        to_self = int(pairs_WW[r, r])
        return cls(int(pairs_WW[r].sum()) - to_self, int(pairs_WW[:, r].sum()) - to_self, route.own_pairs,
                   dispatch_row_bytes, combine_row_bytes, int(route.rows_nWS.sum()) + local.count,
                   route.routed_rows + local.count, local.count)
