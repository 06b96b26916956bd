"""World-size-free checkpoints of expert-parallel layers.

Legend: E logical experts, W ranks, S slots per rank.
An EP layer's ``state_dict()`` holds every expert in logical order (``[E, ...]``), exactly the
keys and shapes of a one-device ``MoELayer``: a state-dict hook all-gathers the slots and takes
each expert from its first replica. ``load_state_dict`` takes that logical view (from any number
of ranks, or from a one-device layer) and keeps the rows of this rank's slots. Both are
collective only in ``state_dict()`` (all ranks of the EP group must call it together).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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
        dist.all_gather(parts, slots_S, group=ep.group)
        gathered = torch.stack(parts)
    flat_F = table.slot_expert_WS.reshape(-1)
    first_E = np.array([np.flatnonzero(flat_F == e)[0] for e in range(table.num_experts)])
    return gathered.reshape((-1,) + tuple(slots_S.shape[1:]))[torch.as_tensor(first_E, device=slots_S.device)]


def install_checkpoint_hooks(layer: nn.Module) -> None:
    """Make ``layer.state_dict()`` / ``load_state_dict`` use the logical expert view."""
    layer.register_state_dict_post_hook(_to_logical)
    layer.register_load_state_dict_pre_hook(_to_slots)


def _expert_tensors(layer: nn.Module):
    yield from layer.experts.named_parameters(recurse=False)
    yield from layer.experts.named_buffers(recurse=False)


def _to_logical(layer, state_dict, prefix, local_metadata) -> None:
    ep = layer.expert_parallel
    for name, tensor in _expert_tensors(layer):
        key = f"{prefix}experts.{name}"
        if key in state_dict:
            state_dict[key] = logical_rows(ep.ep_group, layer.placement, tensor)


def _to_slots(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    ep = layer.expert_parallel
    E = layer.placement.num_experts
    for name, tensor in _expert_tensors(layer):
        key = f"{prefix}experts.{name}"
        if key not in state_dict:
            continue
        value = state_dict[key]
        if tuple(value.shape) != (E,) + tuple(tensor.shape[1:]):
            error_msgs.append(
                f"{key}: an expert-parallel layer loads the logical view [num_experts={E}, "
                f"{', '.join(map(str, tensor.shape[1:]))}] (any world size), got {tuple(value.shape)}"
            )
            continue
        state_dict[key] = slot_rows(layer.placement, ep.rank, value.to(tensor.device))
