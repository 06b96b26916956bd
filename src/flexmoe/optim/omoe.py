"""OMoE (arXiv 2310.09762): update each expert orthogonally to the span of the other experts.

Legend: E logical experts of a layer, S slots on this rank, N numel of one expert's tensor,
M = E - 1 other experts.

The paper alternates an *accumulating* phase (the base optimizer's plain steps) with an
*orthogonal* phase in which every expert moves only in directions orthogonal to the subspace
spanned by the other experts, which restores the diversity that MoE training loses (experts
up to 99% similar). Its update is OWM's projector ``P = I - A (A^T A + alpha I)^-1 A^T``.

Here, per MoE layer and expert tensor (``gate_up_proj``, ``down_proj``), A holds the M other
experts' flattened weights (before the step) as columns. We project the *update* the base
optimizer made, ``delta_e = w_e' - w_e``, not the gradient: with SGD (the setting OWM was
derived for) the two are the same, but AdamW rescales every coordinate, so a projected gradient
would no longer give an orthogonal step. So any torch optimizer (AdamW included) is wrapped
unchanged, with its own moments built from the true gradients. ``alpha = 0`` is the exact
orthogonal projector (pseudo-inverse, so identical upcycled experts are fine). This is our
reading of the paper's abstract-level description ("orthogonal to the subspace spanned by the
other experts"); how the paper builds and averages its projector matrices in detail was not
available to us, so treat the match as approximate.

Expert parallelism: each rank holds only its slots, so in an orthogonal step every EP layer
gathers all E experts' weights (one collective per tensor; every rank of the EP group takes
part, after a header check that names any disagreement). Placement replicas of one expert
share its gradient (``flexmoe.runtime.sync_gradients`` sums them before ``optimizer.step()``), so they
make the same update; the basis of a slot excludes its own logical expert, not just the slot.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..config import _require_float, _require_int
from ..layer import MoELayer, moe_layers
from ..parallel import ParallelExperts
from ..parallel.checkpoint import logical_rows
from ..placement.table import table_digest


@dataclasses.dataclass
class OMoEConfig:
    """accumulate_steps plain base-optimizer steps, then orthogonal_steps projected ones, repeated
    (the paper's alternating training). alpha: OWM's ridge term (0 = exact projection)."""

    accumulate_steps: int = 1
    orthogonal_steps: int = 1
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _require_int(self, "accumulate_steps", minimum=0)
        _require_int(self, "orthogonal_steps", minimum=1)
        _require_float(self, "alpha", positive=False)

    def is_orthogonal(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is projected."""
        return step % (self.accumulate_steps + self.orthogonal_steps) >= self.accumulate_steps


def project_out(delta_SN: torch.Tensor, basis_EN: torch.Tensor, expert_S: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """``delta_s - A (A^T A + alpha I)^+ A^T delta_s`` with A the rows of ``basis_EN`` other than
    ``expert_S[s]``; slots with ``expert_S < 0`` (empty) are returned unchanged."""
    dtype = torch.promote_types(delta_SN.dtype, torch.float32)
    b_EN, d_SN = basis_EN.to(dtype), delta_SN.to(dtype)
    gram_EE = b_EN @ b_EN.T
    inner_ES = b_EN @ d_SN.T
    out = d_SN.clone()
    E = b_EN.shape[0]
    eye = torch.eye(E - 1, dtype=dtype, device=b_EN.device)
    for s, e in enumerate(expert_S.tolist()):
        if e < 0 or E < 2:
            continue
        others_M = torch.tensor([j for j in range(E) if j != e], device=b_EN.device)
        gram_MM = gram_EE[others_M][:, others_M] + alpha * eye
        coef_M = torch.linalg.pinv(gram_MM, hermitian=True) @ inner_ES[others_M, s]
        out[s] -= coef_M @ b_EN[others_M]
    return out.to(delta_SN.dtype)


class OMoE:
    """Makes ``optimizer`` an OMoE optimizer for the experts of ``model``'s MoE layers.

    ``OMoE(optimizer, model, config)`` registers a pre- and a post-step hook on ``optimizer``:
    on orthogonal steps the pre-hook keeps the expert weights, the post-hook projects each
    expert's update. Use ``optimizer`` (and its LR scheduler) exactly as before; keep this
    object's ``state_dict()`` with the checkpoint (it holds the step count that drives the
    alternation). Call ``remove()`` to detach it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, config: OMoEConfig | None = None):
        self.config = OMoEConfig() if config is None else config
        if not isinstance(self.config, OMoEConfig):
            raise TypeError(f"OMoE config must be an OMoEConfig, got {type(self.config).__name__}")
        self.optimizer = optimizer
        self.layers = [layer for layer in moe_layers(model) if layer.config.num_experts > 1]
        if not self.layers:
            raise ValueError("OMoE needs a model with at least one MoE layer of 2 or more experts")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in self.layers:
            for name, p in layer.experts.named_parameters():
                if id(p) not in in_optimizer:
                    raise ValueError(f"OMoE: expert parameter {name} of an MoE layer is not in the optimizer")
        self.steps = 0
        self.last_projected = False
        self._before: list[list[torch.Tensor]] | None = None
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self.config.is_orthogonal(self.steps):
            self._before = None
            return
        self._check_ranks_agree()
        self._before = [[p.detach().clone() for p in layer.experts.parameters()] for layer in self.layers]

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        self.last_projected = self._before is not None
        if self._before is not None:
            for layer, before in zip(self.layers, self._before):
                expert_S = _slot_experts(layer)
                for p, old in zip(layer.experts.parameters(), before):
                    basis_EN = _logical(layer, old).reshape(layer.config.num_experts, -1)
                    delta_SN = (p - old).reshape(old.shape[0], -1)
                    p.copy_((old.reshape(old.shape[0], -1)
                             + project_out(delta_SN, basis_EN, expert_S, self.config.alpha)).view_as(p))
            self._before = None
        self.steps += 1

    def _check_ranks_agree(self) -> None:
        """Before the gathers: every rank of each EP group is at the same step with the same
        layer shapes and placement (a mismatch is named on every rank instead of hanging)."""
        for i, layer in enumerate(self.layers):
            experts = layer.experts
            if not isinstance(experts, ParallelExperts):
                continue
            group, size = experts.ep_group.group, experts.size
            mine = torch.tensor([self.steps, len(self.layers), i, layer.config.num_experts,
                                 sum(p.numel() for p in layer.experts.parameters()),
                                 table_digest(experts.placement)], dtype=torch.int64,
                                device=layer.experts.gate_up_proj.device)  # NCCL gathers device tensors
            parts = [torch.empty_like(mine) for _ in range(size)]
            collectives.all_gather(parts, mine, group=group)
            names = ("OMoE step", "MoE layers", "layer index", "num_experts", "expert numel", "placement digest")
            for name, column in zip(names, torch.stack(parts).T):
                if (column != column[0]).any():
                    raise RuntimeError(f"OMoE: ranks of the EP group of MoE layer {i} disagree on {name}: "
                                       f"{column.tolist()}")


def _slot_experts(layer: MoELayer) -> torch.Tensor:
    """Logical expert of every local slot (-1 = empty)."""
    experts = layer.experts
    if not isinstance(experts, ParallelExperts):
        return torch.arange(layer.config.num_experts)
    return torch.as_tensor(experts.placement.slot_expert_WS[experts.rank])


def _logical(layer: MoELayer, slots: torch.Tensor) -> torch.Tensor:
    """``[E, ...]`` weights of all logical experts (collective over the EP group)."""
    experts = layer.experts
    if not isinstance(experts, ParallelExperts):
        return slots
    return logical_rows(experts.ep_group, experts.placement, slots)
