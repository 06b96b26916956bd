"""How one HuggingFace experts module's weights map onto flexmoe's grouped GEMMs.

Legend: E experts, D model width, F expert hidden width, H = 2F (gated) or F (not gated).
flexmoe multiplies grouped rows by ``w[e]^T`` with ``w`` of shape ``[E, out, in]``; every tensor here is
a view of the module's own parameters in that orientation (a transpose or reshape view, never a copy),
so gradients land in HF's parameters directly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe

ActFn = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedBlockError(ValueError):
    """An MoE block whose expert weights or forward contract flexmoe cannot run."""


def unsupported(block: nn.Module, reason: str, name: str = "") -> UnsupportedBlockError:
    where = f" at '{name}'" if name else ""
    return UnsupportedBlockError(f"flexmoe cannot run MoE block {type(block).__name__}{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """flexmoe's view of one experts module.

    up_EHD: first projection (gate rows then up rows when gated). gate_EFD: a separate gate
        projection (DBRX keeps gate and up apart); None when it is part of ``up_EHD``.
    down_EDF: second projection. up_bias_EH, down_bias_ED: per-expert biases or None.
    act_fn: maps the first projection's rows ``[N, H]`` to ``[N, F]``; None means SiLU-gated
        (``silu(gate) * up`` on concatenated halves), which runs as flexmoe's fused op.
    post_norm: a norm applied to each expert output before weighting (the routing weight can then
        not be folded into the activation).
    sentinels: expert ids >= num_experts may occur (HF expert parallelism) and must be skipped.
    """

    block: str
    num_experts: int
    up_EHD: torch.Tensor
    down_EDF: torch.Tensor
    gate_EFD: torch.Tensor | None = None
    up_bias_EH: torch.Tensor | None = None
    down_bias_ED: torch.Tensor | None = None
    act_fn: ActFn | None = None
    post_norm: nn.Module | None = None
    sentinels: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.down_EDF.dtype


def is_silu(act_fn: object) -> bool:
    return isinstance(act_fn, (nn.SiLU, SiLUActivation))


def is_stacked_experts(module: nn.Module) -> bool:
    """HF v5 layout: 3-D ``down_proj`` plus ``gate_up_proj`` (gated) or ``up_proj`` (not gated)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (
        isinstance(down, nn.Parameter) and down.dim() == 3 and isinstance(up, nn.Parameter) and up.dim() == 3
    )


def is_dbrx_experts(module: nn.Module) -> bool:
    """DBRX layout: ``mlp.w1`` (gate), ``mlp.v1`` (up), ``mlp.w2`` (down^T), each ``[E*F, D]``."""
    mlp = getattr(module, "mlp", None)
    names = ("w1", "v1", "w2")
    return isinstance(mlp, nn.Module) and all(isinstance(getattr(mlp, n, None), nn.Parameter) for n in names)


def takes_routing(module: nn.Module) -> bool:
    """Whether ``forward`` takes ``(hidden_states, top_k_index, top_k_weights)``."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The layout of ``module``, or ``UnsupportedBlockError`` naming it."""
    if is_stacked_experts(module):
        return _stacked_layout(module)
    if is_dbrx_experts(module):
        return _dbrx_layout(module)
    raise unsupported(
        module,
        "expected stacked expert weights (3-D gate_up_proj/up_proj and down_proj, the transformers v5 layout) "
        "or DBRX's mlp.w1/v1/w2",
    )


def _stacked_layout(module: nn.Module) -> ExpertsLayout:
    has_gate = getattr(module, "has_gate", hasattr(module, "gate_up_proj"))
    has_bias = getattr(module, "has_bias", False)
    transposed = getattr(module, "is_transposed", False)
    up = module.gate_up_proj if has_gate else module.up_proj
    up_EHD = up.transpose(1, 2) if transposed else up
    down_EDF = module.down_proj.transpose(1, 2) if transposed else module.down_proj
    E, D, F = down_EDF.shape
    H = 2 * F if has_gate else F
    if tuple(up_EHD.shape) != (E, H, D):
        raise unsupported(
            module,
            f"{'gate_up_proj' if has_gate else 'up_proj'} has shape {tuple(up.shape)}, which does not match "
            f"down_proj {tuple(module.down_proj.shape)} (is_transposed={transposed}, has_gate={has_gate})",
        )
    up_bias = down_bias = None
    if has_bias:
        up_bias = module.gate_up_proj_bias if has_gate else module.up_proj_bias
        down_bias = module.down_proj_bias
        if tuple(up_bias.shape) != (E, H) or tuple(down_bias.shape) != (E, D):
            raise unsupported(module, f"expert biases of shapes {tuple(up_bias.shape)} and "
                                      f"{tuple(down_bias.shape)}, expected {(E, H)} and {(E, D)}")
    if getattr(module, "num_experts", E) != E:
        raise unsupported(module, f"num_experts={module.num_experts} but its weights hold {E} experts "
                                  "(transformers' own expert-parallel sharding is not supported)")
    post_norm = module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None
    return ExpertsLayout(
        block=type(module).__name__,
        num_experts=E,
        up_EHD=up_EHD,
        down_EDF=down_EDF,
        up_bias_EH=up_bias,
        down_bias_ED=down_bias,
        act_fn=_stacked_act_fn(module, has_gate),
        post_norm=post_norm,
        sentinels=getattr(module, "_is_expert_parallel", True),
    )


def _stacked_act_fn(module: nn.Module, has_gate: bool) -> ActFn | None:
    """The module's own ``_apply_gate`` when it overrides HF's default (GPT-OSS's clamped, interleaved
    SwiGLU); otherwise ``act_fn`` (gated: on concatenated halves; SiLU-gated: None, the fused op)."""
    apply_gate = getattr(type(module), "_apply_gate", None)
    if has_gate and apply_gate is not None and apply_gate is not getattr(hf_moe, "_default_apply_gate", None):
        return module._apply_gate
    act_fn = getattr(module, "act_fn", None)
    if not callable(act_fn):
        raise unsupported(module, "it has neither an act_fn nor its own _apply_gate")
    if not has_gate:
        return act_fn
    if not getattr(module, "is_concatenated", True):
        raise unsupported(module, "interleaved gate/up rows (is_concatenated=False) need an _apply_gate method")
    return None if is_silu(act_fn) else _glu(act_fn)


def _dbrx_layout(module: nn.Module) -> ExpertsLayout:
    mlp = module.mlp
    E = module.num_experts
    D = mlp.w1.shape[1]
    F = mlp.w1.shape[0] // E
    for name in ("w1", "v1", "w2"):
        if tuple(getattr(mlp, name).shape) != (E * F, D):
            raise unsupported(module, f"mlp.{name} has shape {tuple(getattr(mlp, name).shape)}, expected {(E * F, D)}")
    act = mlp.activation_fn
    return ExpertsLayout(
        block=type(module).__name__,
        num_experts=E,
        up_EHD=mlp.v1.view(E, F, D),
        gate_EFD=mlp.w1.view(E, F, D),
        down_EDF=mlp.w2.view(E, F, D).transpose(1, 2),
        act_fn=None if is_silu(act) else _glu(act),
        sentinels=True,
    )


def _glu(act_fn: ActFn) -> ActFn:
    """``act(gate) * up`` on concatenated ``[gate | up]`` rows."""

    def gated(h_NH: torch.Tensor) -> torch.Tensor:
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return act_fn(gate_NF) * up_NF

    return gated
