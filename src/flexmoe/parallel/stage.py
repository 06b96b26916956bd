"""The expert-parallel stage as one autograd function: dispatch -> experts -> combine, chunked.

Legend: T local tokens, D width, K experts per token, P (token, rank) pairs one chunk moves,
R rows this rank's experts compute in one chunk (slot order), S local slots.

Forward, per chunk c (n chunks): send every (token, rank) pair once (token row, K slot ids, K
weights; dispatch.py), expand the received pairs to their rows grouped by slot, run the grouped
experts (weight folded into the activation), sum each pair's rows and send one row per pair
back; the source adds the rows that come back into its tokens. Chunk c+1's dispatch is started
before chunk c's experts run, and chunk c's return before chunk c+1's experts, so communication
overlaps compute. Backward runs the same pipeline with gradients: one output-gradient row per
pair travels to the experts, one input-gradient row (with the K weight gradients) comes back.

What backward needs on the expert side depends on the memory strategy:
keep          the expert graph (input, hidden activations)
recompute     the expert input; the graph is rebuilt in backward
recommunicate the graph without its input; backward re-sends the token rows with the gradients
both          nothing; backward re-sends the token rows and rebuilds the graph
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..experts import GroupedExperts
from .comm import Exchanger, RowPacker
from .dispatch import PairRoute, expand_pairs

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

    route: the pairs and every rank's counts. pair_row_TK / row_pair_N: the plan's maps between
    (token, k) pairs and grouped rows (routing weights come per grouped row).
    before_backward: called before backward's first exchange (the EP agreement check).
    """

    route: PairRoute
    exchanger: Exchanger
    experts: GroupedExperts
    use_triton: bool
    strategy: str
    build_graph: bool
    pair_row_TK: torch.Tensor
    row_pair_N: torch.Tensor
    before_backward: Callable[[], None] | None = None
    timer: StageTimer | None = None


def run_stage(x_TD, weight_N, experts: GroupedExperts, run: StageRun) -> torch.Tensor:
    """``y[t] = sum_k weight[t, k] * FFN_{e(t, k)}(x[t])`` for the local tokens ``x_TD``, computed by
    the replicas that hold the experts anywhere in the group (``weight_N`` per grouped row)."""
    return _ExpertParallelStage.apply(x_TD, weight_N, experts.gate_up_proj, experts.down_proj, run)


def dispatch_packer(x_dtype: torch.dtype, width: int, weight_dtype: torch.dtype, top_k: int) -> RowPacker:
    """The forward dispatch row: token, K slot ids, K weights."""
    return RowPacker([(x_dtype, width), (torch.int32, top_k), (weight_dtype, top_k)])


