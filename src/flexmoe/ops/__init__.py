"""Kernels of the MoE data path, each with a Triton (CUDA) and a plain torch implementation."""

from .activation import scaled_activation
from .grouped_gemm import grouped_mm
from .permute import permute, unpermute_sum

__all__ = ["grouped_mm", "permute", "scaled_activation", "unpermute_sum"]
