"""Expert parallelism: MoE experts spread over the ranks of a process group.

Build a layer with ``flexmoe.MoELayer(config, ep_group=group)`` (optionally ``placement=``,
``slots_per_rank=``, ``parallel=ParallelConfig(...)``) and call ``sync_gradients(model)`` after
each backward. See docs/parallel.md.
"""

from .comm import all_to_all_v
from .config import ParallelConfig
from .expert_parallel import ExpertParallel
from .groups import EPGroup
from .sync import (
    expert_parameter_names,
    expert_parameters,
    sync_dense_gradients,
    sync_expert_gradients,
    sync_gradients,
    sync_router_loads,
)
from .tuning import MemoryReport

__all__ = [
    "EPGroup",
    "ExpertParallel",
    "MemoryReport",
    "ParallelConfig",
    "all_to_all_v",
    "expert_parameter_names",
    "expert_parameters",
    "sync_dense_gradients",
    "sync_expert_gradients",
    "sync_gradients",
    "sync_router_loads",
]
