"""CostModel: modelled time of one MoE layer's training step under a placement, and of a re-placement.

Legend: E logical experts, W ranks, S slots per rank.

    T_comp = max over ranks of (tokens * c_tok + active slots * c_slot)
    T_a2a  = a2a_passes * max over ranks and topology levels of (bytes sent or received / bandwidth)
    T_sync = max(0, S - sync_overlap * T_bwd),   T_bwd = 2/3 T_comp (backward is 2 of the 3 GEMM passes),
             S = 2 * max over ranks and topology levels of (bytes sent or received in one phase of
             the replica sum / sync bandwidth): a reduce-scatter then an all-gather among each
             expert's r holder ranks, (r - 1) / r of a gradient each way per phase
    T_move = max over ranks of (bytes sent or received by replica moves / move bandwidth)
    step   = T_comp + T_a2a + T_sync

All-to-all, replica gradient sync and moves have their own bandwidths (``a2a_bw``, ``sync_bw``,
``move_bw``; the latter two fall back to the all-to-all's when not given). ``sync_overlap`` is
the fraction of the backward pass that the replica gradient sync hides behind: 0 when it runs
after backward (flexmoe's ``sync_gradients``); ``MoERuntime(overlap_replica_sync=True)`` posts
both phases of every layer but the last to finish backward during backward (``T_fwd + max(T_bwd,
T_sync)`` at overlap 1; the model charges every layer alike). A level is
"intra" when both ranks share a node (``rank // ranks_per_node``), "inter" otherwise. The constants
come from ``flexmoe.runtime.measure_cost_model`` (timed on the running machine) or ``from_shape`` (stated hardware numbers);
none is built in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .moves import Transfer, diff_placement
from .split import split_tokens
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
    sync_overlap: fraction in [0, 1] of the backward compute that hides the replica gradient sync
        (0: the sync after backward; > 0 only with ``MoERuntime(overlap_replica_sync=True)``).
    adaptive_split: model the runtime's split, quotas chosen per step from the counts (``split``
        module doc); False models fixed-share quotas (a what-if, e.g. to measure what the
        adaptive split gains; the runtime's host-side dispatch always splits adaptively).
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
    adaptive_split: bool = True

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
        if not isinstance(self.adaptive_split, bool):
            raise ValueError(f"adaptive_split must be a bool, got {self.adaptive_split!r}")
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
        # One split: every replica gets its quota from the sources, so the quotas are its column sums.
        send_WWS = split_tokens(table, counts_WE, adaptive=self.adaptive_split)
        quota_WS = send_WWS.sum(0)
        compute = float((quota_WS.sum(1) * self.c_tok + (quota_WS > 0).sum(1) * self.c_slot).max())

        bw_inter = self.a2a_bw_inter or self.a2a_bw
        send_WW = send_WWS.sum(2).astype(np.float64) * self.bytes_per_token
        a2a = self.a2a_passes * self._level_time(send_WW, self.a2a_bw, bw_inter)

        sync = max(self.sync_time(table) - self.sync_overlap * compute * (2.0 / 3.0), 0.0)
        return StepCost(compute, a2a, sync)

    def sync_time(self, table: PlacementTable) -> float:
        """Seconds of the replica gradient sum (``flexmoe.runtime.sync``), none of it hidden: per
        replicated expert on r ranks, a reduce-scatter (each holder sends chunk j of its sum to the
        j-th holder) and an all-gather of the chunk totals, every expert's at once; each phase
        moves grad_bytes / r between every ordered pair of holders, and the busiest rank and
        level sets its time."""
        slot_WS = table.slot_expert_WS
        rank_W, _ = np.nonzero(slot_WS >= 0)
        holds_EW = np.zeros((table.num_experts, table.world_size), dtype=np.float64)
        holds_EW[slot_WS[slot_WS >= 0], rank_W] = 1.0
        holds_EW = holds_EW[holds_EW.sum(1) > 1]
        if not holds_EW.size:
            return 0.0
        chunk_E = self.grad_bytes / holds_EW.sum(1)
        out_WW = (holds_EW * chunk_E[:, None]).T @ holds_EW
        bw = self.sync_bw or self.a2a_bw
        bw_inter = self.sync_bw or self.a2a_bw_inter or self.a2a_bw
        return 2.0 * self._level_time(out_WW, bw, bw_inter)

    def moves(self, old: PlacementTable, new: PlacementTable) -> list[Transfer]:
        """The slot copies the migration runs (``diff_placement``), with this model's node layout."""
        return list(diff_placement(old, new, self.ranks_per_node).transfers)

    def move_bytes_total(self, old: PlacementTable, new: PlacementTable) -> float:
        """Bytes crossing the network to turn ``old`` into ``new``."""
        return sum(self.move_bytes for m in self.moves(old, new) if m.is_remote)

    def move_time(self, old: PlacementTable, new: PlacementTable) -> float:
        """Seconds to fetch the new replicas: max over ranks of bytes sent or received / bandwidth."""
        W = old.world_size
        out_WW = np.zeros((W, W))
        for m in self.moves(old, new):
            out_WW[m.src[0], m.dst[0]] += self.move_bytes
        bw = self.move_bw or self.a2a_bw
        bw_inter = self.move_bw or self.a2a_bw_inter or self.a2a_bw
        return self._level_time(out_WW, bw, bw_inter)
