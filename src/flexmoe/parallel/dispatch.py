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
    After ``finish``: pairs_nWW[c, src, dst] and rows_nWS[c, src, slot] (rows this rank's slots
    get from src) on the host, identical on all ranks.
    """

    rank: int
    num_slots: int
    token_P: torch.Tensor
    dst_P: torch.Tensor
    slot_PK: torch.Tensor
    counts_nWC: torch.Tensor
    pairs_nWW: np.ndarray | None = None
    rows_nWS: np.ndarray | None = None
    routed_rows: int = 0
    _send_start_n: np.ndarray | None = None
    _offsets_nS: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return self.counts_nWC.shape[0]

    def finish(self, counts_WnWC: np.ndarray) -> None:
        """Take every rank's ``counts_nWC`` (indexed by source rank first)."""
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
                num_chunks: int, rank: int) -> PairRoute:
    """Group this rank's (token, k) pairs into (token, dst) pairs, chunked; all on the device."""
    T, K = pair_row_TK.shape
    W, S, n = world, num_slots, num_chunks
    device = pair_row_TK.device
    pair_row = pair_row_TK.reshape(-1)
    replica = torch.where(pair_row >= 0, row_replica_N[pair_row.clamp_min(0)], -1) if T * K else pair_row
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
    return PairRoute(rank, S, order % max(T, 1), order // max(T, 1), slot_PK.to(torch.int32), counts_nWC)


def pairs_per_rank(expert_rank_E: torch.Tensor, offsets_E: torch.Tensor, pair_row_TK: torch.Tensor,
                   world: int) -> torch.Tensor:
    """(token, rank) pairs this rank sends to each rank, ``int64 [W]`` on the device, when every
    expert's replicas sit on one rank (``expert_rank_E``): then the destination rank of a row does
    not depend on the other ranks' counts, and the pair counts can travel with them."""
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
    """What one forward of an EP layer moved, seen from this rank.

    dispatch_rows: (token, rank) pairs this rank sent (its own rank included; one row each).
    dispatch_bytes: their bytes (``dispatch_rows * dispatch_row_bytes``).
    combine_rows / combine_bytes: rows this rank's experts sent back (one per received pair).
    local_rows: pairs this rank sent to itself (they do not cross the network).
    expert_rows: (token, expert) rows this rank's experts computed.
    routed_rows: this rank's kept (token, expert) pairs (what a per-expert dispatch would send).
    """

    dispatch_rows: int
    dispatch_bytes: int
    combine_rows: int
    combine_bytes: int
    local_rows: int
    expert_rows: int
    routed_rows: int

    @classmethod
    def of(cls, route: PairRoute, dispatch_row_bytes: int, combine_row_bytes: int) -> "ExchangeStats":
        pairs_WW, r = route.pairs_nWW.sum(axis=0), route.rank
        sent, received = int(pairs_WW[r].sum()), int(pairs_WW[:, r].sum())
        return cls(sent, sent * dispatch_row_bytes, received, received * combine_row_bytes, int(pairs_WW[r, r]),
                   int(route.rows_nWS.sum()), route.routed_rows)
