"""DispatchLayout: which rows every rank sends where, computed identically on every rank.

Legend: W ranks of the EP group, E logical experts, S slots per rank, n pipeline chunks.
A *piece* is the run of rows one source rank sends to one replica (dst rank, slot).

From the all-gathered counts ``C[src, e]`` and the placement table, ``placement.split``
cuts every expert's global token sequence (ordered by source rank) into one contiguous interval
per replica, so ``A[src, dst, slot]`` rows travel from ``src`` to replica ``(dst, slot)``.
Chunk c of n takes rows ``[A*c//n, A*(c+1)//n)`` of every piece. Rows travel in
(dst, slot) order and arrive in (src, slot) order; the expert side regroups them by slot.
Only host integers are exchanged beforehand, so no rank needs another message to agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..placement.split import split_tokens
from ..placement.table import PlacementTable


@dataclasses.dataclass
class ChunkLayout:
    """One pipeline chunk, seen from this rank.

    split_WW: rows from src rank to dst rank (identical on all ranks).
    send_index: local expert-grouped row of each row sent, in send order; None when the rows
        are the contiguous range starting at ``send_start``.
    regroup_index: received row of each slot-ordered row (None: already in slot order).
    ungroup_index: slot-ordered row of each received row (its inverse).
    offsets_S: int32 cumulative rows per local slot (grouped-GEMM offsets).
    """

    rank: int
    split_WW: np.ndarray
    send_index: torch.Tensor | None
    send_start: int
    regroup_index: torch.Tensor | None
    ungroup_index: torch.Tensor | None
    offsets_S: torch.Tensor

    @property
    def send_rows(self) -> int:
        return int(self.split_WW[self.rank].sum())

    @property
    def recv_rows(self) -> int:
        return int(self.split_WW[:, self.rank].sum())

    def send_positions(self, device: torch.device) -> torch.Tensor:
        """``send_index`` as a tensor even when it is a contiguous range."""
        if self.send_index is not None:
            return self.send_index
        return torch.arange(self.send_start, self.send_start + self.send_rows, device=device)


@dataclasses.dataclass
class DispatchLayout:
    """All chunks of one forward; ``send_WWS`` is the unchunked split, ``counts_WE`` the input."""

    chunks: list[ChunkLayout]
    counts_WE: np.ndarray
    send_WWS: np.ndarray

    @property
    def recv_rows_W(self) -> np.ndarray:
        """Rows every rank's experts process (identical on all ranks)."""
        return self.send_WWS.sum(axis=(0, 2))


