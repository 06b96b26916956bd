"""The flexmoe experts forward for HuggingFace experts modules.

Legend: T tokens, K experts per token, E experts, D model width, F expert hidden width,
H = 2F (gated) or F, N = T*K grouped rows.
HF's router has already chosen ``top_k_index [T, K]`` and ``top_k_weights [T, K]``; this runs
flexmoe's dispatch plan, permute, grouped GEMMs and un-permute + sum on the module's own weights.
The routing weight is folded into the activation (as in ``flexmoe.MoELayer``); a down-projection
bias is weighted separately, as ``(sum_k w_tk * onehot(e_tk)) @ bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops import grouped_mm, permute, scaled_activation, unpermute_sum
from ...ops.expert_bias import add_expert_bias
from ...ops._backend import use_triton as resolve_use_triton
from ...plan import DispatchPlan, make_dispatch_plan
from .layout import ExpertsLayout, experts_layout

_KERNELS = ("auto", "triton", "torch")


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    kernels: str = "auto",
) -> torch.Tensor:
    """``y[t] = sum_k top_k_weights[t, k] * expert_{top_k_index[t, k]}(x[t])`` with flexmoe's data path.

    Same contract as HF's experts forward: ``hidden_states`` is ``[..., D]`` with the leading dims
    flattening to T tokens; the output has the shape and dtype of ``hidden_states``.
    ``kernels``: "auto" (Triton on CUDA), "triton" or "torch", as ``MoEConfig.kernels``.
    """
    if kernels not in _KERNELS:
        raise ValueError(f"kernels must be one of {_KERNELS}, got {kernels!r}")
    layout = experts_layout(module)
    x_TD = hidden_states.reshape(-1, hidden_states.shape[-1]).to(layout.dtype)
    T, K = x_TD.shape[0], top_k_index.shape[-1]
    if top_k_index.numel() != T * K or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"{layout.block}: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
            f"{tuple(top_k_weights.shape)} must both be [tokens={T}, k]"
        )
    expert_TK = top_k_index.reshape(T, K).long()
    weight_TK = top_k_weights.reshape(T, K)
    keep_TK = expert_TK < layout.num_experts if layout.sentinels else None
    use_triton = resolve_use_triton(kernels, x_TD.device)

    plan = make_dispatch_plan(expert_TK, weight_TK, keep_TK, layout.num_experts)
    x_ND = permute(x_TD, plan.row_token_N, plan.pair_row_TK, use_triton)
    y_ND = _expert_rows(layout, x_ND, plan, expert_TK, use_triton)
    y_TD = unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, use_triton)
    if layout.down_bias_ED is not None and layout.post_norm is None:
        y_TD = y_TD + _weighted_bias(layout, expert_TK, weight_TK, keep_TK)
    return y_TD.view(hidden_states.shape).to(hidden_states.dtype)


def _expert_rows(
    layout: ExpertsLayout, x_ND: torch.Tensor, plan: DispatchPlan, expert_TK: torch.Tensor, use_triton: bool
) -> torch.Tensor:
    """Weighted expert outputs for the grouped rows (zeros past the kept rows)."""
    offsets_E = plan.offsets_E
    valid_1 = offsets_E[-1:]
    row_expert_N = None
    if layout.up_bias_EH is not None or layout.post_norm is not None:
        row_expert_N = expert_TK.reshape(-1)[plan.row_pair_N].clamp(max=layout.num_experts - 1)

    h_NH = grouped_mm(x_ND, layout.up_EHD, offsets_E)
    if layout.gate_EFD is not None:
        h_NH = torch.cat([grouped_mm(x_ND, layout.gate_EFD, offsets_E), h_NH], dim=-1)
    if layout.up_bias_EH is not None:
        h_NH = add_expert_bias(h_NH, layout.up_bias_EH, row_expert_N)

    fold = layout.post_norm is None
    scale_N = plan.row_weight_N if fold else torch.ones_like(plan.row_weight_N)
    if layout.act_fn is None:
        a_NF = scaled_activation(h_NH, scale_N, valid_1, "swiglu", use_triton)
    else:
        a_NF = (layout.act_fn(h_NH) * scale_N.unsqueeze(-1)).to(h_NH.dtype)
        if layout.sentinels:
            a_NF = _zero_rows_past(a_NF, valid_1)
    y_ND = grouped_mm(a_NF, layout.down_EDF, offsets_E)
    if fold:
        return y_ND

    if layout.down_bias_ED is not None:
        y_ND = add_expert_bias(y_ND, layout.down_bias_ED, row_expert_N)
    y_ND = (layout.post_norm(y_ND) * plan.row_weight_N.unsqueeze(-1)).to(a_NF.dtype)
    return _zero_rows_past(y_ND, valid_1) if layout.sentinels else y_ND


def _zero_rows_past(rows_NX: torch.Tensor, valid_1: torch.Tensor) -> torch.Tensor:
    """Zero the rows at or past ``valid_1[0]`` (not written by the grouped GEMM)."""
    keep_N1 = (torch.arange(rows_NX.shape[0], device=rows_NX.device) < valid_1).unsqueeze(-1)
    return torch.where(keep_N1, rows_NX, torch.zeros((), dtype=rows_NX.dtype, device=rows_NX.device))


def _weighted_bias(layout: ExpertsLayout, expert_TK, weight_TK, keep_TK) -> torch.Tensor:
    """``sum_k w[t, k] * down_bias[e[t, k]]`` as one small matmul (deterministic, no atomics)."""
    bias_ED = layout.down_bias_ED
    E = layout.num_experts
    w_TK = weight_TK.to(bias_ED.dtype)
    if keep_TK is not None:
        w_TK = torch.where(keep_TK, w_TK, torch.zeros((), dtype=w_TK.dtype, device=w_TK.device))
    coef_TE = w_TK.new_zeros((expert_TK.shape[0], E)).scatter_add(1, expert_TK.clamp(max=E - 1), w_TK)
    return coef_TE @ bias_ED
