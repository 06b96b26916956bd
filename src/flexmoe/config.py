"""MoEConfig: the validated description of one MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

Activation = Literal["swiglu", "gelu", "relu"]
RouterKind = Literal["softmax", "sigmoid", "dts"]
TauSchedule = Literal["linear", "exponential"]
KernelChoice = Literal["auto", "triton", "torch", "fused", "hybrid", "per_expert"]

_ACTIVATIONS = ("swiglu", "gelu", "relu")
_ROUTERS = ("softmax", "sigmoid", "dts")
_TAU_SCHEDULES = ("linear", "exponential")
_KERNELS = ("auto", "triton", "torch", "fused", "hybrid", "per_expert")


@dataclasses.dataclass
class DTSGateConfig:
    """The EvoMoE dense-to-sparse gate (``MoEConfig.router = "dts"``); see ``flexmoe.routing_dts``.

    tau_max, tau_min: Gumbel-softmax temperature at gate step 0 and at ``anneal_steps`` onwards.
    anneal_steps: gate steps over which tau goes from tau_max to tau_min.
    schedule: "linear" or "exponential" (geometric) interpolation of tau.
    threshold: a token goes to every expert whose tempered probability exceeds it (and always
        to its most probable one).
    sparse_step: gate step from which the gate is plain top-k; None means ``anneal_steps``.
    top_k: experts per token in the sparse phase; None means ``MoEConfig.top_k``.
    The balance loss is weighted by ``MoEConfig.aux_loss_coef``.
    """

    tau_max: float = 2.0
    tau_min: float = 0.3
    anneal_steps: int = 1000
    schedule: TauSchedule = "exponential"
    threshold: float = 0.001
    sparse_step: int | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        for name in ("tau_max", "tau_min"):
            _require_float(self, name, positive=True)
        if self.tau_min > self.tau_max:
            raise ValueError(
                f"DTSGateConfig.tau_min={self.tau_min} must not exceed tau_max={self.tau_max}"
            )
        _require_int(self, "anneal_steps", minimum=1)
        _require_choice(self, "schedule", _TAU_SCHEDULES)
        _require_float(self, "threshold", positive=False)
        if self.threshold >= 1:
            raise ValueError(f"DTSGateConfig.threshold must be < 1, got {self.threshold}")
        if self.sparse_step is not None:
            _require_int(self, "sparse_step", minimum=0)
        if self.top_k is not None:
            _require_int(self, "top_k", minimum=1)

    @property
    def dense_steps(self) -> int:
        """Gate steps before the gate turns sparse top-k."""
        return self.anneal_steps if self.sparse_step is None else self.sparse_step


@dataclasses.dataclass
class MoEConfig:
    """One MoE feed-forward layer.

    d_model, d_ff: model width and per-expert hidden width.
    num_experts, top_k: routed experts and experts chosen per token (1 <= top_k <= num_experts).
    activation: "swiglu" (gated; ``gate_up_proj`` is ``[E, 2F, D]``), "gelu" or "relu"
        (``gate_up_proj`` is ``[E, F, D]``).
    router: "softmax" or "sigmoid" scores with top-k selection on score + balancing bias, or
        "dts", the EvoMoE dense-to-sparse gate configured by ``dts``.
    norm_topk_prob: renormalise the k chosen weights to sum to one.
    capacity_factor: None = dropless. A float gives each expert
        ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots; overflow pairs are dropped
        lowest router probability first and contribute zero.
    aux_loss_coef: Switch-Transformer load-balancing loss coefficient (0 disables it).
    z_loss_coef: router z-loss coefficient (ST-MoE; 0 disables it).
    bias_update_rate: DeepSeek-V3 auxiliary-loss-free balancing. A per-expert bias is added to the
        scores for top-k selection only; ``flexmoe.update_router_bias(model)`` (call it once after
        each ``optimizer.step()``) moves it by ``rate * sign(mean load - load)`` using the loads
        accumulated since the previous call. 0 disables it.
    num_shared_experts: dense experts of width ``d_ff`` every token passes through.
    shared_expert_gate: scale the shared experts by ``sigmoid(x @ w)`` (Qwen2-MoE style).
    router_dtype: dtype of router logits and probabilities (float32 by default).
    kernels: "auto" uses Triton kernels on CUDA and plain torch elsewhere; "triton" forces them
        (on CPU only under ``TRITON_INTERPRET=1``); "torch" never uses them. "fused" (opt-in,
        docs/kernels.md) runs the one-device expert stage in fused Triton grouped GEMMs (gather
        in the operand load, activation in the epilogue); with expert parallelism it acts as
        "triton". "hybrid" is the fused forward with the backward in grouped GEMMs on re-gathered
        rows ("auto" picks it where docs/kernels.md says it measured faster; "triton" under expert
        parallelism too). "per_expert" is "auto" with one cuBLAS GEMM per expert instead of the grouped
        GEMM (one host synchronisation per GEMM call, for few large experts).
    validate_inputs: check shape, dtype and finiteness of the input on every eager forward.
        On CPU a non-finite input raises ValueError; on GPU the check is an asynchronous device
        assert (no host synchronisation; a failure surfaces at a later CUDA call). Skipped under
        ``torch.compile``.
    init_std: standard deviation of the normal initialisation of all weights.
    dts: settings of the dense-to-sparse gate (used when ``router == "dts"``).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    activation: Activation = "swiglu"
    router: RouterKind = "softmax"
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    router_dtype: torch.dtype = torch.float32
    kernels: KernelChoice = "auto"
    validate_inputs: bool = True
    init_std: float = 0.02
    dts: DTSGateConfig = dataclasses.field(default_factory=DTSGateConfig)

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            _require_int(self, name, minimum=1)
        _require_int(self, "num_shared_experts", minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} must not exceed num_experts={self.num_experts}"
            )
        _require_choice(self, "activation", _ACTIVATIONS)
        _require_choice(self, "router", _ROUTERS)
        _require_choice(self, "kernels", _KERNELS)
        if self.capacity_factor is not None:
            _require_float(self, "capacity_factor", positive=True)
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            _require_float(self, name, positive=False)
        _require_float(self, "init_std", positive=True)
        for name in ("norm_topk_prob", "shared_expert_gate", "validate_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_expert_gate=True needs num_shared_experts >= 1")
        if not isinstance(self.router_dtype, torch.dtype) or not self.router_dtype.is_floating_point:
            raise ValueError(
                f"MoEConfig.router_dtype must be a floating torch.dtype, got {self.router_dtype!r}"
            )
        if not isinstance(self.dts, DTSGateConfig):
            raise ValueError(f"MoEConfig.dts must be a DTSGateConfig, got {type(self.dts).__name__}")
        if self.router == "dts":
            self._check_dts()

    def _check_dts(self) -> None:
        if self.dts.top_k is not None and self.dts.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.dts.top_k={self.dts.top_k} must not exceed num_experts={self.num_experts}"
            )
        if self.capacity_factor is not None:
            raise ValueError("MoEConfig.capacity_factor is not supported with router='dts' (use None)")
        if self.bias_update_rate:
            raise ValueError("MoEConfig.bias_update_rate is not supported with router='dts' (use 0)")

    @property
    def is_gated(self) -> bool:
        return self.activation == "swiglu"

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)


def _require_int(cfg, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{type(cfg).__name__}.{name} must be >= {minimum}, got {value}")


def _require_float(cfg, name: str, positive: bool) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{type(cfg).__name__}.{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{type(cfg).__name__}.{name} must be >= 0, got {value}")


def _require_choice(cfg, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")
