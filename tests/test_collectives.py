"""flexmoe's collectives never leave a tensor's last reference to gloo's worker (one that is the
last owner aborts the process when the interpreter is exiting): a tensor the worker still holds
when the collective returns is kept by flexmoe.collectives until it lets go; and they give the
same results as torch's. Two gloo processes whose gloo threads are starved
(helpers.starve_gloo_threads), so that a worker still holding a tensor is caught; and the
keeping itself on one process."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from flexmoe import collectives
from flexmoe.parallel import EPGroup
from flexmoe.parallel.agreement import all_gather_ints, start_all_gather_ints
from flexmoe.parallel.comm import Exchanger
from helpers import run_case_table, run_cases_in_processes, starve_gloo_threads

TRIES = 40


def case_plain_torch_collective_leaves_its_tensor_with_the_worker(rank, world):
    """The hazard itself, so that the other cases can fail: right after torch's own all-reduce
    returns, gloo's worker often still holds the tensor."""
    held = 0
    for _ in range(TRIES):
        x = torch.ones(64)
        dist.all_reduce(x)
        held += x._use_count() > 1
    assert held > 0, (f"gloo's worker never held the tensor after dist.all_reduce in {TRIES} tries: if torch "
                      "now lets go before waking the caller, flexmoe.collectives may no longer be needed")


def _kept_until_released(*tensors):
    """Each tensor has no owner but Python, or flexmoe keeps it (so the worker's reference is not
    the last); either way it is let go of soon, and flexmoe then lets go too."""
    kept = {id(t) for entry, _ in collectives._unsettled for t in entry}
    assert all(t._use_count() == 1 or id(t) in kept for t in tensors), [t._use_count() for t in tensors]
    deadline = time.monotonic() + 5
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(1e-4)
    assert all(t._use_count() == 1 for t in tensors)


def _all_let_go():
    deadline = time.monotonic() + 5
    while collectives.unsettled() and time.monotonic() < deadline:
        time.sleep(1e-4)
    assert collectives.unsettled() == 0


def case_all_reduce(rank, world):
    for i in range(TRIES):
        x = torch.full((64,), float(rank + i))
        collectives.all_reduce(x)
        _kept_until_released(x)
        assert torch.equal(x, torch.full((64,), float(sum(range(world)) + world * i)))
        m = torch.tensor([rank, -rank], dtype=torch.int64)
        collectives.all_reduce(m, op=dist.ReduceOp.MAX)
        _kept_until_released(m)
        assert m.tolist() == [world - 1, 0]


def case_all_gather(rank, world):
    for i in range(TRIES):
        mine = torch.arange(3) + 10 * rank + i
        parts = [torch.empty_like(mine) for _ in range(world)]
        collectives.all_gather(parts, mine)
        _kept_until_released(*parts, mine)
        assert all(torch.equal(p, torch.arange(3) + 10 * r + i) for r, p in enumerate(parts))


def case_broadcast(rank, world):
    for i in range(TRIES):
        x = torch.full((5,), float(i)) if rank == 1 else torch.zeros(5)
        collectives.broadcast(x, src=1)
        _kept_until_released(x)
        assert torch.equal(x, torch.full((5,), float(i)))


def case_objects_of_different_sizes(rank, world):
    mine = {"rank": rank, "payload": "x" * (100 * rank + 1)}
    assert collectives.all_gather_object(mine) == [{"rank": r, "payload": "x" * (100 * r + 1)} for r in range(world)]
    sent = ["from rank 1", list(range(50))] if rank == 1 else None
    assert collectives.broadcast_object(sent, src=1) == ["from rank 1", list(range(50))]
    assert collectives.all_gather_object(None) == [None] * world
    _all_let_go()  # the object collectives' own tensors too


def case_ep_all_gathers(rank, world):
    ep = EPGroup.create(dist.group.WORLD)
    for i in range(TRIES):
        mine = torch.tensor([rank, i], dtype=torch.int64)
        got = all_gather_ints(ep, mine, 30.0, "a test all-gather")
        _kept_until_released(mine)
        assert got.tolist() == [[r, i] for r in range(world)]
        pending = start_all_gather_ints(ep, mine, 30.0, "a test all-gather")
        assert pending.wait().tolist() == [[r, i] for r in range(world)]
        _kept_until_released(*pending._parts, mine)


def case_ep_all_to_all(rank, world):
    ep = EPGroup.create(dist.group.WORLD)
    exchanger = Exchanger(ep, timeout_s=30.0)
    for i in range(TRIES):
        send = [r + 1 for r in range(world)]  # rank r gets r + 1 rows from everyone
        rows = torch.cat([torch.full((n, 4), float(100 * rank + 10 * r + i)) for r, n in enumerate(send)])
        split_WW = np.array([send] * world)  # [source, destination] rows
        got = exchanger.start(rows, split_WW).wait()
        _kept_until_released(got, rows)
        want = torch.cat([torch.full((rank + 1, 4), float(100 * r + 10 * rank + i)) for r in range(world)])
        assert torch.equal(got, want)


CASES = {
    "plain_torch_holds": case_plain_torch_collective_leaves_its_tensor_with_the_worker,
    "all_reduce": case_all_reduce,
    "all_gather": case_all_gather,
    "broadcast": case_broadcast,
    "objects": case_objects_of_different_sizes,
    "ep_all_gathers": case_ep_all_gathers,
    "ep_all_to_all": case_ep_all_to_all,
}


def run_cases(rank: int, world: int, port: int) -> dict:
    """Entry point of every spawned process (helpers.run_cases_in_processes)."""
    return run_case_table(CASES, rank, world, port, 60, after_init=starve_gloo_threads)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return run_cases_in_processes(2, "test_collectives", str(tmp_path_factory.mktemp("coll")), 120)


@pytest.mark.parametrize("case", list(CASES))
def test_collectives(spawned, case):
    for rank, results in enumerate(spawned):
        assert results[case] == "ok", f"rank {rank}:\n{results[case]}"


def test_kept_tensors_are_let_go_once_their_extra_owners_are():
    """The keeping itself, on one process: a tensor with an owner it did not have before the
    collective (here an autograd graph, standing in for gloo's worker) is kept and checked again
    by later calls; once that owner is gone the next call lets go of it; the exit hook waits at
    most EXIT_WAIT_S for what stays held."""
    x = torch.randn(4, requires_grad=True)
    counts = collectives.use_counts([x])
    graph = (x * x).sum()  # saves x: an extra owner
    collectives.settle([x], counts)
    assert collectives.unsettled() == 1 and collectives._unsettled[0][0][0] is x
    start = time.monotonic()
    collectives._settle_at_exit()
    assert collectives.EXIT_WAIT_S <= time.monotonic() - start < collectives.EXIT_WAIT_S + 1
    del graph
    assert collectives.unsettled() == 0
    y = torch.randn(4)
    collectives.settle([y], collectives.use_counts([y]))  # nothing extra holds it: nothing kept
    assert collectives.unsettled() == 0
    assert collectives.use_counts([torch.zeros(1, device="meta")]) is None  # not on the CPU: not kept
