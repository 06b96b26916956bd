"""Per-expert biases added to expert-grouped rows, as matrix products with a one-hot matrix.

Legend: N grouped rows, H width, E experts.
``row_expert_N`` names the expert of each row. ``h + bias[row_expert]`` (indexing) costs, on an
H200 (Qwen3-like, T = 16384), a sort-based index_put in backward (2.9-5.1 ms per layer: the
expert-bias option ran at 1.83-1.87x the layer) and an index_add_ is no better (N x H float32
atomics on E x H addresses). With the one-hot matrix ``onehot_NE`` (row i: ``scale[i]`` or 1 at
its expert) everything is a GEMM on the tensor cores, accumulated in float32:
forward ``addmm(h, onehot, bias)``, bias gradient ``onehot^T @ grad``, scale gradient the
diagonal entries ``(grad @ bias^T)[i, e(i)]``.
"""

from __future__ import annotations

import torch


def _one_hot(row_expert_N: torch.Tensor, num_experts: int, value_N: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    N = row_expert_N.shape[0]
    fill_N1 = (torch.ones(N, 1, dtype=dtype, device=row_expert_N.device) if value_N is None
               else value_N.to(dtype).unsqueeze(-1))
    return torch.zeros(N, num_experts, dtype=dtype, device=row_expert_N.device).scatter_(
        1, row_expert_N.unsqueeze(-1), fill_N1)


class _AddExpertBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, bias_EH, row_expert_N, scale_N):
        ctx.save_for_backward(bias_EH, row_expert_N, scale_N)
        ctx.has_scale = scale_N is not None
        onehot_NE = _one_hot(row_expert_N, bias_EH.shape[0], scale_N, h_NH.dtype)
        return torch.addmm(h_NH, onehot_NE, bias_EH.to(h_NH.dtype))

    @staticmethod
    def backward(ctx, grad_NH):
        bias_EH, row_expert_N, scale_N = ctx.saved_tensors
        grad_bias = grad_scale = None
        if ctx.needs_input_grad[1]:
            onehot_NE = _one_hot(row_expert_N, bias_EH.shape[0], scale_N, grad_NH.dtype)
            grad_bias = (onehot_NE.t() @ grad_NH).to(bias_EH.dtype)
        if ctx.has_scale and ctx.needs_input_grad[3]:
            dots_NE = grad_NH @ bias_EH.to(grad_NH.dtype).t()
            grad_scale = dots_NE.gather(1, row_expert_N.unsqueeze(-1)).squeeze(-1).to(scale_N.dtype)
        return grad_NH, grad_bias, None, grad_scale


def add_expert_bias(h_NH: torch.Tensor, bias_EH: torch.Tensor, row_expert_N: torch.Tensor,
                    scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """``h[i] + bias[e(i)]`` (times ``scale[i]`` when given) for the expert ``e(i) = row_expert_N[i]``."""
    return _AddExpertBias.apply(h_NH, bias_EH, row_expert_N, scale_N)
