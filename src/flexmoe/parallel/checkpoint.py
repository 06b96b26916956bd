"""Slot rows <-> logical rows: the world-size-free view of expert-parallel weights.

Legend: E logical experts, W ranks, S slots per rank.
An EP layer's ``state_dict()`` holds every expert in logical order (``[E, ...]``), exactly the
keys and shapes of a one-device ``MoELayer`` (``ParallelExperts`` gathers the slots and takes
each expert from its first replica); ``load_state_dict`` keeps the rows of this rank's slots.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import collectives
from ..placement.table import PlacementTable
from .groups import EPGroup


def slot_rows(table: PlacementTable, rank: int, logical_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``logical_E [E, ...]`` for the slots of ``rank`` (zeros in empty slots)."""
    expert_S = torch.as_tensor(table.slot_expert_WS[rank], device=logical_E.device)
    out = logical_E.new_zeros((table.slots_per_rank,) + tuple(logical_E.shape[1:]))
    valid = expert_S >= 0
    out[valid] = logical_E[expert_S[valid]]
    return out


def logical_rows(ep: EPGroup, table: PlacementTable, slots_S: torch.Tensor) -> torch.Tensor:
    """All experts ``[E, ...]`` in logical order, each from its first replica (collective)."""
    slots_S = slots_S.detach().contiguous()
    if ep.size == 1:
        gathered = slots_S.unsqueeze(0)
    else:
        parts = [torch.empty_like(slots_S) for _ in range(ep.size)]
        collectives.all_gather(parts, slots_S, group=ep.group)
        gathered = torch.stack(parts)
    flat_F = table.slot_expert_WS.reshape(-1)
    first_E = np.array([np.flatnonzero(flat_F == e)[0] for e in range(table.num_experts)])
    return gathered.reshape((-1,) + tuple(slots_S.shape[1:]))[torch.as_tensor(first_E, device=slots_S.device)]
