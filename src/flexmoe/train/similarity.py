"""Expert similarity: how alike the experts of each MoE layer are (OMoE's diagnosis).

Legend: E logical experts, N numel of one expert's weights, T tokens, D model width.
``weight_cos``: mean over expert pairs of the cosine of their flattened weights (gate_up_proj
and down_proj together). ``output_cos``: mean over expert pairs of the cosine of their outputs
on the same tokens (every expert applied to the layer's inputs of a fixed batch). 1 means
identical experts (e.g. right after upcycling); fresh random experts give about 0 for weights.
Both are collective under expert parallelism (the experts are gathered from their ranks).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..layer import MoELayer, moe_layers
from ..parallel import ParallelExperts
from ..parallel.checkpoint import logical_rows


def mean_pairwise_cosine(rows_EN: torch.Tensor) -> float:
    """Mean cosine over the E(E-1)/2 pairs of rows (1.0 for a single row)."""
    E = rows_EN.shape[0]
    if E < 2:
        return 1.0
    unit_EN = rows_EN.double() / rows_EN.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos_EE = unit_EN @ unit_EN.T
    return float(cos_EE[torch.triu_indices(E, E, 1).unbind()].mean())


def logical_expert_weights(layer: MoELayer) -> dict[str, torch.Tensor]:
    """``{name: [E, ...]}`` of every expert tensor in logical order (collective under EP)."""
    experts = layer.experts
    out = {}
    for name, p in experts.named_parameters():
        if isinstance(experts, ParallelExperts):
            out[name] = logical_rows(experts.ep_group, experts.placement, p.detach())
        else:
            out[name] = p.detach()
    return out


def weight_cosine(layer: MoELayer) -> float:
    weights = logical_expert_weights(layer)
    E = layer.config.num_experts
    return mean_pairwise_cosine(torch.cat([w.reshape(E, -1) for w in weights.values()], dim=1))


@torch.no_grad()
def output_cosine(layer: MoELayer, x_TD: torch.Tensor) -> float:
    """Every expert applied (unweighted) to the same tokens ``x_TD``; mean pairwise cosine."""
    weights = logical_expert_weights(layer)
    E, T = layer.config.num_experts, x_TD.shape[0]
    dtype = weights["gate_up_proj"].dtype
    x_ND = x_TD.to(dtype).repeat(E, 1)
    offsets_E = torch.arange(1, E + 1, device=x_TD.device, dtype=torch.int32) * T
    scale_N = torch.ones(E * T, device=x_TD.device, dtype=dtype)
    y_ND = functional_call(layer.experts, weights, (x_ND, offsets_E, scale_N, False))
    return mean_pairwise_cosine(y_ND.reshape(E, -1))


@torch.no_grad()
def expert_similarity(model: nn.Module, tokens_BS: torch.Tensor, max_tokens: int = 256) -> dict:
    """Per MoE layer weight and output cosines; the inputs are those of a forward of ``tokens_BS``
    (first ``max_tokens`` tokens per layer). Every rank must call it (EP forwards are collective)."""
    layers = [layer for layer in moe_layers(model) if layer.config.num_experts > 1]
    if not layers:
        return {}
    inputs: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module, args) -> None:
            inputs.setdefault(i, args[0].reshape(-1, args[0].shape[-1])[:max_tokens].detach())
        return hook

    hooks = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            model(tokens_BS)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    weight_L = [weight_cosine(layer) for layer in layers]
    output_L = [output_cosine(layer, inputs[i]) for i, layer in enumerate(layers)]
    return {"expert_weight_cos": sum(weight_L) / len(weight_L), "expert_output_cos": sum(output_L) / len(output_L),
            "expert_weight_cos_per_layer": [round(v, 5) for v in weight_L],
            "expert_output_cos_per_layer": [round(v, 5) for v in output_L]}
