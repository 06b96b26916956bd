"""The expert-parallel stage as one autograd function: local rows, dispatch -> experts -> combine, chunked.

Legend: T local tokens, D width, K experts per token, P (token, rank) pairs one chunk moves,
R rows this rank's experts compute in one chunk (slot order), S local slots.

Forward starts with the local rows (dispatch.LocalRows: rows of experts whose only replica is
here): gathered straight from the tokens, one grouped GEMM over the local slots, added straight
into the output. They do not depend on the other ranks' counts, so they run while the counts
all-gather is in flight; ``StageRun.resolve`` then waits for it and returns the route of the
remaining (exchanged) rows. They are one more "chunk" of the stage for the memory strategies
and the weight gradients, with no exchange. Then, per chunk c (n chunks) of the exchanged rows: send every (token, rank) pair once (token row, K slot ids, K
weights; dispatch.py), expand the received pairs to their rows grouped by slot, run the grouped
experts (weight folded into the activation), sum each pair's rows and send one row per pair
back; the source adds the rows that come back into its tokens. Chunk c+1's dispatch is started
before chunk c's experts run, and chunk c's return before chunk c+1's experts, so communication
overlaps compute. Backward runs the same pipeline with gradients: one output-gradient row per
pair travels to the experts, one input-gradient row (with the K weight gradients) comes back.
A chunk's backward computes only its input and routing-weight gradients; the expert weight
gradients of all chunks are computed once at the end (one grouped GEMM per weight over every
chunk's rows, gathered slot-major: ``_WeightGrads``), never one full-size gradient per chunk.

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

import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..experts import GroupedExperts
from ..ops.grouped_gemm import WgradRows, grouped_mm_wgrad
from .comm import Exchanger, RowPacker, index_from_ranges
from .dispatch import LocalRows, PairRoute, expand_pairs

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

    local: the local rows, computed before ``resolve`` is called. resolve: waits for the other
    ranks' counts and returns the route of the exchanged rows (None: nothing is exchanged, world
    size 1 only) and the memory strategy. strategy: the memory strategy when known before the
    counts (None: "auto", chosen by resolve). pair_row_TK / row_pair_N: the plan's maps between
    (token, k) pairs and grouped rows (routing weights come per grouped row).
    before_backward: called before backward's first exchange (the EP agreement check).
    """

    local: LocalRows
    resolve: Callable[[], "tuple[PairRoute | None, str]"]
    exchanger: Exchanger
    experts: GroupedExperts
    use_triton: bool
    strategy: str | None
    build_graph: bool
    pair_row_TK: torch.Tensor
    row_pair_N: torch.Tensor
    before_backward: Callable[[], None] | None = None
    timer: StageTimer | None = None
    route: PairRoute | None = None


def run_stage(x_TD, weight_N, experts: GroupedExperts, run: StageRun, weights=None) -> torch.Tensor:
    """``y[t] = sum_k weight[t, k] * FFN_{e(t, k)}(x[t])`` for the local tokens ``x_TD``, computed by
    the replicas that hold the experts anywhere in the group (``weight_N`` per grouped row).
    ``weights``: (gate_up, down) in place of the experts' own (identities of them: a trial clock)."""
    gate_up, down = weights if weights is not None else (experts.gate_up_proj, experts.down_proj)
    return _ExpertParallelStage.apply(x_TD, weight_N, gate_up, down, run)


def dispatch_packer(x_dtype: torch.dtype, width: int, weight_dtype: torch.dtype, top_k: int) -> RowPacker:
    """The forward dispatch row: token, K slot ids, K weights."""
    return RowPacker([(x_dtype, width), (torch.int32, top_k), (weight_dtype, top_k)])


