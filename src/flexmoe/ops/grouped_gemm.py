"""Grouped GEMM: ``y[rows of group e] = x[rows of group e] @ w[e]^T``.

Legend: N rows grouped by expert, E groups, I input width, O output width.
``offsets_E`` are int32 cumulative row counts (the last one may be below N: later rows are
not part of any group and come out as zeros). On CUDA with bf16 and 16-byte aligned widths
this is ``torch._grouped_mm`` (no host synchronisation); elsewhere a per-group loop wrapped
in custom ops, so ``torch.compile`` still captures the layer whole.
"""

from __future__ import annotations

import torch


def _loop_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out_NO = x_NI.new_zeros((x_NI.shape[0], w_EOI.shape[1]))
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(x_NI[start:end], w_EOI[e].t(), out=out_NO[start:end])
        start = end
    return out_NO


@torch.library.custom_op("flexmoe::grouped_mm_loop", mutates_args=())
def grouped_mm_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return _loop_mm(x_NI, w_EOI, offsets_E)


@torch.library.custom_op("flexmoe::grouped_mm_loop_wgrad", mutates_args=())
def grouped_mm_loop_wgrad(grad_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = grad_e^T @ x_e``; zero for groups without rows."""
    E = offsets_E.shape[0]
    dw_EOI = grad_NO.new_zeros((E, grad_NO.shape[1], x_NI.shape[1]))
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(grad_NO[start:end].t(), x_NI[start:end], out=dw_EOI[e])
        start = end
    return dw_EOI


@grouped_mm_loop.register_fake
def _(x_NI, w_EOI, offsets_E):
    return x_NI.new_empty((x_NI.shape[0], w_EOI.shape[1]))


@grouped_mm_loop_wgrad.register_fake
def _(grad_NO, x_NI, offsets_E):
    return grad_NO.new_empty((offsets_E.shape[0], grad_NO.shape[1], x_NI.shape[1]))


def _setup(ctx, inputs, output):
    x_NI, w_EOI, offsets_E = inputs
    ctx.save_for_backward(x_NI, w_EOI, offsets_E)


def _backward(ctx, grad_NO):
    x_NI, w_EOI, offsets_E = ctx.saved_tensors
    grad_x = grouped_mm_loop(grad_NO.contiguous(), w_EOI.transpose(1, 2).contiguous(), offsets_E)
    grad_w = grouped_mm_loop_wgrad(grad_NO.contiguous(), x_NI, offsets_E)
    return grad_x, grad_w, None


grouped_mm_loop.register_autograd(_backward, setup_context=_setup)


def has_fast_grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` has a fast kernel for these operands."""
    return (
        x_NI.is_cuda
        and x_NI.dtype == torch.bfloat16
        and w_EOI.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x_NI.device)[0] >= 9
        and x_NI.shape[1] % 8 == 0
        and w_EOI.shape[1] % 8 == 0
    )


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, per_expert: bool = False) -> torch.Tensor:
    """Grouped ``x @ w[e]^T`` over row groups given by ``offsets_E``.

    ``per_expert``: one ``torch.mm`` (cuBLAS on CUDA) per group instead of the grouped kernel;
    it reads the offsets on the host (one synchronisation), which few large experts can afford.
    """
    if not per_expert and has_fast_grouped_mm(x_NI, w_EOI):
        return torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E)
    return grouped_mm_loop(x_NI.contiguous(), w_EOI.contiguous(), offsets_E)


def grouped_wgrad(grad_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = grad_e^T @ x_e`` (``[E, O, I]``; zero for groups without rows): ``torch._grouped_mm``
    where it has a fast kernel, else the per-group loop."""
    if has_fast_grouped_mm(grad_NO, x_NI.unsqueeze(0)):
        return torch._grouped_mm(grad_NO.t(), x_NI, offs=offsets_E)
    return grouped_mm_loop_wgrad(grad_NO.contiguous(), x_NI.contiguous(), offsets_E)
