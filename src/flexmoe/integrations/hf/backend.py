"""Plug flexmoe into HuggingFace models: the "flexmoe" experts implementation, and ``patch`` for
experts modules that do not dispatch through HF's experts interface."""

from __future__ import annotations

import functools

from torch import nn
from transformers.integrations.moe import ExpertsInterface

from .experts import experts_forward
from .layout import experts_layout, is_dbrx_experts, is_stacked_experts, takes_routing, unsupported

IMPLEMENTATION = "flexmoe"


def flexmoe_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """HF experts implementation "flexmoe": flexmoe's data path with kernels "auto" (Triton on CUDA)."""
    return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Register "flexmoe" in transformers' ``ExpertsInterface`` (idempotent).

    Afterwards ``model.set_experts_implementation("flexmoe")`` and
    ``from_pretrained(..., experts_implementation="flexmoe")`` run flexmoe in every experts module
    that HF dispatches through the interface.
    """
    ExpertsInterface.register(IMPLEMENTATION, flexmoe_experts_forward)


def patch(model: nn.Module, kernels: str = "auto") -> list[str]:
    """Run every experts module of ``model`` through flexmoe, whatever its experts implementation.

    Replaces each experts module's ``forward`` on the instance (the parameters stay where they are)
    and returns the module names. Covers modules that HF dispatches through its experts interface,
    modules with the same weights and forward contract that do not (custom or remote-code models),
    and DBRX's experts. ``kernels``: "auto" (Triton on CUDA), "triton" or "torch".
    Raises ``UnsupportedBlockError`` naming the first MoE block it cannot run, before patching any.
    """
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be one of ('auto', 'triton', 'torch'), got {kernels!r}")
    blocks = expert_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE experts modules for flexmoe to run")
    for name, module in blocks:
        experts_layout(module)
    for _, module in blocks:
        module.forward = functools.partial(experts_forward, module, kernels=kernels)
    return [name for name, _ in blocks]


def unpatch(model: nn.Module) -> list[str]:
    """Undo ``patch``: the experts modules of ``model`` use their class's forward again."""
    restored = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is experts_forward:
            del module.forward
            restored.append(name)
    return restored


def expert_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of ``model`` flexmoe can run, as ``(name, module)``.

    Raises ``UnsupportedBlockError`` for an MoE block it cannot run: an ``...Experts`` module whose
    weights are not stacked per expert, or whose forward does not take
    ``(hidden_states, top_k_index, top_k_weights)``, and blocks holding experts as an ``nn.ModuleList``.
    """
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if is_stacked_experts(module) or is_dbrx_experts(module):
            if not takes_routing(module):
                raise unsupported(
                    module, "its forward does not take (hidden_states, top_k_index, top_k_weights)", name
                )
            found.append((name, module))
        elif cls.endswith("Experts") and not cls.endswith("SharedExperts"):
            raise unsupported(module, "its expert weights are not stacked per expert", name)
        elif isinstance(getattr(module, "experts", None), nn.ModuleList):
            raise unsupported(
                module, "its experts are an nn.ModuleList of separate modules; flexmoe needs stacked [E, ...] "
                "expert weights (the transformers v5 layout)", name
            )
    return found
