"""The expert-parallel stage as one autograd function: dispatch -> experts -> combine, chunked.

Legend: N local expert-grouped rows, D width, T local tokens, R rows this rank's experts get in
one chunk (slot order), S local slots.

Forward, per chunk c (n chunks): pack token rows with their routing weights, exchange them,
regroup by slot, run the grouped experts (weight folded into the activation), send the outputs
back. Chunk c+1's dispatch is started before chunk c's experts run, and chunk c's return before
chunk c+1's experts, so communication overlaps compute. Backward runs the same pipeline with
gradients: output gradients travel to the experts, input and weight gradients travel back.

What backward needs on the expert side depends on the memory strategy:
keep          the expert graph (input, hidden activations)
recompute     the expert input; the graph is rebuilt in backward
recommunicate the graph without its input; backward re-sends the input from token rows the
              source keeps (T x D)
both          nothing; backward re-sends the input and rebuilds the graph
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..experts import GroupedExperts
from .comm import Exchanger, RowPacker
from .layout import ChunkLayout, DispatchLayout

KEEPS_GRAPH = ("keep", "recommunicate")
RESENDS_INPUT = ("recommunicate", "both")


@dataclasses.dataclass
class StageTimer:
    """Synchronised timings of one unchunked forward (for choosing a memory strategy)."""

    dispatch_s: float = 0.0
    dispatch_bytes: int = 0
    expert_s: float = 0.0
    expert_rows: int = 0
    _last: float = 0.0

    def mark(self, device: torch.device) -> float:
        """Seconds since the previous mark, after the device finished its queued work."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


@dataclasses.dataclass
class StageRun:
    """Everything the stage needs besides its tensors, for one forward and its backward.

    row_token_N / first_row_T: the plan's maps, used to keep token rows for "recommunicate".
    """

    layout: DispatchLayout
    exchanger: Exchanger
    experts: GroupedExperts
    use_triton: bool
    strategy: str
    build_graph: bool
    row_token_N: torch.Tensor
    first_row_T: torch.Tensor | None
    timer: StageTimer | None = None


def run_stage(x_ND, weight_N, experts: GroupedExperts, run: StageRun) -> torch.Tensor:
    """Weighted expert outputs for the local expert-grouped rows ``x_ND`` (zero rows past the
    kept ones), computed by the experts that hold them anywhere in the group."""
    return _ExpertParallelStage.apply(x_ND, weight_N, experts.gate_up_proj, experts.down_proj, run)


