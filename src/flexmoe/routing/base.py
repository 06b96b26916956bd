"""What every router shares: the Routing result, the logits path, expert counts, the losses.

Legend: T tokens, D model width, E experts, K chosen experts per token.
A router returns a ``Routing``; entries with ``keep_TK == False`` are not dispatched
(capacity overflow, or a gate that selects fewer than K experts for a token). Every router
computes its logits with ``router_logits`` (router dtype, never autocast).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


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
    balance_expert_TK: the experts the balance loss counts when they differ from ``expert_TK``
        (``MoEConfig.aux_loss_experts="unbiased"`` under a balancing bias); None = ``expert_TK``.
    slot_TK: the global slot (``rank * slots_per_rank + slot``) each pair must be computed in,
        when device-limited routing picks among replicas (``flexmoe.routing.limits``); None =
        the dispatcher splits each expert's pairs over its replicas.
    """

    expert_TK: torch.Tensor
    weight_TK: torch.Tensor
    keep_TK: torch.Tensor | None
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    balance_loss: torch.Tensor | None = None
    balance_expert_TK: torch.Tensor | None = None
    slot_TK: torch.Tensor | None = None

    @property
    def counted_expert_TK(self) -> torch.Tensor:
        """The experts the balance loss counts."""
        return self.expert_TK if self.balance_expert_TK is None else self.balance_expert_TK

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
    counts_E = expert_counts(routing.counted_expert_TK, None, E).to(probs_TE.dtype)
    f_E = counts_E / routing.expert_TK.numel()
    p_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return E * torch.sum(f_E * p_TE.mean(0))


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    if routing.logits_TE.shape[0] == 0:
        return routing.logits_TE.sum() * 0.0
    return torch.logsumexp(routing.logits_TE, dim=-1).square().mean()

