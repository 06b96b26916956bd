"""The fused expert stage as torch custom ops: token rows in, combined token rows out.

Legend: T tokens, K slots, N grouped rows, E experts, D model width, F expert hidden width,
H = 2F (gated) or F.
Forward: gate_up GEMM on gathered rows with ``act * scale`` in its epilogue, down GEMM, combine
(un-permute + sum). Backward: down dgrad on the gathered output gradient with the activation
backward in its epilogue, the two weight gradients (balanced over row blocks), the input dgrad
and its combine. Neither ``x_ND`` nor a permuted output gradient is ever written.
``grouped_backward`` (the "hybrid" path) keeps the fused gate_up (the down GEMM, which fuses
nothing, runs as a grouped GEMM where ``torch._grouped_mm`` is fast) but runs the backward as the
unfused path does (the fused backward GEMMs measured slower on an H200, docs/kernels.md): the
output gradient and ``x`` are gathered into grouped rows and every backward GEMM is a grouped GEMM
(``torch._grouped_mm`` on sm90 bf16); ``x_ND`` is still not kept between the passes.
Both passes are ``torch.library`` custom ops with fake implementations, so
``torch.compile(fullgraph=True)`` captures them. They need Triton (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from ._backend import fused_gemm, triton_kernels
from .activation import scaled_activation_backward
from .grouped_gemm import grouped_mm, grouped_mm_wgrad, has_fast_grouped_mm


@torch.library.custom_op("flexmoe::fused_experts", mutates_args=())
def fused_experts(
    x_TD: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor,
    row_token_N: torch.Tensor, pair_row_TK: torch.Tensor, scale_N: torch.Tensor, activation: str,
    grouped_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_TD, h_NH, a_NF)``: the combined expert output and the two activations backward needs."""
    k = fused_gemm()
    schedule = k.Schedule(offsets_E, row_token_N.shape[0])
    h_NH, a_NF = k.gate_up(x_TD, row_token_N, w_EHD, scale_N, schedule, activation)
    if grouped_backward and has_fast_grouped_mm(a_NF, w_EDF):  # "hybrid": the down GEMM fuses nothing
        y_ND = grouped_mm(a_NF, w_EDF, offsets_E)
    else:
        y_ND = k.expert_mm(a_NF, w_EDF, True, schedule)
    return triton_kernels().gather_sum(y_ND, pair_row_TK), h_NH, a_NF


@torch.library.custom_op("flexmoe::fused_experts_backward", mutates_args=())
def fused_experts_backward(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor,
    row_token_N: torch.Tensor, pair_row_TK: torch.Tensor, scale_N: torch.Tensor, h_NH: torch.Tensor,
    a_NF: torch.Tensor, activation: str, grouped_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx_TD, dw_EHD, dw_EDF, dscale_N)``."""
    if grouped_backward:
        return _grouped_backward(dy_TD, x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, h_NH, a_NF,
                                 activation)
    E = w_EHD.shape[0]
    k = fused_gemm()
    schedule = k.Schedule(offsets_E, row_token_N.shape[0])
    dh_NH, dscale_N = k.down_dgrad(dy_TD, row_token_N, w_EDF, h_NH, scale_N, schedule, activation)
    dw_EDF = k.expert_wgrad(dy_TD, row_token_N, a_NF, None, E, schedule)
    dw_EHD = k.expert_wgrad(dh_NH, None, x_TD, row_token_N, E, schedule)
    dx_ND = k.expert_mm(dh_NH, w_EHD, False, schedule)
    return triton_kernels().gather_sum(dx_ND, pair_row_TK), dw_EHD, dw_EDF, dscale_N


def _grouped_backward(dy_TD, x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, h_NH, a_NF, activation):
    """The backward of the hybrid path: gathered rows and grouped GEMMs (see the module docstring)."""
    t = triton_kernels()
    dy_ND = t.gather_rows(dy_TD, row_token_N)
    da_NF = grouped_mm(dy_ND, w_EDF.transpose(1, 2), offsets_E)
    dh_NH, dscale_N = scaled_activation_backward(h_NH, scale_N, offsets_E[-1:], da_NF, activation, True)
    dw_EDF = grouped_mm_wgrad(dy_ND, a_NF, offsets_E)
    dw_EHD = grouped_mm_wgrad(dh_NH, t.gather_rows(x_TD, row_token_N), offsets_E)
    dx_ND = grouped_mm(dh_NH, w_EHD.transpose(1, 2), offsets_E)
    return t.gather_sum(dx_ND, pair_row_TK), dw_EHD, dw_EDF, dscale_N


@fused_experts.register_fake
def _(x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, activation, grouped_backward):
    N, H = row_token_N.shape[0], w_EHD.shape[1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty((N, H)), x_TD.new_empty((N, w_EDF.shape[2]))


@fused_experts_backward.register_fake
def _(dy_TD, x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, h_NH, a_NF, activation,
      grouped_backward):
    return torch.empty_like(x_TD), torch.empty_like(w_EHD), torch.empty_like(w_EDF), torch.empty_like(scale_N)


def _setup(ctx, inputs, output):
    *tensors, activation, grouped_backward = inputs
    _, h_NH, a_NF = output
    ctx.mark_non_differentiable(h_NH, a_NF)
    ctx.save_for_backward(*tensors, h_NH, a_NF)
    ctx.activation = activation
    ctx.grouped_backward = grouped_backward


def _backward(ctx, dy_TD, _dh, _da):
    x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, h_NH, a_NF = ctx.saved_tensors
    dx_TD, dw_EHD, dw_EDF, dscale_N = fused_experts_backward(
        dy_TD.contiguous(), x_TD, w_EHD, w_EDF, offsets_E, row_token_N, pair_row_TK, scale_N, h_NH, a_NF,
        ctx.activation, ctx.grouped_backward,
    )
    return dx_TD, dw_EHD, dw_EDF, None, None, None, dscale_N, None, None


fused_experts.register_autograd(_backward, setup_context=_setup)


def fused_expert_ffn(
    x_TD: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor,
    row_token_N: torch.Tensor, pair_row_TK: torch.Tensor, scale_N: torch.Tensor, activation: str,
    grouped_backward: bool = False,
) -> torch.Tensor:
    """``y[t] = sum_k scale * FFN_e(x[t])`` over the kept (token, slot) pairs, in fused kernels
    (the backward in grouped GEMMs with ``grouped_backward``)."""
    y_TD, _, _ = fused_experts(
        x_TD.contiguous(), w_EHD.contiguous(), w_EDF.contiguous(), offsets_E, row_token_N, pair_row_TK,
        scale_N.contiguous(), activation, grouped_backward,
    )
    return y_TD
