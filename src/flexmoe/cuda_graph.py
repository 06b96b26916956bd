"""Capture a one-device MoELayer's forward and backward in CUDA graphs (static shapes only).

The one-device path has no data-dependent shapes and no host synchronisation (with Triton or
fused kernels and ``torch._grouped_mm``), so its launches can be replayed from a graph, which
removes the launch gaps between its many small kernels.
"""

from __future__ import annotations

import torch

from .layer import MoELayer
from .parallel import ParallelExperts


def cuda_graph_layer(layer: MoELayer, sample_x: torch.Tensor, warmup_iters: int = 3) -> MoELayer:
    """Replace ``layer``'s forward (and its backward) by CUDA-graph replays for inputs shaped like
    ``sample_x``; returns ``layer``.

    Every later input must have ``sample_x``'s shape, dtype, device and ``requires_grad``. The
    router losses are not outputs of the graph, so configs with ``aux_loss_coef`` or
    ``z_loss_coef`` are refused, and so are expert parallelism, the DTS gate (its step counter
    lives on the host) and ``kernels="per_expert"`` (host synchronisation). Grouped GEMMs
    without a fast ``torch._grouped_mm`` (not sm90 / not bf16) loop on the host and fail to
    capture; ``kernels="fused"`` has no such limit.
    ``layer.last_counts`` then holds the counts of the latest replay. Built on
    ``torch.cuda.make_graphed_callables``; under autocast pass ``cache_enabled=False`` to it.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"cuda_graph_layer expects a MoELayer, got {type(layer).__name__}")
    cfg = layer.config
    if isinstance(layer.experts, ParallelExperts):
        raise ValueError("cuda_graph_layer supports the one-device layer only (no expert parallelism)")
    if cfg.aux_loss_coef or cfg.z_loss_coef:
        raise ValueError("cuda_graph_layer: aux_loss_coef and z_loss_coef must be 0 (router losses are not graph outputs)")
    if cfg.router == "dts":
        raise ValueError("cuda_graph_layer: router='dts' keeps host state per step; use softmax or sigmoid")
    if cfg.kernels == "per_expert":
        raise ValueError("cuda_graph_layer: kernels='per_expert' synchronises with the host; use 'auto' or 'fused'")
    if not isinstance(sample_x, torch.Tensor) or not sample_x.is_cuda or not torch.cuda.is_available():
        raise RuntimeError("cuda_graph_layer needs CUDA: sample_x must be a tensor on a CUDA device")
    return torch.cuda.make_graphed_callables(layer, (sample_x,), num_warmup_iters=warmup_iters)
