"""What happens between training steps: the per-step object ``MoERuntime`` and the low-level
functions it calls (gate schedule, gradient and load sync, bias update, placement: migration and
scheduler), and measuring the cost model's constants."""

from ..routing import set_gate_step

from .measure import measure_cost_model
from .migration import MigrationReport, PendingMove, apply_placement, check_same_placement, issue_placement
from .scheduler import PlacementScheduler
from .step import MoERuntime, update_router_bias
from .sync import (
    expert_parameter_names,
    expert_parameters,
    sync_dense_gradients,
    sync_expert_gradients,
    sync_gradients,
    sync_router_loads,
)

__all__ = [
    "MigrationReport",
    "MoERuntime",
    "PendingMove",
    "PlacementScheduler",
    "apply_placement",
    "check_same_placement",
    "expert_parameter_names",
    "expert_parameters",
    "issue_placement",
    "measure_cost_model",
    "set_gate_step",
    "sync_dense_gradients",
    "sync_expert_gradients",
    "sync_gradients",
    "sync_router_loads",
    "update_router_bias",
]
