"""Table edits: one FlexMoE primitive at a time (expand, shrink, migrate, swap), version + 1 each.

Legend: a slot is ``(rank, slot index)``. Handy for manual placement and tests; planners build
whole tables instead.
"""

from __future__ import annotations

from .moves import Slot
from .table import EMPTY, PlacementTable


def expand_replica(table: PlacementTable, expert: int, slot: Slot) -> PlacementTable:
    """A new replica of ``expert`` in the empty ``slot = (rank, s)``; the expert's shares become equal."""
    new = table.copy()
    r, s = slot
    if new.slot_expert_WS[r, s] != EMPTY:
        raise ValueError(f"expand: slot {slot} holds expert {new.slot_expert_WS[r, s]}, not empty")
    new.slot_expert_WS[r, s] = expert
    mask = new.slot_expert_WS == expert
    new.share_WS[mask] = 1.0 / mask.sum()
    return _bumped(new, table)


def shrink_replica(table: PlacementTable, slot: Slot) -> PlacementTable:
    """Drop the replica in ``slot``; the expert's other replicas keep their shares, renormalised."""
    new = table.copy()
    r, s = slot
    expert = new.slot_expert_WS[r, s]
    if expert == EMPTY:
        raise ValueError(f"shrink: slot {slot} is empty")
    new.slot_expert_WS[r, s] = EMPTY
    new.share_WS[r, s] = 0.0
    mask = new.slot_expert_WS == expert
    if not mask.any():
        raise ValueError(f"shrink: slot {slot} holds the last replica of expert {expert}")
    total = new.share_WS[mask].sum()
    new.share_WS[mask] = new.share_WS[mask] / total if total > 0 else 1.0 / mask.sum()
    return _bumped(new, table)


def migrate_replica(table: PlacementTable, src: Slot, dst: Slot) -> PlacementTable:
    """Move the replica in ``src`` (with its share) to the empty slot ``dst``."""
    if table.slot_expert_WS[src] == EMPTY:
        raise ValueError(f"migrate: source slot {src} is empty")
    if table.slot_expert_WS[dst] != EMPTY:
        raise ValueError(f"migrate: destination slot {dst} holds expert {table.slot_expert_WS[dst]}, not empty")
    return swap_slots(table, src, dst)


def swap_slots(table: PlacementTable, a: Slot, b: Slot) -> PlacementTable:
    """Exchange the contents (expert and share) of slots ``a`` and ``b``."""
    new = table.copy()
    for arr in (new.slot_expert_WS, new.share_WS):
        arr[a], arr[b] = arr[b].copy(), arr[a].copy()
    return _bumped(new, table)


def _bumped(new: PlacementTable, old: PlacementTable) -> PlacementTable:
    new.version = old.version + 1
    new.validate()
    return new
