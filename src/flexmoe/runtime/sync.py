"""Gradient synchronisation for models with expert-parallel MoE layers.

Legend: E logical experts, W ranks of an EP group, S slots per rank.
Every rank computes the loss of its own batch and backpropagates it. Then:

* dense (non-expert) parameters are replicated: their gradients are averaged over the
  data-parallel group, as DDP does;
* an expert slot's gradient already holds the contributions of the tokens every rank sent to it.
  Replicas of one expert saw disjoint tokens, so their gradients are SUMMED (point-to-point,
  only between the ranks holding that expert: a reduce-scatter and an all-gather), then every
  expert gradient is divided by the data-parallel size, exactly like an averaged dense gradient. Empty slots get zero gradients.

The result is the gradient of the mean of the per-rank losses, i.e. of the single-process model
on the global batch when every rank's loss is a mean over equally many tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from .. import collectives
from ..parallel import ParallelExperts, ShardedExperts
from ..parallel.agreement import SYNC, check_envelope
from ..placement.table import table_digest


def ep_stages(model: nn.Module) -> list[ParallelExperts]:
    """The expert-parallel stages of ``model``'s MoE layers, in module order."""
    return [m for m in model.modules() if isinstance(m, ParallelExperts)]


def sharded_stages(model: nn.Module) -> list[ShardedExperts]:
    """The adaptive (sharded-expert) stages of ``model``'s MoE layers, in module order."""
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of expert-parallel experts (sharded by placement or by adaptive layers, not
    replicated)."""
    stages = ep_stages(model) + sharded_stages(model)
    return [p for stage in stages for p in stage.parameters()]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of ``expert_parameters(model)``; hand them to
    DDP as parameters to ignore."""
    ids = {id(p) for p in expert_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def sync_gradients(
    model: nn.Module, dp_group: dist.ProcessGroup | None = None, expert_dp_group: dist.ProcessGroup | None = None
) -> None:
    """Average dense gradients over ``dp_group`` (default: the world) and synchronise expert
    gradients (``sync_expert_gradients``). Call after ``backward()``, before ``optimizer.step()``.

    First every EP group checks that its ranks are all here, after the same forward steps of
    every EP layer (``flexmoe.parallel.agreement``): a rank that skipped a forward, or is still
    in one, makes every rank raise instead of pairing the wrong collectives."""
    check_sync_point(model)
    sync_dense_gradients(model, dp_group)
    _sync_expert_gradients(model, dp_group, expert_dp_group)


def check_sync_point(model: nn.Module) -> None:
    """Raise on every rank of an EP group whose ranks are not all at this gradient sync with
    equal forward steps of every EP layer (one small all-gather per EP group)."""
    by_group: dict[int, list] = {}
    for stage in ep_stages(model) + sharded_stages(model):
        if stage.size > 1:
            by_group.setdefault(id(stage.ep_group.group), []).append(stage)
    for stages in by_group.values():
        steps = [stage.forward_steps for stage in stages]
        fields = {"forward steps of the EP layers": repr(steps)}
        timeout = min(_timeout_s(stage) for stage in stages)
        first, device = stages[0], stages[0].gate_up_proj.device
        if isinstance(first, ParallelExperts):
            first.agreement.check(SYNC, steps[0], fields, timeout, device)
        else:
            check_envelope(first.ep_group, SYNC, steps[0], fields, timeout, device)


def _timeout_s(stage: ParallelExperts | ShardedExperts) -> float:
    return stage.adaptive.timeout_s if isinstance(stage, ShardedExperts) else stage.parallel.timeout_s


def sync_dense_gradients(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> None:
    """Average the gradients of all non-expert parameters over ``dp_group`` (one all-reduce per
    dtype and device). A parameter without a gradient on some ranks counts as zero there; one
    without a gradient on every rank keeps ``grad = None`` (as on one process)."""
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
    if not params or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    collectives.all_reduce(has_grad, group=dp_group)
    params = [p for p, used in zip(params, has_grad.tolist()) if used]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce([p.grad for p in params], dp_group, average=True)


def sync_expert_gradients(
    model: nn.Module, dp_group: dist.ProcessGroup | None = None, expert_dp_group: dist.ProcessGroup | None = None
) -> None:
    """Sum the gradients of the replicas of every logical expert, zero those of empty slots, and
    divide by the size of ``dp_group`` (default: the world).

    expert_dp_group: when EP groups are smaller than the data-parallel group, the ranks that
    hold the same slots in different EP groups; their expert gradients are summed too.
    Starts with the check of ``check_sync_point``.
    """
    check_sync_point(model)
    _sync_expert_gradients(model, dp_group, expert_dp_group)


def _sync_expert_gradients(model: nn.Module, dp_group, expert_dp_group,
                           replicas: "OverlappedReplicaSync | None" = None) -> None:
    """The expert part of ``sync_gradients``; ``replicas``: the replica sum started during
    backward, finished here instead of summing the replicas afresh."""
    stages = ep_stages(model)
    for stage in stages:
        for p in _trainable(stage):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            empty = torch.as_tensor(stage.placement.slot_expert_WS[stage.rank] < 0, device=p.device)
            p.grad[empty] = 0
    if replicas is None:
        _sum_replicas(stages)
    else:
        replicas.finish()
    grads = [p.grad for stage in stages for p in _trainable(stage)]
    # A shard's gradient already holds every rank's tokens (the exchanges sent them back).
    for p in (p for stage in sharded_stages(model) for p in _trainable(stage)):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if expert_dp_group is not None:
        _check_same_tables(stages, expert_dp_group, grads[0].device if grads else torch.device("cpu"))
        _all_reduce(grads, expert_dp_group, average=False)
    world = dist.get_world_size(dp_group) if dist.is_initialized() else 1
    for g in grads:
        g /= world


def _replicated_stages(model: nn.Module) -> list[ParallelExperts]:
    """EP stages with trainable parameters and a replicated expert, i.e. every stage
    ``_sum_replicas`` changes (an EP group of one rank too: its local duplicates are summed).
    The tables, hence this list, are equal on every rank of an EP group."""
    return [stage for stage in ep_stages(model)
            if _trainable(stage) and int(stage.placement.num_replicas_E().max(initial=0)) > 1]


class OverlappedReplicaSync:
    """The replica gradient sum of one backward, posted while backward still runs.

    Armed (``start_overlapped_sync``) just before the backward of the last micro-batch: a one-shot
    ``register_post_accumulate_grad_hook`` on each replicated EP stage's trainable parameters marks
    the stage ready once all of them hold this backward's gradient. Stages are posted in one fixed
    order (reverse module order, the order a stack of layers finishes its backward in), each
    as soon as it and every stage before it is ready: its reduce-scatter without waiting, then
    the previous stage's all-gather (once that stage's reduce-scatter has arrived: the one wait,
    a layer of backward after it was posted). So every rank posts the same p2p ops in the same
    order whatever its hooks' timing, and only the last stage's all-gather is left for after
    backward. ``finish`` (in ``sync_gradients_after_overlap``) posts what is left in the same
    order, waits, and writes the totals: the same additions in the same order as
    ``_sum_replicas``, so equal bits.
    """

    def __init__(self, stages: list[ParallelExperts], groups: "ReplicaSyncGroups | None" = None):
        self._stages = list(reversed(stages))
        self._groups = groups
        self._missing = [{id(p) for p in _trainable(stage)} for stage in self._stages]
        self._sums: list[list[_ReplicaSum]] = []
        self._scatters: list[list] = []
        self._gathers: list = []
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                         for i, stage in enumerate(self._stages) for p in _trainable(stage)]

    @property
    def posted(self) -> int:
        """How many stages' reduce-scatter has been posted so far."""
        return len(self._sums)

    def _hook(self, index: int):
        def on_grad(param: torch.Tensor) -> None:
            self._missing[index].discard(id(param))
            self._post_ready()
        return on_grad

    def _post_ready(self) -> None:
        while self.posted < len(self._stages) and not self._missing[self.posted]:
            stage = self._stages[self.posted]
            sums = _collect_replicas(stage, None if self._groups is None else self._groups.of(stage))
            self._scatters.append(_start(_reduce_scatter(sums)))
            self._sums.append(sums)
            if self.posted >= 2:
                self._post_gather(self.posted - 2)

    def _post_gather(self, index: int) -> None:
        _wait(self._scatters[index])
        self._scatters[index] = []
        self._gathers += _start(_all_gather(self._sums[index]))

    def cancel(self) -> None:
        """Remove the hooks that have not fired (the sync will not be finished)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finish(self) -> None:
        """After backward (gradients of every expert parameter present): post what is left in the
        same order, wait, and write the totals into the gradients."""
        self.cancel()
        for missing in self._missing:
            missing.clear()
        self._post_ready()
        if self.posted:
            self._post_gather(self.posted - 1)
        _wait(self._gathers)
        self._gathers = []
        _write_replicas([item for stage_sums in self._sums for item in stage_sums])


class ReplicaSyncGroups:
    """Per EP group, a second process group over the same ranks for the replica sum posted
    during backward: on NCCL the ops of one communicator run in order on one stream, so a sum
    posted on the EP group would hold up the backward all-to-alls issued after it instead of
    running beside them. Made on first use by the group's ranks alone (``new_group`` with local
    synchronisation), at the same point of the same step on each (the tables are equal)."""

    def __init__(self):
        self._twins: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}

    def of(self, stage: ParallelExperts) -> dist.ProcessGroup | None:
        group = stage.ep_group.group
        if group is None or stage.size == 1:
            return group
        if id(group) not in self._twins:
            twin = dist.new_group(dist.get_process_group_ranks(group), use_local_synchronization=True)
            self._twins[id(group)] = (group, twin)  # the EP group is held so its id stays its own
        return self._twins[id(group)][1]


def start_overlapped_sync(model: nn.Module,
                          groups: ReplicaSyncGroups | None = None) -> OverlappedReplicaSync | None:
    """Before the last micro-batch's backward: check the sync point (``check_sync_point``, before
    any p2p, so a rank that skipped a forward raises on every rank), then arm the hooks that post
    the replica sum during backward (on ``groups``' twin of each EP group; None: the EP group
    itself). None (nothing armed) without torch.distributed or replicas; finish with
    ``sync_gradients_after_overlap``."""
    if not dist.is_initialized():
        return None
    check_sync_point(model)
    stages = _replicated_stages(model)
    if groups is not None:
        for stage in stages:  # made here, not in a hook during backward
            groups.of(stage)
    return OverlappedReplicaSync(stages, groups) if stages else None


def sync_gradients_after_overlap(
    model: nn.Module, replicas: OverlappedReplicaSync, dp_group: dist.ProcessGroup | None = None,
    expert_dp_group: dist.ProcessGroup | None = None,
) -> None:
    """``sync_gradients`` after ``start_overlapped_sync``: the sync point was checked then and the
    replica sum finishes here (no second sum); the rest is as ``sync_gradients``."""
    sync_dense_gradients(model, dp_group)
    _sync_expert_gradients(model, dp_group, expert_dp_group, replicas)


def _check_same_tables(stages: list[ParallelExperts], group: dist.ProcessGroup, device: torch.device) -> None:
    """Slot gradients may only be summed across EP groups that hold the same placement tables."""
    if not stages or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    digests = torch.tensor([table_digest(stage.placement) for stage in stages], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(digests) for _ in range(dist.get_world_size(group))]
    collectives.all_gather(gathered, digests, group=group)
    differing = sorted({i for g in gathered for i in torch.nonzero(g != digests).flatten().tolist()})
    if differing:
        raise RuntimeError(
            f"sync_gradients: ranks of expert_dp_group hold different placement tables in EP layers "
            f"{differing}; their slot gradients would mix different experts. Give every EP group the "
            "same tables (pass expert_dp_group to PlacementScheduler too)."
        )


def _trainable(stage: ParallelExperts | ShardedExperts) -> list[nn.Parameter]:
    return [p for p in stage.parameters() if p.requires_grad]


def _all_reduce(tensors: list[torch.Tensor], group, average: bool) -> None:
    """Sum (or average) ``tensors`` in place over ``group``: one all-reduce per dtype and device."""
    if not tensors or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for bucket in groups.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collectives.all_reduce(flat, group=group)
        if average:
            flat /= dist.get_world_size(group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@dataclasses.dataclass
class _ReplicaSum:
    """One replicated expert on this rank: its slots here, the flat sum of their gradients
    (``local``) cut into one chunk per holder rank (``holders``, ascending), the local chunks the
    other holders sent for the chunk this rank owns, and the totals of the other chunks."""

    grads: list[torch.Tensor]
    slots: list[int]
    local: torch.Tensor
    holders: list[int]
    rank: int
    group: dist.ProcessGroup | None
    scattered: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    gathered: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    owned: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.chunks = list(torch.tensor_split(self.local, len(self.holders)))  # views, one per holder
        self.index = self.holders.index(self.rank)

    def reduce_owned(self) -> torch.Tensor:
        """The owned chunk's total: the holders' chunks added in rank order, as one lead adding
        every holder's sum in rank order would (equal bits, whichever rank owns the chunk)."""
        parts = [self.chunks[self.index] if h == self.rank else self.scattered[h] for h in self.holders]
        self.owned = parts[0].clone()
        for part in parts[1:]:
            self.owned += part
        return self.owned

    def total(self) -> torch.Tensor:
        """Every chunk's total, in holder order (after the all-gather)."""
        return torch.cat([self.owned if h == self.rank else self.gathered[h] for h in self.holders])


