"""flexmoe: fast, exact Mixture-of-Experts training for PyTorch.

The layer (MoEConfig, MoELayer), expert parallelism (EPGroup, ParallelConfig, sync_gradients),
dynamic expert placement (PlacementScheduler and its planner / cost model), routing traces and the
placement simulator, and the dense-to-sparse gate. The HuggingFace backend is
``flexmoe.integrations.hf`` (needs transformers).

Names are imported on first use (PEP 562), so ``import flexmoe`` and the ``flexmoe`` command's
``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util

# public name -> the module that defines it
_EXPORTS = {
    "CostModel": ".placement",
    "DTSGateConfig": ".config",
    "DTSRouter": ".routing",
    "EPGroup": ".parallel",
    "GreedyPlanner": ".placement",
    "LoadPredictor": ".placement",
    "MoEConfig": ".config",
    "MoELayer": ".layer",
    "ParallelConfig": ".parallel",
    "PlacementScheduler": ".runtime",
    "PlacementTable": ".placement",
    "SyntheticTraceConfig": ".sim",
    "TraceRecorder": ".sim",
    "aux_loss": ".layer",
    "generate_trace": ".sim",
    "make_planner": ".placement",
    "moe_layers": ".layer",
    "read_trace": ".sim",
    "replica_quotas": ".placement",
    "set_gate_step": ".routing",
    "simulate": ".sim",
    "split_tokens": ".placement",
    "sync_gradients": ".runtime",
    "update_router_bias": ".layer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, or a subpackage (``flexmoe.parallel``) as an eager import used to provide."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
