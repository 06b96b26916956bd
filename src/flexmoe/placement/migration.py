"""Migration: change a layer's placement table and move expert weights with their optimizer state.

Legend: E logical experts, W ranks of the expert-parallel group, S slots per rank.
A change of table is a set of slot copies ``(src rank, src slot) -> (dst rank, dst slot)`` derived
from the diff of the old and new table. Each copy carries the slot's row of every expert parameter
and of every optimizer state tensor of that parameter (Adam ``exp_avg``, ``exp_avg_sq``, ...).
All rows are read into staging buffers before any slot is written, so a slot may be a source and a
destination of the same change (two experts can swap). Remote rows travel with one
``batch_isend_irecv``; rows that stay on their rank are copied locally. Run it between optimizer
steps, on every rank of the group, with the same new table.

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

from .table import EMPTY, PlacementTable

Slot = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Table edits: one primitive at a time, version + 1 each. Handy for manual placement and tests.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Diff: which slot rows must move.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Copy the contents of ``src = (rank, slot)`` (old table) into ``dst`` (new table)."""

    expert: int
    src: Slot
    dst: Slot


@dataclasses.dataclass(frozen=True)
class MigrationPlan:
    """The copies that turn ``old`` into ``new``, and what they amount to as primitives."""

    transfers: tuple[Transfer, ...]
    expands: int
    shrinks: int
    migrates: int

    @property
    def num_remote(self) -> int:
        return sum(t.src[0] != t.dst[0] for t in self.transfers)


