"""MoERuntime: everything MoE-specific a training loop does per step, in one object.

A step, in order (each call is a no-op where the model does not need it)::

    moe.before_forward(step)          # gate schedule (DTS gates)
    loss = task_loss + moe.aux_loss() # router losses of the last forward
    loss.backward()
    moe.after_backward()              # gradient sync: dense grads averaged, replica grads summed
    optimizer.step()
    moe.after_optimizer_step()        # bias update (loads summed over ranks), placement: a
                                      # re-plan's moves are posted here and land in each layer's
                                      # next forward; change no weight in between

With gradient accumulation call ``moe.observe()`` after each micro-batch's forward when a
placement scheduler is attached (its counts then add up over the micro-batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..layer import aux_loss, moe_layers
from ..routing import set_gate_step
from .scheduler import PlacementScheduler
from .sync import sync_gradients, sync_router_loads


def update_router_bias(model: nn.Module) -> None:
    """Apply the auxiliary-loss-free bias update of every MoE layer; call after ``optimizer.step()``
    (on several ranks, ``sync_router_loads`` first)."""
    for layer in moe_layers(model):
        layer.router.update_bias()


class MoERuntime:
    """The per-step MoE work of ``model``, in the order a training loop needs it.

    dp_group: the data-parallel group gradients are averaged over (default: the world, when
        torch.distributed is initialised; nothing is communicated otherwise).
    expert_dp_group: with EP groups smaller than the data-parallel group, the ranks that hold
        the same slots in different EP groups (see ``flexmoe.runtime.sync_gradients``).
    placement: a ``PlacementScheduler`` for dynamic expert placement, or None (static).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dp_group: dist.ProcessGroup | None = None,
        expert_dp_group: dist.ProcessGroup | None = None,
        placement: PlacementScheduler | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoERuntime.model must be an nn.Module, got {type(model).__name__}")
        if placement is not None and not isinstance(placement, PlacementScheduler):
            raise TypeError(f"MoERuntime.placement must be a PlacementScheduler or None, got {type(placement).__name__}")
        self.model = model
        self.dp_group = dp_group
        self.expert_dp_group = expert_dp_group
        self.placement = placement
        self.layers = moe_layers(model)
        self._has_bias = any(layer.config.bias_update_rate for layer in self.layers)

    def before_forward(self, step: int) -> None:
        """Set the gate step (optimizer steps taken so far) of every DTS gate."""
        set_gate_step(self.model, step)

    def aux_loss(self) -> torch.Tensor:
        """The weighted router losses of the last forward, summed over the MoE layers."""
        return aux_loss(self.model)

    def observe(self) -> None:
        """Add the last forward's routing counts to the placement scheduler (gradient accumulation)."""
        if self.placement is not None:
            self.placement.observe()

    def after_backward(self) -> None:
        """Average dense gradients over the ranks and synchronise expert gradients."""
        sync_gradients(self.model, self.dp_group, self.expert_dp_group)

    def after_optimizer_step(self) -> dict | None:
        """Bias update (loads summed over ``dp_group`` first), then the placement step; returns
        the scheduler's metrics when it re-planned, else None."""
        if self._has_bias:
            if dist.is_available() and dist.is_initialized():
                sync_router_loads(self.model, self.dp_group)
            update_router_bias(self.model)
        return None if self.placement is None else self.placement.step()