def _sum_replicas(stages: list[ParallelExperts]) -> None:
    """Local replicas are added up; the holder ranks of an expert then sum their local sums by a
    reduce-scatter (each holder adds up one chunk, in rank order) and an all-gather of the chunk
    totals, so all replicas get equal bits."""
    sums = [item for stage in stages for item in _collect_replicas(stage)]
    _wait(_start(_reduce_scatter(sums)))
    _wait(_start(_all_gather(sums)))
    _write_replicas(sums)


def _collect_replicas(stage: ParallelExperts, group: dist.ProcessGroup | None = None) -> list[_ReplicaSum]:
    """This rank's replicated experts of ``stage``, each with the sum of its local slots'
    gradients, to be summed over ``group`` (default: the stage's EP group; same ranks)."""
    group = stage.ep_group.group if group is None else group
    table, rank = stage.placement, stage.rank
    grads = [p.grad for p in _trainable(stage)]
    sums: list[_ReplicaSum] = []
    if not grads:
        return sums
    for e in range(table.num_experts):
        replicas = table.replicas(e)
        slots = [s for r, s, _ in replicas if r == rank]
        if len(replicas) < 2 or not slots:
            continue
        holders = sorted({r for r, _, _ in replicas})
        local = torch.cat([_add_rows(g, slots).reshape(-1) for g in grads])
        sums.append(_ReplicaSum(grads, slots, local, holders, rank, group))
    return sums


