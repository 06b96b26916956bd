"""Row exchanges between the ranks of an EP group: uneven all-to-all, flat or hierarchical.

Legend: W ranks, N rows, B bytes per packed row; ``split_WW[src, dst]`` rows travel src -> dst.
Every exchange is started asynchronously and finished with ``wait()``, so the pipeline can
overlap it with expert compute (gloo runs it on a worker thread, NCCL on its own stream).
``all_to_all_v`` is the same exchange as a differentiable function (backward = reverse exchange).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import collectives
from .agreement import wait
from .groups import EPGroup


class RowPacker:
    """Lay rows of several tensors (any dtypes) side by side in one uint8 row, so one exchange
    carries them all (tokens with their slot ids and routing weights). Each part starts at a
    multiple of its element size and the row length is a multiple of 16 bytes (aligned vector
    loads), so unpacking needs no copy."""

    def __init__(self, parts: list[tuple[torch.dtype, int]]):
        self.parts = parts
        self.offsets: list[int] = []
        offset = 0
        for dtype, width in parts:
            size = dtype.itemsize
            offset = -(-offset // size) * size
            self.offsets.append(offset)
            offset += size * width
        self.row_bytes = -(-offset // 16) * 16

    def pack(self, tensors: list[torch.Tensor], index: "torch.Tensor | list | None" = None) -> torch.Tensor:
        """Rows ``index`` (all rows when None; or one index, or None, per tensor) of each tensor,
        packed: ``uint8 [N, row_bytes]``."""
        indices = list(index) if isinstance(index, (list, tuple)) else [index] * len(tensors)
        first, first_index = tensors[0], indices[0]
        rows = first.shape[0] if first_index is None else first_index.shape[0]
        buf = torch.empty((rows, self.row_bytes), dtype=torch.uint8, device=first.device)
        for tensor, rows_index, view, (_, width) in zip(tensors, indices, self.unpack(buf), self.parts):
            tensor = tensor.reshape(tensor.shape[0], width)
            if rows_index is None:
                view.copy_(tensor)
            else:
                torch.index_select(tensor, 0, rows_index, out=view)
        return buf

    def unpack(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Views ``[N, width]`` of each part in a packed buffer."""
        views = []
        for (dtype, width), offset in zip(self.parts, self.offsets):
            views.append(buf[:, offset:offset + dtype.itemsize * width].view(dtype))
        return views


class Pending:
    """An exchange in flight; ``wait()`` returns the received rows. ``followed_by(fn)`` makes
    ``wait()`` pass them to ``fn``, which starts the next exchange, and wait for that one."""

    def __init__(self, result: torch.Tensor, work=None, keep_alive=None, timeout_s: float | None = None,
                 counts: list[int] | None = None):
        self._result, self._work, self._keep, self._then = result, work, keep_alive, None
        self._timeout_s, self._counts = timeout_s, counts

    def followed_by(self, then) -> "Pending":
        self._then = then
        return self

    def wait(self) -> torch.Tensor:
        if self._work is not None and self._timeout_s is not None:
            wait(self._work, self._timeout_s, "an EP all-to-all")
        elif self._work is not None:
            self._work.wait()
        self._work = None
        if self._counts is not None:  # gloo lets go of the rows before they are freed here
            collectives.settle([self._result, self._keep], self._counts)
        self._keep = None
        if self._then is not None:
            then, self._then = self._then, None
            self._result = then(self._result).wait()
        return self._result


def _start_all_to_all(rows: torch.Tensor, send: list[int], recv: list[int], group,
                      timeout_s: float | None = None) -> Pending:
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
    counts = collectives.use_counts([out, rows])
    work = dist.all_to_all_single(out, rows, recv, send, group=group, async_op=True)
    return Pending(out, work, keep_alive=rows, timeout_s=timeout_s, counts=counts)


