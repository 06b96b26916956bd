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
    """Only the gradients asked for: the expert-parallel stage computes the weight gradient of
    all its chunks at once (``grouped_mm_wgrad``) and runs these GEMMs with detached weights."""
    x_NI, w_EOI, offsets_E = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm_loop(grad_NO.contiguous(), w_EOI.transpose(1, 2).contiguous(), offsets_E)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_loop_wgrad(grad_NO.contiguous(), x_NI, offsets_E)
    return grad_x, grad_w, None


grouped_mm_loop.register_autograd(_backward, setup_context=_setup)


def has_fast_grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` has a fast kernel for these operands."""
    return _fast_for(x_NI, w_EOI.dtype, w_EOI.shape[1])


def _fast_for(x_NI: torch.Tensor, w_dtype: torch.dtype, out_width: int) -> bool:
    return (
        x_NI.is_cuda
        and x_NI.dtype == torch.bfloat16
        and w_dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x_NI.device)[0] >= 9
        and x_NI.shape[1] % 8 == 0
        and out_width % 8 == 0
    )


def grouped_mm_wgrad(grad_NO: torch.Tensor, x_NI: torch.Tensor, offsets_E: torch.Tensor,
                     per_expert: bool = False) -> torch.Tensor:
    """``dw[e] = grad_e^T @ x_e`` for every group (zero for empty ones): the weight gradient of
    ``grouped_mm(x, w, offsets)`` as one grouped GEMM (``torch._grouped_mm`` with the groups
    along the reduced dimension where fast, else the per-group loop)."""
    if not per_expert and _fast_for(x_NI, grad_NO.dtype, grad_NO.shape[1]):
        return torch._grouped_mm(grad_NO.t(), x_NI, offs=offsets_E)
    return grouped_mm_loop_wgrad(grad_NO.contiguous(), x_NI.contiguous(), offsets_E)


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, per_expert: bool = False) -> torch.Tensor:
    """Grouped ``x @ w[e]^T`` over row groups given by ``offsets_E``.

    ``per_expert``: one ``torch.mm`` (cuBLAS on CUDA) per group instead of the grouped kernel;
    it reads the offsets on the host (one synchronisation), which few large experts can afford.
    """
    if not per_expert and has_fast_grouped_mm(x_NI, w_EOI):
        return torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E)
    return grouped_mm_loop(x_NI.contiguous(), w_EOI.contiguous(), offsets_E)


class WgradRows:
    """The operands of deferred weight gradients: for GEMM i of a graph, its input rows and the
    gradient of its output, filled in by backward (``record_wgrad_rows``)."""

    def __init__(self, count: int):
        self.rows: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * count


class _RecordWgradRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_NO, x_NI, holder: WgradRows, index: int):
        ctx.holder, ctx.index = holder, index
        ctx.save_for_backward(x_NI)
        return y_NO.view_as(y_NO)

    @staticmethod
    def backward(ctx, grad_NO):
        (x_NI,) = ctx.saved_tensors
        # Detached: x_NI's own graph leads back to this node, whose context holds the holder, a
        # cycle through autograd's C++ nodes that Python's collector cannot free (a leak per step).
        ctx.holder.rows[ctx.index] = (x_NI.detach(), grad_NO)
        return grad_NO, None, None, None


def record_wgrad_rows(y_NO: torch.Tensor, x_NI: torch.Tensor, holder: WgradRows, index: int) -> torch.Tensor:
    """``y_NO`` unchanged; its backward stores ``(x_NI, grad of y_NO)`` as ``holder.rows[index]``,
    so the weight gradient of the GEMM ``y = x @ w^T`` can be computed later, with other rows."""
    return _RecordWgradRows.apply(y_NO, x_NI, holder, index)
