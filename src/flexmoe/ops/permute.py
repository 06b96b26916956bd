"""Permute (token order -> expert-grouped rows) and un-permute + sum, as torch custom ops.

Legend: T tokens, K slots, N grouped rows, D width.
``permute`` and ``unpermute_sum`` are each other's adjoint, so each one's backward is the other.
Both are registered with ``torch.library`` (fake implementation and autograd), so
``torch.compile(fullgraph=True)`` captures them without a graph break.
"""

from __future__ import annotations

import torch

from ._backend import triton_kernels


def _torch_gather_rows(src_TD: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    if src_TD.shape[0] == 0:
        return src_TD.new_zeros((index_N.shape[0], src_TD.shape[1]))
    rows_ND = src_TD.index_select(0, index_N.clamp_min(0))
    return torch.where((index_N >= 0).unsqueeze(-1), rows_ND, torch.zeros((), dtype=src_TD.dtype, device=src_TD.device))


def _torch_gather_sum(src_ND: torch.Tensor, index_TK: torch.Tensor) -> torch.Tensor:
    T, K = index_TK.shape
    acc_dtype = torch.float32 if src_ND.dtype in (torch.bfloat16, torch.float16) else src_ND.dtype
    rows = _torch_gather_rows(src_ND.to(acc_dtype), index_TK.reshape(-1))
    return rows.view(T, K, src_ND.shape[1]).sum(1).to(src_ND.dtype)


@torch.library.custom_op("flexmoe::permute", mutates_args=())
def permute(
    x_TD: torch.Tensor, row_token_N: torch.Tensor, pair_row_TK: torch.Tensor, use_triton: bool
) -> torch.Tensor:
    """Grouped rows ``out[i] = x[row_token[i]]`` (zero rows where ``row_token[i] < 0``).

    ``pair_row_TK`` is the inverse map, used by the backward pass.
    """
    if use_triton:
        return triton_kernels().scatter_rows(x_TD, pair_row_TK, row_token_N)
    return _torch_gather_rows(x_TD, row_token_N)


@torch.library.custom_op("flexmoe::unpermute_sum", mutates_args=())
def unpermute_sum(
    y_ND: torch.Tensor, pair_row_TK: torch.Tensor, row_token_N: torch.Tensor, use_triton: bool
) -> torch.Tensor:
    """Token outputs ``out[t] = sum_k y[pair_row[t, k]]`` over kept pairs (float32 accumulation).

    ``row_token_N`` is the inverse map, used by the backward pass.
    """
    if use_triton:
        return triton_kernels().gather_sum(y_ND, pair_row_TK)
    return _torch_gather_sum(y_ND, pair_row_TK)


@permute.register_fake
def _(x_TD, row_token_N, pair_row_TK, use_triton):
    return x_TD.new_empty((row_token_N.shape[0], x_TD.shape[1]))


@unpermute_sum.register_fake
def _(y_ND, pair_row_TK, row_token_N, use_triton):
    return y_ND.new_empty((pair_row_TK.shape[0], y_ND.shape[1]))


def _setup_ctx(ctx, inputs, output):
    _, forward_index, adjoint_index, use_triton = inputs
    ctx.save_for_backward(forward_index, adjoint_index)
    ctx.use_triton = use_triton


def _permute_backward(ctx, grad_ND):
    row_token_N, pair_row_TK = ctx.saved_tensors
    return unpermute_sum(grad_ND, pair_row_TK, row_token_N, ctx.use_triton), None, None, None


def _unpermute_backward(ctx, grad_TD):
    pair_row_TK, row_token_N = ctx.saved_tensors
    return permute(grad_TD, row_token_N, pair_row_TK, ctx.use_triton), None, None, None


permute.register_autograd(_permute_backward, setup_context=_setup_ctx)
unpermute_sum.register_autograd(_unpermute_backward, setup_context=_setup_ctx)
