"""Migration: change a layer's placement table and move expert weights with their optimizer state.

Legend: E logical experts, W ranks of the expert-parallel group, S slots per rank.
A change of table is a set of slot copies ``(src rank, src slot) -> (dst rank, dst slot)`` derived
from the diff of the old and new table. Each copy carries the slot's row of every expert parameter
and of every optimizer state tensor of that parameter (Adam ``exp_avg``, ``exp_avg_sq``, ...).
All rows are read into staging buffers before any slot is written, so a slot may be a source and a
destination of the same change (two experts can swap). Remote rows travel with one
``batch_isend_irecv``; rows that stay on their rank are copied locally (runtime/slot_transfer.py).

A move runs in two halves: ``issue_placement`` (collective) checks that the ranks agree, stages the
source rows and posts the remote ones without waiting; ``PendingMove.apply`` waits for them and
switches the layer to the new table. Between the two the layer keeps its old table and slots
untouched, so it may be read (a forward, a checkpoint) but its weights and optimizer state must
not change: ``apply`` raises, writing nothing, when an optimizer step (or any in-place write to a
moving tensor) came in between, because the staged rows would be stale. ``apply_placement`` runs
both halves at once. Every wait is bounded by the layer's ``ParallelConfig.timeout_s``.

In terms of the FlexMoE primitives, per expert: new replica locations without an old one are filled
by *migrate* (when an old location is dropped at the same time) or *expand*; old locations that are
dropped without a new one are a *shrink* (the slot is left as is and no longer read).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..parallel.agreement import bounded_wait
from ..parallel.expert_parallel import ParallelExperts, ep_stage
from ..placement.moves import diff_placement
from ..placement.table import PlacementTable, table_digest
from .slot_transfer import Field, SlotTransfer


@dataclasses.dataclass(frozen=True)
class MigrationReport:
    """What one ``apply_placement`` did.

    bytes_moved: bytes of all copies in the group (remote and local, all ranks).
    bytes_sent / bytes_received: bytes this rank sent to / received from other ranks.
    """

    old_version: int
    new_version: int
    expands: int
    shrinks: int
    migrates: int
    transfers: int
    remote_transfers: int
    bytes_per_slot: int
    bytes_moved: int
    bytes_sent: int
    bytes_received: int


class PendingMove:
    """A table change of one layer whose slot rows are in flight (from ``issue_placement``).

    ``apply()`` lands it (on every rank of the group, before the layer's next forward);
    ``cancel()`` finishes the transfers and drops them, leaving the layer on its old table.
    ``report`` is known from the start. Either call is the move's end; a second one raises.
    """

    def __init__(self, stage: ParallelExperts, table: PlacementTable, transfer: SlotTransfer,
                 report: MigrationReport, versions: list[int]) -> None:
        self.stage = stage
        self.table = table
        self.report = report
        self._transfer: SlotTransfer | None = transfer
        self._versions = versions

    @property
    def done(self) -> bool:
        return self._transfer is None

    def apply(self) -> MigrationReport:
        """Wait for the rows (at most ``ParallelConfig.timeout_s``), write them, switch the table.
        RuntimeError (and nothing written; the layer keeps its old table) when a moving tensor
        changed since the issue."""
        transfer = self._take_transfer()
        timeout_s = self.stage.parallel.timeout_s
        stale = [f.name for f, version in zip(transfer.fields, self._versions) if f.changed_since(version)]
        if stale:
            transfer.wait(timeout_s)
            raise RuntimeError(
                f"placement move to table v{self.table.version} is stale: {', '.join(stale[:4])} changed "
                "between issuing the move and applying it (an optimizer step before the layer's next "
                "forward?); the layer keeps table "
                f"v{self.stage.placement.version}. Issue a move after optimizer.step() and apply it "
                "before the next forward"
            )
        transfer.land(timeout_s)
        self.stage.set_placement(self.table)
        return self.report

    def cancel(self) -> None:
        """Finish the posted transfers (so the ranks stay paired) and write nothing."""
        self._take_transfer().wait(self.stage.parallel.timeout_s)

    def _take_transfer(self) -> SlotTransfer:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            raise RuntimeError(f"the placement move to table v{self.table.version} was already applied or cancelled")
        return transfer


def issue_placement(
    layer: nn.Module,
    new_table: PlacementTable,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    ranks_per_node: int | None = None,
    move_optimizer_state: bool = True,
) -> PendingMove:
    """Start switching ``layer`` to ``new_table``: check, stage and post the slot rows; returns
    without waiting for them. Arguments as ``apply_placement``; call ``.apply()`` on the result
    on every rank before the layer's next forward, with no optimizer step in between."""
    stage = require_stage(layer, "apply_placement")
    old_table: PlacementTable = stage.placement
    new_table.validate()
    rank, group = stage.rank, stage.ep_group.group
    if ranks_per_node is None:
        ranks_per_node = stage.ep_group.ranks_per_node
    if new_table.slot_expert_WS.shape != old_table.slot_expert_WS.shape:
        raise ValueError(
            f"new table has shape {new_table.slot_expert_WS.shape}, layer holds {old_table.slot_expert_WS.shape}"
        )
    plan = diff_placement(old_table, new_table, ranks_per_node)
    changed = not (
        np.array_equal(old_table.slot_expert_WS, new_table.slot_expert_WS)
        and np.array_equal(old_table.share_WS, new_table.share_WS)
    )
    if changed and new_table.version <= old_table.version:
        raise ValueError(
            f"a changed table needs a higher version: old {old_table.version}, new {new_table.version}"
        )
    fields, scalars = _slot_fields(stage, old_table.slots_per_rank, as_optimizer_list(optimizer))
    _check_agreement(old_table, new_table, fields, scalars, stage)

    moving = fields if move_optimizer_state else fields[: len(list(stage.parameters()))]
    versions = [f.owner._version for f in moving]
    transfer = SlotTransfer(plan.transfers, moving, rank, group).issue()
    row_bytes = sum(f.row_bytes for f in moving)
    report = MigrationReport(
        old_version=old_table.version,
        new_version=new_table.version,
        expands=plan.expands,
        shrinks=plan.shrinks,
        migrates=plan.migrates,
        transfers=len(plan.transfers),
        remote_transfers=plan.num_remote,
        bytes_per_slot=row_bytes,
        bytes_moved=row_bytes * len(plan.transfers),
        bytes_sent=row_bytes * transfer.rows_sent,
        bytes_received=row_bytes * transfer.rows_received,
    )
    return PendingMove(stage, new_table.copy(), transfer, report, versions)


def apply_placement(
    layer: nn.Module,
    new_table: PlacementTable,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    ranks_per_node: int | None = None,
    move_optimizer_state: bool = True,
) -> MigrationReport:
    """Switch ``layer`` to ``new_table``, moving expert weights and optimizer state as needed.

    Call it on every rank of the layer's EP group with the same table, between ``optimizer.step()``
    and the next forward (gradients are not moved). Ranks first exchange the old and new table
    versions and the layout of the optimizer state; any disagreement raises RuntimeError before
    anything moves. ``ranks_per_node`` (default: the layer's EP group's) makes copies prefer a
    source on the destination's node.
    Per-slot optimizer states are any state tensor whose first dimension is the
    slot dimension; 0-d states (Adam's ``step``) are shared by all slots of a parameter and must be
    equal on all ranks. ``move_optimizer_state=False`` moves weights only (wrong for training; it
    exists so tests can show that they notice). Blocking: ``issue_placement`` is the
    non-blocking form.
    """
    return issue_placement(layer, new_table, optimizer, ranks_per_node=ranks_per_node,
                           move_optimizer_state=move_optimizer_state).apply()


def check_same_placement(layers: Sequence[nn.Module], group=None) -> None:
    """Raise RuntimeError unless every rank of ``group`` holds the same table (version and
    contents) in each of the expert-parallel ``layers``. No-op on a single process, and for
    one-rank tables without an explicit group. Waits at most the layers' ``ParallelConfig.timeout_s``."""
    stages = [require_stage(layer, "check_same_placement") for layer in layers]
    check_same_tables([s.placement for s in stages], group, min((s.parallel.timeout_s for s in stages), default=0.0))


def check_same_tables(tables: Sequence[PlacementTable], group, timeout_s: float) -> None:
    """``check_same_placement`` on the tables themselves (e.g. the targets of pending moves)."""
    if not tables or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size(group) == 1 or (group is None and tables[0].world_size == 1):
        return
    mine = torch.tensor(
        [[table.version, table_digest(table)] for table in tables],
        dtype=torch.int64, device=collectives.group_device(group),
    )
    all_WL2 = collectives.gathered(mine, group, bounded_wait(timeout_s, "the placement tables check")).cpu()
    if not bool((all_WL2 == all_WL2[0]).all()):
        versions = all_WL2[..., 0].tolist()
        raise RuntimeError(
            "placement tables differ across ranks (versions per rank, one entry per layer: "
            f"{versions}; equal versions mean different contents); every rank must call the "
            "scheduler / apply_placement with the same plans"
        )


def require_stage(layer: nn.Module, caller: str) -> ParallelExperts:
    """The expert-parallel stage of ``layer``; TypeError naming ``caller`` when it has none."""
    stage = ep_stage(layer)
    if stage is None:
        raise TypeError(
            f"{caller} needs an expert-parallel MoE layer (MoELayer(config, ep_group=..., placement=...)), "
            f"got {type(layer).__name__}"
        )
    return stage


def as_optimizer_list(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _slot_fields(
    stage: ParallelExperts, S: int, optimizers: Iterable[torch.optim.Optimizer]
) -> tuple[list[Field], list[tuple[str, float]]]:
    """Expert parameters first (in module order), then their per-slot optimizer states."""
    params = list(stage.named_parameters())
    fields: list[Field] = []
    for name, p in params:
        if p.dim() == 0 or p.shape[0] != S:
            raise ValueError(f"expert parameter {name} has shape {tuple(p.shape)}, expected {S} slots first")
        fields.append(Field(name, p.data, p))
    scalars: list[tuple[str, float]] = []
    for i, opt in enumerate(optimizers):
        for name, p in params:
            state = opt.state.get(p)
            for key in sorted(state or {}):
                value = state[key]
                label = f"optimizer{i}.{name}.{key}"
                if value is None:
                    continue
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == S:
                    fields.append(Field(label, value, value, lambda o=opt, p=p, k=key: o.state.get(p, {}).get(k)))
                elif (torch.is_tensor(value) and value.numel() == 1) or isinstance(value, (int, float)):
                    scalars.append((label, float(value)))
                else:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(
                        f"cannot move optimizer state {label} ({shape}): it is neither per slot "
                        f"(first dimension {S}) nor a scalar"
                    )
    return fields, scalars


def _digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 2


def _check_agreement(old_table, new_table, fields, scalars, stage: ParallelExperts) -> None:
    """One bounded all-gather of digests; only when they differ, the details (every rank then
    knows they differ, so every rank joins that second exchange and raises)."""
    if stage.size == 1:
        return
    group = stage.ep_group.group
    mine = {
        "old": (old_table.version, table_digest(old_table)),
        "new": (new_table.version, table_digest(new_table)),
        "fields": [(f.name, tuple(f.tensor.shape), str(f.tensor.dtype)) for f in fields],
        "scalars": scalars,
    }
    digests = torch.tensor([*mine["old"], *mine["new"], _digest(mine["fields"]), _digest(mine["scalars"])],
                           dtype=torch.int64, device=collectives.group_device(group))
    all_W6 = collectives.gathered(digests, group, bounded_wait(stage.parallel.timeout_s,
                                                                 "the placement move's agreement check")).cpu()
    if bool((all_W6 == all_W6[0]).all()):
        return
    for key, what, cols in (("old", "current", slice(0, 2)), ("new", "new", slice(2, 4))):
        if not bool((all_W6[:, cols] == all_W6[0, cols]).all()):
            raise RuntimeError(
                f"ranks disagree on the {what} placement table of a layer (versions per rank: "
                f"{all_W6[:, cols.start].tolist()}; equal versions mean the same version holds different "
                "contents); every rank must apply the same plan"
            )
    everyone = collectives.all_gather_object({"fields": mine["fields"], "scalars": scalars}, group=group)
    if any(o["fields"] != everyone[0]["fields"] for o in everyone):
        raise RuntimeError(
            "ranks hold different expert parameters / optimizer states; cannot move slots between them: "
            f"{[o['fields'] for o in everyone]}"
        )
    raise RuntimeError(
        "scalar optimizer states (e.g. Adam 'step') differ across ranks, so a slot cannot move "
        f"between them: {[o['scalars'] for o in everyone]}"
    )