class _ExpertParallelStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_N, gate_up, down, run: StageRun):
        chunks = run.layout.chunks
        packer = RowPacker([(x_ND.dtype, x_ND.shape[1]), (weight_N.dtype, 1)])
        keeps_graph = run.build_graph and run.strategy in KEEPS_GRAPH
        params = _param_leaves(gate_up, down, keeps_graph)

        def dispatch(ch: ChunkLayout):
            parts = [x_ND, weight_N] if ch.send_index is not None else _rows(ch, x_ND, weight_N)
            return run.exchanger.start(packer.pack(parts, ch.send_index), ch.split_WW)

        timer = run.timer
        saved, returns = [], []
        if timer is not None:
            timer.mark(x_ND.device)
        upcoming = dispatch(chunks[0])
        for c, ch in enumerate(chunks):
            current = upcoming
            if c + 1 < len(chunks):
                upcoming = dispatch(chunks[c + 1])
            x_recv, w_recv = packer.unpack(current.wait())
            x_RD, w_R = _regroup(x_recv, ch), _regroup(w_recv, ch).view(-1)
            if timer is not None:
                timer.dispatch_s += timer.mark(x_ND.device)
            y_RD, chunk_saved = _expert_forward(run, params, x_RD, w_R, ch.offsets_S, keeps_graph)
            if timer is not None:
                timer.expert_s += timer.mark(x_ND.device)
            saved.append(chunk_saved)
            y_recv = y_RD if ch.ungroup_index is None else y_RD.index_select(0, ch.ungroup_index)
            returns.append(run.exchanger.start(y_recv, ch.split_WW, reverse=True))
        if timer is not None:
            timer.dispatch_bytes += sum(ch.send_rows + ch.recv_rows for ch in chunks) * packer.row_bytes
            timer.expert_rows += sum(ch.recv_rows for ch in chunks)
        out_ND = _assemble(x_ND.shape, chunks, [pending.wait() for pending in returns])

        if run.build_graph:
            ctx.run, ctx.saved, ctx.params = run, saved, params if keeps_graph else None
            ctx.shapes = (x_ND.shape, x_ND.dtype, weight_N.shape, weight_N.dtype)
            ctx.token_rows_TD = None
            if run.strategy in RESENDS_INPUT:
                ctx.token_rows_TD = x_ND.index_select(0, run.first_row_T.clamp_min(0))
            ctx.save_for_backward(gate_up, down)
        return out_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        run: StageRun = ctx.run
        chunks = run.layout.chunks
        gate_up, down = ctx.saved_tensors
        x_shape, x_dtype, w_shape, w_dtype = ctx.shapes
        packer = RowPacker([(x_dtype, x_shape[1]), (w_dtype, 1)])
        grad_ND = grad_ND.contiguous()
        params = ctx.params if ctx.params is not None else _param_leaves(gate_up, down, True)

        def dispatch(ch: ChunkLayout):
            if ch.send_index is None:
                (grad_rows,) = _rows(ch, grad_ND)
            else:
                grad_rows = grad_ND.index_select(0, ch.send_index)
            grad_pending = run.exchanger.start(grad_rows, ch.split_WW)
            input_pending = None
            if run.strategy in RESENDS_INPUT:
                tokens = run.row_token_N.index_select(0, ch.send_positions(grad_ND.device))
                input_pending = run.exchanger.start(ctx.token_rows_TD.index_select(0, tokens), ch.split_WW)
            return grad_pending, input_pending

        grad_gate_up = grad_down = None
        returns = []
        upcoming = dispatch(chunks[0])
        for c, ch in enumerate(chunks):
            grad_pending, input_pending = upcoming
            if c + 1 < len(chunks):
                upcoming = dispatch(chunks[c + 1])
            grad_RD = _regroup(grad_pending.wait(), ch)
            x_RD = _regroup(input_pending.wait(), ch) if input_pending is not None else None
            dx_RD, dw_R, d_gate_up, d_down = _expert_backward(run, ctx.saved[c], params, grad_RD, x_RD, ch.offsets_S)
            ctx.saved[c] = None
            if d_gate_up is None:
                pass
            elif grad_gate_up is None:
                grad_gate_up, grad_down = d_gate_up, d_down
            else:
                grad_gate_up += d_gate_up
                grad_down += d_down
            buf = packer.pack([dx_RD, dw_R], ch.ungroup_index)
            returns.append(run.exchanger.start(buf, ch.split_WW, reverse=True))
        grads_back = [packer.unpack(pending.wait()) for pending in returns]
        grad_x_ND = _assemble(x_shape, chunks, [dx for dx, _ in grads_back])
        grad_w_N = _assemble(w_shape + (1,), chunks, [dw for _, dw in grads_back]).view(w_shape)
        ctx.token_rows_TD = None
        if grad_gate_up is None:
            grad_gate_up, grad_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        return grad_x_ND, grad_w_N, grad_gate_up, grad_down, None


def _rows(ch: ChunkLayout, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t[ch.send_start:ch.send_start + ch.send_rows] for t in tensors]


def _regroup(recv: torch.Tensor, ch: ChunkLayout) -> torch.Tensor:
    """Received rows (source order) in slot order, contiguous."""
    if ch.regroup_index is None:
        return recv.contiguous()
    return recv.index_select(0, ch.regroup_index)


def _assemble(shape, chunks: list[ChunkLayout], returned: list[torch.Tensor]) -> torch.Tensor:
    """Rows that came back (send order, per chunk) at their local expert-grouped positions;
    zeros for rows that were not sent (capacity drops)."""
    ch = chunks[0]
    if len(chunks) == 1 and ch.send_index is None and ch.send_rows == shape[0] and returned[0].is_contiguous():
        return returned[0].view(shape)
    out = returned[0].new_zeros(shape)
    for ch, values in zip(chunks, returned):
        if ch.send_index is None:
            out[ch.send_start:ch.send_start + ch.send_rows] = values
        else:
            out.index_copy_(0, ch.send_index, values)
    return out


def _param_leaves(gate_up, down, requires_grad: bool) -> dict[str, torch.Tensor]:
    return {
        "gate_up_proj": gate_up.detach().requires_grad_(requires_grad),
        "down_proj": down.detach().requires_grad_(requires_grad),
    }