class _ExpertParallelStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_N, gate_up, down, run: StageRun):
        T, D = x_TD.shape
        params = _param_leaves(gate_up, down)
        timer, local = run.timer, run.local
        if timer is not None:
            timer.mark(x_TD.device)
        strategy_was_open = run.strategy is None
        y_local_RD, saved_local = _local_forward(run, params, x_TD, weight_N)
        if timer is not None:
            timer.expert_s += timer.mark(x_TD.device)
            timer.expert_rows += local.count
        route, strategy = run.resolve()  # the host waits for the other ranks' counts here
        run.route, run.strategy = route, strategy
        if strategy_was_open and saved_local is not None:
            saved_local = _settle(saved_local, strategy)
        y_TD = x_TD.new_zeros((T, D))
        if local.count:
            y_TD.index_add_(0, local.token_R, y_local_RD)
        saved, expansions = [], []
        if route is not None:
            saved, expansions = _exchanged_forward(run, route, params, x_TD, weight_N, y_TD)
        if run.build_graph:
            ctx.run, ctx.saved, ctx.expansions, ctx.saved_local = run, saved, expansions, saved_local
            ctx.params = params
            ctx.weight_dtype = weight_N.dtype
            resent = [x_TD] if strategy in RESENDS_INPUT else []
            ctx.save_for_backward(gate_up, down, *resent)
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        run: StageRun = ctx.run
        route, local = run.route, run.local
        if run.before_backward is not None:
            run.before_backward()
        gate_up, down, *resent = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        (T, D), K = grad_TD.shape, run.pair_row_TK.shape[1]
        params = ctx.params
        rows_nS = [local.rows_S] + ([] if route is None else list(route.rows_nWS.sum(axis=1)))
        offsets_n = [local.offsets_S] + ([] if route is None else list(route.offsets_nS(grad_TD.device)))
        weight_grads = _WeightGrads(np.stack(rows_nS), offsets_n, [gate_up, down], grad_TD.device)
        grad_x_TD = grad_TD.new_zeros((T, D))
        grad_w_TK = grad_TD.new_zeros((T, K), dtype=ctx.weight_dtype)
        exchanged = None
        if route is not None:  # started first: the local rows' backward overlaps its first exchange
            exchanged = _ExchangedBackward(run, route, ctx, grad_TD, resent)
        grad_local_R = None
        if local.count:
            x_RD = resent[0].index_select(0, local.token_R) if resent else None
            dx_RD, dw_R, wgrad_rows = _expert_backward(run, ctx.saved_local, params,
                                                       grad_TD.index_select(0, local.token_R), x_RD, local.offsets_S)
            ctx.saved_local = None
            if wgrad_rows is not None:
                weight_grads.add(0, wgrad_rows)
            grad_x_TD.index_add_(0, local.token_R, dx_RD)
            grad_local_R = dw_R.to(ctx.weight_dtype)
        if exchanged is not None:
            exchanged.compute(weight_grads)
        per_expert = run.experts.config.kernels == "per_expert"
        grad_gate_up, grad_down = weight_grads.compute([gate_up, down], per_expert)  # overlaps the last return
        if exchanged is not None:
            exchanged.combine(grad_x_TD, grad_w_TK)
        grad_w_N = grad_w_TK.view(-1).index_select(0, run.row_pair_N)
        if grad_local_R is not None:
            grad_w_N.index_add_(0, local.row_R, grad_local_R)
        return grad_x_TD, grad_w_N, grad_gate_up, grad_down, None


def _local_forward(run: StageRun, params, x_TD, weight_N):
    """Expert outputs of the local rows (``[R, D]``, weighted) and what their backward needs.
    With the strategy still open ("auto") the graph is kept without its input, which ``_settle``
    then keeps or drops."""
    local = run.local
    if not local.count:
        return None, None
    x_RD = x_TD.index_select(0, local.token_R)
    w_R = weight_N.index_select(0, local.row_R)
    strategy = run.strategy if run.strategy is not None else "recommunicate"
    keeps_graph = run.build_graph and strategy in KEEPS_GRAPH
    y_RD, saved = _expert_forward(run, params, x_RD, w_R, local.offsets_S, keeps_graph, strategy)
    if saved is not None and run.strategy is None:
        saved.x_RD = x_RD  # until _settle
    return y_RD, saved


