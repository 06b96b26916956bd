"""Plug flexmoe into HuggingFace models: the "flexmoe" experts implementation, and ``patch`` for
experts modules that do not dispatch through HF's experts interface.

transformers accepts any registered experts implementation for any model and silently never calls
it where no experts module dispatches through the interface (a dense Llama, Switch Transformers,
JetMoe, DBRX). ``register`` therefore also makes choosing "flexmoe" check the model: building one
with ``experts_implementation="flexmoe"`` or calling ``set_experts_implementation("flexmoe")``
raises ``UnsupportedBlockError`` when flexmoe would not run.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import ExpertsInterface

from .experts import experts_forward
from .layout import (
    UnsupportedBlockError,
    experts_layout,
    is_dbrx_experts,
    is_stacked_experts,
    takes_routing,
    unsupported,
)

IMPLEMENTATION = "flexmoe"


def flexmoe_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """HF experts implementation "flexmoe": flexmoe's data path with kernels "auto" (Triton on CUDA)."""
    return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Register "flexmoe" in transformers' ``ExpertsInterface`` (idempotent).

    Afterwards ``model.set_experts_implementation("flexmoe")`` and
    ``from_pretrained(..., experts_implementation="flexmoe")`` run flexmoe in every experts module
    that HF dispatches through the interface, and choosing "flexmoe" for a model where it would
    never run (no experts module dispatches through the interface) raises ``UnsupportedBlockError``.
    """
    ExpertsInterface.register(IMPLEMENTATION, flexmoe_experts_forward)
    for name, hook in (("post_init", _check_after_init), ("set_experts_implementation", _check_before_set)):
        original = getattr(PreTrainedModel, name, None)
        if original is not None and getattr(original, "_flexmoe_original", None) is None:  # idempotent
            setattr(PreTrainedModel, name, _checked(original, hook))


def _checked(original, hook):
    """``original`` (a PreTrainedModel method) run through ``hook(self, original, ...)``."""

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return hook(self, original, *args, **kwargs)

    method._flexmoe_original = original
    return method


def _check_after_init(self: PreTrainedModel, original, *args, **kwargs):
    """``post_init``: a model built with experts_implementation="flexmoe" must have blocks it runs."""
    result = original(self, *args, **kwargs)
    if getattr(self.config, "_experts_implementation", None) == IMPLEMENTATION:
        # A submodel of a composite model without experts (a vision tower) passes when its
        # modeling file has interface-dispatched experts elsewhere (transformers' own heuristic).
        can_set = getattr(type(self), "_can_set_experts_implementation", None)
        _check_dispatches(self, allow_none=bool(can_set and can_set()))
    return result


def _check_before_set(self: PreTrainedModel, original, experts_implementation, *args, **kwargs):
    """``set_experts_implementation("flexmoe")``: check the model before anything changes."""
    if experts_implementation == IMPLEMENTATION:
        _check_dispatches(self)
    return original(self, experts_implementation, *args, **kwargs)


def _dispatches_through_interface(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' experts-interface dispatcher."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and code.co_filename == inspect.getsourcefile(hf_moe) and "experts_interface" in (
        code.co_freevars
    )


def _check_dispatches(model: nn.Module, allow_none: bool = False) -> list[str]:
    """Names of the experts modules of ``model`` that experts_implementation="flexmoe" runs.

    Raises ``UnsupportedBlockError`` for an MoE block flexmoe cannot run, and (unless
    ``allow_none``) when no experts module dispatches through transformers' experts interface,
    naming the model and what to do instead.
    """
    choice = f'experts_implementation="{IMPLEMENTATION}" on {type(model).__name__}'
    try:
        blocks = expert_blocks(model)
    except UnsupportedBlockError as err:
        raise UnsupportedBlockError(f"{choice}: {err}") from None
    names = [name for name, module in blocks if _dispatches_through_interface(module)]
    if not names and not allow_none:
        if blocks:
            hint = (f"its experts ({type(blocks[0][1]).__name__}) do not dispatch through transformers' experts "
                    "interface; run them with flexmoe.integrations.hf.patch(model) instead")
        else:
            hint = "it has no MoE experts module (a dense model?), so flexmoe would never run"
        raise UnsupportedBlockError(f"{choice}: {hint}")
    return names


def patch(model: nn.Module, kernels: str = "auto") -> list[str]:
    """Run every experts module of ``model`` through flexmoe, whatever its experts implementation.

    Replaces each experts module's ``forward`` on the instance (the parameters stay where they are)
    and returns the module names. Covers modules that HF dispatches through its experts interface,
    modules with the same weights and forward contract that do not (custom or remote-code models),
    and DBRX's experts. ``kernels``: "auto" (Triton on CUDA), "triton" or "torch".
    Raises ``UnsupportedBlockError`` naming the first MoE block it cannot run, before patching any,
    or when the model has no experts module at all.
    """
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be one of ('auto', 'triton', 'torch'), got {kernels!r}")
    blocks = expert_blocks(model)
    if not blocks:
        raise UnsupportedBlockError(
            f"{type(model).__name__} has no MoE experts modules for flexmoe to run (a dense model?)"
        )
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
