"""The EvoMoE dense-to-sparse (DTS) gate: start dense, anneal to sparse top-k.

Legend: T tokens, D model width, E experts, K dispatched slots per token.

Dense phase (gate step < ``dts.dense_steps``):
    g_TE = softmax((x W_g + gumbel_TE) / tau), Gumbel noise only in training mode, drawn from
    torch's default generator (so restoring the RNG state replays it exactly);
    a token goes to every expert with g_te > threshold, and always to its argmax;
    K = E with ``keep_TK`` masking the unselected pairs, so only selected pairs are dispatched.
Sparse phase: plain top-k (``dts.top_k``, default ``MoEConfig.top_k``) on softmax(x W_g).

Combine weights in both phases: the noise-free softmax p_TE = softmax(x W_g) on the selected
experts, renormalised to sum to one per token when ``MoEConfig.norm_topk_prob`` (the default).
Balance loss: E * sum_e mean_t(p_te) * mean_t(mask_te), mask_te = 1 where t goes to e; it is
weighted by ``MoEConfig.aux_loss_coef`` (with top-k selection it equals K times the Switch loss).

The gate step lives in a persistent buffer (saved with the model); advance it with
``flexmoe.set_gate_step(model, step)`` before each training forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import DTSGateConfig, MoEConfig
from .base import Routing, router_logits


def gate_temperature(dts: DTSGateConfig, step: int) -> float:
    """tau at gate ``step``: tau_max at 0, tau_min from ``anneal_steps`` on."""
    frac = min(max(step, 0) / dts.anneal_steps, 1.0)
    if dts.schedule == "linear":
        return dts.tau_max + (dts.tau_min - dts.tau_max) * frac
    return dts.tau_max * math.exp(frac * math.log(dts.tau_min / dts.tau_max))


def gate_temperature_tensor(dts: DTSGateConfig, step: torch.Tensor) -> torch.Tensor:
    """``gate_temperature`` computed on the device from a step tensor (float64, no host sync,
    so ``torch.compile`` does not recompile as tau changes)."""
    frac = (step.to(torch.float64) / dts.anneal_steps).clamp(0.0, 1.0)
    if dts.schedule == "linear":
        return dts.tau_max + (dts.tau_min - dts.tau_max) * frac
    return dts.tau_max * torch.exp(frac * math.log(dts.tau_min / dts.tau_max))


def gumbel_noise(like_TE: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples ``-log(Exp(1))`` shaped and typed like ``like_TE``."""
    exp_TE = torch.empty_like(like_TE).exponential_()
    return -exp_TE.clamp_min_(torch.finfo(exp_TE.dtype).tiny).log()


def dts_balance_loss(probs_TE: torch.Tensor, mask_TE: torch.Tensor) -> torch.Tensor:
    """``E * sum_e mean_t(probs_te) * mean_t(mask_te)``; the mask carries no gradient."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    return E * torch.sum(probs_TE.mean(0) * mask_TE.to(probs_TE.dtype).mean(0))


class DTSRouter(nn.Module):
    """Dense-to-sparse gate with a persistent gate step; see the module docstring."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        if config.router != "dts":
            raise ValueError(f"DTSRouter needs MoEConfig.router='dts', got {config.router!r}")
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.register_buffer("gate_step", torch.zeros((), dtype=torch.int64))
        self._step = 0
        self._sparse = config.dts.dense_steps == 0  # a bool, so torch.compile keeps two graphs at most
        nn.init.normal_(self.weight, std=config.init_std)

    @property
    def step(self) -> int:
        return self._step

    def set_step(self, step: int) -> None:
        """Set the gate step (the number of optimizer steps taken so far)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"gate step must be an int >= 0, got {step!r}")
        self._step = step
        self._sparse = step >= self.config.dts.dense_steps
        self.gate_step.fill_(step)

    @property
    def is_sparse(self) -> bool:
        return self._sparse

    @property
    def tau(self) -> float:
        return gate_temperature(self.config.dts, self._step)

    @property
    def sparse_top_k(self) -> int:
        return self.config.dts.top_k or self.config.top_k

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        logits_TE = router_logits(x_TD, self.weight, cfg.router_dtype)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.is_sparse:
            expert_TK = torch.topk(probs_TE.detach(), self.sparse_top_k, dim=-1, sorted=False).indices
            weight_TK = probs_TE.gather(-1, expert_TK)
            keep_TK = None
            mask_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(-1, expert_TK, True)
        else:
            mask_TE = self._dense_selection(logits_TE.detach())
            expert_TK = torch.arange(cfg.num_experts, device=x_TD.device).expand_as(mask_TE)
            weight_TK = probs_TE * mask_TE
            keep_TK = mask_TE
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        balance = dts_balance_loss(probs_TE, mask_TE) if cfg.aux_loss_coef else None
        return Routing(expert_TK, weight_TK, keep_TK, probs_TE, logits_TE, balance)

    def _dense_selection(self, logits_TE: torch.Tensor) -> torch.Tensor:
        z_TE = logits_TE + gumbel_noise(logits_TE) if self.training else logits_TE
        tau = gate_temperature_tensor(self.config.dts, self.gate_step).to(z_TE.dtype)
        g_TE = torch.softmax(z_TE / tau, dim=-1)
        mask_TE = g_TE > self.config.dts.threshold
        return mask_TE.scatter_(-1, g_TE.argmax(-1, keepdim=True), True)

    def record_load(self, counts_E: torch.Tensor) -> None:
        """The DTS gate has no balancing bias, so loads are not kept."""

    def update_bias(self, load_E: torch.Tensor | None = None) -> None:
        """No balancing bias here (``flexmoe.update_router_bias`` may still be called)."""

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._step = int(self.gate_step)
        self._sparse = self._step >= self.config.dts.dense_steps

    def extra_repr(self) -> str:
        phase = "sparse" if self.is_sparse else f"dense tau={self.tau:.4g}"
        return f"experts={self.config.num_experts}, step={self._step}, {phase}"


def set_gate_step(model: nn.Module, step: int) -> None:
    """Set the gate step of every DTS gate in ``model``; call it with the optimizer step count
    before each training forward (the training loop of ``flexmoe train`` does)."""
    for module in model.modules():
        if isinstance(module, DTSRouter):
            module.set_step(step)
