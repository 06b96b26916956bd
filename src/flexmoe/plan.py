"""DispatchPlan: where every (token, slot) pair goes once tokens are grouped by expert.

Legend: T tokens, K slots per token, N = T*K rows of the grouped buffer, E experts.
One histogram and one stable sort; no host synchronisation.
Rows of dropped pairs sit after all kept rows (``row_token_N == -1`` there).
"""

from __future__ import annotations

import dataclasses

import torch

from .routing.base import count_keys, expert_keys



@dataclasses.dataclass
class DispatchPlan:
    """Index maps between token order and expert-grouped order.

    counts_E: rows per expert (int64). offsets_E: cumulative counts (int32, grouped-GEMM offsets).
    row_token_N: source token of each grouped row, -1 for dropped rows.
    pair_row_TK: grouped row of each (token, slot) pair, -1 when dropped.
    row_weight_N: combine weight of each grouped row (differentiable, router dtype).
    row_pair_N: flat (token * K + slot) index of each grouped row.
    """

    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    row_token_N: torch.Tensor
    pair_row_TK: torch.Tensor
    row_weight_N: torch.Tensor
    row_pair_N: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.row_token_N.shape[0]


def make_dispatch_plan(
    expert_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int
) -> DispatchPlan:
    """Group the (token, slot) pairs by expert; pairs with ``keep_TK == False`` are not dispatched."""
    E = num_experts
    T, K = expert_TK.shape
    device = expert_TK.device
    key_N = expert_keys(expert_TK, keep_TK, E)
    sorted_key_N, row_pair_N = torch.sort(key_N, stable=True)
    counts_E = count_keys(key_N, E)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    row_token_N = torch.where(sorted_key_N < E, row_pair_N // K, -1)
    pair_row_N = torch.empty_like(row_pair_N)
    pair_row_N[row_pair_N] = torch.arange(T * K, device=device)
    if keep_TK is not None:
        pair_row_N = torch.where(keep_TK.reshape(-1), pair_row_N, -1)
    row_weight_N = weight_TK.reshape(-1).gather(0, row_pair_N)
    return DispatchPlan(counts_E, offsets_E, row_token_N, pair_row_N.view(T, K), row_weight_N, row_pair_N)