def diff_placement(old: PlacementTable, new: PlacementTable, ranks_per_node: int | None = None) -> MigrationPlan:
    """The slot copies from ``old`` to ``new``; identical on every rank for identical tables.

    A destination is fed from an old replica on its own rank when there is one (a local copy),
    else on its node (``rank // ranks_per_node``, when given), else from any old replica; among
    those, the one with the fewest copies assigned so far, ties to the lowest (rank, slot).
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


def table_digest(table: PlacementTable) -> int:
    """A 62-bit digest of the table contents and version, equal on ranks with equal tables."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(table.slot_expert_WS, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(table.share_WS, dtype=np.float64).tobytes())
    h.update(int(table.version).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 2


# ----------------------------------------------------------------------------------------------
# Execution.
# ----------------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class _Field:
    """One tensor with a slot row per physical slot: a parameter or one of its optimizer states."""

    name: str
    tensor: torch.Tensor

    @property
    def row_bytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()


def apply_placement(
    layer: nn.Module,
    new_table: PlacementTable,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    ranks_per_node: int | None = None,
    move_optimizer_state: bool = True,
) -> MigrationReport:
    """Switch ``layer`` to ``new_table``, moving expert weights and optimizer state as needed.

    Call it on every rank of ``layer.ep_group`` with the same table, between ``optimizer.step()``
    and the next backward (gradients are not moved). Ranks first exchange the old and new table
    versions and the layout of the optimizer state; any disagreement raises RuntimeError before
    anything moves. ``ranks_per_node`` (default: the layer's EP group's) makes copies prefer a
    source on the destination's node.
    Per-slot optimizer states are any state tensor whose first dimension is the
    slot dimension; 0-d states (Adam's ``step``) are shared by all slots of a parameter and must be
    equal on all ranks. ``move_optimizer_state=False`` moves weights only (wrong for training; it
    exists so tests can show that they notice).
    """
    old_table: PlacementTable = layer.placement
    new_table.validate()
    rank, world, group = _ep_coords(layer, old_table)
    if ranks_per_node is None:
        ep = getattr(getattr(layer, "expert_parallel", None), "ep_group", None)
        ranks_per_node = getattr(ep, "ranks_per_node", None)
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
    fields, scalars = _slot_fields(layer, old_table.slots_per_rank, _as_list(optimizer))
    _check_agreement(layer, old_table, new_table, fields, scalars, group, world)

    moving = fields if move_optimizer_state else fields[: _num_params(layer)]
    sent, received = _execute(plan.transfers, moving, rank, group)
    layer.set_placement(new_table.copy())

    row_bytes = sum(f.row_bytes for f in moving)
    return MigrationReport(
        old_version=old_table.version,
        new_version=new_table.version,
        expands=plan.expands,
        shrinks=plan.shrinks,
        migrates=plan.migrates,
        transfers=len(plan.transfers),
        remote_transfers=plan.num_remote,
        bytes_per_slot=row_bytes,
        bytes_moved=row_bytes * len(plan.transfers),
        bytes_sent=row_bytes * sent,
        bytes_received=row_bytes * received,
    )


def check_same_placement(layers: Sequence[nn.Module], group=None) -> None:
    """Raise RuntimeError unless every rank of ``group`` holds the same table (version and
    contents) in each of ``layers``. No-op on a single process, and for one-rank tables
    without an explicit group."""
    if not layers or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size(group) == 1 or (group is None and layers[0].placement.world_size == 1):
        return
    mine = torch.tensor(
        [[layer.placement.version, table_digest(layer.placement)] for layer in layers],
        dtype=torch.int64, device=_comm_device(group),
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    all_WL2 = torch.stack(gathered).cpu()
    if not bool((all_WL2 == all_WL2[0]).all()):
        versions = all_WL2[..., 0].tolist()
        raise RuntimeError(
            "placement tables differ across ranks (versions per rank, one entry per layer: "
            f"{versions}; equal versions mean different contents); every rank must call the "
            "scheduler / apply_placement with the same plans"
        )


def _ep_coords(layer: nn.Module, table: PlacementTable):
    """(rank, size, process group) of the layer's EP group (``layer.ep_rank/ep_size/ep_group``)."""
    group = getattr(layer, "ep_group", None)
    if hasattr(layer, "ep_rank") and hasattr(layer, "ep_size"):
        rank, world = layer.ep_rank, layer.ep_size
    elif dist.is_available() and dist.is_initialized() and table.world_size > 1:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    else:
        rank, world = 0, 1
    if world != table.world_size:
        raise ValueError(f"table is for {table.world_size} ranks, the layer's group has {world}")
    return rank, world, group


def _as_list(optimizer) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _num_params(layer: nn.Module) -> int:
    return len(list(layer.experts.parameters()))


def _slot_fields(
    layer: nn.Module, S: int, optimizers: Iterable[torch.optim.Optimizer]
) -> tuple[list[_Field], list[tuple[str, float]]]:
    """Expert parameters first (in module order), then their per-slot optimizer states."""
    params = list(layer.experts.named_parameters())
    fields: list[_Field] = []
    for name, p in params:
        if p.dim() == 0 or p.shape[0] != S:
            raise ValueError(f"expert parameter {name} has shape {tuple(p.shape)}, expected {S} slots first")
        fields.append(_Field(name, p.data))
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
                    fields.append(_Field(label, value))
                elif (torch.is_tensor(value) and value.numel() == 1) or isinstance(value, (int, float)):
                    scalars.append((label, float(value)))
                else:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(
                        f"cannot move optimizer state {label} ({shape}): it is neither per slot "
                        f"(first dimension {S}) nor a scalar"
                    )
    return fields, scalars


def _check_agreement(layer, old_table, new_table, fields, scalars, group, world) -> None:
    if world == 1:
        return
    mine = {
        "old": (old_table.version, table_digest(old_table)),
        "new": (new_table.version, table_digest(new_table)),
        "fields": [(f.name, tuple(f.tensor.shape), str(f.tensor.dtype)) for f in fields],
        "scalars": scalars,
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for key, what in (("old", "current"), ("new", "new")):
        if any(o[key] != everyone[0][key] for o in everyone):
            versions = [o[key][0] for o in everyone]
            raise RuntimeError(
                f"ranks disagree on the {what} placement table of a layer (versions per rank: {versions}; "
                "equal versions mean the same version holds different contents); "
                "every rank must apply the same plan"
            )
    if any(o["fields"] != everyone[0]["fields"] for o in everyone):
        raise RuntimeError(
            "ranks hold different expert parameters / optimizer states; cannot move slots between them: "
            f"{[o['fields'] for o in everyone]}"
        )
    if any(o["scalars"] != everyone[0]["scalars"] for o in everyone):
        raise RuntimeError(
            "scalar optimizer states (e.g. Adam 'step') differ across ranks, so a slot cannot move "
            f"between them: {[o['scalars'] for o in everyone]}"
        )


def _execute(transfers: Sequence[Transfer], fields: list[_Field], rank: int, group) -> tuple[int, int]:
    """Copy slot rows of every field along ``transfers``; returns (rows sent, rows received) counts."""
    local = [t for t in transfers if t.src[0] == rank and t.dst[0] == rank]
    sends: dict[int, list[Transfer]] = {}
    recvs: dict[int, list[Transfer]] = {}
    for t in transfers:
        if t.src[0] == rank and t.dst[0] != rank:
            sends.setdefault(t.dst[0], []).append(t)
        elif t.dst[0] == rank and t.src[0] != rank:
            recvs.setdefault(t.src[0], []).append(t)

    dtypes = list(dict.fromkeys(f.tensor.dtype for f in fields))

    def rows(ts: list[Transfer], which: str, f: _Field) -> torch.Tensor:
        return torch.tensor([getattr(t, which)[1] for t in ts], dtype=torch.long, device=f.tensor.device)

    # Read everything first (index_select copies), so sources may be overwritten afterwards.
    staged_local = [f.tensor.index_select(0, rows(local, "src", f)) for f in fields] if local else []
    send_bufs = {peer: _pack(fields, dtypes, lambda f: f.tensor.index_select(0, rows(ts, "src", f)))
                 for peer, ts in sorted(sends.items())}
    recv_bufs = {peer: _empty_like_pack(fields, dtypes, len(ts)) for peer, ts in sorted(recvs.items())}

    ops = []
    for peer in sorted(set(sends) | set(recvs)):
        global_peer = dist.get_global_rank(group, peer) if group is not None else peer
        for tag, dtype in enumerate(dtypes):
            if peer in sends:
                ops.append(dist.P2POp(dist.isend, send_bufs[peer][dtype], global_peer, group, tag))
            if peer in recvs:
                ops.append(dist.P2POp(dist.irecv, recv_bufs[peer][dtype], global_peer, group, tag))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    with torch.no_grad():
        for f, staged in zip(fields, staged_local):
            f.tensor.index_copy_(0, rows(local, "dst", f), staged)
        for peer, ts in sorted(recvs.items()):
            for f, block in zip(fields, _unpack(fields, dtypes, recv_bufs[peer], len(ts))):
                f.tensor.index_copy_(0, rows(ts, "dst", f), block)
    return sum(map(len, sends.values())), sum(map(len, recvs.values()))


def _pack(fields: list[_Field], dtypes: list[torch.dtype], take) -> dict[torch.dtype, torch.Tensor]:
    """One flat buffer per dtype: the selected rows of each field of that dtype, in field order."""
    out = {}
    for dtype in dtypes:
        parts = [take(f).reshape(-1) for f in fields if f.tensor.dtype == dtype]
        out[dtype] = torch.cat(parts)
    return out


def _empty_like_pack(fields: list[_Field], dtypes: list[torch.dtype], n: int) -> dict[torch.dtype, torch.Tensor]:
    out = {}
    for dtype in dtypes:
        same = [f for f in fields if f.tensor.dtype == dtype]
        numel = n * sum(f.tensor[0].numel() for f in same)
        out[dtype] = torch.empty(numel, dtype=dtype, device=same[0].tensor.device)
    return out


def _unpack(fields: list[_Field], dtypes, bufs: dict[torch.dtype, torch.Tensor], n: int) -> list[torch.Tensor]:
    """Inverse of ``_pack``: the ``[n, *row shape]`` block of each field, in field order."""
    offsets = {dtype: 0 for dtype in dtypes}
    blocks = []
    for f in fields:
        row_shape = tuple(f.tensor.shape[1:])
        numel = n * f.tensor[0].numel()
        start = offsets[f.tensor.dtype]
        blocks.append(bufs[f.tensor.dtype][start:start + numel].view(n, *row_shape))
        offsets[f.tensor.dtype] = start + numel
    return blocks


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
