"""MoERuntime(overlap_replica_sync=True): the replica gradient sum started during backward.

On 2 and 4 gloo processes, a model of a dense layer and three EP layers (replicated experts on
two of them, local duplicates too, one layer without replicas) trained with the overlapped sync
must give gradients EQUAL (torch.equal) to the plain ``sync_gradients``: after one backward (a
rank without tokens included), after 3 Adam steps, and with two accumulated micro-batches. The
hooks must have posted every replicated layer's reduce-scatter and all but the last layer's
all-gather before ``after_backward``; skipping the sum must be
detected; a rank that skipped a forward makes every rank raise the agreement error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoEConfig, MoELayer
from flexmoe.parallel.agreement import AgreementError
from flexmoe.placement import PlacementTable
from flexmoe.runtime import MoERuntime, sync_gradients
from flexmoe.runtime import sync as sync_module
from helpers import run_case_table, run_cases_in_processes

E, D, F, K, T = 6, 8, 6, 2, 12
SPAWN_TIMEOUT_S = 180
CONFIG = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, router_dtype=torch.float64, kernels="torch",
                   validate_inputs=False)


def replicated_table(world: int, layer: int, extra: int) -> PlacementTable:
    """Expert e on rank (e + layer) % world, plus ``extra`` random replicas (some on a rank that
    already holds the expert: local duplicates); the same on every rank."""
    slots = E // world + 2
    se = np.full((world, slots), -1)
    for e in range(E):
        r = (e + layer) % world
        se[r, np.flatnonzero(se[r] < 0)[0]] = e
    rng = np.random.default_rng(10 * world + layer)
    for _ in range(extra):
        r = int(rng.integers(world))
        free = np.flatnonzero(se[r] < 0)
        if free.size:
            se[r, free[0]] = int(rng.integers(E))
    reps_E = np.bincount(se[se >= 0], minlength=E)
    share = np.where(se >= 0, 1.0 / reps_E[np.maximum(se, 0)], 0.0)
    return PlacementTable(E, se, share)


class Stack(nn.Module):
    """A dense layer, then three EP layers: replicas on layers 0 and 2, none on layer 1."""

    def __init__(self, world: int, solo: dist.ProcessGroup | None = None, ep_group: dist.ProcessGroup | None = None):
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(D, D).double()
        extras = (2 * world, 0, world + 1)
        self.moes = nn.ModuleList(
            MoELayer(CONFIG, ep_group=ep_group or dist.group.WORLD, placement=replicated_table(world, i, n)).double()
            for i, n in enumerate(extras))
        if solo is not None:  # an EP group of this rank alone, with local duplicates
            self.moes.append(MoELayer(CONFIG, ep_group=solo, placement=replicated_table(1, 0, 2)).double())

    def forward(self, x):
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return h


def batch(step: int, rank: int, empty_rank: int | None = None):
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 0 if rank == empty_rank else T + rank
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)


def loss_of(model, x, target):
    return ((model(x) - target) ** 2).sum() / (T * dist.get_world_size())


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    differing = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differing, f"{what}: overlapped != plain in {differing}"


def plain_grads(world, rank, step=0, empty_rank=None, micro=1, solo=None):
    model = Stack(world, solo)
    for m in range(micro):
        loss_of(model, *batch(step + m, rank, empty_rank)).backward()
    sync_gradients(model)
    return model, grads(model)


def overlapped_grads(world, rank, step=0, empty_rank=None, micro=1, solo=None):
    """Like ``plain_grads`` through MoERuntime(overlap_replica_sync=True); also checks that the
    hooks posted all of the sum but the last layer's all-gather during the backward."""
    model = Stack(world, solo)
    moe = MoERuntime(model, overlap_replica_sync=True)
    for m in range(micro):
        loss = loss_of(model, *batch(step + m, rank, empty_rank))
        if m == micro - 1:
            moe.before_backward()
        loss.backward()
    posted = 2 if solo is None else 3
    assert moe._pending is not None and moe._pending.posted == posted, "every replicated layer posted during backward"
    ep_groups = {id(s.ep_group.group) for s in sync_module.ep_stages(model)}
    for stage_sums in moe._pending._sums:  # on a twin of the EP group: its own communicator
        for item in (i for i in stage_sums if len(i.holders) > 1):  # (an EP group of one rank sends nothing)
            assert id(item.group) not in ep_groups, "the overlapped sum runs on the EP group's communicator"
            assert set(item.holders) <= set(dist.get_process_group_ranks(item.group)), item.holders
    calls = {"_reduce_scatter": 0, "_all_gather": 0}
    real = {name: getattr(sync_module, name) for name in calls}

    def counting(name):
        def call(sums):
            calls[name] += 1
            return real[name](sums)
        return call

    for name in calls:
        setattr(sync_module, name, counting(name))
    try:
        moe.after_backward()
    finally:
        for name, fn in real.items():
            setattr(sync_module, name, fn)
    assert calls == {"_reduce_scatter": 0, "_all_gather": 1}, f"posted after backward: {calls}"
    return model, grads(model)


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t)
    return bool(t.item())