def _settle(saved: _ChunkSaved, strategy: str) -> _ChunkSaved:
    """Keep what ``strategy`` keeps of a local graph built without its input (x_RD held aside)."""
    x_RD, saved.x_RD = saved.x_RD, None
    if strategy == "keep":
        saved.swap.provide(x_RD)
        return saved
    if strategy == "recommunicate":
        return saved
    return _ChunkSaved(saved.scale_R.detach(), x_RD if strategy == "recompute" else None)


def _exchanged_forward(run: StageRun, route: PairRoute, params, x_TD, weight_N, y_TD):
    """The chunked pipeline of the exchanged rows; their outputs are added into ``y_TD``."""
    (T, D), K = x_TD.shape, route.slot_PK.shape[1]
    packer = dispatch_packer(x_TD.dtype, D, weight_N.dtype, K)
    keeps_graph = run.build_graph and run.strategy in KEEPS_GRAPH
    w_TK = _pair_weights(weight_N, run.pair_row_TK)
    timer = run.timer

    def dispatch(c: int):
        part = route.send_slice(c)
        token_P, slot_PK = route.token_P[part], route.slot_PK[part]
        w_PK = torch.where(slot_PK >= 0, w_TK.index_select(0, token_P), 0)
        return run.exchanger.start(packer.pack([x_TD, slot_PK, w_PK], [token_P, None, None]), route.split_WW(c))

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
        y_RD, chunk_saved = _expert_forward(run, params, x_RD, w_R, offsets_S, keeps_graph, run.strategy)
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
    for c, pending in enumerate(returns):
        y_TD.index_add_(0, route.token_P[route.send_slice(c)], pending.wait())
    return saved, expansions


class _ExchangedBackward:
    """The backward pipeline of the exchanged rows: started at construction (first dispatch),
    ``compute`` runs the chunks (weight-gradient rows into ``_WeightGrads`` as chunk c + 1),
    ``combine`` adds the returned gradients into the token gradients."""

    def __init__(self, run: StageRun, route: PairRoute, ctx, grad_TD, resent):
        self.run, self.route, self.ctx = run, route, ctx
        D = grad_TD.shape[1]
        self.K = route.slot_PK.shape[1]
        self.sends = [grad_TD, *resent]
        self.packer = RowPacker([(t.dtype, D) for t in self.sends])
        self.back = RowPacker([(grad_TD.dtype, D), (ctx.weight_dtype, self.K)])
        self.returns = []
        self.upcoming = self._dispatch(0)

    def _dispatch(self, c: int):
        token_P = self.route.token_P[self.route.send_slice(c)]
        return self.run.exchanger.start(self.packer.pack(self.sends, token_P), self.route.split_WW(c))

    def compute(self, weight_grads: "_WeightGrads") -> None:
        run, route, ctx, K = self.run, self.route, self.ctx, self.K
        D = self.sends[0].shape[1]
        for c in range(route.num_chunks):
            current = self.upcoming
            if c + 1 < route.num_chunks:
                self.upcoming = self._dispatch(c + 1)
            grad_PD, *x_PD = self.packer.unpack(current.wait())
            row_key_R, offsets_S = ctx.expansions[c]
            row_pair_R = row_key_R // K
            grad_RD = grad_PD.index_select(0, row_pair_R)
            x_RD = x_PD[0].index_select(0, row_pair_R) if x_PD else None
            dx_RD, dw_R, wgrad_rows = _expert_backward(run, ctx.saved[c], ctx.params, grad_RD, x_RD, offsets_S)
            ctx.saved[c] = None
            if wgrad_rows is not None:
                weight_grads.add(c + 1, wgrad_rows)
            P = grad_PD.shape[0]
            dx_PD = dx_RD.new_zeros((P, D)).index_add_(0, row_pair_R, dx_RD)
            dw_PK = dx_RD.new_zeros(P * K, dtype=ctx.weight_dtype).index_copy_(0, row_key_R, dw_R.to(ctx.weight_dtype)).view(P, K)
            self.returns.append(run.exchanger.start(self.back.pack([dx_PD, dw_PK]), route.split_WW(c), reverse=True))

    def combine(self, grad_x_TD, grad_w_TK) -> None:
        for c, pending in enumerate(self.returns):
            dx_PD, dw_PK = self.back.unpack(pending.wait())
            token_P = self.route.token_P[self.route.send_slice(c)]
            grad_x_TD.index_add_(0, token_P, dx_PD)
            grad_w_TK.index_add_(0, token_P, dw_PK)


