"""MoELayer: route -> plan -> permute -> experts -> un-permute + combine.

Legend: T tokens, D model width, E experts, K experts per token, N = T*K grouped rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import DenseFFN, GroupedExperts
from .ops import permute, unpermute_sum
from .ops._backend import fused_path
from .ops._backend import use_triton as resolve_use_triton
from .ops.checks import check_finite
from .parallel.config import ParallelConfig
from .parallel.expert_parallel import ExpertParallel
from .parallel.groups import EPGroup
from .placement.table import PlacementTable
from .plan import DispatchPlan, make_dispatch_plan
from .routing import Routing, load_balancing_loss, make_router, router_z_loss


class MoELayer(nn.Module):
    """A drop-in MoE feed-forward block: ``y = layer(x)`` for ``x`` of shape ``[..., d_model]``.

    Under ``torch.autocast`` the experts compute in the autocast dtype (float32 parameters are
    cast per forward, as autocast does for ``nn.Linear``) and the router stays in ``router_dtype``.

    After each forward, ``aux_loss`` holds the differentiable weighted sum of the configured
    router losses (zero when none is configured) and ``last_counts`` the tokens dispatched to
    each expert (a device tensor; reading it does not synchronise until you use its values).

    Expert parallelism (docs/parallel.md): with ``ep_group`` (a process group or
    ``flexmoe.parallel.EPGroup``) and/or ``placement`` (a ``PlacementTable``), ``experts`` holds
    only this rank's ``slots_per_rank`` physical slots, ``placement`` says which logical expert
    each slot holds, and ``state_dict()`` still holds the logical view of all experts.
    """

    def __init__(
        self,
        config: MoEConfig,
        ep_group: EPGroup | torch.distributed.ProcessGroup | None = None,
        *,
        placement: PlacementTable | None = None,
        slots_per_rank: int | None = None,
        parallel: ParallelConfig | None = None,
    ):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.router = make_router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = DenseFFN(config) if config.num_shared_experts else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_counts: torch.Tensor | None = None
        self.expert_parallel: ExpertParallel | None = None
        self.placement: PlacementTable | None = None
        self.ep_group: torch.distributed.ProcessGroup | None = None
        self.ep_rank, self.ep_size = 0, 1
        if ep_group is not None or placement is not None or slots_per_rank is not None or parallel is not None:
            ExpertParallel.attach(self, ep_group, placement, slots_per_rank, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_TD = x.reshape(-1, self.config.d_model)
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        use_triton = resolve_use_triton(self.config.kernels, x_TD.device)

        routing = self.router(x_TD)
        plan = make_dispatch_plan(routing.expert_TK, routing.weight_TK, routing.keep_TK, routing.num_experts)
        cfg = self.config
        path = fused_path(cfg.kernels, x_TD, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k)
        if path is not None and self.expert_parallel is None:
            y_TD = self.experts.forward_tokens(x_TD, plan, grouped_backward=path == "hybrid")
        else:
            x_ND = permute(x_TD, plan.row_token_N, plan.pair_row_TK, use_triton)
            y_ND = self.run_experts(x_ND, plan, use_triton)
            y_TD = unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, use_triton)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        self.aux_loss = self.router_loss(routing)
        self.last_counts = plan.counts_E
        self.router.record_load(plan.counts_E)
        return y_TD.view(x.shape)

    def run_experts(self, x_ND: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """The expert stage: grouped rows in, weighted expert outputs out, same row order."""
        if self.expert_parallel is not None:
            return self.expert_parallel(self.experts, self.placement, x_ND, plan, use_triton)
        return self.experts(x_ND, plan.offsets_E, plan.row_weight_N, use_triton)

    def set_placement(self, table: PlacementTable) -> None:
        """Switch to ``table`` (the caller has moved the slot weights to match it)."""
        if self.expert_parallel is None:
            raise RuntimeError("set_placement needs an expert-parallel layer (MoELayer(config, ep_group=...))")
        self.expert_parallel.check_table(table, self.placement)
        self.placement = table.copy()

    def router_loss(self, routing: Routing) -> torch.Tensor:
        cfg = self.config
        loss = routing.logits_TE.new_zeros(())
        if cfg.aux_loss_coef:
            loss = loss + cfg.aux_loss_coef * load_balancing_loss(routing)
        if cfg.z_loss_coef:
            loss = loss + cfg.z_loss_coef * router_z_loss(routing)
        return loss

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer input must have last dimension d_model={cfg.d_model}, got shape {tuple(x.shape)}")
        weight_dtype = self.experts.gate_up_proj.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"MoELayer input dtype {x.dtype} differs from its parameters' dtype {weight_dtype}; "
                "cast one of them (e.g. layer.to(x.dtype))"
            )
        if cfg.validate_inputs and not torch.compiler.is_compiling():
            check_finite(x, "MoELayer input contains NaN or Inf")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over the MoE layers of ``model`` (from their last forward)."""
    losses = [layer.aux_loss for layer in moe_layers(model)]
    if not losses:
        return torch.zeros(())
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    return total


def update_router_bias(model: nn.Module) -> None:
    """Apply the auxiliary-loss-free bias update of every MoE layer; call after ``optimizer.step()``."""
    for layer in moe_layers(model):
        layer.router.update_bias()
