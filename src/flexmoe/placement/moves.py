"""The move diff: which slot copies turn one placement table into another.

Legend: E logical experts, W ranks, S slots per rank; a slot is ``(rank, slot index)``.
One diff serves both the migration (runtime/migration.py executes it) and the cost model (which
prices it), so the modelled moves are the moves that run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .table import PlacementTable

Slot = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Copy the contents of ``src = (rank, slot)`` (old table) into ``dst`` (new table)."""

    expert: int
    src: Slot
    dst: Slot

    @property
    def is_remote(self) -> bool:
        return self.src[0] != self.dst[0]


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
    """The copies that turn ``old`` into ``new``, and what they amount to as FlexMoE primitives."""

    transfers: tuple[Transfer, ...]
    expands: int
    shrinks: int
    migrates: int

    @property
    def num_remote(self) -> int:
        return sum(t.is_remote for t in self.transfers)


def diff_placement(old: PlacementTable, new: PlacementTable, ranks_per_node: int | None = None) -> MigrationPlan:
    """The slot copies from ``old`` to ``new``; identical on every rank for identical tables.

    Every slot of ``new`` that holds an expert it did not hold in ``old`` is a destination. It is
    fed from an old replica on its own rank when there is one (a local copy), else on its node
    (``rank // ranks_per_node``, when given), else from any old replica; among those, the one with
    the fewest copies assigned so far (spreading the sends), ties to the lowest (rank, slot).
    Per expert, new locations without an old one are *migrates* (paired with a dropped old
    location) or *expands*; dropped locations left over are *shrinks* (no copy).
    """
    if old.slot_expert_WS.shape != new.slot_expert_WS.shape or old.num_experts != new.num_experts:
        raise ValueError(
            f"tables differ in shape: old {old.num_experts} experts on {old.slot_expert_WS.shape}, "
            f"new {new.num_experts} on {new.slot_expert_WS.shape}"
        )
    transfers: list[Transfer] = []
    expands = shrinks = migrates = 0
    sends_per_src: dict[Slot, int] = {}
    for e in range(old.num_experts):
        old_slots = _slots_of(old, e)
        new_slots = _slots_of(new, e)
        added = [s for s in new_slots if s not in old_slots]
        removed = [s for s in old_slots if s not in new_slots]
        moved = min(len(added), len(removed))
        migrates += moved
        expands += len(added) - moved
        shrinks += len(removed) - moved
        for dst in added:
            local = [s for s in old_slots if s[0] == dst[0]]
            same_node = [s for s in old_slots if ranks_per_node and s[0] // ranks_per_node == dst[0] // ranks_per_node]
            candidates = local or same_node or old_slots
            src = min(candidates, key=lambda s: (sends_per_src.get(s, 0), s))
            sends_per_src[src] = sends_per_src.get(src, 0) + 1
            transfers.append(Transfer(e, src, dst))
    return MigrationPlan(tuple(transfers), expands, shrinks, migrates)


def _slots_of(table: PlacementTable, expert: int) -> list[Slot]:
    ranks, slots = np.nonzero(table.slot_expert_WS == expert)
    return [(int(r), int(s)) for r, s in zip(ranks, slots)]