def _pair_weights(weight_N: torch.Tensor, pair_row_TK: torch.Tensor) -> torch.Tensor:
    """Routing weight of every (token, k) pair (0 for dropped pairs)."""
    rows = pair_row_TK.clamp_min(0).reshape(-1)
    w = weight_N.index_select(0, rows).view(pair_row_TK.shape) if weight_N.shape[0] else weight_N.new_zeros(pair_row_TK.shape)
    return torch.where(pair_row_TK >= 0, w, 0)


def _param_leaves(gate_up, down) -> dict[str, torch.Tensor]:
    """The expert weights without autograd: their gradients come from ``_WeightGrads``."""
    return {"gate_up_proj": gate_up.detach(), "down_proj": down.detach()}


def _call_experts(run: StageRun, params, x_RD, w_R, offsets_S, wgrad_rows: WgradRows | None = None) -> torch.Tensor:
    return functional_call(run.experts, params, (x_RD, offsets_S, w_R, run.use_triton, wgrad_rows))


class _WeightGrads:
    """The expert weight gradients of a whole stage, each one grouped GEMM.

    Every chunk's backward (the local rows are chunk 0) hands over its two GEMMs' input rows and
    output gradients (``WgradRows``); with rows in several chunks they are copied into buffers
    ordered slot-major (slot, then chunk, then row), so ``dw[s] = sum over chunks of grad_s^T @
    x_s`` is one wgrad GEMM per weight over all rows. When one chunk holds every row its own
    tensors are used (no copy), so degree 1 computes exactly what the unchunked layer does.
    When exactly two chunks hold rows (the local rows and the exchanged rows at degree 1) and
    copying the rows would touch more elements than adding two full-size gradients, each chunk
    gets its own wgrad GEMM and the two are summed (``summed``).
    rows_nS: rows per (chunk, local slot); offsets_n: each chunk's device offsets.
    """

    def __init__(self, rows_nS: np.ndarray, offsets_n: list[torch.Tensor], weights: list[torch.Tensor],
                 device: torch.device):
        self.rows_nS = rows_nS
        total_S = rows_nS.sum(axis=0)
        self.total = int(total_S.sum())
        self.device = device
        busy = np.nonzero(rows_nS.sum(axis=1))[0]
        self.direct = busy.size <= 1
        # Elements touched: the copy reads and writes every row of both operands of both GEMMs
        # (weight [S, O, I]: a row is I + O wide); the sum reads two gradients and writes one.
        copied = 2 * self.total * sum(w.shape[1] + w.shape[2] for w in weights)
        self.summed = busy.size == 2 and 3 * sum(w.numel() for w in weights) < copied
        self.offsets_n, self.parts = offsets_n, []
        if self.direct or self.summed:
            self.offsets_S = offsets_n[int(busy[0]) if busy.size else 0]
        else:
            self.offsets_S = torch.from_numpy(np.cumsum(total_S).astype(np.int32)).to(device)
            self.start_nS = (np.cumsum(total_S) - total_S)[None, :] + (np.cumsum(rows_nS, axis=0) - rows_nS)
        self.pairs: list = [None, None]

    def add(self, chunk: int, wgrad_rows: WgradRows) -> None:
        rows, wgrad_rows.rows = wgrad_rows.rows, [None] * len(wgrad_rows.rows)  # taken: the holder keeps none
        if self.summed:
            self.parts.append((self.offsets_n[chunk], rows))
            return
        if self.direct:
            self.pairs = rows
            return
        index = index_from_ranges(self.start_nS[chunk], self.rows_nS[chunk], self.device)
        for i, (x_RI, grad_RO) in enumerate(rows):
            if self.pairs[i] is None:
                self.pairs[i] = (x_RI.new_empty((self.total, x_RI.shape[1])),
                                 grad_RO.new_empty((self.total, grad_RO.shape[1])))
            self.pairs[i][0].index_copy_(0, index, x_RI)
            self.pairs[i][1].index_copy_(0, index, grad_RO)

    def compute(self, weights: list[torch.Tensor], per_expert: bool) -> list[torch.Tensor]:
        """The gradient of each weight (zeros when no chunk had rows)."""
        if self.summed:
            grads = [_summed_wgrad(weight, [(offsets, rows[i]) for offsets, rows in self.parts], per_expert)
                     for i, weight in enumerate(weights)]
            self.parts = []
            return grads
        grads = []
        for weight, pair in zip(weights, self.pairs):
            if pair is None:
                grads.append(torch.zeros_like(weight))
            else:
                grads.append(grouped_mm_wgrad(pair[1], pair[0], self.offsets_S, per_expert).to(weight.dtype))
        self.pairs = [None, None]
        return grads


