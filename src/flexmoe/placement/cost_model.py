"""CostModel: modelled time of one MoE layer's training step under a placement, and of a re-placement.

Legend: E logical experts, W ranks, S slots per rank.

    T_comp = max over ranks of (tokens * c_tok + active slots * c_slot)
    T_a2a  = a2a_passes * max over ranks and topology levels of (bytes sent or received / bandwidth)
    T_sync = max(0, sum over replicated experts of 2 (r - 1) / r * grad_bytes / sync bandwidth
                    - sync_overlap * T_bwd),   T_bwd = 2/3 T_comp (backward is 2 of the 3 GEMM passes)
    T_move = max over ranks of (bytes sent or received by replica moves / move bandwidth)
    step   = T_comp + T_a2a + T_sync

All-to-all, replica gradient sync and moves have their own bandwidths (``a2a_bw``, ``sync_bw``,
``move_bw``; the latter two fall back to the all-to-all's when not given). ``sync_overlap`` is
the fraction of the backward pass that the replica gradient sync hides behind: 0 when it runs
after backward (flexmoe's ``sync_gradients`` today), 1 gives ``T_fwd + max(T_bwd, T_sync)``. A level is
"intra" when both ranks share a node (``rank // ranks_per_node``), "inter" otherwise. The constants
come from ``measure`` (timed on the running machine) or ``from_shape`` (stated hardware numbers);
none is built in.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .split import replica_quotas, split_tokens
from .table import PlacementTable


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Modelled seconds of one layer's step, by term."""

    compute: float
    a2a: float
    sync: float

    @property
    def total(self) -> float:
        return self.compute + self.a2a + self.sync


@dataclasses.dataclass(frozen=True)
class Move:
    """One replica that must be fetched: ``expert`` copied from ``src_rank`` into (dst_rank, dst_slot).

    ``src_rank == dst_rank`` is a local slot change (no network bytes).
    """

    expert: int
    src_rank: int
    dst_rank: int
    dst_slot: int


def plan_moves(old: PlacementTable, new: PlacementTable) -> list[Move]:
    """Every slot of ``new`` whose expert it did not hold in ``old``, with the rank to fetch it from.

    Source: the destination rank itself when it already held the expert, else the lowest rank
    holding it in the same node (when ``ranks_per_node`` is given), else the lowest holder.
    Deterministic, so every rank derives the same list.
    """
    return _plan_moves(old, new, None)


