"""Grouped expert feed-forward networks (SwiGLU, GELU, ReLU) in HuggingFace v5 layout.

Legend: N rows grouped by expert, E experts held here, D model width, F expert hidden width.
``gate_up_proj [E, 2F, D]`` (gate rows first, then up; ``[E, F, D]`` when not gated) and
``down_proj [E, D, F]``, so HF MoE weights load without a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import MoEConfig
from .ops import grouped_mm, permute, scaled_activation, unpermute_sum
from .ops.fused_experts import fused_expert_ffn
from .ops.grouped_gemm import WgradRows, record_wgrad_rows

if TYPE_CHECKING:
    from .plan import DispatchPlan


class GroupedExperts(nn.Module):
    """``num_experts`` FFNs applied to expert-grouped rows with two grouped GEMMs."""

    def __init__(self, config: MoEConfig, num_experts: int | None = None):
        super().__init__()
        self.config = config
        E = config.num_experts if num_experts is None else num_experts
        hidden = 2 * config.d_ff if config.is_gated else config.d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(E, hidden, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(E, config.d_model, config.d_ff))
        nn.init.normal_(self.gate_up_proj, std=config.init_std)
        nn.init.normal_(self.down_proj, std=config.init_std)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(
        self, x_ND: torch.Tensor, offsets_E: torch.Tensor, scale_N: torch.Tensor, use_triton: bool,
        wgrad_rows: WgradRows | None = None,
    ) -> torch.Tensor:
        """``y[i] = scale[i] * FFN_e(x[i])`` for the expert e whose group holds row i.

        Rows past ``offsets_E[-1]`` give zeros. Weights are cast to the rows' dtype (a no-op
        unless running under autocast with float32 parameters). ``wgrad_rows`` (2 entries)
        receives, in backward, each GEMM's input rows and output gradient (gate_up, then down),
        for callers that compute the weight gradients themselves (the chunked EP stage).
        """
        per_expert = self.config.kernels == "per_expert"
        h_NH = grouped_mm(x_ND, self.gate_up_proj.to(x_ND.dtype), offsets_E, per_expert)
        if wgrad_rows is not None:
            h_NH = record_wgrad_rows(h_NH, x_ND, wgrad_rows, 0)
        a_NF = scaled_activation(h_NH, scale_N, offsets_E[-1:], self.config.activation, use_triton)
        y_ND = grouped_mm(a_NF, self.down_proj.to(x_ND.dtype), offsets_E, per_expert)
        if wgrad_rows is not None:
            y_ND = record_wgrad_rows(y_ND, a_NF, wgrad_rows, 1)
        return y_ND

    def forward_tokens(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The whole expert stage in fused Triton kernels (``kernels="fused"``), token order in and out:
        ``y[t] = sum_k weight[t, k] * FFN_e(x[t])`` over the plan's kept pairs, gather and combine included."""
        dtype = x_TD.dtype
        return fused_expert_ffn(
            x_TD, self.gate_up_proj.to(dtype), self.down_proj.to(dtype), plan.offsets_E, plan.row_token_N,
            plan.pair_row_TK, plan.row_weight_N, self.config.activation,
        )

    def begin_forward(self) -> None:
        """Called first in every forward of the layer (the expert-parallel stage counts them)."""

    def run(self, x_TD: torch.Tensor, plan: "DispatchPlan", use_triton: bool) -> torch.Tensor:
        """The layer's expert stage: tokens in, ``sum_k weight * FFN_k(token)`` out (here every
        expert is local; ``flexmoe.parallel.ParallelExperts`` spreads them over ranks)."""
        if self.config.kernels == "fused":  # gather in the gate_up load, combine after the down GEMM
            return self.forward_tokens(x_TD, plan)
        x_ND = permute(x_TD, plan.row_token_N, plan.pair_row_TK, use_triton)
        y_ND = self(x_ND, plan.offsets_E, plan.row_weight_N, use_triton)
        return unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, use_triton)


class DenseFFN(nn.Module):
    """The shared experts: one dense FFN of width ``num_shared_experts * d_ff``."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        F_shared = config.num_shared_experts * config.d_ff
        hidden = 2 * F_shared if config.is_gated else F_shared
        self.gate_up_proj = nn.Parameter(torch.empty(hidden, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(config.d_model, F_shared))
        self.gate = nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None
        nn.init.normal_(self.gate_up_proj, std=config.init_std)
        nn.init.normal_(self.down_proj, std=config.init_std)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=config.init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TH = x_TD @ self.gate_up_proj.t()
        if self.config.activation == "swiglu":
            gate_TF, up_TF = h_TH.chunk(2, dim=-1)
            a_TF = nn.functional.silu(gate_TF) * up_TF
        elif self.config.activation == "gelu":
            a_TF = nn.functional.gelu(h_TH)
        else:
            a_TF = nn.functional.relu(h_TH)
        y_TD = a_TF @ self.down_proj.t()
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD
