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
from .ops.activation import clamped_swiglu
from .ops._backend import fused_path
from .ops.expert_bias import add_expert_bias
from .ops.epilogue_experts import epilogue_ffn
from .ops.fused_experts import fused_expert_ffn
from .ops.grouped_gemm import WgradRows, record_wgrad_rows

if TYPE_CHECKING:
    from .plan import DispatchPlan


def expert_ffn(x_ND: torch.Tensor, gate_up_EHD: torch.Tensor, down_EDF: torch.Tensor, offsets_E: torch.Tensor,
               scale_N: torch.Tensor, activation: str, use_triton: bool, per_expert: bool = False,
               swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> torch.Tensor:
    """``scale[i] * FFN_e(x[i])`` with the given weights (whole experts or slices of their width:
    ``flexmoe.parallel`` runs it on gathered and sharded weights). Rows past ``offsets_E[-1]``
    give zeros; weights are cast to the rows' dtype. ``per_expert``: one GEMM per expert
    (``kernels="per_expert"``) instead of the grouped GEMM."""
    h_NH = grouped_mm(x_ND, gate_up_EHD.to(x_ND.dtype), offsets_E, per_expert)
    a_NF = scaled_activation(h_NH, scale_N, offsets_E[-1:], activation, use_triton, swiglu_alpha, swiglu_limit)
    return grouped_mm(a_NF, down_EDF.to(x_ND.dtype), offsets_E, per_expert)


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
        if config.expert_biases:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, hidden))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, config.d_model))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

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
        cfg = self.config
        per_expert = cfg.kernels == "per_expert"
        if cfg.kernels == "epilogue" and wgrad_rows is None:  # no biases, no clamp: the config checked
            dtype = x_ND.dtype
            return epilogue_ffn(x_ND, self.gate_up_proj.to(dtype), self.down_proj.to(dtype), offsets_E, scale_N,
                                cfg.activation)
        if self.gate_up_proj_bias is None and wgrad_rows is None:
            return expert_ffn(x_ND, self.gate_up_proj, self.down_proj, offsets_E, scale_N, cfg.activation,
                              use_triton, per_expert, cfg.swiglu_alpha, cfg.swiglu_limit)
        h_NH = grouped_mm(x_ND, self.gate_up_proj.to(x_ND.dtype), offsets_E, per_expert)
        if wgrad_rows is not None:
            h_NH = record_wgrad_rows(h_NH, x_ND, wgrad_rows, 0)
        if self.gate_up_proj_bias is not None:
            # Expert biases: row r belongs to the group whose offset first exceeds r.
            row_N = torch.arange(x_ND.shape[0], device=x_ND.device, dtype=offsets_E.dtype)
            row_expert_N = torch.searchsorted(offsets_E, row_N, right=True).clamp(max=self.num_experts - 1)
            h_NH = add_expert_bias(h_NH, self.gate_up_proj_bias, row_expert_N)
        a_NF = scaled_activation(h_NH, scale_N, offsets_E[-1:], cfg.activation, use_triton,
                                 cfg.swiglu_alpha, cfg.swiglu_limit)
        y_ND = grouped_mm(a_NF, self.down_proj.to(x_ND.dtype), offsets_E, per_expert)
        if wgrad_rows is not None:
            y_ND = record_wgrad_rows(y_ND, a_NF, wgrad_rows, 1)
        if self.gate_up_proj_bias is None:
            return y_ND
        y_ND = add_expert_bias(y_ND, self.down_proj_bias, row_expert_N, scale_N)
        valid_N1 = (row_N < offsets_E[-1:]).unsqueeze(-1)
        return torch.where(valid_N1, y_ND, torch.zeros((), dtype=y_ND.dtype, device=y_ND.device))

    def forward_tokens(self, x_TD: torch.Tensor, plan: DispatchPlan, grouped_backward: bool = False) -> torch.Tensor:
        """The whole expert stage in fused Triton kernels (``kernels="fused"``), token order in and out:
        ``y[t] = sum_k weight[t, k] * FFN_e(x[t])`` over the plan's kept pairs, gather and combine included.
        ``grouped_backward`` ("hybrid"): the backward in grouped GEMMs on re-gathered rows."""
        dtype = x_TD.dtype
        return fused_expert_ffn(
            x_TD, self.gate_up_proj.to(dtype), self.down_proj.to(dtype), plan.offsets_E, plan.row_token_N,
            plan.pair_row_TK, plan.row_weight_N, self.config.activation, grouped_backward,
        )

    def begin_forward(self) -> None:
        """Called first in every forward of the layer (the expert-parallel stage counts them)."""

    def run(self, x_TD: torch.Tensor, plan: "DispatchPlan", use_triton: bool) -> torch.Tensor:
        """The layer's expert stage: tokens in, ``sum_k weight * FFN_k(token)`` out (here every
        expert is local; ``flexmoe.parallel.ParallelExperts`` spreads them over ranks)."""
        cfg = self.config
        path = None  # "fused" / "hybrid": gather in the gate_up load, combine after the down GEMM
        if self.gate_up_proj_bias is None and cfg.activation != "swiglu_clamped":
            path = fused_path(cfg.kernels, x_TD, cfg.d_model, cfg.d_ff, self.num_experts, cfg.top_k)
        if path is not None:
            return self.forward_tokens(x_TD, plan, grouped_backward=path == "hybrid")
        x_ND = permute(x_TD, plan.row_token_N, plan.pair_row_TK, use_triton)
        y_ND = self(x_ND, plan.offsets_E, plan.row_weight_N, use_triton)
        return unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, use_triton)


class DenseFFN(nn.Module):
    """The shared experts: one dense FFN of width ``config.shared_width``."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        F_shared = config.shared_width
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
        elif self.config.activation == "swiglu_clamped":
            a_TF = clamped_swiglu(h_TH, self.config.swiglu_alpha, self.config.swiglu_limit)
        elif self.config.activation == "gelu":
            a_TF = nn.functional.gelu(h_TH)
        else:
            a_TF = nn.functional.relu(h_TH)
        y_TD = a_TF @ self.down_proj.t()
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD
