"""MoELayer: route -> plan -> expert stage (permute -> grouped experts -> un-permute + combine;
under expert parallelism the stage sends each token once per rank in between).

Legend: T tokens, D model width, E experts, K experts per token, N = T*K grouped rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import DenseFFN, GroupedExperts
from .ops._backend import use_triton as resolve_use_triton
from .ops.checks import check_finite
from .parallel import AdaptiveConfig, EPGroup, ParallelConfig, ParallelExperts, ShardedExperts
from .placement.table import PlacementTable
from .plan import make_dispatch_plan
from .routing import expert_counts, make_router, router_loss
from .routing.balance import BalanceStats, ExpertCountAgreement, pooled_balance_loss
from .routing.limits import device_limits


class MoELayer(nn.Module):
    """A drop-in MoE feed-forward block: ``y = layer(x)`` for ``x`` of shape ``[..., d_model]``.

    Under ``torch.autocast`` the experts compute in the autocast dtype (float32 parameters are
    cast per forward, as autocast does for ``nn.Linear``) and the router stays in ``router_dtype``.

    After each forward, ``aux_loss`` holds the differentiable weighted sum of the configured
    router losses (zero when none is configured) and ``last_counts`` the tokens dispatched to
    each expert (a device tensor; reading it does not synchronise until you use its values).

    The expert stage is chosen here, once: ``GroupedExperts`` (all experts local), or with
    ``ep_group`` (a process group or ``flexmoe.parallel.EPGroup``), ``placement`` (a
    ``PlacementTable``), ``slots_per_rank`` or ``parallel`` a ``flexmoe.parallel.ParallelExperts``
    holding only this rank's slots, the table and the group; or with ``parallel`` a
    ``flexmoe.parallel.AdaptiveConfig`` a ``ShardedExperts`` holding this rank's shards of the
    experts, run data-parallel, expert-parallel or sharded per step (docs/parallel.md).
    ``state_dict()`` holds the logical view of all experts either way.
    ``data_parallel_group``: the group whose counts ``aux_loss_scope="global"`` sums (None = the
    default group, or this process alone when torch.distributed is not initialised). The
    sequence layout of ``aux_loss_scope="sequence"`` is the input's: ``[..., S, D]``.
    """

    def __init__(
        self,
        config: MoEConfig,
        ep_group: EPGroup | torch.distributed.ProcessGroup | None = None,
        *,
        placement: PlacementTable | None = None,
        slots_per_rank: int | None = None,
        parallel: ParallelConfig | AdaptiveConfig | None = None,
        data_parallel_group: torch.distributed.ProcessGroup | None = None,
    ):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.router = make_router(config)
        if isinstance(parallel, AdaptiveConfig):
            if placement is not None or slots_per_rank is not None:
                raise ValueError(
                    "MoELayer: parallel=AdaptiveConfig(...) (sharded experts, adaptive methods) does not compose "
                    "with placement= / slots_per_rank= (replicas of sharded experts are not supported); "
                    "use one or the other"
                )
            if config.expert_biases:
                raise ValueError("MoEConfig.expert_biases is not supported with adaptive parallelism yet")
            self.experts = ShardedExperts(config, ep_group, parallel)
        elif ep_group is None and placement is None and slots_per_rank is None and parallel is None:
            self.experts = GroupedExperts(config)
        else:
            if config.expert_biases:
                raise ValueError("MoEConfig.expert_biases is not supported with expert parallelism yet")
            self.experts = ParallelExperts(config, ep_group, placement, slots_per_rank, parallel)
        self.shared_experts = DenseFFN(config) if config.num_shared_experts else None
        self.data_parallel_group = data_parallel_group
        self._expert_count_agreement = ExpertCountAgreement()
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_counts: torch.Tensor | None = None
        self.balance_stats: BalanceStats | None = None
        self._limits_key: tuple | None = None
        self._refresh_device_limits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.experts.begin_forward()
        self._check_input(x)
        x_TD = x.reshape(-1, self.config.d_model)
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        use_triton = resolve_use_triton(self.config.kernels, x_TD.device)

        if self._limits_key is not None and self._placement_changed():
            self._refresh_device_limits()
        routing = self.router(x_TD)
        counts_E = None
        if routing.slot_TK is None:
            plan = make_dispatch_plan(routing.expert_TK, routing.weight_TK, routing.keep_TK, routing.num_experts)
        else:  # device-limited routing chose the replica of every pair: group the rows by slot
            table = self.experts.placement
            plan = make_dispatch_plan(routing.slot_TK, routing.weight_TK, routing.keep_TK,
                                      table.world_size * table.slots_per_rank)
            counts_E = expert_counts(routing.expert_TK, routing.keep_TK, routing.num_experts)
        # The shared experts are queued first: on a GPU they run while an expert-parallel stage
        # waits for its counts on the host.
        shared_TD = self.shared_experts(x_TD) if self.shared_experts is not None else None
        y_TD = self.experts.run(x_TD, plan, use_triton)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD

        seq_len = x.shape[-2] if x.dim() >= 3 else x_TD.shape[0]
        self.aux_loss = router_loss(routing, self.config, seq_len, self.data_parallel_group,
                                    self._expert_count_agreement)
        if self.config.aux_loss_coef and self.config.aux_loss_scope == "pooled":
            self.balance_stats = BalanceStats.of(routing)
        self.last_counts = plan.counts_E if counts_E is None else counts_E
        self.router.record_load(self.last_counts)
        return y_TD.view(x.shape)

    def _refresh_device_limits(self) -> None:
        """Rank and node groups for device- / node-limited routing, from the current placement."""
        cfg = self.config
        table = getattr(self.experts, "placement", None)
        if table is None or (cfg.max_ranks_per_token is None and cfg.max_nodes_per_token is None):
            return
        limits = device_limits(table.slot_expert_WS, self.experts.ep_group.ranks_per_node, cfg, self.experts.rank)
        self.router.set_device_limits(limits)
        self._limits_key = (table, table.version)

    def _placement_changed(self) -> bool:
        table, version = self._limits_key
        return self.experts.placement is not table or self.experts.placement.version != version

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer input must have last dimension d_model={cfg.d_model}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MoELayer input must be a floating-point tensor (hidden states), got dtype {x.dtype}")
        if x.device.type == "meta":
            raise ValueError("MoELayer input is on the meta device; routing needs real values "
                             "(materialise the layer and the input on cpu or cuda first)")
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
    """Sum of ``aux_loss`` over the MoE layers of ``model`` (from their last forward), plus the
    loss pooled over the layers with ``aux_loss_scope="pooled"`` (HF convention), weighted by
    their ``aux_loss_coef``."""
    layers = moe_layers(model)
    losses = [layer.aux_loss for layer in layers]
    pooled = [layer for layer in layers if layer.config.aux_loss_scope == "pooled" and layer.config.aux_loss_coef]
    if pooled:
        coefs = {layer.config.aux_loss_coef for layer in pooled}
        if len(coefs) != 1:
            raise ValueError(f"aux_loss_scope='pooled' layers must share aux_loss_coef, got {sorted(coefs)}")
        if any(layer.balance_stats is None for layer in pooled):
            raise ValueError("aux_loss_scope='pooled': a layer has not run a forward yet")
        losses.append(coefs.pop() * pooled_balance_loss([layer.balance_stats for layer in pooled]))
    if not losses:
        return torch.zeros(())
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss.to(total.device)
    return total
