"""flexmoe: fast, exact Mixture-of-Experts layers for PyTorch."""

from .config import MoEConfig
from .layer import MoELayer, aux_loss, moe_layers, update_router_bias

__all__ = ["MoEConfig", "MoELayer", "aux_loss", "moe_layers", "update_router_bias"]
__version__ = "0.1.0"
from .placement.scheduler import PlacementScheduler  # noqa: E402
__all__ += ["PlacementScheduler"]
from .parallel import EPGroup, ParallelConfig, sync_gradients  # noqa: E402
__all__ += ["EPGroup", "ParallelConfig", "sync_gradients"]
from .placement import CostModel, GreedyPlanner, LoadPredictor, make_planner, replica_quotas, split_tokens  # noqa: E402
__all__ += ["CostModel", "GreedyPlanner", "LoadPredictor", "make_planner", "replica_quotas", "split_tokens"]
from .sim import SyntheticTraceConfig, TraceRecorder, generate_trace, read_trace, simulate  # noqa: E402
__all__ += ["SyntheticTraceConfig", "TraceRecorder", "generate_trace", "read_trace", "simulate"]
from .config import DTSGateConfig  # noqa: E402
from .routing_dts import DTSRouter, set_gate_step  # noqa: E402
__all__ += ["DTSGateConfig", "DTSRouter", "set_gate_step"]
