"""The top-k router: softmax or sigmoid scores, top-k selection, optional capacity.

Legend: T tokens, D model width, E experts, K chosen experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from .base import Routing, expert_counts, router_logits
from .limits import DeviceLimits, GroupMap, limit_to_groups, pick_replicas


class TopKRouter(nn.Module):
    """Softmax or sigmoid scores, top-k on score + balancing bias, optional renormalisation.

    The bias (DeepSeek-V3 auxiliary-loss-free balancing) only changes which experts are chosen,
    never the combine weights. The layer hands each training forward's dispatched counts to
    ``record_load``; they accumulate in ``pending_load_E`` until ``update_bias()`` consumes them.
    Both stay float32 whatever the module's dtype (``.bfloat16()`` leaves them alone), as
    Megatron keeps them: bf16 would lose small updates and exact counts.
    The bias is applied when ``bias_update_rate > 0`` or once a nonzero bias was loaded with
    ``load_state_dict`` (or set by ``set_expert_bias``); a rate of 0 then means a frozen bias.
    """

    _FLOAT32_BUFFERS = ("expert_bias", "pending_load_E")

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.register_buffer(
            "pending_load_E", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False
        )
        self._bias_loaded = False
        self.groups = GroupMap.contiguous(config.num_experts, config.num_groups) if config.limits_groups else None
        self.device_limits: DeviceLimits | None = None
        nn.init.normal_(self.weight, std=config.init_std)

    @property
    def applies_bias(self) -> bool:
        return bool(self.config.bias_update_rate) or self._bias_loaded

    def set_expert_bias(self, bias_E: torch.Tensor) -> None:
        """Set the balancing bias (applied from now on, whatever ``bias_update_rate``)."""
        with torch.no_grad():
            self.expert_bias.copy_(bias_E)
        self._bias_loaded = True

    def set_device_limits(self, limits: DeviceLimits) -> None:
        """Node / rank groups and how many of each a token may use (set by the layer under EP)."""
        self.device_limits = limits.to(self.weight.device)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        if cfg.router_jitter and self.training:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        logits_TE = router_logits(x_TD, self.weight, cfg.router_dtype)
        if self.bias is not None:
            logits_TE = logits_TE + self.bias.to(logits_TE.dtype)
        if cfg.router == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            probs_TE = torch.sigmoid(logits_TE)
        with torch.no_grad():
            select_TE = probs_TE + self.expert_bias.to(probs_TE.dtype) if self.applies_bias else probs_TE
            expert_TK, rank_TW = self._top_k(select_TE)
            balance_TK = slot_TK = None
            if cfg.aux_loss_experts == "unbiased" and self.applies_bias:
                balance_TK = self._top_k(probs_TE)[0]
            limits = self.device_limits
            if limits is not None and limits.slot_WE is not None:
                slot_TK = pick_replicas(expert_TK, rank_TW, limits.slot_WE, limits.rank)
        score_TK = probs_TE.gather(-1, expert_TK)
        weight_TK = self._combine_weights(score_TK)
        keep_TK = self._capacity_mask(expert_TK, score_TK, weight_TK)
        return Routing(expert_TK, weight_TK, keep_TK, probs_TE, logits_TE, balance_expert_TK=balance_TK,
                       slot_TK=slot_TK)

    def _combine_weights(self, score_TK: torch.Tensor) -> torch.Tensor:
        """Chosen scores, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``."""
        cfg = self.config
        weight_TK = score_TK
        if cfg.norm_topk_prob:
            weight_TK = score_TK / score_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return weight_TK

    def _capacity_mask(self, expert_TK, score_TK, weight_TK) -> torch.Tensor | None:
        """Which pairs fit in the experts' capacity (None: all of them), by ``capacity_priority``."""
        cfg = self.config
        T = expert_TK.shape[0]
        capacity = cfg.capacity(T)
        if capacity is None or capacity >= T * cfg.top_k:
            return None
        priority_TK = {"prob": score_TK, "weight": weight_TK, "position": None}[cfg.capacity_priority]
        priority_TK = None if priority_TK is None else priority_TK.detach()
        return capacity_keep_mask(expert_TK, priority_TK, cfg.num_experts, capacity)

    def _top_k(self, select_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The k best experts per token inside the allowed groups, nodes and ranks, and the ranks
        each token may send to (None without device limits)."""
        cfg = self.config
        if self.groups is not None:
            select_TE = limit_to_groups(select_TE, self.groups, cfg.top_groups, cfg.group_score_experts)
        allowed_TW = None
        if self.device_limits is not None:
            select_TE, allowed_TW = self.device_limits.limit(select_TE, cfg.group_score_experts)
        return torch.topk(select_TE, cfg.top_k, dim=-1, sorted=False).indices, allowed_TW

    def _apply(self, fn, recurse=True):
        """Module dtype casts leave the float32 router state alone (device moves still apply), and
        the group maps (plain tensors, not buffers) follow the router's device."""
        kept = {name: self._buffers[name] for name in self._FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(new.device)
        device = self.weight.device
        if self.groups is not None:
            self.groups = self.groups.to(device)
        if self.device_limits is not None:
            self.device_limits = self.device_limits.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        loaded = state_dict.get(prefix + "expert_bias")
        if loaded is not None and bool((loaded != 0).any()):
            self._bias_loaded = True

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
        if rate:  # no loads recorded: no move; decided on the device (no host synchronisation)
            step_E = rate * torch.sign(load_E.mean() - load_E)
            self.expert_bias += torch.where(load_E.sum() > 0, step_E, torch.zeros_like(step_E))
        self.pending_load_E.zero_()


def capacity_keep_mask(
    expert_TK: torch.Tensor, score_TK: torch.Tensor | None, num_experts: int, capacity: int
) -> torch.Tensor:
    """Keep at most ``capacity`` pairs per expert, the highest-scoring ones.

    Ties, and every pair when ``score_TK`` is None (drop by position), keep the pair that comes
    first in (token, slot) order.
    """
    expert_N = expert_TK.reshape(-1)
    if score_TK is None:
        by_score_N = torch.arange(expert_N.numel(), device=expert_N.device)
    else:
        by_score_N = torch.sort(-score_TK.reshape(-1), stable=True).indices
    by_expert = torch.sort(expert_N[by_score_N], stable=True)
    order_N = by_score_N[by_expert.indices]
    counts_E = expert_counts(expert_TK, None, num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(expert_N.numel(), device=expert_N.device) - start_E[by_expert.values]
    keep_N = torch.empty_like(expert_N, dtype=torch.bool)
    keep_N[order_N] = rank_N < capacity
    return keep_N.view_as(expert_TK)
