"""Expert-diversify (EvoMoE): spawn the experts of an MoE model from a trained dense model.

Every expert of an MoE block starts as the dense FFN of the same block, then (drawn per expert, so
the copies can specialise) a random fraction ``mask`` of its weights is set to zero and Gaussian
noise of ``noise`` times the weight's standard deviation is added; routers keep their fresh
initialisation; every other weight is copied unchanged. ``mask = noise = 0`` is upcycling
(every expert an exact copy of the dense FFN).

Source: the EvoMoE paper (arXiv 2112.14397) spawns the experts from the trained shared expert by
random masking; its released code (``codecaution/EvoMoE``) has no diversify step, so the mask
ratio is not given there: ``mask`` and ``noise`` are both options here.
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.gpt import GPTMoE, ModelConfig
from ..config import _require_float
from .checkpoint import CheckpointError, check_weights_fit, load_weights, unique_state_dict


@dataclasses.dataclass
class DiversifyConfig:
    """noise: Gaussian perturbation relative to each weight's std. mask: fraction of each expert's
    weights zeroed, in [0, 1). Both 0: upcycling."""

    noise: float = 0.1
    mask: float = 0.0

    def __post_init__(self) -> None:
        _require_float(self, "noise", positive=False)
        _require_float(self, "mask", positive=False)
        if self.mask >= 1:
            raise ValueError(f"DiversifyConfig.mask must be < 1, got {self.mask}")

# Fields that must agree between the dense model and the MoE model it seeds.
_SHAPE_FIELDS = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "positions",
                 "tie_embeddings")


def check_dense_source(dense_cfg: ModelConfig, moe_cfg: ModelConfig, source: str) -> None:
    if dense_cfg.num_experts != 1:
        raise CheckpointError(
            f"--init-from-dense {source}: that checkpoint has num_experts={dense_cfg.num_experts}; "
            "train a dense model first (num_experts=1, e.g. --preset tiny-dense)"
        )
    if not moe_cfg.is_moe:
        raise CheckpointError("--init-from-dense needs an MoE model (num_experts > 1)")
    diffs = [f"{f}: dense {getattr(dense_cfg, f)!r}, this run {getattr(moe_cfg, f)!r}"
             for f in _SHAPE_FIELDS if getattr(dense_cfg, f) != getattr(moe_cfg, f)]
    if diffs:
        raise CheckpointError(
            f"--init-from-dense {source} was written for another model shape ({'; '.join(diffs)})"
        )


@torch.no_grad()
def diversify_from_dense(model: GPTMoE, dense_weights: dict[str, torch.Tensor], dense_cfg: ModelConfig,
                         spawn: DiversifyConfig, generator: torch.Generator, source: str) -> None:
    """Load ``dense_weights`` into ``model``, spawning each MoE block's experts from its dense FFN."""
    cfg = model.config
    check_dense_source(dense_cfg, cfg, source)
    dense_model = GPTMoE(dense_cfg)
    check_weights_fit(dense_model, dense_weights, source)
    target = unique_state_dict(model)
    merged = {}
    for name, tensor in target.items():
        prefix, _, leaf = name.rpartition(".experts.")
        if prefix and leaf in ("gate_up_proj", "down_proj"):
            w = dense_weights[f"{prefix}.{leaf}"].to(tensor.dtype)
            experts = w.unsqueeze(0).expand(tensor.shape).clone()
            if spawn.mask:
                experts *= torch.rand(tensor.shape, generator=generator) >= spawn.mask
            if spawn.noise:
                experts += spawn.noise * w.std() * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            merged[name] = experts
        elif name in dense_weights:
            merged[name] = dense_weights[name]
        else:
            merged[name] = tensor  # routers: fresh initialisation
    load_weights(model, merged)
