"""Load one HuggingFace MoE block into a plain ``flexmoe.MoELayer`` (no HF code in its forward).

Legend: E experts, D model width, F expert hidden width, Fs shared-expert width.
``moe_config_from_hf(hf_config)`` gives the MoEConfig that reproduces the block's routing and
experts, ``moe_state_dict_from_hf(hf_config, block_state)`` renames and re-lays its tensors
(``block_state``: the block's own ``state_dict()``, e.g. ``model.model.layers[i].mlp``), and
``moe_layer_from_hf`` does both. Covered: DeepSeek-V3, Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral and
GPT-OSS (docs/routing.md lists which HF option maps to which field). Only attributes of the HF
config are read; transformers itself is not imported.
"""

from __future__ import annotations

import dataclasses

import torch

from ...config import MoEConfig
from ...layer import MoELayer

_SOFTMAX_TOPK = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
SUPPORTED = ("deepseek_v3",) + _SOFTMAX_TOPK + ("gpt_oss",)


def _model_type(hf_config) -> str:
    kind = getattr(hf_config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"moe_config_from_hf: model_type {kind!r} is not one of {SUPPORTED}")
    return kind


def _num_experts(hf_config) -> int:
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = getattr(hf_config, name, None)
        if value:
            return int(value)
    raise ValueError("moe_config_from_hf: the HF config names no expert count")


def moe_config_from_hf(hf_config, **overrides) -> MoEConfig:
    """The MoEConfig of one MoE block of ``hf_config``; ``overrides`` replace any field."""
    kind = _model_type(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if kind != "gpt_oss" and act != "silu":
        raise ValueError(f"moe_config_from_hf: hidden_act {act!r} is not SiLU (flexmoe's 'swiglu')")
    fields = dict(
        d_model=hf_config.hidden_size,
        d_ff=getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size,
        num_experts=_num_experts(hf_config),
        top_k=hf_config.num_experts_per_tok,
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", True)),
    )
    if kind == "deepseek_v3":
        fields.update(router="sigmoid", routed_scaling_factor=float(hf_config.routed_scaling_factor),
                      num_groups=hf_config.n_group, top_groups=hf_config.topk_group, group_score_experts=2,
                      num_shared_experts=hf_config.n_shared_experts or 0)
    elif kind == "qwen2_moe":
        fields.update(num_shared_experts=1, shared_d_ff=hf_config.shared_expert_intermediate_size,
                      shared_expert_gate=True)
    elif kind == "mixtral":
        fields.update(norm_topk_prob=True)
    elif kind == "gpt_oss":
        fields.update(activation="swiglu_clamped", swiglu_alpha=float(getattr(hf_config, "swiglu_alpha", 1.702)),
                      swiglu_limit=float(hf_config.swiglu_limit), expert_biases=True, router_bias=True,
                      norm_topk_prob=True)
    return dataclasses.replace(MoEConfig(**fields), **overrides) if overrides else MoEConfig(**fields)


def _swiglu_shared(block_state: dict, prefix: str) -> dict:
    return {
        "shared_experts.gate_up_proj": torch.cat(
            [block_state[prefix + "gate_proj.weight"], block_state[prefix + "up_proj.weight"]], dim=0
        ),
        "shared_experts.down_proj": block_state[prefix + "down_proj.weight"],
    }


def _deinterleave(rows_EHX: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's interleaved (gate, up, gate, up, ...) rows -> flexmoe's [gate | up] halves."""
    return torch.cat([rows_EHX[:, 0::2], rows_EHX[:, 1::2]], dim=1)


def moe_state_dict_from_hf(hf_config, block_state: dict) -> dict:
    """``MoELayer`` state dict from the HF block's ``state_dict()`` (tensors are re-laid, not shared)."""
    kind = _model_type(hf_config)
    s = block_state
    if kind == "gpt_oss":
        return {
            "router.weight": s["router.weight"],
            "router.bias": s["router.bias"],
            "experts.gate_up_proj": _deinterleave(s["experts.gate_up_proj"].transpose(1, 2)),
            "experts.gate_up_proj_bias": _deinterleave(s["experts.gate_up_proj_bias"].unsqueeze(-1)).squeeze(-1),
            "experts.down_proj": s["experts.down_proj"].transpose(1, 2),
            "experts.down_proj_bias": s["experts.down_proj_bias"],
        }
    out = {
        "router.weight": s["gate.weight"],
        "experts.gate_up_proj": s["experts.gate_up_proj"],
        "experts.down_proj": s["experts.down_proj"],
    }
    if kind == "deepseek_v3":
        out["router.expert_bias"] = s["gate.e_score_correction_bias"].to(torch.float32)
        if getattr(hf_config, "n_shared_experts", 0):
            out.update(_swiglu_shared(s, "shared_experts."))
    elif kind == "qwen2_moe":
        out.update(_swiglu_shared(s, "shared_expert."))
        out["shared_experts.gate.weight"] = s["shared_expert_gate.weight"]
    return {name: t.detach().clone() for name, t in out.items()}


def moe_layer_from_hf(hf_config, block_state: dict, **overrides) -> MoELayer:
    """A ``MoELayer`` holding the HF block's weights, in the dtype of those weights."""
    state = moe_state_dict_from_hf(hf_config, block_state)
    layer = MoELayer(moe_config_from_hf(hf_config, **overrides))
    layer.to(state["experts.down_proj"].dtype)
    layer.load_state_dict(state, strict=False)
    missing = set(layer.state_dict()) - set(state) - {"router.expert_bias"}
    if missing:
        raise ValueError(f"moe_layer_from_hf: no HF tensor for {sorted(missing)}")
    return layer
