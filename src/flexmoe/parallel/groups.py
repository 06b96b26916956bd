"""EPGroup: the ranks one expert-parallel MoE layer spans, and their node structure.

A layer's EP group is a ``torch.distributed`` process group. Hierarchical (2DH) all-to-all also
needs one sub-group per node (consecutive ranks) and one per local index across nodes; build
them once with ``EPGroup.create(group, ranks_per_node=...)`` and pass the same EPGroup to every
layer, so the sub-groups (NCCL communicators) are shared.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class EPGroup:
    """group: the process group (None = a single process, no communication).
    rank, size: this process's rank in it and its size.
    ranks_per_node: ranks per node for hierarchical all-to-all (None = flat only).
    intra: this rank's node group; inter: the group of ranks with this rank's local index.
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    ranks_per_node: int | None = None
    intra: dist.ProcessGroup | None = None
    inter: dist.ProcessGroup | None = None

    @classmethod
    def local(cls) -> "EPGroup":
        """One process: every expert is local and nothing is communicated."""
        return cls(None, 0, 1)

    @classmethod
    def create(cls, group: dist.ProcessGroup | None = None, ranks_per_node: int | None = None) -> "EPGroup":
        """Wrap ``group`` (default: the world). With ``ranks_per_node`` this is collective over the
        default group, like ``torch.distributed.new_group``: every process must call it."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("EPGroup.create needs torch.distributed to be initialised (init_process_group)")
        group = dist.group.WORLD if group is None else group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        if ranks_per_node is None:
            return cls(group, rank, size)
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"EPGroup.create: ranks_per_node must be an int >= 1, got {ranks_per_node!r}")
        if size % ranks_per_node:
            raise ValueError(f"EPGroup.create: ranks_per_node={ranks_per_node} does not divide the group size {size}")
        members = dist.get_process_group_ranks(group)
        nodes = size // ranks_per_node
        intra = inter = None
        for node in range(nodes):
            made = dist.new_group(members[node * ranks_per_node:(node + 1) * ranks_per_node])
            if node == rank // ranks_per_node:
                intra = made
        for local in range(ranks_per_node):
            made = dist.new_group(members[local::ranks_per_node])
            if local == rank % ranks_per_node:
                inter = made
        return cls(group, rank, size, ranks_per_node, intra, inter)

    @classmethod
    def wrap(cls, group: "EPGroup | dist.ProcessGroup | None") -> "EPGroup":
        if isinstance(group, EPGroup):
            return group
        if group is None:
            return cls.local()
        return cls.create(group)

    @property
    def hierarchical(self) -> bool:
        return self.ranks_per_node is not None