class _ExpertParallelStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_N, gate_up, down, run: StageRun):
        route = run.route
        (T, D), K = x_TD.shape, route.slot_PK.shape[1]
        packer = dispatch_packer(x_TD.dtype, D, weight_N.dtype, K)
        keeps_graph = run.build_graph and run.strategy in KEEPS_GRAPH
        params = _param_leaves(gate_up, down, keeps_graph)
        w_TK = _pair_weights(weight_N, run.pair_row_TK)

        def dispatch(c: int):
            part = route.send_slice(c)
            token_P, slot_PK = route.token_P[part], route.slot_PK[part]
            w_PK = torch.where(slot_PK >= 0, w_TK.index_select(0, token_P), 0)
            return run.exchanger.start(packer.pack([x_TD, slot_PK, w_PK], [token_P, None, None]), route.split_WW(c))

        timer = run.timer
        saved, expansions, returns = [], [], []
        if timer is not None:
            timer.mark(x_TD.device)
        upcoming = dispatch(0)
        for c in range(route.num_chunks):
            current = upcoming
            if c + 1 < route.num_chunks:
                upcoming = dispatch(c + 1)
            x_PD, slot_PK, w_PK = packer.unpack(current.wait())
            row_key_R = expand_pairs(slot_PK, int(route.recv_rows_S(c).sum()))
            offsets_S = route.offsets_nS(x_TD.device)[c]
            row_pair_R = row_key_R // K
            x_RD = x_PD.index_select(0, row_pair_R)
            w_R = w_PK.reshape(-1).index_select(0, row_key_R)
            if timer is not None:
                timer.dispatch_s += timer.mark(x_TD.device)
            y_RD, chunk_saved = _expert_forward(run, params, x_RD, w_R, offsets_S, keeps_graph)
            if timer is not None:
                timer.expert_s += timer.mark(x_TD.device)
            saved.append(chunk_saved)
            expansions.append((row_key_R, offsets_S))
            y_PD = y_RD.new_zeros((x_PD.shape[0], D)).index_add_(0, row_pair_R, y_RD)
            returns.append(run.exchanger.start(y_PD, route.split_WW(c), reverse=True))
        if timer is not None:
            pairs = int(route.pairs_nWW[:, route.rank].sum() + route.pairs_nWW[:, :, route.rank].sum())
            timer.dispatch_bytes += pairs * packer.row_bytes
            timer.expert_rows += int(route.rows_nWS.sum())
        y_TD = x_TD.new_zeros((T, D))
        for c, pending in enumerate(returns):
            y_TD.index_add_(0, route.token_P[route.send_slice(c)], pending.wait())

        if run.build_graph:
            ctx.run, ctx.saved, ctx.expansions = run, saved, expansions
            ctx.params = params if keeps_graph else None
            ctx.weight_dtype = weight_N.dtype
            resent = [x_TD] if run.strategy in RESENDS_INPUT else []
            ctx.save_for_backward(gate_up, down, *resent)
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        run: StageRun = ctx.run
        route = run.route
        if run.before_backward is not None:
            run.before_backward()
        gate_up, down, *resent = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        (T, D), K = grad_TD.shape, route.slot_PK.shape[1]
        sends = [grad_TD, *resent]
        packer = RowPacker([(t.dtype, D) for t in sends])
        back = RowPacker([(grad_TD.dtype, D), (ctx.weight_dtype, K)])
        params = ctx.params if ctx.params is not None else _param_leaves(gate_up, down, True)

        def dispatch(c: int):
            token_P = route.token_P[route.send_slice(c)]
            return run.exchanger.start(packer.pack(sends, token_P), route.split_WW(c))

        grad_gate_up = grad_down = None
        returns = []
        upcoming = dispatch(0)
        for c in range(route.num_chunks):
            current = upcoming
            if c + 1 < route.num_chunks:
                upcoming = dispatch(c + 1)
            grad_PD, *x_PD = packer.unpack(current.wait())
            row_key_R, offsets_S = ctx.expansions[c]
            row_pair_R = row_key_R // K
            grad_RD = grad_PD.index_select(0, row_pair_R)
            x_RD = x_PD[0].index_select(0, row_pair_R) if x_PD else None
            dx_RD, dw_R, d_gate_up, d_down = _expert_backward(run, ctx.saved[c], params, grad_RD, x_RD, offsets_S)
            ctx.saved[c] = None
            if d_gate_up is None:
                pass
            elif grad_gate_up is None:
                grad_gate_up, grad_down = d_gate_up, d_down
            else:
                grad_gate_up += d_gate_up
                grad_down += d_down
            P = grad_PD.shape[0]
            dx_PD = dx_RD.new_zeros((P, D)).index_add_(0, row_pair_R, dx_RD)
            dw_PK = dx_RD.new_zeros(P * K, dtype=ctx.weight_dtype).index_copy_(0, row_key_R, dw_R.to(ctx.weight_dtype)).view(P, K)
            returns.append(run.exchanger.start(back.pack([dx_PD, dw_PK]), route.split_WW(c), reverse=True))
        grad_x_TD = grad_TD.new_zeros((T, D))
        grad_w_TK = grad_TD.new_zeros((T, K), dtype=ctx.weight_dtype)
        for c, pending in enumerate(returns):
            dx_PD, dw_PK = back.unpack(pending.wait())
            token_P = route.token_P[route.send_slice(c)]
            grad_x_TD.index_add_(0, token_P, dx_PD)
            grad_w_TK.index_add_(0, token_P, dw_PK)
        grad_w_N = grad_w_TK.view(-1).index_select(0, run.row_pair_N)
        if grad_gate_up is None:
            grad_gate_up, grad_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        return grad_x_TD, grad_w_N, grad_gate_up, grad_down, None


def _pair_weights(weight_N: torch.Tensor, pair_row_TK: torch.Tensor) -> torch.Tensor:
    """Routing weight of every (token, k) pair (0 for dropped pairs)."""
    rows = pair_row_TK.clamp_min(0).reshape(-1)
    w = weight_N.index_select(0, rows).view(pair_row_TK.shape) if weight_N.shape[0] else weight_N.new_zeros(pair_row_TK.shape)
    return torch.where(pair_row_TK >= 0, w, 0)


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