# ------------------------------------------------------------------------------- cases (all ranks)


def case_one_backward_equals_plain(rank, world):
    for empty_rank in (None, world - 1):
        _, want = plain_grads(world, rank, empty_rank=empty_rank)
        _, got = overlapped_grads(world, rank, empty_rank=empty_rank)
        assert_equal(got, want, f"one backward, rank without tokens: {empty_rank}")


def case_ep_group_of_one_rank_equals_plain(rank, world):
    """A layer on an EP group of one rank: its local duplicates are summed as in the plain sync."""
    solos = [dist.new_group([r]) for r in range(world)]
    _, want = plain_grads(world, rank, solo=solos[rank])
    _, got = overlapped_grads(world, rank, solo=solos[rank])
    assert_equal(got, want, "EP group of one rank")


def case_expert_dp_group_equals_plain(rank, world):
    """4 ranks as 2 EP groups of 2 ({0, 1}, {2, 3}); expert gradients also summed across them."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair, other = pairs[rank // 2], across[rank % 2]
    runs = []
    for overlap in (False, True):
        model = Stack(2, ep_group=pair)
        moe = MoERuntime(model, expert_dp_group=other, overlap_replica_sync=overlap)
        loss = loss_of(model, *batch(0, rank))
        moe.before_backward()
        loss.backward()
        assert not overlap or moe._pending.posted == 2
        moe.after_backward()
        runs.append(grads(model))
    assert_equal(runs[1], runs[0], "2 EP groups of 2 with expert_dp_group")


def case_sum_skipped_is_detected(rank, world):
    """The check has teeth: when each holder keeps its own sum (the others' left out) some rank
    differs."""
    _, want = plain_grads(world, rank)
    real = sync_module._ReplicaSum.total
    sync_module._ReplicaSum.total = lambda item: item.local.clone()
    try:
        _, got = overlapped_grads(world, rank)
    finally:
        sync_module._ReplicaSum.total = real
    differs = any(not torch.equal(got[name], want[name]) for name in want)
    assert _any_rank(differs), "skipping the sum went unnoticed"


def case_plain_sum_equals_rank_order_reference(rank, world):
    """The reduce-scatter + all-gather sum gives, on every holder, the bits of adding the holders'
    local sums in rank order (what one lead adding them all would get), divided by the world."""
    model = Stack(world)
    loss_of(model, *batch(0, rank)).backward()
    raw = [[p.grad.clone() for p in moe.experts.parameters()] for moe in model.moes]
    everyone = []
    for layer in raw:
        flat = torch.cat([g.reshape(-1) for g in layer])
        got = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(got, flat)
        everyone.append([[t.view_as(g) for t, g in zip(torch.split(f, [g.numel() for g in layer]), layer)]
                         for f in got])
    sync_gradients(model)
    widest = 0
    for i, moe in enumerate(model.moes):
        table = moe.experts.placement
        for e in range(E):
            replicas = table.replicas(e)
            holders = sorted({r for r, _, _ in replicas})
            mine = [s for r, s, _ in replicas if r == rank]
            if len(replicas) < 2 or not mine:
                continue
            widest = max(widest, len(holders))
            for k, p in enumerate(moe.experts.parameters()):
                parts = []
                for h in holders:
                    slots = [s for r, s, _ in replicas if r == h]
                    local = everyone[i][h][k][slots[0]].clone()
                    for s in slots[1:]:
                        local += everyone[i][h][k][s]
                    parts.append(local)
                want = parts[0].clone()
                for part in parts[1:]:
                    want += part
                want /= world
                for s in mine:
                    assert torch.equal(p.grad[s], want), f"layer {i}, expert {e}, slot {s}"
    assert world == 2 or _any_rank(widest >= 3), "no expert on three or more ranks was checked"


def case_adam_steps_equal_plain(rank, world):
    runs = []
    for overlap in (False, True):
        model = Stack(world)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        moe = MoERuntime(model, overlap_replica_sync=overlap)
        for step in range(3):
            loss = loss_of(model, *batch(step, rank, empty_rank=world - 1 if step == 1 else None))
            moe.before_backward()
            loss.backward()
            moe.after_backward()
            opt.step()
            opt.zero_grad()
        runs.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert_equal(runs[1], runs[0], "after 3 Adam steps")


def case_accumulation_equals_plain(rank, world):
    _, want = plain_grads(world, rank, micro=2)
    _, got = overlapped_grads(world, rank, micro=2)
    assert_equal(got, want, "two micro-batches")


def case_before_backward_twice_raises(rank, world):
    model = Stack(world)
    moe = MoERuntime(model, overlap_replica_sync=True)
    loss = loss_of(model, *batch(0, rank))
    moe.before_backward()
    with pytest.raises(RuntimeError, match="called again before after_backward"):
        moe.before_backward()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()), "the hooks were removed"
    loss.backward()
    moe.after_backward()  # the plain sync


def case_rank_that_skipped_a_forward_raises_everywhere(rank, world):
    model = Stack(world)
    moe = MoERuntime(model, overlap_replica_sync=True)
    loss = loss_of(model, *batch(0, rank))
    moe.before_backward()
    loss.backward()
    moe.after_backward()
    with pytest.raises(AgreementError, match="rank 0: the forward of an EP layer.*rank 1: flexmoe.runtime.sync_gradients"):
        if rank != 1:
            loss = loss_of(model, *batch(1, rank))
        moe.before_backward()
    assert moe._pending is None, "nothing armed after the agreement error"


CASES = {
    "one_backward_equals_plain": case_one_backward_equals_plain,
    "ep_group_of_one_rank_equals_plain": case_ep_group_of_one_rank_equals_plain,
    "sum_skipped_is_detected": case_sum_skipped_is_detected,
    "plain_sum_equals_rank_order_reference": case_plain_sum_equals_rank_order_reference,
    "adam_steps_equal_plain": case_adam_steps_equal_plain,
    "accumulation_equals_plain": case_accumulation_equals_plain,
    "before_backward_twice_raises": case_before_backward_twice_raises,
    "rank_that_skipped_a_forward_raises_everywhere": case_rank_that_skipped_a_forward_raises_everywhere,
}


CASES_OF = {2: CASES, 4: {**CASES, "expert_dp_group_equals_plain": case_expert_dp_group_equals_plain}}
# the agreement-error case leaves the group's checks out of step: it runs last
CASES_OF[4]["rank_that_skipped_a_forward_raises_everywhere"] = CASES_OF[4].pop("rank_that_skipped_a_forward_raises_everywhere")


def run_cases(rank: int, world: int, port: int) -> dict:
    """Entry point of every spawned process (helpers.run_cases_in_processes)."""
    return run_case_table(CASES_OF[world], rank, world, port, 60)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_cases_in_processes(world, "test_runtime_overlap",
                                                  str(tmp_path_factory.mktemp(f"ov{world}")), SPAWN_TIMEOUT_S)
        return cache[world]

    return get


@pytest.mark.parametrize("world, case", [(w, name) for w in (2, 4) for name in CASES_OF[w]])
def test_overlapped_replica_sync(spawned, world, case):
    for rank, results in enumerate(spawned(world)):
        assert results[case] == "ok", f"rank {rank} of {world}:\n{results[case]}"


# ------------------------------------------------------------------------------- one process


def test_overlap_flag_is_validated_and_a_no_op_without_distributed():
    model = nn.Sequential(MoELayer(CONFIG).double())
    with pytest.raises(TypeError, match="overlap_replica_sync must be a bool"):
        MoERuntime(model, overlap_replica_sync=1)
    moe = MoERuntime(model, overlap_replica_sync=True)
    x = torch.randn(5, D, dtype=torch.float64)
    model(x).sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x).sum()
    moe.before_backward()
    loss.backward()
    moe.after_backward()
    assert moe._pending is None
    assert_equal({name: p.grad for name, p in model.named_parameters()}, want, "one process")
