"""Asynchronous placement moves on 2 gloo processes (one spawn; the tests read its results).

1. invariance on 2 ranks: the scenarios of test_placement_runtime_dist.py (direct blocking and
   asynchronous moves of every kind, the scheduler with asynchronous moves, resuming from a
   checkpoint taken while a move is in flight) equal static training to 1e-10 in float64.
2. the overlap is real, shown by event order: with two MoE layers, ``step()`` posts both layers'
   transfers and returns; the host work of the next step and layer 0's forward run while layer 1's
   move is still in flight, and each layer lands its move just before its own forward. The result
   equals blocking moves bitwise.
3. failures never hang and lose nothing (each on a fresh group, ``ParallelConfig.timeout_s`` 2 s,
   the process group's own timeout 60 s): a rank that raises between issue and apply keeps its old
   table and slots and checkpoints them with the pending table, and the other rank's next forward
   raises TimeoutError within the bound; a rank that skips a re-plan makes the other's
   ``scheduler.step()`` raise TimeoutError within the bound (it used to wait for the process
   group's timeout); a rank that skips a re-plan and trains on makes both ranks raise an
   AgreementError naming where each is (it used to die in a gloo size mismatch).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoEConfig, MoELayer, ParallelConfig, PlacementScheduler
from flexmoe.placement import PlacementTable, ReplanPolicy, swap_slots
from flexmoe.runtime import sync_gradients
from helpers import spawn_ranks
from test_placement_runtime_dist import (
    check_direct,
    check_resumed,
    check_scheduler,
    invariance_scenarios,
)

WORLD = 2
TIMEOUT_S = 2.0
SPAWN_TIMEOUT_S = 240
CFG = MoEConfig(d_model=6, d_ff=4, num_experts=4, top_k=2, router_dtype=torch.float64, kernels="torch",
                validate_inputs=False)


class CrossSwapPlanner:
    """Swap slot 0 of rank 0 with slot 0 of rank 1 at every plan: every plan moves rows remotely."""

    def plan(self, table, counts_WE, cost_model):
        return swap_slots(table, (0, 0), (1, 0))


def two_layer_model(group, parallel=None, layers=2):
    torch.manual_seed(4)
    se = np.array([[0, 1, -1], [2, 3, -1]])
    table = PlacementTable(4, se, (se >= 0) * 1.0)
    return nn.Sequential(*[MoELayer(CFG, ep_group=group, placement=table.copy(), parallel=parallel)
                           for _ in range(layers)]).double()


def make_scheduler(model, opt, async_moves=True):
    return PlacementScheduler(model, opt, CrossSwapPlanner(), "cm", async_moves=async_moves,
                              policy=ReplanPolicy(interval=2, warmup=1, guard=False))


def tokens(step, rank):
    return torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))


def train_step(model, opt, x):
    model(x).pow(2).mean().backward()
    sync_gradients(model)
    opt.step()
    opt.zero_grad()


def overlap_scenario(rank, async_moves):
    """Four steps; records what is in flight at each point of the loop."""
    model = two_layer_model(dist.group.WORLD)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = make_scheduler(model, opt, async_moves)
    events = []
    for i, layer in enumerate(model):  # runs before the scheduler's own pre-hook
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(["forward", i, list(sched.pending)]),
                                        prepend=True)
    x = tokens(0, rank)
    for step in range(4):
        train_step(model, opt, x)
        metrics = sched.step()
        events.append(["step", step, list(sched.pending),
                       None if metrics is None else sum(m["remote_transfers"] for m in metrics["layers"])])
        x = tokens(step + 1, rank)  # the host work of the next step: the transfers are in flight
        events.append(["host", step, list(sched.pending)])
    sched.finish_moves()
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    return {"events": events, "state": state, "versions": [t.version for t in sched.tables]}


def one_step_with_a_scheduler(rank, group, timeout_s):
    """One MoE layer on ``group`` with ``ParallelConfig.timeout_s``, its Adam and a scheduler that
    re-plans every step (CrossSwapPlanner), after one training step that all ranks start together
    (so that only the failure a scenario stages may exceed the short timeout)."""
    model = two_layer_model(group, ParallelConfig(timeout_s=timeout_s), layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = PlacementScheduler(model, opt, CrossSwapPlanner(), "cm", policy=ReplanPolicy(interval=1, guard=False))
    dist.barrier(group)
    train_step(model, opt, tokens(0, rank))
    return model, opt, sched


def raise_between_issue_and_apply(rank, group):
    """Rank 1's data loader fails after the plan's moves were issued."""
    model, opt, sched = one_step_with_a_scheduler(rank, group, TIMEOUT_S)
    sched.step()
    experts = model[0].experts
    before = [t.clone() for t in (experts.gate_up_proj, experts.down_proj, opt.state[experts.gate_up_proj]["exp_avg"])]
    out = {"pending": list(sched.pending)}
    if rank == 1:
        try:
            raise OSError("data loader failed")
        except OSError:
            state = sched.state_dict()
            after = (experts.gate_up_proj, experts.down_proj, opt.state[experts.gate_up_proj]["exp_avg"])
            out.update(version=experts.placement.version, saved_version=state["tables"][0]["version"],
                       saved_pending_version=state["pending_tables"][0]["version"],
                       slots_intact=all(torch.equal(a, b) for a, b in zip(after, before)))
        time.sleep(2 * TIMEOUT_S)  # alive but absent, as a rank stuck after an error
        return out
    start = time.monotonic()
    try:
        model(tokens(1, rank))
    except Exception as error:  # noqa: BLE001 - the test reads what it was
        out.update(error=type(error).__name__, message=str(error))
    out["elapsed_s"] = time.monotonic() - start
    return out


def skip_a_replan(rank, group):
    """Rank 1 does not join a re-plan (it skipped its scheduler step after an error)."""
    model, opt, sched = one_step_with_a_scheduler(rank, group, TIMEOUT_S)
    out = {}
    if rank == 1:
        time.sleep(2 * TIMEOUT_S)
        return out
    start = time.monotonic()
    try:
        sched.step()
    except Exception as error:  # noqa: BLE001
        out.update(error=type(error).__name__, message=str(error))
    out["elapsed_s"] = time.monotonic() - start
    return out


def skip_a_replan_and_train_on(rank, group):
    """Rank 1 skips its scheduler step (after an error) and goes on to its next training step."""
    model, opt, sched = one_step_with_a_scheduler(rank, group, 30.0)
    out = {}
    try:
        if rank == 0:
            sched.step()
        else:
            train_step(model, opt, tokens(1, rank))
    except Exception as error:  # noqa: BLE001 - the test reads what it was
        out.update(error=type(error).__name__, message=str(error))
    return out


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    failure_groups = [dist.new_group([0, 1]) for _ in range(3)]
    training, _, _ = invariance_scenarios(rank, WORLD)
    results = {"training": training,
               "overlap": {"async": overlap_scenario(rank, True), "blocking": overlap_scenario(rank, False)}}
    dist.barrier()
    results["raise_between"] = raise_between_issue_and_apply(rank, failure_groups[0])
    dist.barrier()
    results["skip_replan"] = skip_a_replan(rank, failure_groups[1])
    dist.barrier()
    results["skip_replan_train_on"] = skip_a_replan_and_train_on(rank, failure_groups[2])
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    os._exit(0)  # the failure groups hold collectives that never completed: do not tear them down


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("placement_async"))
    return spawn_ranks(WORLD, out_dir, SPAWN_TIMEOUT_S, worker, lambda r, port: (r, port, out_dir))


@pytest.mark.parametrize("name", ["direct", "direct_async"])
def test_two_ranks_invariant_under_direct_changes(results, name):
    check_direct(results[0]["training"], name)


def test_two_ranks_invariant_under_scheduler_with_async_moves(results):
    check_scheduler(results[0]["training"])


def test_two_ranks_resume_from_a_checkpoint_taken_mid_move(results):
    check_resumed(results[0]["training"])


def test_moves_overlap_with_host_work_and_earlier_layers(results):
    for r in results:
        events = r["overlap"]["async"]["events"]
        plans = [e for e in events if e[0] == "step" and e[3] is not None]
        assert len(plans) == 2 and all(e[3] > 0 for e in plans), events  # remote rows every plan
        for k, e in enumerate(events):
            if e[0] == "step" and e[3] is not None:  # a plan: in order, issue ... wait, per layer
                assert events[k:k + 4] == [["step", e[1], [0, 1], e[3]], ["host", e[1], [0, 1]],
                                           ["forward", 0, [0, 1]], ["forward", 1, [1]]], events[k:k + 4]
        blocking = r["overlap"]["blocking"]
        assert all(e[2] == [] for e in blocking["events"]), blocking["events"]
        assert r["overlap"]["async"]["versions"] == blocking["versions"] == [2, 2]
        assert r["overlap"]["async"]["state"] == blocking["state"]  # bitwise


def test_a_rank_raising_between_issue_and_apply_loses_nothing_and_never_hangs(results):
    failed, other = results[1]["raise_between"], results[0]["raise_between"]
    assert failed["pending"] == other["pending"] == [0]
    assert failed["slots_intact"] and failed["version"] == failed["saved_version"] == 0
    assert failed["saved_pending_version"] == 1
    assert other["error"] == "TimeoutError" and "timeout_s" in other["message"], other
    assert other["elapsed_s"] < 10 * TIMEOUT_S, other  # the process group waits 60 s


def test_a_rank_skipping_a_replan_times_out_within_parallel_timeout(results):
    r = results[0]["skip_replan"]
    assert r.get("error") == "TimeoutError" and "timeout_s" in r["message"], r
    assert r["elapsed_s"] < 10 * TIMEOUT_S, r  # the process group waits 60 s


def test_a_rank_skipping_a_replan_and_training_on_is_named_on_both_ranks(results):
    """Not a gloo size mismatch: the re-plan's agreement check meets the other's forward check."""
    for r in results:
        out = r["skip_replan_train_on"]
        assert out.get("error") == "AgreementError", out
        assert "different points" in out["message"] and "re-plan of PlacementScheduler.step" in out["message"], out
        assert "the forward of an EP layer" in out["message"], out