def _summed_wgrad(weight: torch.Tensor, parts: list, per_expert: bool) -> torch.Tensor:
    """``sum over parts of grouped_mm_wgrad(grad, x, offsets)`` (zeros without parts)."""
    total = None
    for offsets_S, (x_RI, grad_RO) in parts:
        grad = grouped_mm_wgrad(grad_RO, x_RI, offsets_S, per_expert)
        total = grad if total is None else total.add_(grad)
    return torch.zeros_like(weight) if total is None else total.to(weight.dtype)


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
    wgrad_rows: WgradRows | None = None


def _expert_forward(run: StageRun, params, x_RD, w_R, offsets_S, keeps_graph: bool, strategy: str):
    if not run.build_graph or x_RD.shape[0] == 0:
        with torch.no_grad():
            return _call_experts(run, params, x_RD, w_R, offsets_S), None
    if not keeps_graph:
        with torch.no_grad():
            y_RD = _call_experts(run, params, x_RD, w_R, offsets_S)
        return y_RD, _ChunkSaved(w_R, x_RD if strategy == "recompute" else None)
    saved = _ChunkSaved(w_R.detach().requires_grad_(), output_grad=[], input_grad=[], wgrad_rows=WgradRows(2))
    saved.anchor = torch.empty(0, device=x_RD.device, requires_grad=True)
    swap = _SwapSavedInput(x_RD) if strategy == "recommunicate" else contextlib.nullcontext()
    with torch.enable_grad(), swap:
        x_in = _GraphInput.apply(x_RD, saved.anchor, saved.input_grad)
        y_RD = _call_experts(run, params, x_in, saved.scale_R, offsets_S, saved.wgrad_rows)
        saved.root = _GraphRoot.apply(y_RD, saved.output_grad)
    if strategy == "recommunicate":
        saved.swap = swap
    return y_RD.detach(), saved


def _expert_backward(run: StageRun, saved: _ChunkSaved | None, params, grad_RD, x_RD, offsets_S):
    """Gradients of one chunk: its input rows and routing weights, and what the expert weight
    gradients need (``WgradRows``: each GEMM's input rows and output gradient; None without rows)."""
    if saved is None:
        return grad_RD, grad_RD.new_zeros(grad_RD.shape[0]), None
    if saved.root is None:
        x_RD = saved.x_RD if x_RD is None else x_RD
        x_leaf = x_RD.detach().requires_grad_()
        w_leaf = saved.scale_R.detach().requires_grad_()
        wgrad_rows = WgradRows(2)
        with torch.enable_grad():
            y_RD = _call_experts(run, params, x_leaf, w_leaf, offsets_S, wgrad_rows)
        dx, dw = torch.autograd.grad(y_RD, [x_leaf, w_leaf], grad_RD)
        return dx, dw, wgrad_rows
    if saved.swap is not None and x_RD is not None:  # None: provided in forward (_settle)
        saved.swap.provide(x_RD)
    saved.output_grad.append(grad_RD)
    _, dw = torch.autograd.grad(saved.root, [saved.anchor, saved.scale_R], saved.root.new_empty(0), allow_unused=True)
    return saved.input_grad.pop(), dw, saved.wgrad_rows


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
