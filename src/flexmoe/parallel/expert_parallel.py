"""ParallelExperts: the expert stage of one MoELayer spread over the ranks of a process group.

Legend: W ranks, E logical experts, S slots per rank, D width, T local tokens.
``MoELayer(config, ep_group=...)`` builds one as its ``experts``; the layer's forward hands it
the local expert-grouped rows (``run``). Per forward: one all-gather of the per-expert counts (with a header
every rank checks, so disagreeing ranks fail with a clear error instead of hanging), the host
layout, then the pipelined stage (stage.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import MoEConfig
from ..experts import GroupedExperts
from ..placement.table import PlacementTable, table_digest
from ..plan import DispatchPlan
from .checkpoint import logical_rows, slot_rows
from .comm import Exchanger
from .config import MEMORY_STRATEGIES, ParallelConfig
from .groups import EPGroup
from .layout import DispatchLayout, build_layout
from .stage import RESENDS_INPUT, StageRun, StageTimer, run_stage
from .tuning import (
    MemoryReport,
    PipelineTuner,
    RowBytes,
    choose_memory_strategy,
    free_memory_bytes,
    kept_bytes,
    measure_row_bytes,
)

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Header of the per-forward all-gather: (name, must be equal on all ranks).
_HEADER = (
    ("placement version", True),
    ("placement digest", True),
    ("num_experts", True),
    ("slots_per_rank", True),
    ("d_model", True),
    ("dtype", True),
    ("memory strategy", True),
    ("pipeline degree", True),
    ("all_to_all", True),
    ("backward expected", True),
    ("tokens", False),
    ("budget bytes", False),
    ("ns per expert row", False),
    ("bytes per s", False),
    ("trial level", False),
    ("trial degree", False),
    ("trial ns", False),
)
_COLUMN = {name: i for i, (name, _) in enumerate(_HEADER)}


class ParallelExperts(GroupedExperts):
    """The expert stage of one MoE layer spread over the ranks of a process group.

    It holds this rank's ``slots_per_rank`` physical slots as its ``gate_up_proj`` /
    ``down_proj`` (``[S, ...]``), the placement table saying which logical expert each slot
    holds, and the group; ``state_dict()`` still holds the logical view of all E experts
    (collective: every rank of the group calls it together), and ``load_state_dict`` takes it.
    Attributes a user may read:

    ep_group: the EPGroup (``.group``, ``.rank``, ``.size``); placement: the PlacementTable.
    last_counts_WE: tokens every rank routed to every logical expert in the last forward.
    last_pipeline_degree: chunks used by the last forward.
    memory_report: MemoryReport of the last forward (activation memory kept and saved).
    """

    def __init__(
        self,
        config: MoEConfig,
        ep_group: EPGroup | dist.ProcessGroup | None = None,
        placement: PlacementTable | None = None,
        slots_per_rank: int | None = None,
        parallel: ParallelConfig | None = None,
    ):
        parallel = ParallelConfig() if parallel is None else parallel
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"MoELayer parallel= expects a flexmoe.parallel.ParallelConfig, got {type(parallel).__name__}")
        ep = EPGroup.wrap(ep_group)
        if placement is None:
            placement = PlacementTable.static(config.num_experts, ep.size, slots_per_rank)
        elif not isinstance(placement, PlacementTable):
            raise TypeError(f"MoELayer placement= expects a PlacementTable, got {type(placement).__name__}")
        elif slots_per_rank is not None and slots_per_rank != placement.slots_per_rank:
            raise ValueError(
                f"MoELayer slots_per_rank={slots_per_rank} contradicts the placement table's {placement.slots_per_rank}"
            )
        # All E experts are initialised first and this rank's slots copied from them, so a layer
        # built from one seed equals the one-device layer built from it.
        super().__init__(config)
        self.ep_group = ep
        self.parallel = parallel
        self.placement = placement
        self.check_table(placement)
        self.placement = placement.copy()
        for name, param in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(slot_rows(self.placement, ep.rank, param.detach())))
        self.exchanger = Exchanger(ep, parallel.all_to_all == "hierarchical")
        self.tuner = PipelineTuner(parallel.pipeline_candidates)
        self.last_counts_WE: np.ndarray | None = None
        self.last_pipeline_degree: int | None = None
        self.memory_report: MemoryReport | None = None
        self._row_bytes: dict[tuple, RowBytes] = {}
        self._rates: tuple[float, float] | None = None
        self._group_rates: tuple[float, float] | None = None

    @property
    def rank(self) -> int:
        return self.ep_group.rank

    @property
    def size(self) -> int:
        return self.ep_group.size

    @torch.compiler.disable
    def run(self, x_ND: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """Weighted expert outputs for the local expert-grouped rows, computed wherever the
        placement puts each expert (a graph break under ``torch.compile``: the layout needs the
        counts on the host)."""
        experts, placement = self, self.placement
        if plan.counts_E.shape[0] != self.config.num_experts:  # rows grouped by slot (routing.slot_TK)
            placement = slot_table(placement)
        weight_N = plan.row_weight_N
        build_graph = torch.is_grad_enabled() and (
            x_ND.requires_grad or weight_N.requires_grad or any(p.requires_grad for p in experts.parameters())
        )
        strategy_asked = self.parallel.memory
        profile = strategy_asked == "auto" and self._rates is None
        row_bytes = self._measure_row_bytes(experts, x_ND.dtype, weight_N.dtype, use_triton)
        tokens = plan.pair_row_TK.shape[0]
        header_WH, counts_WE = self._all_gather_counts(placement, plan.counts_E, x_ND, tokens, build_graph)

        self.tuner.absorb(header_WH[:, [_COLUMN["trial level"], _COLUMN["trial degree"], _COLUMN["trial ns"]]])
        self._absorb_rates(header_WH)
        level = PipelineTuner.level(counts_WE)
        if profile:
            degree, trial = 1, False
        elif self.parallel.pipeline_degree == "auto":
            degree, trial = self.tuner.choose(level)
        else:
            degree, trial = self.parallel.pipeline_degree, False
        layout = build_layout(placement, counts_WE, self.rank, degree, x_ND.device)
        strategy, report = self._memory_strategy(layout, header_WH, row_bytes, build_graph)
        run = StageRun(
            layout=layout,
            exchanger=self.exchanger,
            experts=experts,
            use_triton=use_triton,
            strategy=strategy,
            build_graph=build_graph,
            row_token_N=plan.row_token_N,
            first_row_T=plan.pair_row_TK.max(dim=1).values if strategy in RESENDS_INPUT else None,
            timer=StageTimer() if profile else None,
        )
        start = _synchronized_time(x_ND.device) if trial else 0.0
        y_ND = run_stage(x_ND, weight_N, experts, run)
        if trial:
            self.tuner.record(level, degree, _synchronized_time(x_ND.device) - start)
        if profile:
            timer = run.timer
            per_row = timer.expert_s / timer.expert_rows if timer.expert_rows else -1.0
            bandwidth = timer.dispatch_bytes / timer.dispatch_s if timer.dispatch_bytes and timer.dispatch_s > 0 else -1.0
            self._rates = (per_row, bandwidth)
        self.last_counts_WE = counts_WE if placement is self.placement else logical_counts(self.placement, counts_WE)
        self.last_pipeline_degree = degree
        self.memory_report = report
        return y_ND

    # ------------------------------------------------------------------------------------------

    def set_placement(self, table: PlacementTable) -> None:
        """Switch to ``table`` (the caller has moved the slot weights to match it:
        ``flexmoe.runtime.apply_placement`` does both)."""
        self.check_table(table)
        self.placement = table.copy()

    def check_table(self, table: PlacementTable) -> None:
        """Raise unless ``table`` fits this stage: its experts, group size and slot count."""
        if not isinstance(table, PlacementTable):
            raise TypeError(f"expected a PlacementTable, got {type(table).__name__}")
        table.validate()
        if table.num_experts != self.config.num_experts:
            raise ValueError(f"placement table has {table.num_experts} experts, the layer {self.config.num_experts}")
        if table.world_size != self.size:
            raise ValueError(f"placement table is for {table.world_size} ranks, the EP group has {self.size}")
        if table.slots_per_rank != self.placement.slots_per_rank:
            raise ValueError(
                f"placement table has {table.slots_per_rank} slots per rank, the layer holds {self.placement.slots_per_rank}"
            )

    # ---- the logical state dict ---------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Every expert in logical order ``[E, ...]``, each from its first replica (collective)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self._slot_tensors():
            if prefix + name in destination:
                destination[prefix + name] = logical_rows(self.ep_group, self.placement, tensor)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Take the logical view (from any number of ranks, or a one-device layer) and keep the
        rows of this rank's slots."""
        E = self.placement.num_experts
        for name, tensor in self._slot_tensors():
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if tuple(value.shape) != (E,) + tuple(tensor.shape[1:]):
                error_msgs.append(
                    f"{key}: an expert-parallel layer loads the logical view [num_experts={E}, "
                    f"{', '.join(map(str, tensor.shape[1:]))}] (any world size), got {tuple(value.shape)}"
                )
                continue
            state_dict[key] = slot_rows(self.placement, self.rank, value.to(tensor.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _slot_tensors(self):
        yield from self.named_parameters(recurse=False)
        yield from self.named_buffers(recurse=False)

    # ------------------------------------------------------------------------------------------

    def _measure_row_bytes(self, experts, dtype, weight_dtype, use_triton) -> RowBytes:
        key = (dtype, weight_dtype, use_triton, experts.gate_up_proj.device)
        if key not in self._row_bytes:
            self._row_bytes[key] = measure_row_bytes(experts, dtype, weight_dtype, use_triton)
        return self._row_bytes[key]

    def _all_gather_counts(self, placement, counts_E, x_ND, tokens, build_graph):
        """Every rank's header and counts; raises RuntimeError (on all ranks) if they disagree."""
        par = self.parallel
        budget = -1
        if par.memory == "auto":
            budget = par.memory_budget_bytes
            if budget is None:
                budget = int(free_memory_bytes(x_ND.device) * par.free_memory_fraction)
        per_row, bandwidth = self._rates if self._rates is not None else (-1.0, -1.0)
        header = [
            placement.version,
            table_digest(placement),
            self.config.num_experts,
            placement.slots_per_rank,
            x_ND.shape[1],
            _DTYPES.index(x_ND.dtype) if x_ND.dtype in _DTYPES else -1,
            (MEMORY_STRATEGIES + ("auto",)).index(par.memory),
            0 if par.pipeline_degree == "auto" else par.pipeline_degree,
            int(self.exchanger.hierarchical),
            int(build_graph),
            tokens,
            budget,
            int(per_row * 1e9) if per_row >= 0 else -1,
            int(bandwidth) if bandwidth >= 0 else -1,
            *self.tuner.shared_row(),
        ]
        if self.size == 1:
            everyone = np.array([header + counts_E.tolist()], dtype=np.int64)
        else:
            mine = torch.cat([torch.tensor(header, dtype=torch.int64).to(counts_E.device), counts_E.to(torch.int64)])
            parts = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(parts, mine, group=self.ep_group.group)
            everyone = torch.stack(parts).cpu().numpy()
        header_WH, counts_WE = everyone[:, :len(_HEADER)], everyone[:, len(_HEADER):]
        for name, must_agree in _HEADER:
            column = header_WH[:, _COLUMN[name]]
            if must_agree and (column != column[0]).any():
                raise RuntimeError(
                    f"flexmoe expert parallelism: ranks of the EP group disagree on {name} "
                    f"(per rank: {column.tolist()}); every rank must run the same layer with the same "
                    "placement table, config, dtype and grad mode"
                )
        return header_WH, counts_WE

    def _absorb_rates(self, header_WH: np.ndarray) -> None:
        """Slowest recompute and slowest link over the ranks that measured them (a rank without
        traffic or expert rows in its profiled forward has nothing to report)."""
        per_row = header_WH[:, _COLUMN["ns per expert row"]]
        bandwidth = header_WH[:, _COLUMN["bytes per s"]]
        if self._group_rates is None and (bandwidth >= 0).any() and (per_row >= 0).any():
            self._group_rates = (float(per_row.max()) * 1e-9, float(bandwidth[bandwidth >= 0].min()))

    def _memory_strategy(self, layout: DispatchLayout, header_WH, row: RowBytes, build_graph: bool):
        recv_W = layout.recv_rows_W
        tokens_W = header_WH[:, _COLUMN["tokens"]]
        by_rank = [kept_bytes(int(recv_W[r]), int(tokens_W[r]), row) for r in range(self.size)]
        strategy = self.parallel.memory
        if strategy == "auto":
            worst = {s: max(kept[s] for kept in by_rank) for s in MEMORY_STRATEGIES}
            budget = int(header_WH[:, _COLUMN["budget bytes"]].min())
            recompute_s = resend_s = None
            if self._group_rates is not None:
                per_row_s, bandwidth = self._group_rates
                rows = int(recv_W.max())
                recompute_s = rows * per_row_s
                resend_s = 2 * rows * row.input / bandwidth if bandwidth > 0 else 0.0
            strategy = choose_memory_strategy(worst, budget, recompute_s, resend_s)
        mine = by_rank[self.rank]
        kept = mine[strategy] if build_graph else 0
        report = MemoryReport(strategy, kept, (mine["keep"] if build_graph else 0) - kept, mine)
        return strategy, report


def slot_table(table: PlacementTable) -> PlacementTable:
    """The table seen by rows already assigned to slots: every slot its own expert (id
    ``rank * S + slot``), so the dispatcher sends each row to exactly the slot it names."""
    W, S = table.slot_expert_WS.shape
    return PlacementTable(W * S, np.arange(W * S).reshape(W, S), np.ones((W, S)), table.version)


def logical_counts(table: PlacementTable, slot_counts_WF: np.ndarray) -> np.ndarray:
    """Per-slot counts ``[W, W*S]`` summed into per-expert counts ``[W, E]``."""
    expert_F = table.slot_expert_WS.reshape(-1)
    counts_WE = np.zeros((slot_counts_WF.shape[0], table.num_experts), dtype=slot_counts_WF.dtype)
    held_F = expert_F >= 0
    np.add.at(counts_WE, (slice(None), expert_F[held_F]), slot_counts_WF[:, held_F])
    return counts_WE


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def ep_stage(layer: nn.Module) -> ParallelExperts | None:
    """The expert-parallel stage of an MoE layer, or None when its experts are local."""
    experts = getattr(layer, "experts", None)
    return experts if isinstance(experts, ParallelExperts) else None
