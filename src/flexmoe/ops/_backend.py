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

    "auto" and "per_expert": Triton on CUDA when installed. "triton" and "fused": always (CPU
    tensors need ``TRITON_INTERPRET=1``). "torch": never.
    """
    if kernels == "torch":
        return False
    if kernels in ("triton", "fused"):
        if not _TRITON_INSTALLED:
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} but triton is not installed")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"MoEConfig.kernels={kernels!r} on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return device.type == "cuda" and _TRITON_INSTALLED
