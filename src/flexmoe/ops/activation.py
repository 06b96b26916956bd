"""Expert activations with the combine weight folded in: ``act(h) * scale`` per grouped row.

Legend: N grouped rows, F expert hidden width (2F for gated inputs).
Scaling the activation by the routing weight before the down projection lets the final combine
be a plain un-permute + sum, and its backward yields the weight gradient from tensors the
activation backward already reads. Rows at or past ``valid_1[0]`` (not filled by the grouped
GEMM) produce zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import triton_kernels


def _row_mask(num_rows: int, valid_1: torch.Tensor) -> torch.Tensor:
    return (torch.arange(num_rows, device=valid_1.device) < valid_1.to(torch.int64)).unsqueeze(-1)


def _torch_swiglu_scaled(h_N2F, scale_N, valid_1):
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    out = F.silu(gate_NF) * up_NF * scale_N.to(h_N2F.dtype).unsqueeze(-1)
    return torch.where(_row_mask(h_N2F.shape[0], valid_1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _torch_swiglu_scaled_backward(h_N2F, scale_N, valid_1, grad_NF):
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    grad_NF = torch.where(_row_mask(h_N2F.shape[0], valid_1), grad_NF, torch.zeros((), dtype=grad_NF.dtype, device=grad_NF.device))
    sig_NF = torch.sigmoid(gate_NF)
    silu_NF = gate_NF * sig_NF
    scale_N1 = scale_N.to(h_N2F.dtype).unsqueeze(-1)
    dgate_NF = grad_NF * scale_N1 * up_NF * sig_NF * (1 + gate_NF * (1 - sig_NF))
    dup_NF = grad_NF * scale_N1 * silu_NF
    acc = torch.float32 if h_N2F.dtype in (torch.bfloat16, torch.float16) else h_N2F.dtype
    dscale_N = (silu_NF.to(acc) * up_NF.to(acc) * grad_NF.to(acc)).sum(-1).to(scale_N.dtype)
    return torch.cat([dgate_NF, dup_NF], dim=-1), dscale_N


def clamped_swiglu(h_N2F: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's SwiGLU on ``[gate | up]`` rows: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=l)`` (plain torch; autograd differentiates it)."""
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    gate_NF = gate_NF.clamp(max=limit)
    return (up_NF.clamp(-limit, limit) + 1) * (gate_NF * torch.sigmoid(gate_NF * alpha))


