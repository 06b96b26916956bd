"""PlacementScheduler: observe routing counts, re-plan expert placement at a cadence, migrate.

Legend: L MoE layers with a placement table, W ranks of the expert-parallel group, E logical experts,
S slots per rank, H steps since the last plan.
Each ``step()`` (after ``optimizer.step()``) appends this rank's tokens per expert of every layer to
a device buffer (no host synchronisation). Every ``interval`` steps the buffer is all-gathered over
the expert-parallel group, so every rank holds the same counts ``C[step, src rank, layer, expert]``;
they feed a ``flexmoe.placement.Replanner`` (the same object the simulator runs: cadence,
predictors, guard, bytes budget), which proposes a table per layer, and ``apply_placement`` moves
weights and optimizer state. All ranks compute the same plans from the same counts; their tables
are checked to agree after every change.

With ``async_moves`` (the default) a plan's moves are issued, not waited for: ``step()`` stages the
slot rows and posts the transfers, and each layer lands its move in a forward pre-hook, just before
its next forward. The rule that keeps this exact: a move is issued right after
``optimizer.step()`` and lands before the next forward, and nothing in between changes a weight or
an optimizer state (the old table and slots stay valid and are what a checkpoint saves); a move
that finds a moving tensor changed raises instead of landing stale rows. So the transfers overlap
with the host work before the next forward (data loading) and, for layer i, with the forward of
layers 0..i-1.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..layer import moe_layers
from ..parallel import ParallelExperts, ep_stage
from ..parallel.agreement import REPLAN, bounded_wait
from ..placement.planner import GreedyPlanner, Planner
from ..placement.policy import ReplanPolicy, Replanner
from ..placement.predict import LoadPredictor, PredictorConfig
from ..placement.split import balance_ratio
from ..placement.table import PlacementTable
from ..sim.trace import TraceRecorder
from .measure import measure_cost_model
from .migration import (
    PendingMove,
    apply_placement,
    as_optimizer_list,
    check_same_tables,
    issue_placement,
)


class PlacementScheduler:
    """Dynamic expert placement for every MoE layer of ``model`` that has a placement table.

    Call ``step()`` on every rank of the expert-parallel group once per training step, after
    ``optimizer.step()`` and before the next forward. With gradient accumulation call
    ``observe()`` after each micro-batch's forward; ``step()`` then uses the sum of the observed
    counts instead of the last forward's.

    planner: default ``GreedyPlanner()`` (flexmoe's); any object with
        ``plan(table, counts_WE, cost_model[, step]) -> PlacementTable`` returning a table with a
        higher version when it changes anything. It must be deterministic: every rank plans on its
        own from the same counts. ``counts_WE`` are predicted tokens per step (float).
    cost_model: a ``CostModel`` handed to the planner; None measures one on this machine
        (``flexmoe.runtime.measure_cost_model``, a collective over the group) when the scheduler is built.
    policy: a ``ReplanPolicy`` (interval, warmup, predictor, guard, bytes budget); default
        ``ReplanPolicy()``, the policy the simulator replays. Or, instead, the shorthands
        interval (plan every ``interval`` steps), warmup (steps before the first plan, default
        interval) and ema_decay (an EMA predictor ``ema = decay * ema + (1 - decay) * counts``;
        None: the planner's own predictor): the other fields keep ``ReplanPolicy``'s defaults.
    trace: record the all-gathered routing counts of every step (0-based step index) to a trace
        file the simulator reads: a path (global rank 0 writes it, appending when it exists) or a
        ``flexmoe.sim.trace.TraceRecorder`` (used as is on the ranks that pass one). Steps are
        written at each plan boundary.
    expert_dp_group: with data parallelism over several EP groups, the ranks that hold the same
        slots in different EP groups (as for ``flexmoe.parallel.sync_gradients``). Counts are
        summed over it, so every EP group plans the same tables; required whenever expert
        gradients are synchronised over such a group.
    logger: where per-layer plan summaries go (INFO, on global rank 0 only); default
        ``logging.getLogger("flexmoe.placement")``.
    async_moves: True (default): a plan's transfers are posted by ``step()`` and land just
        before each layer's next forward (a forward pre-hook), overlapping with what runs in
        between; exact because nothing may change the weights or optimizer state in between (a
        move that finds them changed raises). False: ``step()`` waits for every move.
        ``pending`` names the layers with a move in flight, ``finish_moves()`` lands them now.

    After each plan, ``last_metrics`` holds ``{"step", "kind", "bytes_moved", "layers": [...]}``
    (kind "plan", or "shed" for a shed between plans that dropped replicas: only those layers) with, per
    layer: the balance ratio (max / mean rank load) observed since the last plan under the old table
    (``balance_observed``) and, on the predicted counts, under the old and new tables
    (``balance_predicted_old`` / ``_new``), replica counts, the primitives applied (expands, shrinks,
    migrates), slot copies and bytes moved.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
        planner: Planner | None = None,
        cost_model: Any = None,
        *,
        policy: ReplanPolicy | None = None,
        interval: int | None = None,
        warmup: int | None = None,
        ema_decay: float | None = None,
        trace: Any = None,
        expert_dp_group: dist.ProcessGroup | None = None,
        logger: logging.Logger | None = None,
        async_moves: bool = True,
    ):
        self.layers = [m for m in moe_layers(model) if ep_stage(m) is not None]
        if not self.layers:
            raise ValueError(
                "PlacementScheduler: the model has no MoE layer with a placement table "
                "(build MoELayer with ep_group=..., placement=..., slots_per_rank=...)"
            )
        self._stages: list[ParallelExperts] = [ep_stage(m) for m in self.layers]
        if len({_group_key(stage.ep_group.group) for stage in self._stages}) > 1:
            raise ValueError("PlacementScheduler: all MoE layers with placement must share one ep_group")
        planner = GreedyPlanner() if planner is None else planner
        if not callable(getattr(planner, "plan", None)):
            raise ValueError(
                f"PlacementScheduler.planner must have a plan(table, counts_WE, cost_model) method, got {planner!r}"
            )
        for name, value, minimum in (("interval", interval, 1), ("warmup", warmup, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"PlacementScheduler.{name} must be an int >= {minimum}, got {value!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"PlacementScheduler.ema_decay must be None or in [0, 1), got {ema_decay!r}")
        if not isinstance(async_moves, bool):
            raise ValueError(f"PlacementScheduler.async_moves must be a bool, got {async_moves!r}")
        if policy is not None and (interval, warmup, ema_decay) != (None, None, None):
            raise ValueError("PlacementScheduler: give either policy or interval/warmup/ema_decay, not both")
        if policy is None:
            predictor = None if ema_decay is None else PredictorConfig(decay=ema_decay)
            policy = ReplanPolicy(interval=interval or ReplanPolicy.interval, warmup=warmup, predictor=predictor)
        if not isinstance(policy, ReplanPolicy):
            raise ValueError(f"PlacementScheduler.policy must be a ReplanPolicy, got {policy!r}")
        self.group = self._stages[0].ep_group.group
        self.expert_dp_group = expert_dp_group
        self.optimizers = as_optimizer_list(optimizer)
        self.planner = planner
        self.cost_model = cost_model if cost_model is not None else self._measure_cost_model()
        self.policy = policy
        self.replanner = Replanner(policy, planner, len(self.layers))
        self.recorder = self._make_recorder(trace)
        self._owns_recorder = self.recorder is not None and self.recorder is not trace
        self.logger = logger or logging.getLogger("flexmoe.placement")
        self.num_steps = 0
        self.last_metrics: dict = {}
        self._pending: list[torch.Tensor] = []  # [L, E] per step, this rank, not yet gathered
        self._accum: torch.Tensor | None = None
        self.async_moves = async_moves
        self.timeout_s = min(stage.parallel.timeout_s for stage in self._stages)
        self._moves: list[PendingMove | None] = [None] * len(self.layers)  # in flight, per layer
        self._restored: list[PlacementTable | None] = [None] * len(self.layers)  # to move on resume
        self._hooks = [layer.register_forward_pre_hook(_LandBeforeForward(self, i))
                       for i, layer in enumerate(self.layers)]

    def _make_recorder(self, trace):
        if trace is None or callable(getattr(trace, "record", None)):
            return trace
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        table = self._stages[0].placement
        meta = {"slots_per_rank": table.slots_per_rank, "source": "PlacementScheduler"}
        return TraceRecorder(trace, table.world_size, table.num_experts, len(self.layers), meta)

    @property
    def interval(self) -> int:
        return self.policy.interval

    @property
    def _predictors(self) -> list[LoadPredictor]:
        return self.replanner.predictors

    def _measure_cost_model(self):
        layer = self.layers[0]
        device = layer.experts.gate_up_proj.device
        group = self.group if self.world_size > 1 else None
        return measure_cost_model(layer.config.d_model, layer.config.d_ff, device=str(device), group=group)

    @property
    def tables(self) -> list[PlacementTable]:
        return [stage.placement for stage in self._stages]

    @property
    def world_size(self) -> int:
        return self._stages[0].placement.world_size

    def observe(self) -> None:
        """Add the last forward's counts of every layer (for gradient accumulation)."""
        counts = self._local_counts()
        self._accum = counts if self._accum is None else self._accum + counts

    def step(self) -> dict | None:
        """Record this step's counts; every ``interval`` steps plan and migrate (and, with
        ``ReplanPolicy.shed_window``, after every step while a layer may shed, drop replicas that
        stopped paying). Returns the new ``last_metrics`` when it planned or shed, else None."""
        self.finish_moves()  # only when no forward ran since the last plan
        counts = self._accum if self._accum is not None else self._local_counts()
        self._accum = None
        self._pending.append(counts)
        self.num_steps += 1
        if not self.replanner.due(self.num_steps):
            return None
        self._check_replan_point()
        return self._plan_and_apply(self._gather_pending(), shed=not self.policy.due(self.num_steps))

    def _check_replan_point(self) -> None:
        """Raise ``AgreementError`` on every rank of the EP group unless all are at this re-plan
        with the same steps: a rank that skipped its ``step()`` (after an error) meets this check
        with its next forward's, or its gradient sync's, before the counts all-gather it would
        break."""
        first = self._stages[0]
        if first.size == 1:
            return
        fields = {"PlacementScheduler steps": str(self.num_steps),
                  "forward steps of the EP layers": repr([s.forward_steps for s in self._stages])}
        first.agreement.check(REPLAN, first.forward_steps, fields, self.timeout_s, first.gate_up_proj.device)

    @property
    def pending(self) -> tuple[int, ...]:
        """Indices (into ``layers``) of the layers whose move has not landed yet."""
        return tuple(i for i in range(len(self.layers)) if self._is_pending(i))

    def _is_pending(self, i: int) -> bool:
        return self._moves[i] is not None or self._restored[i] is not None

    def finish_moves(self) -> None:
        """Land every pending move now (a collective when any is pending), in layer order."""
        for i in self.pending:
            self._land(i)

    def _land(self, i: int) -> None:
        move, table = self._moves[i], self._restored[i]
        self._moves[i] = self._restored[i] = None  # a failed landing is not retried: the layer keeps its old table
        if move is not None:
            move.apply()
        elif table is not None:  # a checkpoint taken while this move was in flight: move it now
            apply_placement(self.layers[i], table, self.optimizers,
                            ranks_per_node=getattr(self.cost_model, "ranks_per_node", None))

    @property
    def planned_tables(self) -> list[PlacementTable]:
        """Per layer, the table it holds once its pending move (if any) has landed (``tables``:
        the ones they hold now)."""
        return [m.table if m is not None else r if r is not None else s.placement
                for m, r, s in zip(self._moves, self._restored, self._stages)]

    def _local_counts(self) -> torch.Tensor:
        counts = []
        for i, layer in enumerate(self.layers):
            if layer.last_counts is None:
                raise RuntimeError(f"MoE layer {i} has no counts yet: call the scheduler after a forward pass")
            counts.append(layer.last_counts.detach().to(torch.int64).reshape(-1))
        return torch.stack(counts)

    def _gather_pending(self) -> np.ndarray:
        """All-gather the steps since the last plan: ``int64 [H, W, L, E]``; feeds predictors and recorder."""
        local_HLE = torch.stack(self._pending)
        self._pending = []
        if self.expert_dp_group is not None and dist.get_world_size(self.expert_dp_group) > 1:
            local_HLE = local_HLE.to(collectives.group_device(self.expert_dp_group))
            collectives.all_reduce(local_HLE, group=self.expert_dp_group, wait=bounded_wait(
                self.timeout_s, "the placement scheduler's counts all-reduce", among="expert_dp_group"))
        if self.world_size > 1:
            local_HLE = local_HLE.to(collectives.group_device(self.group))
            all_HWLE = collectives.gathered(local_HLE, self.group, bounded_wait(
                self.timeout_s, "the placement scheduler's counts all-gather")).transpose(0, 1).cpu().numpy()
        else:
            all_HWLE = local_HLE.cpu().numpy()[:, None]
        first_step = self.num_steps - all_HWLE.shape[0]
        for h, counts_WLE in enumerate(all_HWLE):
            self.replanner.observe(counts_WLE.transpose(1, 0, 2))
            if self.recorder is not None:
                for i in range(len(self.layers)):
                    self.recorder.record(first_step + h, i, counts_WLE[:, i])
        return all_HWLE

    def _plan_and_apply(self, observed_HWLE: np.ndarray, shed: bool = False) -> dict | None:
        ranks_per_node = getattr(self.cost_model, "ranks_per_node", None)
        layer_metrics = []
        predicted_LWE = [p.predict() for p in self._predictors]
        plans = self.replanner.plan([stage.placement.copy() for stage in self._stages], self.cost_model)
        for i, (layer, stage) in enumerate(zip(self.layers, self._stages)):
            predicted_E = np.rint(predicted_LWE[i].sum(axis=0)).astype(np.int64)
            old = stage.placement
            new = plans[i].table
            metrics = {
                "layer": i,
                "balance_observed": balance_ratio(old, observed_HWLE[:, :, i].sum(axis=(0, 1))),
                "balance_predicted_old": balance_ratio(old, predicted_E),
                "balance_predicted_new": balance_ratio(new, predicted_E),
            }
            report = None
            if not _same(old, new):
                move = issue_placement(layer, new, self.optimizers, ranks_per_node=ranks_per_node)
                report = move.report
                if self.async_moves:
                    self._moves[i] = move
                else:
                    move.apply()
            replicas_E = new.num_replicas_E()
            metrics.update(version=new.version, replicas=replicas_E.tolist(),
                           replicated_experts=int((replicas_E > 1).sum()), pending=self._moves[i] is not None)
            for key in ("expands", "shrinks", "migrates", "transfers", "remote_transfers",
                        "bytes_moved", "bytes_sent", "bytes_received"):
                metrics[key] = getattr(report, key) if report else 0
            layer_metrics.append(metrics)
        check_same_tables(self.planned_tables, self.group, self.timeout_s)
        if self.expert_dp_group is not None:
            check_same_tables(self.planned_tables, self.expert_dp_group, self.timeout_s)
        if shed:  # between plans: report (and log) only the layers that dropped replicas
            layer_metrics = [m for m in layer_metrics if m["shrinks"]]
            if not layer_metrics:
                return None
        self.last_metrics = {
            "step": self.num_steps,
            "kind": "shed" if shed else "plan",
            "bytes_moved": sum(m["bytes_moved"] for m in layer_metrics),
            "layers": layer_metrics,
        }
        self._log()
        return self.last_metrics

    def _log(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        for m in self.last_metrics["layers"]:
            head = (f"placement step {self.num_steps} layer {m['layer']} v{m['version']}: "
                    f"balance {m['balance_observed']:.3f}")
            if not m["transfers"] and m["balance_predicted_new"] == m["balance_predicted_old"]:
                self.logger.info("%s (predicted %.3f), unchanged", head, m["balance_predicted_old"])
                continue
            self.logger.info(
                "%s -> predicted %.3f (was %.3f), replicated experts %d (max %d replicas), "
                "expand %d shrink %d migrate %d, %d slot copies (%d remote), %d bytes moved",
                head, m["balance_predicted_new"], m["balance_predicted_old"], m["replicated_experts"],
                max(m["replicas"]), m["expands"], m["shrinks"], m["migrates"], m["transfers"],
                m["remote_transfers"], m["bytes_moved"],
            )

    def close(self) -> None:
        """Close the trace file the scheduler opened (if any)."""
        if self.recorder is not None and self._owns_recorder:
            self.recorder.close()

    def state_dict(self) -> dict:
        """Tables, step counter and load predictors; no communication, so any rank may save it.
        Counts of the steps since the last plan are this rank's own. With moves in flight,
        ``tables`` are the layers' current (old) tables, which the weights and optimizer state
        still match, and ``pending_tables`` the tables they are moving to (None where none is):
        loading it moves them again at the next forward, from the same state."""
        return {
            "num_steps": self.num_steps,
            "tables": [t.state_dict() for t in self.tables],
            "pending_tables": [None if t is s.placement else t.state_dict()
                               for t, s in zip(self.planned_tables, self._stages)],
            "replanner": self.replanner.state_dict(),
            "pending": torch.stack([t.cpu() for t in self._pending]) if self._pending else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore tables (set on the layers without moving anything: the weights come from the
        model's state dict saved together with this), step counter and predictors. Moves that
        were in flight when it was saved run before each layer's next forward (a collective).
        Moves in flight here are finished and dropped first."""
        tables = [PlacementTable.from_state_dict(t) for t in state["tables"]]
        pending = [None if t is None else PlacementTable.from_state_dict(t)
                   for t in state.get("pending_tables") or [None] * len(tables)]
        if len(tables) != len(self.layers):
            raise ValueError(f"state has {len(tables)} placement tables, the model has {len(self.layers)} layers")
        if len(pending) != len(tables):
            raise ValueError(f"state has {len(pending)} pending tables for {len(tables)} placement tables")
        for i, (stage, table) in enumerate(zip(self._stages, tables)):
            if pending[i] is not None:
                stage.check_table(pending[i])
            if table.slot_expert_WS.shape != stage.placement.slot_expert_WS.shape:
                raise ValueError(
                    f"layer {i}: saved table has shape {table.slot_expert_WS.shape}, "
                    f"the layer {stage.placement.slot_expert_WS.shape}"
                )
        for i, move in enumerate(self._moves):
            if move is not None:
                self._moves[i] = None
                move.cancel()
        for stage, table in zip(self._stages, tables):
            stage.set_placement(table)
        self._restored = pending
        if "replanner" in state:
            self.replanner.load_state_dict(state["replanner"])
        else:  # saved before the re-plan policy: predictors only
            for predictor, p_state in zip(self._predictors, state["predictors"]):
                predictor.load_state_dict(p_state)
            self.replanner.steps_done = int(state["num_steps"]) - (0 if state["pending"] is None else len(state["pending"]))
        self.num_steps = int(state["num_steps"])
        device = self.layers[0].experts.gate_up_proj.device
        self._pending = [] if state["pending"] is None else list(state["pending"].to(device).unbind(0))
        self._accum = None


class _LandBeforeForward:
    """The forward pre-hook of layer ``i``: land its pending move. It holds the scheduler weakly,
    so copying or pickling a model does not copy the scheduler (a copy's hook does nothing)."""

    def __init__(self, scheduler: PlacementScheduler, i: int) -> None:
        self.scheduler = weakref.ref(scheduler)
        self.i = i

    def __call__(self, module, args) -> None:
        scheduler = self.scheduler() if self.scheduler is not None else None
        if scheduler is not None and scheduler._is_pending(self.i):
            scheduler._land(self.i)

    def __getstate__(self) -> dict:
        return {"scheduler": None, "i": self.i}

    def __deepcopy__(self, memo) -> "_LandBeforeForward":
        copy = _LandBeforeForward.__new__(_LandBeforeForward)
        copy.__setstate__(self.__getstate__())
        return copy

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _same(a: PlacementTable, b: PlacementTable) -> bool:
    return (
        a.version == b.version
        and np.array_equal(a.slot_expert_WS, b.slot_expert_WS)
        and np.array_equal(a.share_WS, b.share_WS)
    )


def _group_key(group) -> tuple | None:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return tuple(dist.get_process_group_ranks(group))
