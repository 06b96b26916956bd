"""Expert parallelism: the expert stage of an MoE layer spread over the ranks of a process group.

Build a layer with ``flexmoe.MoELayer(config, ep_group=group)`` (optionally ``placement=``,
``slots_per_rank=``, ``parallel=ParallelConfig(...)``); its ``experts`` is then a
``ParallelExperts``. Gradient and load synchronisation between steps live in
``flexmoe.runtime``. ``parallel=AdaptiveConfig(...)`` shards the experts instead and picks
data-parallel, expert-parallel or sharded execution per step (``ShardedExperts``).
See docs/parallel.md.
"""

from .adaptive_config import AdaptiveConfig
from .comm import all_to_all_v
from .config import ParallelConfig
from .expert_parallel import ParallelExperts, ep_stage
from .groups import EPGroup
from .sharded import ShardedExperts
from .tuning import MemoryReport

__all__ = [
    "AdaptiveConfig",
    "EPGroup",
    "MemoryReport",
    "ParallelConfig",
    "ParallelExperts",
    "ShardedExperts",
    "all_to_all_v",
    "ep_stage",
]
