"""flexmoe: fast, exact Mixture-of-Experts training for PyTorch.

What a training script needs: the layer (``MoEConfig``, ``MoELayer``), the per-step object
(``MoERuntime``, with ``aux_loss``), expert parallelism (``EPGroup``, ``ParallelConfig``) and
dynamic placement (``PlacementTable``, ``PlacementScheduler``, ``make_planner``). Everything else
lives in its subpackage: ``flexmoe.routing``, ``flexmoe.parallel``, ``flexmoe.placement``
(planning), ``flexmoe.runtime`` (between steps), ``flexmoe.sim``, ``flexmoe.models``,
``flexmoe.integrations.hf`` (needs transformers).
"""

from .config import DTSGateConfig, MoEConfig
from .layer import MoELayer, aux_loss, moe_layers
from .parallel import EPGroup, ParallelConfig
from .placement import PlacementTable, make_planner
from .runtime import MoERuntime, PlacementScheduler

__all__ = [
    "DTSGateConfig",
    "EPGroup",
    "MoEConfig",
    "MoELayer",
    "MoERuntime",
    "ParallelConfig",
    "PlacementScheduler",
    "PlacementTable",
    "aux_loss",
    "make_planner",
    "moe_layers",
]
__version__ = "0.1.0"
