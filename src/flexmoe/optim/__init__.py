"""Optimizer wrappers for MoE models (runtime floor: may use the layer, parallel and placement)."""

from .omoe import OMoE, OMoEConfig

__all__ = ["OMoE", "OMoEConfig"]
