"""Which kernel implementation runs: Triton where asked for and possible, plain torch otherwise."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_kernels() -> ModuleType:
    from . import triton_kernels as module

    return module


def fused_gemm() -> ModuleType:
    from . import fused_gemm as module

    return module


def use_triton(kernels: str, device: torch.device) -> bool:
    """Resolve a ``MoEConfig.kernels`` choice for tensors on ``device``.

    "auto" and "per_expert": Triton on CUDA when installed. "triton", "fused", "hybrid", "epilogue": always (CPU
    tensors need ``TRITON_INTERPRET=1``). "torch": never.
    """
    if kernels == "torch":
        return False
    if kernels in ("triton", "fused", "hybrid", "epilogue"):
        if not _TRITON_INSTALLED:
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} but triton is not installed")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return device.type == "cuda" and _TRITON_INSTALLED


# Where "auto" runs the expert stage as "hybrid" (fused forward, grouped-GEMM backward) instead of
# the unfused path: sm90+ CUDA, bf16, and the shapes (d_model, d_ff, experts, top_k) for which
# benchmarks/kernels.py measured the hybrid layer forward+backward at least 3% faster than unfused.
# None so far. Measured on an H200, 2026-12-01, T=16384, bf16 (BENCHMARKS.md, "Fused expert
# kernels (issue 13)"), layer fwd+bwd ms unfused / fused / hybrid:
#   Qwen3-like (2048, 768, 128, 8)  uniform 8.45 / 10.87 / 8.69, Zipf 9.40 / 11.85 / 9.34
#   OLMoE-like (2048, 1024, 64, 8)  uniform 9.99 / 13.08 / 10.34
# The fused gate_up wins (1.14-1.20x on Qwen3-like) but re-gathering x for the weight gradients
# costs what it saves; every fused backward GEMM is slower than torch._grouped_mm (0.44-0.94x).
# Round 3 (same device, BENCHMARKS.md): writing x_ND from the gate_up kernel to spare the backward
# gather was no cheaper than the gather and wrong on the device; not kept.
# Per-expert cuBLAS ("per_expert") is not picked either: 0.87x / 0.90x of the grouped GEMM layer on
# Mixtral-like (4096, 14336, 8, 2), uniform / Zipf (same device and date).
_SM90_HYBRID_SHAPES: frozenset[tuple[int, int, int, int]] = frozenset()


def fused_path(kernels: str, x_TD: torch.Tensor, d_model: int, d_ff: int, num_experts: int, top_k: int) -> str | None:
    """"fused" or "hybrid" where the expert stage runs from token rows in fused kernels, else None."""
    if kernels in ("fused", "hybrid"):
        return kernels
    if kernels != "auto" or not (_TRITON_INSTALLED and x_TD.is_cuda and x_TD.dtype == torch.bfloat16):
        return None
    if torch.cuda.get_device_capability(x_TD.device)[0] < 9:
        return None
    return "hybrid" if (d_model, d_ff, num_experts, top_k) in _SM90_HYBRID_SHAPES else None
