"""flexmoe's collectives return only once gloo's worker has let go of their tensors (a tensor
whose last owner is that worker aborts the process when the interpreter is exiting), and give the
same results as torch's. Two gloo processes whose gloo threads are starved
(helpers.starve_gloo_threads), so that a worker still holding a tensor is caught."""

from __future__ import annotations

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
    assert held > 0, f"the worker never held the tensor after dist.all_reduce in {TRIES} tries"


def case_all_reduce(rank, world):
    for i in range(TRIES):
        x = torch.full((64,), float(rank + i))
        collectives.all_reduce(x)
        assert x._use_count() == 1, x._use_count()
        assert torch.equal(x, torch.full((64,), float(sum(range(world)) + world * i)))
        m = torch.tensor([rank, -rank], dtype=torch.int64)
        collectives.all_reduce(m, op=dist.ReduceOp.MAX)
        assert m._use_count() == 1 and m.tolist() == [world - 1, 0]


def case_all_gather(rank, world):
    for i in range(TRIES):
        mine = torch.arange(3) + 10 * rank + i
        parts = [torch.empty_like(mine) for _ in range(world)]
        collectives.all_gather(parts, mine)
        assert [p._use_count() for p in parts + [mine]] == [1] * (world + 1)
        assert all(torch.equal(p, torch.arange(3) + 10 * r + i) for r, p in enumerate(parts))


def case_broadcast(rank, world):
    for i in range(TRIES):
        x = torch.full((5,), float(i)) if rank == 1 else torch.zeros(5)
        collectives.broadcast(x, src=1)
        assert x._use_count() == 1 and torch.equal(x, torch.full((5,), float(i)))


def case_objects_of_different_sizes(rank, world):
    mine = {"rank": rank, "payload": "x" * (100 * rank + 1)}
    assert collectives.all_gather_object(mine) == [{"rank": r, "payload": "x" * (100 * r + 1)} for r in range(world)]
    sent = ["from rank 1", list(range(50))] if rank == 1 else None
    assert collectives.broadcast_object(sent, src=1) == ["from rank 1", list(range(50))]
    assert collectives.all_gather_object(None) == [None] * world


def case_ep_all_gathers(rank, world):
    ep = EPGroup.create(dist.group.WORLD)
    for i in range(TRIES):
        mine = torch.tensor([rank, i], dtype=torch.int64)
        got = all_gather_ints(ep, mine, 30.0, "a test all-gather")
        assert mine._use_count() == 1 and got.tolist() == [[r, i] for r in range(world)]
        pending = start_all_gather_ints(ep, mine, 30.0, "a test all-gather")
        assert pending.wait().tolist() == [[r, i] for r in range(world)]
        assert all(p._use_count() == 1 for p in pending._parts) and mine._use_count() == 1


def case_ep_all_to_all(rank, world):
    ep = EPGroup.create(dist.group.WORLD)
    exchanger = Exchanger(ep, timeout_s=30.0)
    for i in range(TRIES):
        send = [r + 1 for r in range(world)]  # rank r gets r + 1 rows from everyone
        rows = torch.cat([torch.full((n, 4), float(100 * rank + 10 * r + i)) for r, n in enumerate(send)])
        split_WW = np.array([send] * world)  # [source, destination] rows
        got = exchanger.start(rows, split_WW).wait()
        assert got._use_count() == 1 and rows._use_count() == 1, (got._use_count(), rows._use_count())
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
