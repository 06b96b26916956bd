"""The expert FFN on grouped rows with the activation in the GEMM epilogues (``kernels="epilogue"``).

Legend: N rows grouped by expert, E experts, D model width, F expert hidden width, H = 2F (gated)
or F.
The unfused path runs each gate_up GEMM and down dgrad as a grouped GEMM and then a memory-bound
kernel that re-reads what the GEMM just wrote (the activation forward reads ``h``, its backward
``h`` and ``da``). Here those two GEMMs are Triton grouped GEMMs (``fused_gemm``) with the
activation x routing weight in the gate_up epilogue and its backward (and the routing-weight
gradient) in the dgrad epilogue; ``da`` is never written. The GEMMs that fuse nothing (down, the
weight gradients, dx) stay ``grouped_mm``. The rows are the permuted rows the unfused path
gathers anyway (``x_ND`` is kept for the weight gradient as there), so the expert-parallel stage
could run it unchanged. On sm90 bf16 both Triton GEMMs read row and weight tiles through TMA.
Rows past ``offsets_E[-1]`` give zeros in ``y`` and in every gradient, as ``grouped_mm`` does.
A ``torch.library`` custom op with a fake implementation: ``torch.compile(fullgraph=True)``
captures it.
"""

from __future__ import annotations

import torch

from ._backend import fused_gemm
from .grouped_gemm import grouped_mm, grouped_mm_wgrad


def _tma(w_E: torch.Tensor) -> bool:
    return fused_gemm().hopper_tma(w_E)


@torch.library.custom_op("flexmoe::epilogue_ffn", mutates_args=())
def epilogue_ffn_op(
    x_ND: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor, scale_N: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y_ND, h_NH, a_NF)``: the FFN output and the two activations backward needs."""
    k = fused_gemm()
    schedule = k.Schedule(offsets_E, x_ND.shape[0])
    h_NH, a_NF = k.gate_up(x_ND, None, w_EHD, scale_N, schedule, activation, tma=_tma(w_EHD))
    return grouped_mm(a_NF, w_EDF, offsets_E), h_NH, a_NF


@torch.library.custom_op("flexmoe::epilogue_ffn_backward", mutates_args=())
def epilogue_ffn_backward(
    dy_ND: torch.Tensor, x_ND: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor,
    scale_N: torch.Tensor, h_NH: torch.Tensor, a_NF: torch.Tensor, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx_ND, dw_EHD, dw_EDF, dscale_N)``."""
    k = fused_gemm()
    schedule = k.Schedule(offsets_E, dy_ND.shape[0])
    tma = _tma(w_EDF)  # with TMA weights the epilogue's h goes through TMA too: 12-13% faster on an H200
    dh_NH, dscale_N = k.down_dgrad(dy_ND, None, w_EDF, h_NH, scale_N, schedule, activation, tma=tma, h_tma=tma)
    dw_EDF = grouped_mm_wgrad(dy_ND, a_NF, offsets_E)
    dw_EHD = grouped_mm_wgrad(dh_NH, x_ND, offsets_E)
    dx_ND = grouped_mm(dh_NH, w_EHD.transpose(1, 2), offsets_E)
    return dx_ND, dw_EHD, dw_EDF, dscale_N


@epilogue_ffn_op.register_fake
def _(x_ND, w_EHD, w_EDF, offsets_E, scale_N, activation):
    N = x_ND.shape[0]
    return x_ND.new_empty((N, w_EDF.shape[1])), x_ND.new_empty((N, w_EHD.shape[1])), x_ND.new_empty((N, w_EDF.shape[2]))


@epilogue_ffn_backward.register_fake
def _(dy_ND, x_ND, w_EHD, w_EDF, offsets_E, scale_N, h_NH, a_NF, activation):
    return torch.empty_like(x_ND), torch.empty_like(w_EHD), torch.empty_like(w_EDF), torch.empty_like(scale_N)


def _setup(ctx, inputs, output):
    x_ND, w_EHD, w_EDF, offsets_E, scale_N, activation = inputs
    _, h_NH, a_NF = output
    ctx.mark_non_differentiable(h_NH, a_NF)
    ctx.save_for_backward(x_ND, w_EHD, w_EDF, offsets_E, scale_N, h_NH, a_NF)
    ctx.activation = activation


def _backward(ctx, dy_ND, _dh, _da):
    x_ND, w_EHD, w_EDF, offsets_E, scale_N, h_NH, a_NF = ctx.saved_tensors
    dx_ND, dw_EHD, dw_EDF, dscale_N = epilogue_ffn_backward(
        dy_ND.contiguous(), x_ND, w_EHD, w_EDF, offsets_E, scale_N, h_NH, a_NF, ctx.activation)
    return dx_ND, dw_EHD, dw_EDF, None, dscale_N, None


epilogue_ffn_op.register_autograd(_backward, setup_context=_setup)


def epilogue_ffn(x_ND: torch.Tensor, w_EHD: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor,
                 scale_N: torch.Tensor, activation: str) -> torch.Tensor:
    """``y[i] = scale[i] * FFN_e(x[i])`` on grouped rows, the activation in the GEMM epilogues."""
    y_ND, _, _ = epilogue_ffn_op(x_ND.contiguous(), w_EHD.contiguous(), w_EDF.contiguous(), offsets_E,
                                 scale_N.contiguous(), activation)
    return y_ND
