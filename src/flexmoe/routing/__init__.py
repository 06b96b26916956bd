"""Routers: pick experts per token and their combine weights (``base``: what they share;
``topk``: softmax / sigmoid top-k; ``limits``: group-, node- and rank-limited choice;
``balance``: sequence / global / pooled balance losses; ``dts``: the EvoMoE dense-to-sparse gate)."""

from torch import nn

from ..config import MoEConfig
from .balance import router_loss
from .base import (
    Routing, count_keys, expert_counts, expert_keys, load_balancing_loss, router_logits, router_z_loss,
)
from .dts import DTSRouter, set_gate_step
from .topk import TopKRouter, capacity_keep_mask

__all__ = [
    "DTSRouter", "Routing", "TopKRouter", "capacity_keep_mask", "count_keys", "expert_counts", "expert_keys",
    "load_balancing_loss", "make_router", "router_logits", "router_loss", "router_z_loss", "set_gate_step",
]


def make_router(config: MoEConfig) -> nn.Module:
    """The router module for ``config.router``."""
    if config.router == "dts":
        return DTSRouter(config)
    return TopKRouter(config)
