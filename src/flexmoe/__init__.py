"""flexmoe: fast, exact Mixture-of-Experts training for PyTorch.

What a training script needs: the layer (``MoEConfig``, ``MoELayer``), the per-step object
(``MoERuntime``, with ``aux_loss``), expert parallelism (``EPGroup``, ``ParallelConfig``; ``AdaptiveConfig`` for Tutel-style adaptive
parallelism over sharded experts) and
dynamic placement (``PlacementTable``, ``PlacementScheduler``, ``make_planner``). Everything else
lives in its subpackage: ``flexmoe.routing``, ``flexmoe.parallel``, ``flexmoe.placement``
(planning), ``flexmoe.runtime`` (between steps), ``flexmoe.sim``, ``flexmoe.models``,
``flexmoe.integrations.hf`` (needs transformers).

Names are imported on first use (PEP 562), so ``import flexmoe`` and the ``flexmoe`` command's
``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util

# public name -> the module that defines it
_EXPORTS = {
    "AdaptiveConfig": ".parallel",
    "DTSGateConfig": ".config",
    "EPGroup": ".parallel",
    "MoEConfig": ".config",
    "MoELayer": ".layer",
    "MoERuntime": ".runtime",
    "ParallelConfig": ".parallel",
    "PlacementScheduler": ".runtime",
    "PlacementTable": ".placement",
    "aux_loss": ".layer",
    "cuda_graph_layer": ".cuda_graph",
    "make_planner": ".placement",
    "moe_layers": ".layer",
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