def _torch_clamped_swiglu_scaled(h_N2F, scale_N, valid_1, alpha, limit):
    out = clamped_swiglu(h_N2F, alpha, limit) * scale_N.to(h_N2F.dtype).unsqueeze(-1)
    return torch.where(_row_mask(h_N2F.shape[0], valid_1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _torch_clamped_swiglu_scaled_backward(h_N2F, scale_N, valid_1, grad_NF, alpha, limit):
    """By hand, as autograd differentiates ``clamped_swiglu`` (a clamp passes the gradient where
    its input is inside the closed range)."""
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    grad_NF = torch.where(_row_mask(h_N2F.shape[0], valid_1), grad_NF, torch.zeros((), dtype=grad_NF.dtype, device=grad_NF.device))
    g_NF, u_NF = gate_NF.clamp(max=limit), up_NF.clamp(-limit, limit)
    sig_NF = torch.sigmoid(g_NF * alpha)
    glu_NF = g_NF * sig_NF
    d_NF = grad_NF * scale_N.to(h_N2F.dtype).unsqueeze(-1)
    dgate_NF = torch.where(gate_NF <= limit, d_NF * (u_NF + 1) * (sig_NF + alpha * glu_NF * (1 - sig_NF)), 0.0)
    dup_NF = torch.where((up_NF >= -limit) & (up_NF <= limit), d_NF * glu_NF, 0.0)
    acc = torch.float32 if h_N2F.dtype in (torch.bfloat16, torch.float16) else h_N2F.dtype
    dscale_N = ((u_NF.to(acc) + 1) * glu_NF.to(acc) * grad_NF.to(acc)).sum(-1).to(scale_N.dtype)
    return torch.cat([dgate_NF, dup_NF], dim=-1), dscale_N


def _clamp(alpha: float | None, limit: float | None) -> tuple[float, float] | None:
    return None if limit is None else (float(alpha), float(limit))


@torch.library.custom_op("flexmoe::swiglu_scaled", mutates_args=())
def swiglu_scaled(h_N2F: torch.Tensor, scale_N: torch.Tensor, valid_1: torch.Tensor, use_triton: bool,
                  alpha: float | None = None, limit: float | None = None) -> torch.Tensor:
    """``silu(gate) * up * scale`` with gate = first F columns, up = last F columns; with
    ``alpha`` and ``limit``, GPT-OSS's ``clamped_swiglu(h) * scale`` instead, in the same one pass
    (a Triton kernel on GPUs, not a chain of torch ops)."""
    if use_triton:
        return triton_kernels().swiglu_scaled_fwd(h_N2F, scale_N, valid_1, _clamp(alpha, limit))
    if limit is not None:
        return _torch_clamped_swiglu_scaled(h_N2F, scale_N, valid_1, alpha, limit)
    return _torch_swiglu_scaled(h_N2F, scale_N, valid_1)


@torch.library.custom_op("flexmoe::swiglu_scaled_backward", mutates_args=())
def swiglu_scaled_backward(
    h_N2F: torch.Tensor, scale_N: torch.Tensor, valid_1: torch.Tensor, grad_NF: torch.Tensor, use_triton: bool,
    alpha: float | None = None, limit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton:
        return triton_kernels().swiglu_scaled_bwd(h_N2F, scale_N, valid_1, grad_NF, _clamp(alpha, limit))
    if limit is not None:
        return _torch_clamped_swiglu_scaled_backward(h_N2F, scale_N, valid_1, grad_NF, alpha, limit)
    return _torch_swiglu_scaled_backward(h_N2F, scale_N, valid_1, grad_NF)


@swiglu_scaled.register_fake
def _(h_N2F, scale_N, valid_1, use_triton, alpha=None, limit=None):
    return h_N2F.new_empty((h_N2F.shape[0], h_N2F.shape[1] // 2))


@swiglu_scaled_backward.register_fake
def _(h_N2F, scale_N, valid_1, grad_NF, use_triton, alpha=None, limit=None):
    return torch.empty_like(h_N2F), torch.empty_like(scale_N)


def _setup(ctx, inputs, output):
    h_N2F, scale_N, valid_1, use_triton, alpha, limit = inputs
    ctx.save_for_backward(h_N2F, scale_N, valid_1)
    ctx.use_triton, ctx.alpha, ctx.limit = use_triton, alpha, limit


def _backward(ctx, grad_NF):
    h_N2F, scale_N, valid_1 = ctx.saved_tensors
    dh, ds = swiglu_scaled_backward(h_N2F, scale_N, valid_1, grad_NF, ctx.use_triton, ctx.alpha, ctx.limit)
    return dh, ds, None, None, None, None


swiglu_scaled.register_autograd(_backward, setup_context=_setup)


def clamped_swiglu_scaled(h_N2F: torch.Tensor, scale_N: torch.Tensor, valid_1: torch.Tensor, alpha: float,
                          limit: float, use_triton: bool) -> torch.Tensor:
    """``clamped_swiglu(h) * scale`` (``swiglu_scaled`` with the clamp)."""
    return swiglu_scaled(h_N2F, scale_N, valid_1, use_triton, alpha, limit)


def scaled_activation(
    h_NF: torch.Tensor, scale_N: torch.Tensor, valid_1: torch.Tensor, activation: str, use_triton: bool,
    swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """Apply ``activation`` to the expert hidden rows and scale each row by its weight
    (``swiglu_alpha`` / ``swiglu_limit``: only for "swiglu_clamped")."""
    if activation in ("swiglu", "swiglu_clamped"):
        clamped = activation == "swiglu_clamped"
        return swiglu_scaled(h_NF, scale_N, valid_1, use_triton, swiglu_alpha if clamped else None,
                             swiglu_limit if clamped else None)
    act = F.gelu(h_NF) if activation == "gelu" else F.relu(h_NF)
    out = act * scale_N.to(h_NF.dtype).unsqueeze(-1)
    return torch.where(_row_mask(h_NF.shape[0], valid_1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def scaled_activation_backward(
    h_NH: torch.Tensor, scale_N: torch.Tensor, valid_1: torch.Tensor, grad_NF: torch.Tensor, activation: str,
    use_triton: bool, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dscale)`` of ``scaled_activation`` for the output gradient ``grad_NF`` (rows at or
    past ``valid_1[0]`` get zeros), without an autograd graph: for backward passes written by hand."""
    if activation in ("swiglu", "swiglu_clamped"):
        clamp = (swiglu_alpha, swiglu_limit) if activation == "swiglu_clamped" else None
        if use_triton:
            return triton_kernels().swiglu_scaled_bwd(h_NH, scale_N, valid_1, grad_NF, clamp)
        if clamp is not None:
            return _torch_clamped_swiglu_scaled_backward(h_NH, scale_N, valid_1, grad_NF, *clamp)
        return _torch_swiglu_scaled_backward(h_NH, scale_N, valid_1, grad_NF)
    grad_NF = torch.where(_row_mask(h_NH.shape[0], valid_1), grad_NF, torch.zeros((), dtype=grad_NF.dtype, device=grad_NF.device))
    if activation == "gelu":
        cdf_NF = 0.5 * (1 + torch.erf(h_NH * 0.7071067811865476))
        act_NF, dact_NF = h_NH * cdf_NF, cdf_NF + h_NH * torch.exp(-0.5 * h_NH * h_NH) * 0.3989422804014327
    else:
        act_NF, dact_NF = F.relu(h_NH), (h_NH > 0).to(h_NH.dtype)
    acc = torch.float32 if h_NH.dtype in (torch.bfloat16, torch.float16) else h_NH.dtype
    dscale_N = (act_NF.to(acc) * grad_NF.to(acc)).sum(-1).to(scale_N.dtype)
    return grad_NF * scale_N.to(h_NH.dtype).unsqueeze(-1) * dact_NF, dscale_N
