"""MoEConfig: the validated description of one MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
The configs are frozen, so a layer never runs on a value that skipped the checks: derive a changed
config with ``dataclasses.replace(cfg, top_k=1)`` (validated again) and build a new layer.
(``__post_init__`` only checks; a field it had to normalise would need ``object.__setattr__``.)
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

import torch

Activation = Literal["swiglu", "swiglu_clamped", "gelu", "relu"]
RouterKind = Literal["softmax", "sigmoid", "dts"]
CapacityPriority = Literal["prob", "weight", "position"]
AuxLossExperts = Literal["selected", "unbiased"]
AuxLossScope = Literal["batch", "sequence", "global", "pooled"]
TauSchedule = Literal["linear", "exponential"]
SparseGate = Literal["topk", "gumbel_top1"]
DTSBalance = Literal["probs", "masked"]
DTSEvalRouting = Literal["phase", "top1"]
KernelChoice = Literal["auto", "triton", "torch", "fused", "hybrid", "epilogue", "per_expert"]

_ACTIVATIONS = ("swiglu", "swiglu_clamped", "gelu", "relu")
_PRIORITIES = ("prob", "weight", "position")
_AUX_EXPERTS = ("selected", "unbiased")
_AUX_SCOPES = ("batch", "sequence", "global", "pooled")
_ROUTERS = ("softmax", "sigmoid", "dts")
_TAU_SCHEDULES = ("linear", "exponential")
_SPARSE_GATES = ("topk", "gumbel_top1")
_DTS_BALANCES = ("probs", "masked")
_DTS_EVAL_ROUTINGS = ("phase", "top1")
_KERNELS = ("auto", "triton", "torch", "fused", "hybrid", "epilogue", "per_expert")


@dataclasses.dataclass(frozen=True)
class DTSGateConfig:
    """The EvoMoE dense-to-sparse gate (``MoEConfig.router = "dts"``); see ``flexmoe.routing.dts``.

    tau_max: Gumbel-softmax temperature at gate step 0.
    tau_min: Gumbel-softmax temperature from anneal_steps onwards.
    anneal_steps: gate steps over which tau goes from tau_max to tau_min.
    schedule: "linear" or "exponential" (geometric) interpolation of tau.
    threshold: a token goes to every expert whose tempered probability exceeds it (and always
        to its most probable one).
    sparse_step: gate step from which the gate is sparse; None means ``anneal_steps``. A value
        above ``anneal_steps`` keeps tau at tau_min for a plateau before the switch.
    sparse_gate: the sparse phase: "topk" (deterministic top-k on the softmax) or "gumbel_top1"
        (argmax of logits + Gumbel noise in training, of the logits in evaluation: Switch-like).
    top_k: experts per token in the "topk" sparse phase; None means ``MoEConfig.top_k``.
    renormalize: divide the combine weights of a token by their sum; None means
        ``MoEConfig.norm_topk_prob``.
    balance: "probs": ``E * sum_e mean_t(p_te) * mean_t(mask_te)``; "masked": the same with the
        masked gates ``p_te * mask_te`` in the first mean. Weighted by ``MoEConfig.aux_loss_coef``.
    eval_routing: in evaluation mode, "phase" routes as the current phase does (without noise),
        "top1" always sends each token to its most probable expert only.

    Defaults are flexmoe's earlier gate (exponential tau 2.0 -> 0.3, top-k, renormalised, balance
    on the unmasked probabilities, phase routing in evaluation). The authors' code
    (codecaution/EvoMoE, fairseq/modules/moe/topkgate.py, fairseq_cli/train.py): tau_max 2.0,
    tau_min 0.5, schedule "linear", threshold 0.001, sparse_step after anneal_steps (a plateau),
    sparse_gate "gumbel_top1", renormalize False, balance "masked", eval_routing "top1".
    """

    tau_max: float = 2.0
    tau_min: float = 0.3
    anneal_steps: int = 1000
    schedule: TauSchedule = "exponential"
    threshold: float = 0.001
    sparse_step: int | None = None
    top_k: int | None = None
    sparse_gate: SparseGate = "topk"
    renormalize: bool | None = None
    balance: DTSBalance = "probs"
    eval_routing: DTSEvalRouting = "phase"

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
        _require_choice(self, "sparse_gate", _SPARSE_GATES)
        _require_choice(self, "balance", _DTS_BALANCES)
        _require_choice(self, "eval_routing", _DTS_EVAL_ROUTINGS)
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise ValueError(f"DTSGateConfig.renormalize must be a bool or None, got {self.renormalize!r}")

    @classmethod
    def authors(cls, anneal_steps: int = 5000, sparse_step: int = 6000) -> "DTSGateConfig":
        """The gate of the EvoMoE authors' code (see the class docstring), with their step counts
        by default."""
        return cls(tau_max=2.0, tau_min=0.5, anneal_steps=anneal_steps, schedule="linear", threshold=0.001,
                   sparse_step=sparse_step, sparse_gate="gumbel_top1", renormalize=False, balance="masked",
                   eval_routing="top1")

    @property
    def dense_steps(self) -> int:
        """Gate steps before the gate turns sparse."""
        return self.anneal_steps if self.sparse_step is None else self.sparse_step


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward layer (docs/routing.md maps each peer's routing option to a field).

    d_model, d_ff: model width and per-expert hidden width.
    num_experts, top_k: routed experts and experts chosen per token (1 <= top_k <= num_experts).
    activation: "swiglu" (gated; ``gate_up_proj`` is ``[E, 2F, D]``), "swiglu_clamped"
        (GPT-OSS: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=l)``,
        with ``l = swiglu_limit``, ``alpha = swiglu_alpha``; same layout), "gelu" or "relu"
        (``gate_up_proj`` is ``[E, F, D]``).
    expert_biases: the experts' projections have biases (``gate_up_proj_bias [E, H]``,
        ``down_proj_bias [E, D]``, GPT-OSS).
    router: "softmax" or "sigmoid" scores with top-k selection on score + balancing bias, or
        "dts", the EvoMoE dense-to-sparse gate configured by ``dts``.
    router_bias: the router's linear layer has a bias (GPT-OSS).
    router_jitter: multiply the router's input by ``U(1 - eps, 1 + eps)`` noise in training mode
        (Switch / Megatron ``input_jitter_eps``; the experts see the clean input). 0 disables it.
    norm_topk_prob: renormalise the k chosen weights to sum to one.
    routed_scaling_factor: multiplies the combine weights, after renormalisation (DeepSeek-V3
        ``routed_scaling_factor``, torchtitan ``route_scale``, Megatron ``topk_scaling_factor``).
    num_groups, top_groups, group_score_experts: group-limited routing (DeepSeek-V3 ``n_group``,
        ``topk_group``): experts are cut into ``num_groups`` contiguous groups, a group scores the
        sum of its ``group_score_experts`` best selection scores (2 in DeepSeek-V3, 1 = the max as
        in DeepSeek-V2), and each token picks its top-k among the ``top_groups`` best groups.
        ``top_groups=None`` means all groups (no limit).
    max_ranks_per_token, max_nodes_per_token: device- / node-limited routing under expert
        parallelism: the same rule with the groups being the ranks (nodes) that hold the experts
        (docs/routing.md). None = no limit. Without expert parallelism they have no effect.
    capacity_factor: None = dropless. A number gives each expert
        ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots, computed exactly with the
        factor read as the decimal it prints as (1.1 is 11/10); overflow pairs are dropped in
        ``capacity_priority`` order and contribute zero.
    capacity_priority: which pairs an over-full expert keeps: "prob" (highest router score),
        "weight" (highest final combine weight, Megatron) or "position" (earliest token, Switch).
    aux_loss_coef: Switch-Transformer load-balancing loss coefficient (0 disables it).
    aux_loss_experts: which experts the load fractions of that loss count under a balancing
        bias: "selected" (the bias-shifted choice that is dispatched) or "unbiased" (top-k of the
        unbiased scores, Megatron).
    aux_loss_scope: "batch" (the layer's tokens), "sequence" (DeepSeek-V3 sequence-wise loss:
        the loss per sequence of a ``[..., S, D]`` input, averaged over sequences; a 2-d input is
        one sequence), "global" (Qwen3 / Megatron global-batch: load fractions from counts summed
        over the layer's data-parallel group) or "pooled" (HF ``router_aux_loss_coef``
        convention: ``top_k`` x the Switch loss with tokens pooled over all layers; computed by
        ``flexmoe.aux_loss(model)``, the layer's own ``aux_loss`` holds only the z-loss).
    z_loss_coef: router z-loss coefficient (ST-MoE; 0 disables it).
    bias_update_rate: DeepSeek-V3 auxiliary-loss-free balancing. A per-expert float32 bias is
        added to the scores for top-k selection only; ``flexmoe.runtime.update_router_bias(model)``
        (call it once after each ``optimizer.step()``) moves it by ``rate * sign(mean load - load)``
        using the loads accumulated since the previous call. 0 = frozen: a bias loaded with
        ``load_state_dict`` is still applied.
    num_shared_experts: dense experts every token passes through, of total width
        ``shared_d_ff`` (None = ``num_shared_experts * d_ff``).
    shared_expert_gate: scale the shared experts by ``sigmoid(x @ w)`` (Qwen2-MoE style).
    router_dtype: dtype of router logits and probabilities (float32 by default).
    kernels: "auto" uses Triton kernels on CUDA and plain torch elsewhere; "triton" forces them
        (on CPU only under ``TRITON_INTERPRET=1``); "torch" never uses them. "fused" (opt-in,
        docs/kernels.md) runs the one-device expert stage in fused Triton grouped GEMMs (gather
        in the operand load, activation in the epilogue); with expert parallelism it acts as
        "triton". "hybrid" is the fused forward with the backward in grouped GEMMs on re-gathered
        rows ("auto" picks it where docs/kernels.md says it measured faster; "triton" under expert
        parallelism too). "epilogue" (opt-in) keeps the unfused path's grouped rows and grouped GEMMs
        but runs the gate_up GEMM and the down dgrad as Triton GEMMs with the activation (forward,
        backward) in their epilogues. "fused", "hybrid" and "epilogue" do not take
        ``expert_biases`` or "swiglu_clamped" (a ValueError at construction). "per_expert" is "auto" with one cuBLAS GEMM per expert instead
        of the grouped GEMM (one host synchronisation per GEMM call, for few large experts).
    validate_inputs: check shape, dtype and finiteness of the input on every eager forward.
        On CPU a non-finite input raises ValueError; on GPU the check is an asynchronous device
        assert (no host synchronisation; a failure surfaces at a later CUDA call). Skipped under
        ``torch.compile``.
    init_std: standard deviation of the normal initialisation of all weights (biases start at 0).
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
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_biases: bool = False
    router_bias: bool = False
    router_jitter: float = 0.0
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    top_groups: int | None = None
    group_score_experts: int = 2
    max_ranks_per_token: int | None = None
    max_nodes_per_token: int | None = None
    capacity_priority: CapacityPriority = "prob"
    aux_loss_experts: AuxLossExperts = "selected"
    aux_loss_scope: AuxLossScope = "batch"
    shared_d_ff: int | None = None

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
        self._check_routing_options()
        if self.router == "dts":
            self._check_dts()

    def _check_routing_options(self) -> None:
        for name in ("swiglu_alpha", "swiglu_limit", "routed_scaling_factor"):
            _require_float(self, name, positive=True)
        _require_float(self, "router_jitter", positive=False)
        if self.router_jitter >= 1:
            raise ValueError(f"MoEConfig.router_jitter must be < 1, got {self.router_jitter}")
        for name in ("expert_biases", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _require_choice(self, "capacity_priority", _PRIORITIES)
        _require_choice(self, "aux_loss_experts", _AUX_EXPERTS)
        _require_choice(self, "aux_loss_scope", _AUX_SCOPES)
        _require_int(self, "num_groups", minimum=1)
        _require_int(self, "group_score_experts", minimum=1)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"MoEConfig.num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )
        if self.top_groups is not None:
            _require_int(self, "top_groups", minimum=1)
            if self.top_groups > self.num_groups:
                raise ValueError(
                    f"MoEConfig.top_groups={self.top_groups} must not exceed num_groups={self.num_groups}"
                )
            reachable = self.top_groups * (self.num_experts // self.num_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"MoEConfig.top_groups={self.top_groups} groups of {self.num_experts // self.num_groups} "
                    f"experts hold fewer than top_k={self.top_k} experts"
                )
        for name in ("max_ranks_per_token", "max_nodes_per_token"):
            if getattr(self, name) is not None:
                _require_int(self, name, minimum=1)
        if self.kernels in ("fused", "hybrid", "epilogue") and (self.expert_biases or self.activation == "swiglu_clamped"):
            option = "expert_biases=True" if self.expert_biases else "activation='swiglu_clamped'"
            raise ValueError(
                f"MoEConfig.kernels={self.kernels!r} does not support {option} (the fused kernels have no expert "
                "biases and no clamped SwiGLU); use kernels='auto'"
            )
        if self.shared_d_ff is not None:
            _require_int(self, "shared_d_ff", minimum=1)
            if self.num_shared_experts == 0:
                raise ValueError("MoEConfig.shared_d_ff needs num_shared_experts >= 1")
        if self.router == "dts":
            defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
            for name in ("num_groups", "top_groups", "max_ranks_per_token", "max_nodes_per_token",
                         "capacity_priority", "aux_loss_experts", "aux_loss_scope", "router_jitter",
                         "routed_scaling_factor"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"MoEConfig.{name} is not supported with router='dts' (leave the default)")

    @property
    def limits_groups(self) -> bool:
        """Whether top-k is restricted to the best groups (``num_groups``/``top_groups``)."""
        return self.top_groups is not None and self.top_groups < self.num_groups

    @property
    def shared_width(self) -> int:
        """Total hidden width of the shared experts."""
        return self.num_shared_experts * self.d_ff if self.shared_d_ff is None else self.shared_d_ff

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
        return self.activation in ("swiglu", "swiglu_clamped")

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` tokens, or None when dropless.

        ``ceil(capacity_factor * num_tokens * top_k / num_experts)`` in exact integer arithmetic,
        the factor taken as the shortest decimal that prints as it (so 1.1 * 10 / 11 is exactly 1).
        """
        if self.capacity_factor is None:
            return None
        factor = Fraction(repr(float(self.capacity_factor)))
        numerator = factor.numerator * num_tokens * self.top_k
        return -(-numerator // (factor.denominator * self.num_experts))


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
