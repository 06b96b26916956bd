"""Bytes and modelled time of each adaptive method, from the layout's own exchange plans.

Legend: W ranks, E experts, Eg experts per group, m shard degree, r spread (0 = dp), D width,
F expert width, H = 2 (gated) or 1, b bytes per element.
Counted per rank and per training step (forward + backward), bytes a rank RECEIVES from other
ranks (what it sends to itself is not counted): parameter shards gathered in forward and their
gradients reduce-scattered in backward, (token, group) pairs dispatched and their partial sums
returned in forward, and their gradients the reverse ways in backward. The modelled time adds the slowest
rank's expert FLOPs at ``flops_per_s`` and the slowest rank's bytes at ``bytes_per_s`` (no
overlap); the layer itself chooses from measured times, not from this model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .shard_layout import DP, ShardLayout


@dataclasses.dataclass(frozen=True)
class MethodCost:
    """One method's per-step traffic and work, slowest rank (param / token bytes, FLOPs)."""

    code: int
    param_bytes: int
    token_bytes: int
    flops: float

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.token_bytes

    def modelled_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        return self.flops / flops_per_s + self.total_bytes / bytes_per_s


def method_cost(layout: ShardLayout, counts_WE: np.ndarray, pairs_WG: np.ndarray, code: int, d_model: int,
                top_k: int, elem_bytes: int) -> MethodCost:
    """Cost of method ``code`` when the ranks route ``counts_WE`` (token, expert) rows, which
    are ``pairs_WG`` (token, expert group) pairs (training step, slowest rank). A dispatched
    pair carries its token and K routing weights, and K int32 expert ids in a second exchange."""
    W, D, F, H = layout.world, d_model, layout.d_ff, layout.halves
    shard_elems = layout.experts_per_group * (H + 1) * (F // layout.shard_degree) * D
    gathered = len(layout.gather_members(0, code)) - 1
    param_bytes = 2 * gathered * shard_elems * elem_bytes
    per_row_flops = 3 * 2 * (H + 1) * D * F  # forward 2 (H+1) D F, backward twice that
    if code == DP:
        return MethodCost(code, param_bytes, 0, float(counts_WE.sum(axis=1).max()) * per_row_flops)
    token_bytes, rows = [], []
    for rank in range(W):
        splits = layout.dispatch(counts_WE, pairs_WG, rank, code)
        remote = np.arange(W) != rank
        # Forward: pairs in (token + K weights), sums back (D); backward: the same both ways.
        recv, sent = int(splits.recv_W[remote].sum()), int(splits.send_W[remote].sum())
        token_bytes.append((recv + sent) * (2 * D + top_k) * elem_bytes + recv * top_k * 4)
        rows.append(int(splits.rows_E.sum()))
    return MethodCost(code, param_bytes, max(token_bytes), max(rows) * per_row_flops / code)