def _plan_moves(old: PlacementTable, new: PlacementTable, ranks_per_node: int | None) -> list[Move]:
    if old.num_experts != new.num_experts or old.slot_expert_WS.shape != new.slot_expert_WS.shape:
        raise ValueError("old and new tables must have the same experts, ranks and slots")
    W, E = old.world_size, old.num_experts
    node_W = np.arange(W) // (ranks_per_node or W)
    holds_WE = np.zeros((W, E), dtype=bool)
    r_old, s_old = np.nonzero(old.slot_expert_WS >= 0)
    holds_WE[r_old, old.slot_expert_WS[r_old, s_old]] = True
    rank_of = np.where(holds_WE, np.arange(W)[:, None], W)
    first_E = rank_of.min(0)
    first_NE = np.stack([np.where(node_W[:, None] == n, rank_of, W).min(0) for n in range(node_W[-1] + 1)])
    new_se = new.slot_expert_WS
    r_new, s_new = np.nonzero((new_se >= 0) & (new_se != old.slot_expert_WS))
    e_new = new_se[r_new, s_new]
    same_node = first_NE[node_W[r_new], e_new]
    src = np.where(holds_WE[r_new, e_new], r_new, np.where(same_node < W, same_node, first_E[e_new]))
    return [Move(int(e), int(a), int(r), int(t)) for e, a, r, t in zip(e_new, src, r_new, s_new)]


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Constants of the per-layer cost model (seconds, bytes, bytes per second; all per rank).

    c_tok: compute seconds per routed token row (forward + backward of one expert FFN).
    c_slot: fixed seconds per expert slot that gets tokens (weight streaming, launch).
    bytes_per_token: bytes of one token row in one all-to-all.
    a2a_passes: all-to-alls per training step (dispatch + combine, forward + backward = 4).
    a2a_bw: all-to-all bandwidth within a node; a2a_bw_inter across nodes (None: same as a2a_bw).
    ranks_per_node: ranks sharing a node (None: all ranks in one node).
    grad_bytes: gradient bytes all-reduced per replicated expert.
    move_bytes: bytes carried by one replica move (parameters + optimizer state).
    sync_bw, move_bw: bandwidth of replica gradient sync and of moves (None: the a2a bandwidth of the level).
    sync_overlap: fraction in [0, 1] of the backward compute that hides the replica gradient sync.
    """

    c_tok: float
    bytes_per_token: float
    a2a_bw: float
    grad_bytes: float
    move_bytes: float
    c_slot: float = 0.0
    a2a_passes: int = 4
    a2a_bw_inter: float | None = None
    ranks_per_node: int | None = None
    sync_bw: float | None = None
    move_bw: float | None = None
    sync_overlap: float = 0.0

    def __post_init__(self) -> None:
        _positive("c_tok", self.c_tok)
        _positive("c_slot", self.c_slot, allow_zero=True)
        _positive("bytes_per_token", self.bytes_per_token, allow_zero=True)
        _positive("a2a_bw", self.a2a_bw)
        _positive("a2a_bw_inter", self.a2a_bw_inter)
        _positive("grad_bytes", self.grad_bytes, allow_zero=True)
        _positive("move_bytes", self.move_bytes, allow_zero=True)
        _positive("sync_bw", self.sync_bw)
        _positive("move_bw", self.move_bw)
        if not 0.0 <= self.sync_overlap <= 1.0:
            raise ValueError(f"sync_overlap must be in [0, 1], got {self.sync_overlap}")
        if not isinstance(self.a2a_passes, int) or self.a2a_passes < 0:
            raise ValueError(f"a2a_passes must be an int >= 0, got {self.a2a_passes}")
        if self.ranks_per_node is not None and (not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1):
            raise ValueError(f"ranks_per_node must be None or an int >= 1, got {self.ranks_per_node}")

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_shape(
        cls,
        d_model: int,
        d_ff: int,
        *,
        flops: float,
        mem_bw: float,
        a2a_bw: float,
        gated: bool = True,
        act_bytes: int = 2,
        param_bytes: int = 4,
        grad_bytes: int = 4,
        optimizer_bytes: int = 8,
        **overrides,
    ) -> "CostModel":
        """Constants from an expert shape and stated hardware rates (FLOP/s, bytes/s).

        Per routed row, forward + backward of the FFN is 3 * 2 * (2 or 3) * D * F FLOPs;
        c_slot streams the weights three times (forward, input grad, weight grad) at ``mem_bw``.
        A move carries fp32 parameters and ``optimizer_bytes`` per parameter (Adam: 8).
        """
        params = (3 if gated else 2) * d_model * d_ff
        values = dict(
            c_tok=3 * 2 * params / flops,
            c_slot=3 * params * act_bytes / mem_bw,
            bytes_per_token=d_model * act_bytes,
            a2a_bw=a2a_bw,
            grad_bytes=params * grad_bytes,
            move_bytes=params * (param_bytes + optimizer_bytes),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def measure(
        cls,
        d_model: int,
        d_ff: int,
        *,
        device: str = "cpu",
        group=None,
        rows: int = 512,
        local_experts: int = 4,
        dtype=None,
        repeats: int = 3,
        **overrides,
    ) -> "CostModel":
        """Time a grouped expert FFN (forward + backward) and an all-to-all on this machine.

        c_tok and c_slot come from a line through two row counts (``rows`` and ``4 * rows``). The all-to-all is timed over
        ``group`` when it has more than one rank; otherwise a device-local copy stands in
        (state ``a2a_bw`` in ``overrides`` when the real fabric is known). Every rank of
        ``group`` must call this together; ranks agree on the constants through an all-reduce max.
        """
        import torch

        from ..config import MoEConfig
        from ..experts import GroupedExperts

        if rows < 1 or local_experts < 1 or repeats < 1:
            raise ValueError(f"rows, local_experts and repeats must be >= 1, got {rows}, {local_experts}, {repeats}")

        dev = torch.device(device)
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        elem = torch.tensor([], dtype=dtype).element_size()
        config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=local_experts, top_k=1)
        experts = GroupedExperts(config).to(dev, dtype)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def ffn_seconds(n: int) -> float:
            x = torch.randn(n, d_model, device=dev, dtype=dtype, requires_grad=True)
            offsets = torch.linspace(0, n, local_experts + 1, device=dev)[1:].round().to(torch.int32)
            scale = torch.ones(n, device=dev, dtype=dtype)
            experts(x, offsets, scale, use_triton=False).sum().backward()
            best = float("inf")
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                experts(x, offsets, scale, use_triton=False).sum().backward()
                sync()
                best = min(best, time.perf_counter() - t0)
            return best

        t1, t4 = ffn_seconds(rows), ffn_seconds(4 * rows)
        c_tok = max((t4 - t1) / (3 * rows), t4 / (4 * rows) * 1e-3)
        c_slot = max((t1 - rows * c_tok) / local_experts, 0.0)

        nbytes = 1 << 24
        world = 1
        if group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(group)
        buf = torch.empty(nbytes // elem * world, device=dev, dtype=dtype)
        out = torch.empty_like(buf)
        best = float("inf")
        for _ in range(repeats + 1):
            sync()
            if world > 1:
                dist.barrier(group=group)
            t0 = time.perf_counter()
            if world > 1:
                dist.all_to_all_single(out, buf, group=group)
            else:
                out.copy_(buf)
            sync()
            best = min(best, time.perf_counter() - t0)
        a2a_bw = (nbytes * (world - 1) if world > 1 else nbytes) / best

        measured = torch.tensor([c_tok, c_slot, 1.0 / a2a_bw], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(measured, op=dist.ReduceOp.MAX, group=group)
        c_tok, c_slot, inv_bw = measured.tolist()
        params = 3 * d_model * d_ff if config.is_gated else 2 * d_model * d_ff
        values = dict(
            c_tok=c_tok,
            c_slot=c_slot,
            bytes_per_token=d_model * elem,
            a2a_bw=1.0 / inv_bw,
            grad_bytes=params * 4,
            move_bytes=params * 12,
        )
        values.update(overrides)
        return cls(**values)

    # ---- the model ----------------------------------------------------------------------------

    def _node_W(self, world_size: int) -> np.ndarray:
        per = self.ranks_per_node or world_size
        return np.arange(world_size) // per

    def _level_time(self, out_WW: np.ndarray, bw_intra: float, bw_inter: float) -> float:
        """Max over ranks of (bytes sent or received per level / that level's bandwidth)."""
        node_W = self._node_W(out_WW.shape[0])
        same_WW = node_W[:, None] == node_W[None, :]
        out_WW = out_WW * (1 - np.eye(out_WW.shape[0]))
        intra_WW, inter_WW = np.where(same_WW, out_WW, 0.0), np.where(same_WW, 0.0, out_WW)
        t_intra = np.maximum(intra_WW.sum(1), intra_WW.sum(0)) / bw_intra
        t_inter = np.maximum(inter_WW.sum(1), inter_WW.sum(0)) / bw_inter
        return float(np.maximum(t_intra, t_inter).max()) if out_WW.size else 0.0

    def step_time(self, table: PlacementTable, counts_WE: np.ndarray) -> StepCost:
        """Modelled step of one layer when source rank w routes ``counts_WE[w, e]`` rows to expert e."""
        counts_WE = np.rint(np.asarray(counts_WE, dtype=np.float64)).astype(np.int64)
        if counts_WE.shape != (table.world_size, table.num_experts):
            raise ValueError(f"counts_WE must have shape {(table.world_size, table.num_experts)}, got {counts_WE.shape}")
        quota_WS = replica_quotas(table, counts_WE.sum(0))
        compute = float((quota_WS.sum(1) * self.c_tok + (quota_WS > 0).sum(1) * self.c_slot).max())

        bw_inter = self.a2a_bw_inter or self.a2a_bw
        send_WW = split_tokens(table, counts_WE).sum(2).astype(np.float64) * self.bytes_per_token
        a2a = self.a2a_passes * self._level_time(send_WW, self.a2a_bw, bw_inter)

        node_W = self._node_W(table.world_size)
        sync = 0.0
        for e in np.nonzero(table.num_replicas_E() > 1)[0]:
            ranks = np.nonzero((table.slot_expert_WS == e).any(axis=1))[0]
            r = ranks.size
            if r < 2:
                continue
            spans = np.unique(node_W[ranks]).size > 1
            bw = self.sync_bw or (bw_inter if spans else self.a2a_bw)
            sync += 2 * (r - 1) / r * self.grad_bytes / bw
        sync = max(sync - self.sync_overlap * compute * (2.0 / 3.0), 0.0)
        return StepCost(compute, a2a, sync)

    def moves(self, old: PlacementTable, new: PlacementTable) -> list[Move]:
        """``plan_moves`` with this model's node layout (same-node sources preferred)."""
        return _plan_moves(old, new, self.ranks_per_node)

    def move_bytes_total(self, old: PlacementTable, new: PlacementTable) -> float:
        """Bytes crossing the network to turn ``old`` into ``new``."""
        return sum(self.move_bytes for m in self.moves(old, new) if m.src_rank != m.dst_rank)

    def move_time(self, old: PlacementTable, new: PlacementTable) -> float:
        """Seconds to fetch the new replicas: max over ranks of bytes sent or received / bandwidth."""
        W = old.world_size
        out_WW = np.zeros((W, W))
        for m in self.moves(old, new):
            out_WW[m.src_rank, m.dst_rank] += self.move_bytes
        bw = self.move_bw or self.a2a_bw
        bw_inter = self.move_bw or self.a2a_bw_inter or self.a2a_bw
        return self._level_time(out_WW, bw, bw_inter)
