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

    "auto" and "per_expert": Triton on CUDA when installed. "triton", "fused", "hybrid": always (CPU
    tensors need ``TRITON_INTERPRET=1``). "torch": never.
    """
    if kernels == "torch":
        return False
    if kernels in ("triton", "fused", "hybrid"):
        if not _TRITON_INSTALLED:
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} but triton is not installed")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return device.type == "cuda" and _TRITON_INSTALLED


# Where "auto" runs the expert stage as "hybrid" (fused forward, grouped-GEMM backward): sm90+ CUDA,
# bf16, and the shapes (d_model, d_ff, experts, top_k) for which benchmarks/kernels.py measured the
# hybrid layer forward+backward faster than the unfused one (BENCHMARKS.md, "Fused expert kernels
# (issue 13)"). Nothing else: the all-fused path measured slower everywhere (0.74-0.76x).
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