def _reduce_scatter(sums: list[_ReplicaSum]) -> list[dist.P2POp]:
    """Phase 1: every holder sends chunk j of its local sum to the j-th holder and receives the
    others' chunks of its own: (r - 1) / r of a gradient each way per replicated expert on r ranks
    (what ``CostModel.sync_time`` charges, twice with the all-gather)."""
    ops = []
    for item in sums:
        for j, peer in enumerate(item.holders):
            if peer == item.rank:
                continue
            item.scattered[peer] = torch.empty_like(item.chunks[item.index])
            ops.append(_p2p(dist.isend, item.chunks[j], peer, item.group))
            ops.append(_p2p(dist.irecv, item.scattered[peer], peer, item.group))
    return ops


def _all_gather(sums: list[_ReplicaSum]) -> list[dist.P2POp]:
    """Phase 2 (this rank's phase 1 arrived): each holder adds up the chunk it owns and sends the
    total to the other holders, receiving theirs."""
    ops = []
    for item in sums:
        owned = item.reduce_owned()
        for j, peer in enumerate(item.holders):
            if peer == item.rank:
                continue
            item.gathered[peer] = torch.empty_like(item.chunks[j])
            ops.append(_p2p(dist.isend, owned, peer, item.group))
            ops.append(_p2p(dist.irecv, item.gathered[peer], peer, item.group))
    return ops