def _call_experts(run: StageRun, params, x_RD, w_R, offsets_S) -> torch.Tensor:
    return functional_call(run.experts, params, (x_RD, offsets_S, w_R, run.use_triton))


@dataclasses.dataclass
class _ChunkSaved:
    """What backward of one chunk starts from. ``root`` ends a kept graph."""

    scale_R: torch.Tensor
    x_RD: torch.Tensor | None = None
    root: torch.Tensor | None = None
    output_grad: list | None = None
    input_grad: list | None = None
    anchor: torch.Tensor | None = None
    swap: "_SwapSavedInput | None" = None


def _expert_forward(run: StageRun, params, x_RD, w_R, offsets_S, keeps_graph: bool):
    if not run.build_graph or x_RD.shape[0] == 0:
        with torch.no_grad():
            return _call_experts(run, params, x_RD, w_R, offsets_S), None
    if not keeps_graph:
        with torch.no_grad():
            y_RD = _call_experts(run, params, x_RD, w_R, offsets_S)
        return y_RD, _ChunkSaved(w_R, x_RD if run.strategy == "recompute" else None)
    saved = _ChunkSaved(w_R.detach().requires_grad_(), output_grad=[], input_grad=[])
    saved.anchor = torch.empty(0, device=x_RD.device, requires_grad=True)
    swap = _SwapSavedInput(x_RD) if run.strategy == "recommunicate" else contextlib.nullcontext()
    with torch.enable_grad(), swap:
        x_in = _GraphInput.apply(x_RD, saved.anchor, saved.input_grad)
        y_RD = _call_experts(run, params, x_in, saved.scale_R, offsets_S)
        saved.root = _GraphRoot.apply(y_RD, saved.output_grad)
    if run.strategy == "recommunicate":
        saved.swap = swap
    return y_RD.detach(), saved


def _expert_backward(run: StageRun, saved: _ChunkSaved | None, params, grad_RD, x_RD, offsets_S):
    """Gradients of one chunk: input rows, weights, and the chunk's share of the parameters."""
    if saved is None:
        return grad_RD, grad_RD.new_zeros(grad_RD.shape[0]), None, None
    if saved.root is None:
        x_RD = saved.x_RD if x_RD is None else x_RD
        x_leaf = x_RD.detach().requires_grad_()
        w_leaf = saved.scale_R.detach().requires_grad_()
        with torch.enable_grad():
            y_RD = _call_experts(run, params, x_leaf, w_leaf, offsets_S)
        dx, dw, dgu, ddn = torch.autograd.grad(
            y_RD, [x_leaf, w_leaf, params["gate_up_proj"], params["down_proj"]], grad_RD
        )
        return dx, dw, dgu, ddn
    if saved.swap is not None:
        saved.swap.provide(x_RD)
    saved.output_grad.append(grad_RD)
    _, dw, dgu, ddn = torch.autograd.grad(
        saved.root,
        [saved.anchor, saved.scale_R, params["gate_up_proj"], params["down_proj"]],
        saved.root.new_empty(0),
        allow_unused=True,
    )
    return saved.input_grad.pop(), dw, dgu, ddn


class _GraphInput(torch.autograd.Function):
    """Enter a kept expert graph without making its input a leaf: a leaf would be held alive by
    its gradient accumulator. The input gradient is handed out through ``holder``."""

    @staticmethod
    def forward(ctx, x, anchor, holder):
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.holder.append(grad)
        return None, None, None


class _GraphRoot(torch.autograd.Function):
    """End a kept expert graph in an empty tensor, so the expert output need not stay alive;
    backward takes the real output gradient from ``holder``."""

    @staticmethod
    def forward(ctx, y, holder):
        ctx.holder = holder
        return y.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return ctx.holder.pop(), None


class _SwapSavedInput(torch.autograd.graph.saved_tensors_hooks):
    """Do not keep the expert input in the graph; backward provides a re-received copy."""

    def __init__(self, x_RD: torch.Tensor):
        key = (x_RD.data_ptr(), tuple(x_RD.shape), x_RD.dtype)
        self._current: torch.Tensor | None = None
        placeholder = object()

        def pack(t: torch.Tensor):
            if (t.data_ptr(), tuple(t.shape), t.dtype) == key:
                return placeholder
            return t

        def unpack(packed):
            return self._current if packed is placeholder else packed

        super().__init__(pack, unpack)

    def provide(self, x_RD: torch.Tensor) -> None:
        self._current = x_RD
