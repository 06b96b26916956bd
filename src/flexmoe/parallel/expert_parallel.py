"""ParallelExperts: the expert stage of one MoELayer spread over the ranks of a process group.

Legend: W ranks, E logical experts, S slots per rank, D width, T local tokens.
``MoELayer(config, ep_group=...)`` builds one as its ``experts``; the layer's forward hands it
the local tokens and their dispatch plan (``run``). Per exact forward: the all-gather of the
agreement envelope (agreement.py) with the per-expert counts behind it is started; the local rows
(experts whose only replica is here; dispatch.py) are computed while it travels; then it is read,
the host lays out the split (which replica takes which row), one all-gather of the (token, rank)
pair counts follows (it rides with the counts when every expert's replicas sit on one rank and
the pipeline degree is 1), then the pipelined stage of the other rows (stage.py). At world size
1 with every expert in exactly one slot the stage is the one-device expert FFN over the slots:
no packing, exchange or host synchronisation.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import MoEConfig
from ..experts import GroupedExperts
from ..placement.split import split_tokens
from ..placement.table import PlacementTable
from ..plan import DispatchPlan
from .agreement import BACKWARD, FORWARD, STATE, LayerAgreement, all_gather_ints, exchange_fields
from .bounded import BoundedReport, bounded_stage, replica_tables
from .symmetric import SymmetricTransport, symmetric_all_to_all_available
from .checkpoint import logical_rows, slot_rows
from .comm import Exchanger
from .config import MEMORY_STRATEGIES, ParallelConfig
from .dispatch import (
    ExchangeStats,
    LocalRows,
    known_counts,
    local_rows,
    local_slots,
    local_slots_WE,
    pairs_per_rank,
    regroup_by_slot,
    route_pairs,
    row_replicas,
)
from .groups import EPGroup
from .stage import StageRun, StageTimer, dispatch_packer, run_stage
from .tuning import (
    MemoryReport,
    PipelineTuner,
    RowBytes,
    TrainingTrialClock,
    choose_memory_strategy,
    free_memory_bytes,
    kept_bytes,
    synchronized_time,
    measure_row_bytes,
)

# Header of the per-forward counts all-gather: per-rank numbers the online choices combine.
_HEADER = (
    "tokens",
    "budget bytes",
    "ns per expert row",
    "bytes per s",
    "trial level",
    "trial degree",
    "trial ns",
)
_COLUMN = {name: i for i, name in enumerate(_HEADER)}


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
    last_exchange: ExchangeStats of the last forward (rows and bytes sent per direction).
    last_bounded: BoundedReport of the last bounded-dispatch forward (what overflowed).
    forward_steps: forward calls of the layer so far (checked across ranks every forward).
    The last four are None after a forward at world size 1 with every expert in its own slot,
    which runs the one-device expert FFN.
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
        self.exchanger = Exchanger(ep, parallel.all_to_all == "hierarchical", parallel.timeout_s)
        self.tuner = PipelineTuner(parallel.pipeline_candidates)
        self.last_counts_WE: np.ndarray | None = None
        self.last_pipeline_degree: int | None = None
        self.memory_report: MemoryReport | None = None
        self.last_exchange: ExchangeStats | None = None
        self.last_bounded: BoundedReport | None = None
        self._symmetric: SymmetricTransport | None = None
        self.forward_steps = 0
        # The forward's all-gather: envelope, header, counts per expert (or per global slot, for
        # slot-keyed plans of device-limited routing: the wider of the two, zero-padded), pairs per
        # rank, pairs to the sender itself.
        self._count_width = max(config.num_experts, self.placement.world_size * self.placement.slots_per_rank)
        self.agreement = LayerAgreement(ep, len(_HEADER) + self._count_width + ep.size + 1)
        self._set_replica_tables()
        self._row_bytes: dict[tuple, RowBytes] = {}
        self._rates: tuple[float, float] | None = None
        self._group_rates: tuple[float, float] | None = None

    @property
    def rank(self) -> int:
        return self.ep_group.rank

    @property
    def size(self) -> int:
        return self.ep_group.size

    def begin_forward(self) -> None:
        """Count a forward call of the layer (called first, so a forward that raises counts too:
        a rank that catches the error and moves on is then one step ahead, which the next
        agreement check reports). Not under ``torch.compile``, which skips the check."""
        if not torch.compiler.is_compiling():
            self.forward_steps += 1

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """Expert outputs of the local tokens, combined, computed wherever the placement puts
        each expert. The exact dispatch is a graph break under ``torch.compile`` (it needs the
        counts on the host); the bounded dispatch and the one-device path are captured."""
        if self._is_one_device:
            self.last_counts_WE = self.last_pipeline_degree = self.memory_report = self.last_exchange = None
            return GroupedExperts.run(self, x_TD, plan, use_triton)
        if self._slots_are_experts and self.parallel.local_first and self.parallel.dispatch == "exact":
            # World size 1, every expert held once: every row is a local row, and the one-device
            # FFN over the slots computes them (the plan regrouped by slot on the device).
            self.last_counts_WE = self.last_pipeline_degree = self.memory_report = self.last_exchange = None
            if not _is_slot_keyed(plan, self.config):
                plan = regroup_by_slot(plan, self.expert_slot_E, self.placement.slots_per_rank)
            return GroupedExperts.run(self, x_TD, plan, use_triton)
        if self.parallel.dispatch == "bounded":
            return self._run_bounded(x_TD, plan, use_triton)
        return self._run_exact(x_TD, plan, use_triton)

    def _run_bounded(self, x_TD: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """Fixed-size exchanges, no host synchronisation (bounded.py). In eager mode the
        agreement envelope is still checked (one small all-gather read on the host); under
        ``torch.compile`` it is skipped."""
        par = self.parallel
        if _is_slot_keyed(plan, self.config):  # every rank sees the same config and table: all raise
            raise ValueError(
                "ParallelConfig.dispatch='bounded' does not take device-limited routing over replicated "
                "experts (MoEConfig.max_ranks_per_token / max_nodes_per_token with a replicated placement "
                "table picks each pair's replica); use dispatch='exact'"
            )
        transport = self._bounded_transport(x_TD.device)
        if not torch.compiler.is_compiling():
            build_graph = torch.is_grad_enabled()
            fields = exchange_fields(self.config, par, self.placement, x_TD.dtype, plan.row_weight_N.dtype, build_graph)
            fields["bounded transport used"] = "symmetric_memory" if transport is not None else "all_to_all"
            self.agreement.check(FORWARD, self.forward_steps, fields, par.timeout_s, x_TD.device)
        y_TD, report = bounded_stage(self, x_TD, plan, self.replica_ids_EQ, self.replica_fraction_EQ, rank=self.rank,
                                     world=self.size, rows_per_rank_pair=par.rows_per_rank_pair,
                                     group=self.ep_group.group, use_triton=use_triton, transport=transport)
        self.last_bounded = report
        self.last_counts_WE = self.memory_report = self.last_exchange = None
        self.last_pipeline_degree = 1
        return y_TD

    def _bounded_transport(self, device: torch.device) -> SymmetricTransport | None:
        """The symmetric-memory transport when ``bounded_transport`` asks for it and it can run
        (built once: allocating its buffers is collective), else None (equal-split all-to-alls)."""
        choice = self.parallel.bounded_transport
        if choice == "all_to_all" or self.size == 1 or (choice == "auto" and torch.compiler.is_compiling()):
            return None
        if not symmetric_all_to_all_available(device):
            if choice == "symmetric_memory":
                raise RuntimeError("ParallelConfig.bounded_transport='symmetric_memory' needs CUDA tensors and a torch "
                                   "with NVSHMEM symmetric memory (torch.ops.symm_mem.all_to_all_vdev); use 'auto'")
            return None
        if self._symmetric is None:
            self._symmetric = SymmetricTransport(self.ep_group.group, self.parallel.rows_per_rank_pair)
        return self._symmetric

    @torch.compiler.disable
    def _run_exact(self, x_TD: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """The exact dispatch, local rows first: the counts all-gather is started, the local rows
        (``dispatch.local_rows``) are computed, and only then is it read (``_resolve``) and the
        other rows exchanged."""
        experts, placement, par = self, self.placement, self.parallel
        slot_keyed = _is_slot_keyed(plan, self.config)
        local_slot_WE = self._local_slot_WE
        if slot_keyed:  # rows grouped by slot: each slot is its own expert for the dispatcher
            placement, local_slot_WE = self._slot_view()
        local_slot_E = local_slot_WE[self.rank]
        weight_N = plan.row_weight_N
        build_graph = torch.is_grad_enabled() and (
            x_TD.requires_grad or weight_N.requires_grad or any(p.requires_grad for p in experts.parameters())
        )
        # The logical table enters the agreement (the slot table forgets which expert a slot holds).
        fields = exchange_fields(self.config, par, self.placement, x_TD.dtype, weight_N.dtype, build_graph)
        fields["plan keys"] = "slots" if slot_keyed else "experts"
        profile = par.memory == "auto" and self._rates is None
        row_bytes = self._measure_row_bytes(experts, x_TD.dtype, weight_N.dtype, use_triton)
        # Static-like tables (each expert on one rank) at degree 1: the pair counts travel with
        # the counts, in one all-gather; otherwise they need the split, and a second one.
        # (A slot-keyed plan's "experts" are slots, each on one rank.)
        # (World size 1 has no all-gather to ride on: the pair counts are read when needed.)
        one_exchange = self.size > 1 and par.pipeline_degree == 1 and (slot_keyed or self._experts_on_one_rank)
        pairs_W = own_pairs = None
        if one_exchange:
            rank_E, exchanged_rank_E = self.expert_rank_E, self._exchanged_rank_on(x_TD.device)
            if slot_keyed:
                rank_E = torch.arange(plan.counts_E.shape[0], device=x_TD.device) // placement.slots_per_rank
                exchanged_rank_E = torch.where(rank_E == self.rank, -1, rank_E)
            if not par.local_first:
                exchanged_rank_E = rank_E
            pairs_W = pairs_per_rank(exchanged_rank_E, plan.offsets_E, plan.pair_row_TK, self.size)
            own_pairs = pairs_per_rank(rank_E, plan.offsets_E, plan.pair_row_TK, self.size)[self.rank]
        pending = self._start_counts(fields, plan.counts_E, x_TD, plan.pair_row_TK.shape[0], pairs_W, own_pairs)
        # This rank's own counts: a wait for the device, no communication (the other ranks'
        # counts are in flight meanwhile).
        if par.local_first and (local_slot_E >= 0).any():
            counts_E = plan.counts_E.cpu().numpy()
            pending.host_counts_E = counts_E  # world size 1: nothing more to read
            local = local_rows(local_slot_E, counts_E, plan.row_token_N, placement.slots_per_rank)
        else:
            local = LocalRows.none(placement.slots_per_rank, x_TD.device)
        step = self.forward_steps
        forward = {}

        def resolve():
            route, strategy = self._resolve(pending, forward, placement, plan, local, slot_keyed, profile,
                                            row_bytes, build_graph, one_exchange, x_TD.device)
            if forward["trial"]:
                forward["start"] = synchronized_time(x_TD.device)
            return route, strategy

        run = StageRun(
            local=local,
            resolve=resolve,
            exchanger=self.exchanger,
            experts=experts,
            use_triton=use_triton,
            strategy=None if par.memory == "auto" else par.memory,
            build_graph=build_graph,
            pair_row_TK=plan.pair_row_TK,
            row_pair_N=plan.row_pair_N,
            before_backward=lambda: self.agreement.check(BACKWARD, step, fields, par.timeout_s, x_TD.device),
            timer=StageTimer() if profile else None,
        )
        # A tuner trial of a training forward is timed over the stage's forward and its backward
        # (which the degree changes too); whether this forward is a trial is known only once the
        # counts are read, so the inputs are routed through the clock whenever one may be.
        clock = weights = None
        x_in, weight_in = x_TD, weight_N
        if par.pipeline_degree == "auto" and build_graph:
            clock = TrainingTrialClock(lambda: synchronized_time(x_TD.device),
                                       lambda seconds: self.tuner.record(forward["level"], forward["degree"], seconds))
            x_in, weight_in, *weights = clock.wrap_inputs(x_TD, weight_N, experts.gate_up_proj, experts.down_proj)
        y_TD = run_stage(x_in, weight_in, experts, run, weights)
        if forward["trial"]:
            elapsed = synchronized_time(x_TD.device) - forward["start"]
            if clock is not None:
                y_TD = clock.wrap_output(y_TD, elapsed)
            else:
                self.tuner.record(forward["level"], forward["degree"], elapsed)
        if profile:
            timer = run.timer
            per_row = timer.expert_s / timer.expert_rows if timer.expert_rows else -1.0
            bandwidth = timer.dispatch_bytes / timer.dispatch_s if timer.dispatch_bytes and timer.dispatch_s > 0 else -1.0
            self._rates = (per_row, bandwidth)
        packer = dispatch_packer(x_TD.dtype, x_TD.shape[1], weight_N.dtype, plan.pair_row_TK.shape[1])
        own = None
        if run.route is None:  # world size 1, every row local: the tokens with a kept row
            own = (plan.pair_row_TK >= 0).any(dim=1).sum()
        self.last_exchange = ExchangeStats.of(run.route, local, packer.row_bytes, x_TD.shape[1] * x_TD.dtype.itemsize,
                                              own)
        return y_TD

    def _resolve(self, pending, forward: dict, placement: PlacementTable, plan: DispatchPlan, local,
                 slot_keyed: bool, profile: bool, row_bytes: RowBytes, build_graph: bool, one_exchange: bool,
                 device: torch.device):
        """Wait for every rank's counts and lay out the exchanged rows: the route (None when
        none are exchanged anywhere, world size 1 only) and the memory strategy. Fills
        ``forward`` with the pipeline degree and whether this forward is a tuner trial."""
        par = self.parallel
        header_WH, counts_WE, pairs_WW, own_W = pending.wait()
        counts_E = counts_WE[self.rank]
        self.tuner.absorb(header_WH[:, [_COLUMN["trial level"], _COLUMN["trial degree"], _COLUMN["trial ns"]]])
        self._absorb_rates(header_WH)
        level = PipelineTuner.level(counts_WE)
        if profile:
            degree, trial = 1, False
        elif par.pipeline_degree == "auto":
            degree, trial = self.tuner.choose(level)
        else:
            degree, trial = par.pipeline_degree, False
        forward.update(level=level, degree=degree, trial=trial)
        send_WWS = split_tokens(placement, counts_WE)
        strategy, report = self._memory_strategy(send_WWS.sum(axis=(0, 2)), header_WH, row_bytes, build_graph)
        self.last_counts_WE = logical_counts(self.placement, counts_WE) if slot_keyed else counts_WE
        self.last_pipeline_degree = degree
        self.memory_report = report
        if self.size == 1 and local.count == int(counts_E.sum()):
            return None, strategy
        row_replica_N = row_replicas(placement, send_WWS, counts_E, self.rank, plan.num_rows, device)
        route = route_pairs(row_replica_N, plan.pair_row_TK, self.size, placement.slots_per_rank, degree, self.rank,
                            local.mask_N(plan.num_rows) if local.count else None)
        if pairs_WW is not None:
            local_slot_WE = self._slot_view()[1] if slot_keyed else self._local_slot_WE
            exchanged_WWS = exchanged_split(local_slot_WE, send_WWS, counts_WE) if par.local_first else send_WWS
            route.finish(known_counts(pairs_WW, exchanged_WWS), own_W[self.rank])
        else:
            shape = (self.size,) + tuple(route.counts_nWC.shape)
            everyone = self._all_gather(torch.cat([route.counts_nWC.reshape(-1), route.own_pairs_dev.view(1)]),
                                        "the pair counts of an EP layer's forward")
            route.finish(everyone[:, :-1].reshape(shape), everyone[self.rank, -1])
        return route, strategy

    # ------------------------------------------------------------------------------------------

    def set_placement(self, table: PlacementTable) -> None:
        """Switch to ``table`` (the caller has moved the slot weights to match it:
        ``flexmoe.runtime.apply_placement`` does both)."""
        self.check_table(table)
        self.placement = table.copy()
        self._set_replica_tables()

    def _set_replica_tables(self) -> None:
        """The table's replicas as device buffers (not in state_dict): for the bounded dispatch,
        the rank of every expert whose replicas all sit on one rank (-1 otherwise), and its slot
        when every expert has one (world size 1); and, for this rank only (not buffers), the
        local slot of every expert and the expert ranks without the local experts."""
        ids_EQ, fraction_EQ = replica_tables(self.placement)
        device = self.gate_up_proj.device
        rank_E = np.full(self.placement.num_experts, -1, dtype=np.int64)
        for e in range(self.placement.num_experts):
            ranks = {r for r, _, _ in self.placement.replicas(e)}
            rank_E[e] = ranks.pop() if len(ranks) == 1 else -1
        self._experts_on_one_rank = bool((rank_E >= 0).all())
        # World size 1 with every expert in exactly one slot: the one-device FFN over the slots.
        self._slots_are_experts = self.size == 1 and bool((self.placement.num_replicas_E() == 1).all())
        self.register_buffer("expert_slot_E", torch.from_numpy(np.maximum(local_slots(self.placement, 0), 0)).to(device),
                             persistent=False)
        self._local_slot_WE = local_slots_WE(self.placement)
        self._local_slot_E = self._local_slot_WE[self.rank]
        self._slot_view_cache = None
        self.register_buffer("expert_rank_E", torch.from_numpy(rank_E).to(device), persistent=False)
        # Rank-specific, so not a buffer (DDP broadcasts buffers from rank 0): one copy per device.
        self._exchanged_rank_E = {"host": torch.from_numpy(np.where(self._local_slot_E >= 0, -1, rank_E))}
        self.register_buffer("replica_ids_EQ", ids_EQ.to(device), persistent=False)
        self.register_buffer("replica_fraction_EQ", fraction_EQ.to(device), persistent=False)

    def _slot_view(self) -> tuple[PlacementTable, np.ndarray]:
        """The slot table (each slot its own expert, for slot-keyed plans) and its
        ``local_slots_WE``, built once per placement table."""
        if self._slot_view_cache is None:
            table = slot_table(self.placement)
            self._slot_view_cache = (table, local_slots_WE(table))
        return self._slot_view_cache

    def _exchanged_rank_on(self, device: torch.device) -> torch.Tensor:
        """``expert_rank_E`` with this rank's local experts at -1 (their rows enter no pair)."""
        key = str(device)
        if key not in self._exchanged_rank_E:
            self._exchanged_rank_E[key] = self._exchanged_rank_E["host"].to(device)
        return self._exchanged_rank_E[key]

    @property
    def _is_one_device(self) -> bool:
        """World size 1 and slot s holds expert s: the one-device expert FFN computes the stage."""
        table = self.placement
        return (self.size == 1 and table.slots_per_rank == table.num_experts
                and bool((table.slot_expert_WS[0] == np.arange(table.num_experts)).all()))

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
        dtype = self.gate_up_proj.dtype
        fields = exchange_fields(self.config, self.parallel, self.placement, dtype, dtype, False)
        self.agreement.check(STATE, self.forward_steps, fields, self.parallel.timeout_s, self.gate_up_proj.device)
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

    def _all_gather(self, mine: torch.Tensor, what: str) -> np.ndarray:
        """``[W, len(mine)]`` int64 on the host: ``mine`` from every rank."""
        mine = mine.to(torch.int64)
        if self.size == 1:
            return mine.cpu().numpy()[None]
        return all_gather_ints(self.ep_group, mine, self.parallel.timeout_s, what).cpu().numpy()

    def _start_counts(self, fields, counts_E, x_TD, tokens, pairs_W=None, own_pairs=None):
        """Start the forward's agreement check, and with it (one all-gather) every rank's header
        (numbers for the online choices), counts per logical expert, and, when given, pair
        counts per destination rank and the pairs to this rank. ``wait()`` on the result gives
        ``(header_WH, counts_WE, pairs_WW, own_W)`` (the last two None when not given)."""
        par = self.parallel
        budget = -1
        if par.memory == "auto":
            budget = par.memory_budget_bytes
            if budget is None:
                budget = int(free_memory_bytes(x_TD.device) * par.free_memory_fraction)
        per_row, bandwidth = self._rates if self._rates is not None else (-1.0, -1.0)
        header = [
            tokens,
            budget,
            int(per_row * 1e9) if per_row >= 0 else -1,
            int(bandwidth) if bandwidth >= 0 else -1,
            *self.tuner.shared_row(),
        ]
        if self.size == 1:  # nothing to gather or check: the host values, once the counts are read
            return _SplitCounts(None, len(_HEADER), counts_E.shape[0], self._count_width, 1, False,
                                np.array([header], dtype=np.int64), counts_E)
        device = counts_E.device
        with_pairs = pairs_W is not None
        if not with_pairs:
            pairs_W = torch.zeros(self.size, dtype=torch.int64, device=device)
            own_pairs = torch.zeros((), dtype=torch.int64, device=device)
        E, C = counts_E.shape[0], self._count_width
        padded_C = torch.zeros(C, dtype=torch.int64, device=device)
        padded_C[:E] = counts_E.to(torch.int64)
        payload = torch.cat([torch.tensor(header, dtype=torch.int64).to(device), padded_C,
                             pairs_W.to(torch.int64), own_pairs.to(torch.int64).view(1)])
        pending = self.agreement.start(FORWARD, self.forward_steps, fields, par.timeout_s, x_TD.device, payload)
        return _SplitCounts(pending, len(_HEADER), E, C, self.size, with_pairs)

    def _absorb_rates(self, header_WH: np.ndarray) -> None:
        """Slowest recompute and slowest link over the ranks that measured them (a rank without
        traffic or expert rows in its profiled forward has nothing to report)."""
        per_row = header_WH[:, _COLUMN["ns per expert row"]]
        bandwidth = header_WH[:, _COLUMN["bytes per s"]]
        if self._group_rates is None and (bandwidth >= 0).any() and (per_row >= 0).any():
            self._group_rates = (float(per_row.max()) * 1e-9, float(bandwidth[bandwidth >= 0].min()))

    def _memory_strategy(self, recv_W: np.ndarray, header_WH, row: RowBytes, build_graph: bool):
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


