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
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..parallel.expert_parallel import ParallelExperts, ep_stage
from ..placement.moves import Transfer, diff_placement
from ..placement.table import PlacementTable, table_digest

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

    Call it on every rank of the layer's EP group with the same table, between ``optimizer.step()``
    and the next backward (gradients are not moved). Ranks first exchange the old and new table
    versions and the layout of the optimizer state; any disagreement raises RuntimeError before
    anything moves. ``ranks_per_node`` (default: the layer's EP group's) makes copies prefer a
    source on the destination's node.
    Per-slot optimizer states are any state tensor whose first dimension is the
    slot dimension; 0-d states (Adam's ``step``) are shared by all slots of a parameter and must be
    equal on all ranks. ``move_optimizer_state=False`` moves weights only (wrong for training; it
    exists so tests can show that they notice).
    """
    stage = require_stage(layer, "apply_placement")
    old_table: PlacementTable = stage.placement
    new_table.validate()
    rank, world, group = stage.rank, stage.size, stage.ep_group.group
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
    _check_agreement(old_table, new_table, fields, scalars, group, world)

    moving = fields if move_optimizer_state else fields[: len(list(stage.parameters()))]
    sent, received = _execute(plan.transfers, moving, rank, group)
    stage.set_placement(new_table.copy())

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
    contents) in each of the expert-parallel ``layers``. No-op on a single process, and for
    one-rank tables without an explicit group."""
    tables = [require_stage(layer, "check_same_placement").placement for layer in layers]
    if not tables or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size(group) == 1 or (group is None and tables[0].world_size == 1):
        return
    mine = torch.tensor(
        [[table.version, table_digest(table)] for table in tables],
        dtype=torch.int64, device=comm_device(group),
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
) -> tuple[list[_Field], list[tuple[str, float]]]:
    """Expert parameters first (in module order), then their per-slot optimizer states."""
    params = list(stage.named_parameters())
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


def _check_agreement(old_table, new_table, fields, scalars, group, world) -> None:
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


def comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