def build_layout(
    table: PlacementTable, counts_WE: np.ndarray, rank: int, num_chunks: int, device: torch.device
) -> DispatchLayout:
    send_WWS = split_tokens(table, counts_WE)
    W, _, S = send_WWS.shape
    slot_expert_F = table.slot_expert_WS.reshape(-1)
    expert_start_E = np.cumsum(counts_WE[rank]) - counts_WE[rank]
    piece_offset_F = _offset_within_expert(send_WWS[rank].reshape(-1), slot_expert_F)
    ranges = _RangeBatch()
    plans = []
    for c in range(num_chunks):
        lo_WWS = send_WWS * c // num_chunks
        len_WWS = send_WWS * (c + 1) // num_chunks - lo_WWS
        # Send side: pieces in (dst, slot) order, read from this rank's expert-grouped rows.
        send_len_F = len_WWS[rank].reshape(-1)
        send_start_F = expert_start_E[np.maximum(slot_expert_F, 0)] + piece_offset_F + lo_WWS[rank].reshape(-1)
        contiguous_from = _contiguous_start(send_start_F, send_len_F)
        send_ref = None if contiguous_from is not None else ranges.add(send_start_F, send_len_F)
        # Receive side: pieces arrive in (src, slot) order; the experts want (slot, src).
        recv_len_WS = len_WWS[:, rank, :]
        recv_start_WS = _exclusive_cumsum(recv_len_WS.reshape(-1)).reshape(W, S)
        slot_len_SW = recv_len_WS.T
        slot_start_SW = _exclusive_cumsum(slot_len_SW.reshape(-1)).reshape(S, W)
        regroup_from = recv_start_WS.T.reshape(-1)
        regroup_ref = ungroup_ref = None
        if not _is_range(regroup_from, slot_len_SW.reshape(-1)):
            regroup_ref = ranges.add(regroup_from, slot_len_SW.reshape(-1))
            ungroup_ref = ranges.add(slot_start_SW.T.reshape(-1), recv_len_WS.reshape(-1))
        offsets_ref = ranges.add_values(np.cumsum(slot_len_SW.sum(axis=1)))
        plans.append((len_WWS.sum(axis=2), send_ref, 0 if contiguous_from is None else contiguous_from,
                      regroup_ref, ungroup_ref, offsets_ref))
    built = ranges.materialize(device)
    chunks = [
        ChunkLayout(rank, split, built.get(send_ref), start, built.get(regroup_ref), built.get(ungroup_ref),
                    built[offsets_ref].to(torch.int32))
        for split, send_ref, start, regroup_ref, ungroup_ref, offsets_ref in plans
    ]
    return DispatchLayout(chunks, counts_WE, send_WWS)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _offset_within_expert(len_F: np.ndarray, expert_F: np.ndarray) -> np.ndarray:
    """For each replica (in flat (rank, slot) order), rows of its expert sent to earlier replicas."""
    out_F = np.zeros_like(len_F)
    valid = np.nonzero(expert_F >= 0)[0]
    order = valid[np.argsort(expert_F[valid], kind="stable")]
    excl = _exclusive_cumsum(len_F[order])
    expert_sorted = expert_F[order]
    is_first = np.ones(order.size, dtype=bool)
    is_first[1:] = expert_sorted[1:] != expert_sorted[:-1]
    group_base = np.maximum.accumulate(np.where(is_first, excl, 0)) if order.size else excl
    out_F[order] = excl - group_base
    return out_F


def _is_range(start_P: np.ndarray, len_P: np.ndarray) -> bool:
    keep = len_P > 0
    return bool(np.array_equal(start_P[keep], _exclusive_cumsum(len_P[keep])))


def _contiguous_start(start_P: np.ndarray, len_P: np.ndarray) -> int | None:
    """Where the pieces start if they form one contiguous run in order, else None."""
    keep = len_P > 0
    start, length = start_P[keep], len_P[keep]
    if start.size == 0:
        return 0
    if np.array_equal(start[1:], start[:-1] + length[:-1]):
        return int(start[0])
    return None


class _RangeBatch:
    """Collect index vectors described by (start, length) pieces; build them with one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray, np.ndarray | None]] = []

    def add(self, start_P: np.ndarray, len_P: np.ndarray) -> int:
        keep = len_P > 0
        self._parts.append(("ranges", start_P[keep].astype(np.int64), len_P[keep].astype(np.int64)))
        return len(self._parts) - 1

    def add_values(self, values: np.ndarray) -> int:
        self._parts.append(("values", np.asarray(values, dtype=np.int64), None))
        return len(self._parts) - 1

    def materialize(self, device: torch.device) -> dict[int, torch.Tensor]:
        flat = []
        for kind, a, b in self._parts:
            if kind == "ranges":
                flat += [a - _exclusive_cumsum(b), b]
            else:
                flat.append(a)
        sizes = [x.size for x in flat]
        host = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64))
        pieces = iter(torch.split(host.to(device), sizes))
        out: dict[int, torch.Tensor] = {}
        for ref, (kind, _, b) in enumerate(self._parts):
            if kind == "values":
                out[ref] = next(pieces)
                continue
            shift, length = next(pieces), next(pieces)
            total = int(b.sum())
            out[ref] = torch.repeat_interleave(shift, length, output_size=total) + torch.arange(total, device=device)
        return out


def index_from_ranges(start_P: np.ndarray, len_P: np.ndarray, device: torch.device) -> torch.Tensor:
    """Concatenated ``arange(start, start + len)`` over pieces, built on ``device``."""
    batch = _RangeBatch()
    ref = batch.add(np.asarray(start_P, dtype=np.int64), np.asarray(len_P, dtype=np.int64))
    return batch.materialize(device)[ref]