class Exchanger:
    """Uneven all-to-all over an EP group; hierarchical (2DH) when asked and available. With
    ``timeout_s`` every wait raises ``TimeoutError`` after that long (agreement.wait)."""

    def __init__(self, ep: EPGroup, hierarchical: bool = False, timeout_s: float | None = None):
        if hierarchical and not ep.hierarchical:
            raise ValueError(
                "ParallelConfig.all_to_all='hierarchical' needs node groups: pass "
                "ep_group=flexmoe.parallel.EPGroup.create(group, ranks_per_node=...)"
            )
        self.ep = ep
        self.hierarchical = hierarchical
        self.timeout_s = timeout_s

    def start(self, rows: torch.Tensor, split_WW: np.ndarray, reverse: bool = False) -> Pending:
        """Send ``rows`` (ordered by destination rank) along ``split_WW`` (its transpose when
        ``reverse``); received rows come ordered by source rank."""
        split_WW = split_WW.T if reverse else split_WW
        ep = self.ep
        if ep.size == 1:
            return Pending(rows)
        if not self.hierarchical:
            return _start_all_to_all(rows, split_WW[ep.rank].tolist(), split_WW[:, ep.rank].tolist(), ep.group,
                                     self.timeout_s)
        return self._start_hierarchical(rows, split_WW)

    def _start_hierarchical(self, rows: torch.Tensor, split_WW: np.ndarray) -> Pending:
        """Stage 1 inside the node: gather on local rank j everything the node sends to local
        index j of any node. Stage 2 between nodes, among ranks of equal local index."""
        ep, L = self.ep, self.ep.ranks_per_node
        M = ep.size // L
        node, local = divmod(ep.rank, L)
        split_MLML = split_WW.reshape(M, L, M, L)
        # Stage 1 send blocks: my rows for (dst node b, dst local j), reordered to (j, b).
        mine_BJ = split_MLML[node, local]
        rows1 = _transpose_blocks(rows, mine_BJ)
        send1 = mine_BJ.sum(axis=0).tolist()
        arrive_IB = split_MLML[node, :, :, local]  # from each local i of my node, for each dst node b
        recv1 = arrive_IB.sum(axis=1).tolist()

        def stage2(received: torch.Tensor) -> Pending:
            rows2 = _transpose_blocks(received, arrive_IB)
            send2 = arrive_IB.sum(axis=0).tolist()
            recv2 = split_MLML[:, :, node, local].sum(axis=1).tolist()
            if M == 1:
                return Pending(rows2)
            return _start_all_to_all(rows2, send2, recv2, ep.inter, self.timeout_s)

        first = Pending(rows1) if L == 1 else _start_all_to_all(rows1, send1, recv1, ep.intra, self.timeout_s)
        return first.followed_by(stage2)


def index_from_ranges(start_P: np.ndarray, len_P: np.ndarray, device: torch.device) -> torch.Tensor:
    """Concatenated ``arange(start, start + len)`` over pieces, built on ``device`` (one copy)."""
    return _ranges(start_P, len_P, device, with_offsets=False)[0]


def ranges_and_offsets(start_P: np.ndarray, len_P: np.ndarray, device: torch.device):
    """``index_from_ranges`` and the int32 cumulative lengths (grouped-GEMM offsets), one copy."""
    return _ranges(start_P, len_P, device, with_offsets=True)


def _ranges(start_P, len_P, device, with_offsets: bool):
    start_P, len_P = np.asarray(start_P, dtype=np.int64), np.asarray(len_P, dtype=np.int64)
    total = int(len_P.sum())
    end_P = np.cumsum(len_P)
    parts = [start_P - (end_P - len_P), len_P] + ([end_P] if with_offsets else [])
    host = torch.from_numpy(np.stack(parts)).to(device)
    index = torch.repeat_interleave(host[0], host[1], output_size=total) + torch.arange(total, device=device)
    return index, (host[2].to(torch.int32) if with_offsets else None)


def _transpose_blocks(rows: torch.Tensor, len_AB: np.ndarray) -> torch.Tensor:
    """Rows stored as blocks in (a, b) order, returned in (b, a) order."""
    A, B = len_AB.shape
    if A == 1 or B == 1:
        return rows
    start_AB = (np.cumsum(len_AB.reshape(-1)) - len_AB.reshape(-1)).reshape(A, B)
    index = index_from_ranges(start_AB.T.reshape(-1), len_AB.T.reshape(-1), rows.device)
    return rows.index_select(0, index)


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _start_all_to_all(x, send_splits, recv_splits, group).wait()

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _start_all_to_all(grad.contiguous(), recv_splits, send_splits, ctx.group).wait(), None, None, None


def all_to_all_v(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x``: ``send_splits[r]`` rows go to rank
    r, ``recv_splits[r]`` rows arrive from it. Backward sends the gradients the reverse way."""
    if len(send_splits) != dist.get_world_size(group) or len(recv_splits) != len(send_splits):
        raise ValueError(f"all_to_all_v: need one split per rank, got {len(send_splits)} and {len(recv_splits)}")
    if sum(send_splits) != x.shape[0]:
        raise ValueError(f"all_to_all_v: send_splits sum to {sum(send_splits)}, x has {x.shape[0]} rows")
    return _AllToAllV.apply(x, list(send_splits), list(recv_splits), group)