class _SplitCounts:
    """The forward's counts all-gather in flight; ``wait()`` splits what every rank sent."""

    def __init__(self, pending, H: int, E: int, C: int, W: int, with_pairs: bool, header_1H: np.ndarray | None = None,
                 counts_E: torch.Tensor | None = None):
        self.pending, self.H, self.E, self.C, self.W, self.with_pairs = pending, H, E, C, W, with_pairs
        self.header_1H, self.counts_E = header_1H, counts_E  # world size 1: the header and the device counts
        self.host_counts_E: np.ndarray | None = None  # world size 1: the counts when already read

    def wait(self):
        if self.pending is None:
            counts_E = self.host_counts_E if self.host_counts_E is not None else self.counts_E.cpu().numpy()
            return self.header_1H, counts_E[None], None, None
        everyone = self.pending.wait()
        H, E, C, W = self.H, self.E, self.C, self.W
        if not self.with_pairs:
            return everyone[:, :H], everyone[:, H:H + E], None, None
        return everyone[:, :H], everyone[:, H:H + E], everyone[:, H + C:H + C + W], everyone[:, H + C + W]


def exchanged_split(local_slot_WE: np.ndarray, send_WWS: np.ndarray, counts_WE: np.ndarray) -> np.ndarray:
    """``send_WWS`` without the local rows: what each source sends each replica through the
    exchange (a source's rows for an expert whose only replica it holds stay out;
    ``local_slot_WE``: ``dispatch.local_slots_WE`` of the table)."""
    out = send_WWS.copy()
    rank_P, expert_P = np.nonzero(local_slot_WE >= 0)
    out[rank_P, rank_P, local_slot_WE[rank_P, expert_P]] -= counts_WE[rank_P, expert_P]
    return out


def _is_slot_keyed(plan: DispatchPlan, config: MoEConfig) -> bool:
    """Whether the plan groups rows by global slot (``routing.slot_TK``) instead of by expert."""
    return plan.counts_E.shape[0] != config.num_experts


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


def ep_stage(layer: nn.Module) -> ParallelExperts | None:
    """The expert-parallel stage of an MoE layer, or None when its experts are local."""
    experts = getattr(layer, "experts", None)
    return experts if isinstance(experts, ParallelExperts) else None