def _write_replicas(sums: list[_ReplicaSum]) -> None:
    """The sum finished: every local slot of a replicated expert gets the total."""
    for item in sums:
        offset, total = 0, item.total()
        for g in item.grads:
            width = g[0].numel()
            g[item.slots] = total[offset:offset + width].view_as(g[0])
            offset += width


def _add_rows(grad: torch.Tensor, slots: list[int]) -> torch.Tensor:
    total = grad[slots[0]].clone()
    for s in slots[1:]:
        total += grad[s]
    return total


def _p2p(op, tensor: torch.Tensor, peer: int, group) -> dist.P2POp:
    return dist.P2POp(op, tensor, group=group, group_peer=peer)


def _start(ops: list[dist.P2POp]) -> list:
    """Post ``ops`` without waiting; the works keep their tensors alive until ``_wait``."""
    return list(dist.batch_isend_irecv(ops)) if ops else []


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def sync_router_loads(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> None:
    """Sum over ``dp_group`` the expert loads every router accumulated for the auxiliary-loss-free
    bias, so ``flexmoe.runtime.update_router_bias(model)`` (call it right after) moves the replicated
    bias identically on every rank."""
    loads = [m.pending_load_E for m in model.modules() if isinstance(getattr(m, "pending_load_E", None), torch.Tensor)]
    _all_reduce(loads, dp_group, average=False)
