"""Expert parallelism: the expert stage of an MoE layer spread over the ranks of a process group.

Build a layer with ``flexmoe.MoELayer(config, ep_group=group)`` (optionally ``placement=``,
``slots_per_rank=``, ``parallel=ParallelConfig(...)``); its ``experts`` is then a
``ParallelExperts``. Gradient and load synchronisation between steps live in
``flexmoe.runtime``. See docs/parallel.md.
"""

from .comm import all_to_all_v
from .config import ParallelConfig
from .expert_parallel import ParallelExperts, ep_stage
from .groups import EPGroup
from .tuning import MemoryReport

__all__ = ["EPGroup", "MemoryReport", "ParallelConfig", "ParallelExperts", "all_to_all_v", "ep_stage"]
