"""The top-k router: softmax or sigmoid scores, top-k selection, optional capacity.

Legend: T tokens, D model width, E experts, K chosen experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from .base import Routing, expert_counts, router_logits


class TopKRouter(nn.Module):
    """Softmax or sigmoid scores, top-k on score + balancing bias, optional renormalisation.

    The bias (DeepSeek-V3 auxiliary-loss-free balancing) only changes which experts are chosen,
    never the combine weights. The layer hands each training forward's dispatched counts to
    ``record_load``; they accumulate in ``pending_load_E`` until ``update_bias()`` consumes them.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer(
            "pending_load_E", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False
        )
        nn.init.normal_(self.weight, std=config.init_std)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        logits_TE = router_logits(x_TD, self.weight, cfg.router_dtype)
        if cfg.router == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            probs_TE = torch.sigmoid(logits_TE)
        with torch.no_grad():
            select_TE = probs_TE + self.expert_bias.to(probs_TE.dtype) if cfg.bias_update_rate else probs_TE
            expert_TK = torch.topk(select_TE, cfg.top_k, dim=-1, sorted=False).indices
        score_TK = probs_TE.gather(-1, expert_TK)
        weight_TK = score_TK
        if cfg.norm_topk_prob:
            weight_TK = score_TK / score_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        keep_TK = None
        capacity = cfg.capacity(x_TD.shape[0])
        if capacity is not None and capacity < x_TD.shape[0] * cfg.top_k:
            keep_TK = capacity_keep_mask(expert_TK, score_TK.detach(), cfg.num_experts, capacity)
        return Routing(expert_TK, weight_TK, keep_TK, probs_TE, logits_TE)

    @torch.no_grad()
    def record_load(self, counts_E: torch.Tensor) -> None:
        """Add one training forward's dispatched tokens per expert to the pending loads."""
        if self.training and self.config.bias_update_rate:
            self.pending_load_E += counts_E.to(torch.float32)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """Move the bias toward under-used experts: ``bias += rate * sign(mean(load) - load)``.

        ``load_E`` defaults to the loads accumulated since the last call (sum them over
        data-parallel ranks first when training on several).
        """
        rate = self.config.bias_update_rate
        load_E = self.pending_load_E if load_E is None else load_E.to(self.pending_load_E)
        if rate and load_E.sum() > 0:
            self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
        self.pending_load_E.zero_()


def capacity_keep_mask(
    expert_TK: torch.Tensor, score_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Keep at most ``capacity`` pairs per expert, the highest-scoring ones.

    Ties keep the pair that comes first in (token, slot) order.
    """
    expert_N = expert_TK.reshape(-1)
    by_score_N = torch.sort(-score_TK.reshape(-1), stable=True).indices
    by_expert = torch.sort(expert_N[by_score_N], stable=True)
    order_N = by_score_N[by_expert.indices]
    counts_E = expert_counts(expert_TK, None, num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(expert_N.numel(), device=expert_N.device) - start_E[by_expert.values]
    keep_N = torch.empty_like(expert_N, dtype=torch.bool)
    keep_N[order_N] = rank_N < capacity
    return keep_N.view_as(expert_TK)
