"""What happens between training steps: gradient and load sync, migration, the placement
scheduler, measuring the cost model's constants."""

from .measure import measure_cost_model
from .migration import MigrationReport, apply_placement, check_same_placement
from .scheduler import PlacementScheduler
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
    "PlacementScheduler",
    "apply_placement",
    "check_same_placement",
    "expert_parameter_names",
    "expert_parameters",
    "measure_cost_model",
    "sync_dense_gradients",
    "sync_expert_gradients",
    "sync_gradients",
    "sync_router_loads",
]
