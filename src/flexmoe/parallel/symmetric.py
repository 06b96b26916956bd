"""torch's symmetric-memory all-to-all for the bounded dispatch: only the used rows move.

Legend: W ranks, C rows per rank pair (``ParallelConfig.rows_per_rank_pair``), B = W * C buffer
rows, Q bytes per row.

The bounded dispatch keeps a ``[W, C]`` block of rows per destination, the first ``used_W[d]``
of block d used. Its default transport (an equal-split all-to-all) moves all B rows. With
``torch.ops.symm_mem.all_to_all_vdev`` (NVSHMEM, CUDA) the splits stay on the device: the used
rows are compacted, exchanged with device splits, and expanded back into blocks on arrival, so
nothing waits for the host and only used rows cross the links.

``symmetric_all_to_all_available`` says where it runs: CUDA tensors, a torch built with NVSHMEM
and the five-argument ``all_to_all_vdev`` (torch >= 2.9). Elsewhere the bounded dispatch uses the
equal-split all-to-all (``ParallelConfig(bounded_transport="auto")`` falls back to it;
``"symmetric_memory"`` raises). CI has no GPU: the compaction and expansion are tested on CPU
against the block layout, the transport itself is not run there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def symmetric_all_to_all_available(device: torch.device) -> bool:
    """Whether ``all_to_all_vdev`` can run on ``device`` (CUDA, NVSHMEM, the 5-argument op)."""
    if device.type != "cuda":
        return False
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:
        return False
    op = getattr(getattr(torch.ops, "symm_mem", None), "all_to_all_vdev", None)
    if op is None or not hasattr(symm_mem, "is_nvshmem_available"):
        return False
    return len(op.default._schema.arguments) == 5 and bool(symm_mem.is_nvshmem_available())


def compact_blocks(rows_BQ: torch.Tensor, used_W: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """The used rows of every block, consecutive in block order (rows past them are zero)."""
    B, C = rows_BQ.shape[0], rows_per_block
    within_B = torch.arange(B, device=rows_BQ.device) % C
    used_B = within_B < used_W.repeat_interleave(C, output_size=B)
    target_B = torch.where(used_B, torch.cumsum(used_B, 0) - 1, B)
    out = rows_BQ.new_zeros((B + 1,) + tuple(rows_BQ.shape[1:]))
    return out.index_copy_(0, target_B, rows_BQ)[:B]


def expand_blocks(dense_BQ: torch.Tensor, used_W: torch.Tensor, rows_per_block: int, fill=0) -> torch.Tensor:
    """Inverse of ``compact_blocks``: block d's first ``used_W[d]`` rows from the dense rows,
    the others ``fill``."""
    B, C = dense_BQ.shape[0], rows_per_block
    within_B = torch.arange(B, device=dense_BQ.device) % C
    used_B = within_B < used_W.repeat_interleave(C, output_size=B)
    start_W = torch.cumsum(used_W, 0) - used_W
    source_B = (start_W.repeat_interleave(C, output_size=B) + within_B).clamp_max(B - 1)
    rows = dense_BQ.index_select(0, source_B)
    return torch.where(used_B.view((B,) + (1,) * (dense_BQ.dim() - 1)), rows, fill)


class SymmetricExchange:
    """Symmetric buffers of one row width over one group (allocated and rendezvoused once, a
    collective) and the exchange of a block layout through them."""

    def __init__(self, group: dist.ProcessGroup, rows: int, row_bytes: int, device: torch.device):
        from torch.distributed import _symmetric_memory as symm_mem

        W = dist.get_world_size(group)
        self.group, self.group_name, self.rows = group, group.group_name, rows
        self.send = symm_mem.empty((rows, row_bytes), dtype=torch.uint8, device=device)
        self.recv = symm_mem.empty((rows, row_bytes), dtype=torch.uint8, device=device)
        self.splits = symm_mem.empty(W, dtype=torch.int64, device=device)
        self.splits_offsets = symm_mem.empty((2, W), dtype=torch.int64, device=device)
        for t in (self.send, self.recv, self.splits, self.splits_offsets):
            symm_mem.rendezvous(t, self.group_name)

    def exchange(self, rows_BQ: torch.Tensor, used_W: torch.Tensor, rows_per_block: int, fill=0):
        """Send block d's used rows to rank d; returns the received blocks (source order) and
        the rows used in each."""
        flat = rows_BQ.reshape(rows_BQ.shape[0], -1)
        self.send.view(flat.dtype).copy_(compact_blocks(flat, used_W, rows_per_block))
        self.splits.copy_(used_W)
        # The peers write into our receive buffer: everyone must be done reading the last one.
        dist.barrier(group=self.group, async_op=True, device_ids=[rows_BQ.device.index]).block_current_stream()
        torch.ops.symm_mem.all_to_all_vdev(self.send, self.recv, self.splits, self.splits_offsets, self.group_name)
        recv_used_W = self.splits_offsets[0].clone()
        dense = self.recv.view(flat.dtype).clone()
        return expand_blocks(dense, recv_used_W, rows_per_block, fill).view_as(rows_BQ), recv_used_W


class SymmetricTransport:
    """The symmetric exchanges of one bounded stage: one set of buffers per row width."""

    def __init__(self, group: dist.ProcessGroup, rows_per_block: int):
        self.group, self.rows_per_block = group, rows_per_block
        self._by_width: dict[tuple, SymmetricExchange] = {}

    def exchange(self, rows_BQ: torch.Tensor, used_W: torch.Tensor, fill=0):
        row_bytes = rows_BQ[0].numel() * rows_BQ.element_size()
        key = (row_bytes, rows_BQ.device)
        if key not in self._by_width:
            self._by_width[key] = SymmetricExchange(self.group, rows_BQ.shape[0], row_bytes, rows_BQ.device)
        return self._by_width[key].exchange(rows_BQ, used_W, self.rows_per_block, fill)


class _SymmetricBlocks(torch.autograd.Function):
    """Block layouts to their ranks through symmetric memory; gradients come back the same way."""

    @staticmethod
    def forward(ctx, transport: SymmetricTransport, used_W, fills, *tensors):
        outs, recv_used_W = [], used_W
        for t, fill in zip(tensors, fills):
            out, recv_used_W = transport.exchange(t.contiguous(), used_W, fill)
            outs.append(out)
        ctx.transport, ctx.recv_used_W = transport, recv_used_W
        ctx.mark_non_differentiable(recv_used_W)
        return (*outs, recv_used_W)

    @staticmethod
    def backward(ctx, *grads):
        back = [None if g is None else ctx.transport.exchange(g.contiguous(), ctx.recv_used_W)[0] for g in grads[:-1]]
        return (None, None, None, *back)


def symmetric_blocks(transport: SymmetricTransport, used_W: torch.Tensor, tensors, fills):
    """``(*received, recv_used_W)``: each tensor's blocks exchanged (block d's first
    ``used_W[d]`` rows to rank d), arrivals in source-block layout, unused rows ``fill``."""
    return _SymmetricBlocks.apply(transport, used_W, tuple(fills), *tensors)
