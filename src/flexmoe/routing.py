"""Routers: pick experts per token, their combine weights, and the router losses.

Legend: T tokens, D model width, E experts, K chosen experts per token.
A router returns a ``Routing``; entries with ``keep_TK == False`` are not dispatched
(capacity overflow, or a gate that selects fewer than K experts for a token).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig


@dataclasses.dataclass
class Routing:
    """What the router decided for T tokens.

    expert_TK: chosen expert per (token, slot), int64.
    weight_TK: combine weight per (token, slot), in the router dtype (differentiable).
    keep_TK: which pairs are dispatched; None means all of them.
    probs_TE: router probabilities (for losses and statistics).
    logits_TE: router logits.
    balance_loss: a router-specific load-balancing loss (unweighted) that replaces the
        Switch-Transformer loss in ``load_balancing_loss``; None for the top-k routers.
    """

    expert_TK: torch.Tensor
    weight_TK: torch.Tensor
    keep_TK: torch.Tensor | None
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    balance_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]


class _LowPrecisionLogits(torch.autograd.Function):
    """bf16/fp16 operands, float32 logits from one tensor-core GEMM (no float32 copies of x).

    The backward rounds the logit gradient to the operand dtype, as a bf16 router would.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_ED):
        ctx.save_for_backward(x_TD, weight_ED)
        return torch.mm(x_TD, weight_ED.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, weight_ED = ctx.saved_tensors
        grad_TE = grad_TE.to(x_TD.dtype)
        return grad_TE @ weight_ED, grad_TE.t() @ x_TD


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, router_dtype: torch.dtype) -> torch.Tensor:
    """Logits in ``router_dtype`` (or the input's dtype when that is more precise), never autocast.

    bf16/fp16 inputs on CUDA with a float32 router use one tensor-core GEMM with a float32 output
    (float32 parameters are first cast to the input's dtype, as autocast would).
    """
    dtype = torch.promote_types(router_dtype, x_TD.dtype)
    with torch.autocast(x_TD.device.type, enabled=False):
        if x_TD.is_cuda and dtype == torch.float32 and x_TD.dtype in (torch.bfloat16, torch.float16):
            return _LowPrecisionLogits.apply(x_TD, weight_ED.to(x_TD.dtype))
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype))


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


def expert_keys(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Flat expert index per (token, slot) pair; ``num_experts`` for pairs that are not dispatched."""
    key_N = expert_TK.reshape(-1)
    if keep_TK is not None:
        key_N = torch.where(keep_TK.reshape(-1), key_N, num_experts)
    return key_N


def count_keys(key_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert (int64) from ``expert_keys``, without a host synchronisation."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_N.device)
    counts.scatter_add_(0, key_N, torch.ones_like(key_N))
    return counts[:num_experts]


def expert_counts(expert_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """Dispatched pairs per expert, int64, without a host synchronisation."""
    return count_keys(expert_keys(expert_TK, keep_TK, num_experts), num_experts)


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


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch-Transformer loss ``E * sum_e f_e * P_e``.

    f_e: fraction of chosen (token, slot) pairs that picked expert e (before capacity drops);
    P_e: mean router probability of e (sigmoid scores are normalised per token first).
    A router that defines its own balance loss (the DTS gate) sets ``routing.balance_loss``.
    """
    if routing.balance_loss is not None:
        return routing.balance_loss
    E = routing.num_experts
    probs_TE = routing.probs_TE
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    counts_E = expert_counts(routing.expert_TK, None, E).to(probs_TE.dtype)
    f_E = counts_E / routing.expert_TK.numel()
    p_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return E * torch.sum(f_E * p_TE.mean(0))


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    if routing.logits_TE.shape[0] == 0:
        return routing.logits_TE.sum() * 0.0
    return torch.logsumexp(routing.logits_TE, dim=-1).square().mean()


def make_router(config: MoEConfig) -> nn.Module:
    """The router module for ``config.router``."""
    if config.router == "dts":
        from .routing_dts import DTSRouter

        return DTSRouter(config)
    return TopKRouter(config)
