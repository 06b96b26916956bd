"""flexmoe: fast, exact Mixture-of-Experts training for PyTorch.

The layer (MoEConfig, MoELayer), expert parallelism (EPGroup, ParallelConfig, sync_gradients),
dynamic expert placement (PlacementScheduler and its planner / cost model), routing traces and the
placement simulator, and the dense-to-sparse gate. The HuggingFace backend is
``flexmoe.integrations.hf`` (needs transformers).
"""

from .config import DTSGateConfig, MoEConfig
from .layer import MoELayer, aux_loss, moe_layers, update_router_bias
from .parallel import EPGroup, ParallelConfig
from .placement import (
    CostModel,
    GreedyPlanner,
    LoadPredictor,
    PlacementTable,
    PredictorConfig,
    ReplanPolicy,
    make_planner,
    replica_quotas,
    split_tokens,
)
from .routing import DTSRouter, set_gate_step
from .runtime import PlacementScheduler, sync_gradients
from .sim import SyntheticTraceConfig, TraceRecorder, generate_trace, read_trace, simulate

__all__ = [
    "CostModel",
    "DTSGateConfig",
    "DTSRouter",
    "EPGroup",
    "GreedyPlanner",
    "LoadPredictor",
    "MoEConfig",
    "MoELayer",
    "ParallelConfig",
    "PlacementScheduler",
    "PlacementTable",
    "PredictorConfig",
    "ReplanPolicy",
    "SyntheticTraceConfig",
    "TraceRecorder",
    "aux_loss",
    "generate_trace",
    "make_planner",
    "moe_layers",
    "read_trace",
    "replica_quotas",
    "set_gate_step",
    "simulate",
    "split_tokens",
    "sync_gradients",
    "update_router_bias",
]
__version__ = "0.1.0"
