"""MoERuntime: everything MoE-specific a training loop does per step, in one object.

A step, in order (each call is a no-op where the model does not need it)::

    moe.before_forward(step)          # gate schedule (DTS gates)
    loss = task_loss + moe.aux_loss() # router losses of the last forward
    moe.before_backward()             # overlap_replica_sync=True only: check, arm the hooks
    loss.backward()
    moe.after_backward()              # gradient sync: dense grads averaged, replica grads summed
    optimizer.step()
    moe.after_optimizer_step()        # bias update (loads summed over ranks), placement: a
                                      # re-plan's moves are posted here and land in each layer's
                                      # next forward; change no weight in between

With gradient accumulation call ``moe.observe()`` after each micro-batch's forward when a
placement scheduler is attached (its counts then add up over the micro-batches), and
``moe.before_backward()`` only before the LAST micro-batch's backward (its hooks post each
replicated expert's sum as soon as that backward has finished its gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..layer import aux_loss, moe_layers
from ..routing import set_gate_step
from .scheduler import PlacementScheduler
from .sync import (OverlappedReplicaSync, ReplicaSyncGroups, start_overlapped_sync, sync_gradients,
                   sync_gradients_after_overlap, sync_router_loads)


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
    overlap_replica_sync: post the replica gradient sum (a reduce-scatter and an all-gather
        among each replicated expert's holders) during backward, per EP layer as soon as its
        expert gradients are final, instead of after it; needs ``before_backward()`` before the
        last backward. Gradients are bit-identical to the plain sync. What ``CostModel.sync_overlap > 0`` models. Default off.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dp_group: dist.ProcessGroup | None = None,
        expert_dp_group: dist.ProcessGroup | None = None,
        placement: PlacementScheduler | None = None,
        overlap_replica_sync: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoERuntime.model must be an nn.Module, got {type(model).__name__}")
        if placement is not None and not isinstance(placement, PlacementScheduler):
            raise TypeError(f"MoERuntime.placement must be a PlacementScheduler or None, got {type(placement).__name__}")
        if not isinstance(overlap_replica_sync, bool):
            raise TypeError(f"MoERuntime.overlap_replica_sync must be a bool, got {type(overlap_replica_sync).__name__}")
        self.model = model
        self.overlap_replica_sync = overlap_replica_sync
        self._pending: OverlappedReplicaSync | None = None
        self._sync_groups = ReplicaSyncGroups()  # the overlapped sum's own communicators
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

    def before_backward(self) -> None:
        """With ``overlap_replica_sync``, before the last micro-batch's backward: check that every
        rank is here after the same forwards (raises on every rank otherwise), then arm the hooks
        that start the replica sum during backward. A no-op when off, without torch.distributed
        or without replicated experts."""
        if not self.overlap_replica_sync:
            return
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
            raise RuntimeError(
                "MoERuntime.before_backward: called again before after_backward(); call it once, before the "
                "last micro-batch's backward only, and after_backward() after that backward")
        self._pending = start_overlapped_sync(self.model, self._sync_groups)

    def after_backward(self) -> None:
        """Average dense gradients over the ranks and synchronise expert gradients (finishing the
        replica sum ``before_backward`` started, if any)."""
        pending, self._pending = self._pending, None
        if pending is None:
            sync_gradients(self.model, self.dp_group, self.expert_dp_group)
        else:
            sync_gradients_after_overlap(self.model, pending, self.dp_group, self.expert_dp_group)

    def after_optimizer_step(self) -> dict | None:
        """Bias update (loads summed over ``dp_group`` first), then the placement step; returns
        the scheduler's metrics when it re-planned, else None."""
        if self._has_bias:
            if dist.is_available() and dist.is_initialized():
                sync_router_loads(self.model, self.dp_group)
            update_router_bias(self.model)
        return None if self.placement is None else self.placement.step()
