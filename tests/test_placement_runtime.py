"""Placement runtime on one process: table edits, diffs, migration of weights + optimizer state,
and the scheduler's cadence, metrics and checkpoint state. The multi-process invariance test is in
test_placement_runtime_dist.py."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from flexmoe import MoEConfig, MoELayer
from flexmoe.parallel import EPGroup, ParallelExperts
from flexmoe.placement import (
    CostModel,
    PlacementTable,
    PredictorConfig,
    ReplanPolicy,
    diff_placement,
    expand_replica,
    make_planner,
    migrate_replica,
    shrink_replica,
    swap_slots,
)
from flexmoe.runtime import apply_placement, issue_placement
from flexmoe.runtime import PlacementScheduler
from flexmoe.sim.trace import read_trace


class SlotLayer(MoELayer):
    """The part of the EP layer contract migration and scheduler use: S physical slots, a table,
    counts. (No data path: the multi-process test runs the real one.)"""

    def __init__(self, table: PlacementTable, d_model=4, d_ff=6):
        nn.Module.__init__(self)
        cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=table.num_experts, top_k=1)
        self.config = cfg
        self.experts = ParallelExperts(cfg, EPGroup.local(), table).double()
        self.last_counts = None


def logical(layer, tensors):
    """Rows of every logical expert (first replica), from each tensor [S, ...]."""
    out = []
    for e in range(layer.experts.placement.num_experts):
        _, s, _ = layer.experts.placement.replicas(e)[0]
        out.append([t[s].clone() for t in tensors])
    return out


def adam_layer(table, seed=0):
    torch.manual_seed(seed)
    layer = SlotLayer(table)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    # Make replicas of one expert identical, then give the optimizer some per-slot history.
    with torch.no_grad():
        for p in layer.experts.parameters():
            for e in range(table.num_experts):
                slots = [s for _, s, _ in table.replicas(e)]
                p[slots] = p[slots[0]].clone()
    for _ in range(2):
        loss = sum((p ** 3).sum() for p in layer.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return layer, opt


def state_tensors(layer, opt):
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    return [gu.data, dn.data, opt.state[gu]["exp_avg"], opt.state[gu]["exp_avg_sq"],
            opt.state[dn]["exp_avg"], opt.state[dn]["exp_avg_sq"]]


def one_rank_table(slots):
    """E = number of distinct non-negative entries; equal shares per expert."""
    se = np.array([slots])
    E = int(se.max()) + 1
    share = np.zeros(se.shape)
    for e in range(E):
        share[se == e] = 1.0 / (se == e).sum()
    return PlacementTable(E, se, share)


# ---------------------------------------------------------------- table edits and diff


def test_table_edits_bump_version_and_keep_shares_valid():
    t = PlacementTable.static(4, 2, slots_per_rank=3)  # [[0,1,-1],[2,3,-1]]
    t1 = expand_replica(t, 0, (1, 2))
    assert t1.version == 1 and t1.replicas(0) == [(0, 0, 0.5), (1, 2, 0.5)]
    t2 = shrink_replica(t1, (0, 0))
    assert t2.version == 2 and t2.replicas(0) == [(1, 2, 1.0)]
    t3 = migrate_replica(t2, (0, 1), (0, 0))
    assert t3.slot_expert_WS[0].tolist() == [1, -1, -1]
    t4 = swap_slots(t3, (0, 0), (1, 0))
    assert t4.slot_expert_WS.tolist() == [[2, -1, -1], [1, 3, 0]] and t4.version == 4
    with pytest.raises(ValueError, match="not empty"):
        expand_replica(t, 1, (0, 0))
    with pytest.raises(ValueError, match="last replica"):
        shrink_replica(t, (0, 0))
    with pytest.raises(ValueError, match="source slot"):
        migrate_replica(t, (0, 2), (1, 2))


def test_diff_classifies_primitives_and_prefers_local_sources():
    old = PlacementTable(3, np.array([[0, 1, -1], [2, 0, -1]]), np.array([[0.5, 1, 0], [1, 0.5, 0]]))
    new = PlacementTable(3, np.array([[0, 2, 1], [2, -1, 1]]), np.array([[1, 0.5, 0.5], [0.5, 0, 0.5]]), 1)
    plan = diff_placement(old, new)
    # expert 0: (1,1) dropped -> shrink; expert 1: (0,1) -> (0,2) migrate, (1,2) expand; expert 2: (0,1) expand
    assert (plan.expands, plan.shrinks, plan.migrates) == (2, 1, 1)
    by_dst = {t.dst: t for t in plan.transfers}
    assert set(by_dst) == {(0, 2), (1, 2), (0, 1)}
    assert by_dst[(0, 2)].src == (0, 1)  # local source
    assert by_dst[(0, 1)].src == (1, 0) and by_dst[(0, 1)].expert == 2
    assert plan.num_remote == 2
    assert diff_placement(old, old).transfers == ()


def test_diff_prefers_same_node_then_spreads_sources():
    def table(rows, version):
        se = np.array([[e, -1] for e in rows])
        return PlacementTable(1, se, (se >= 0) / (se >= 0).sum(), version)

    old, new = table([0, 0, -1, -1], 0), table([0, 0, 0, 0], 1)
    srcs = {t.dst: t.src for t in diff_placement(old, new).transfers}
    assert srcs == {(2, 0): (0, 0), (3, 0): (1, 0)}  # spread over both holders
    old, new = table([0, -1, 0, -1], 0), table([0, -1, 0, 0], 1)
    assert diff_placement(old, new).transfers[0].src == (0, 0)  # least used, then lowest
    assert diff_placement(old, new, ranks_per_node=2).transfers[0].src == (2, 0)  # same node


# ---------------------------------------------------------------- migration, one process


@pytest.mark.parametrize("change", ["swap", "expand", "shrink", "migrate", "rotate"])
def test_apply_placement_moves_weights_and_adam_state(change):
    table = one_rank_table([0, 1, 2, 0, -1])
    layer, opt = adam_layer(table)
    before = logical(layer, state_tensors(layer, opt))
    step_before = float(opt.state[layer.experts.gate_up_proj]["step"])
    new = {
        "swap": lambda: swap_slots(table, (0, 0), (0, 1)),
        "expand": lambda: expand_replica(table, 2, (0, 4)),
        "shrink": lambda: shrink_replica(table, (0, 0)),
        "migrate": lambda: migrate_replica(table, (0, 1), (0, 4)),
        "rotate": lambda: PlacementTable(3, np.array([[2, 0, 1, -1, 0]]),
                                         np.array([[1, 0.5, 1, 0, 0.5]]), 1),
    }[change]()
    report = apply_placement(layer, new, opt)
    assert layer.experts.placement.version == new.version
    after_tensors = state_tensors(layer, opt)
    for e, rows in enumerate(before):
        for r, s, _ in layer.experts.placement.replicas(e):
            for old_row, t in zip(rows, after_tensors):
                torch.testing.assert_close(t[s], old_row, rtol=0, atol=0)
    assert float(opt.state[layer.experts.gate_up_proj]["step"]) == step_before
    row_bytes = sum(t[0].numel() * 8 for t in after_tensors)
    assert report.bytes_per_slot == row_bytes
    assert report.bytes_moved == row_bytes * report.transfers
    assert report.bytes_sent == report.bytes_received == 0
    expected = {"swap": (0, 0, 2), "expand": (1, 0, 0), "shrink": (0, 1, 0), "migrate": (0, 0, 1)}
    if change in expected:
        assert (report.expands, report.shrinks, report.migrates) == expected[change]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.5, centered=True),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
], ids=["sgd_momentum", "adamw_amsgrad", "rmsprop", "adagrad"])
def test_apply_placement_moves_every_per_slot_state(make_opt):
    table = one_rank_table([0, 1, 2, -1])
    torch.manual_seed(0)
    layer = SlotLayer(table)
    opt = make_opt(layer.parameters())
    for _ in range(2):
        sum((p ** 3).sum() for p in layer.parameters()).backward()
        opt.step()
        opt.zero_grad()
    per_slot = [v for p in layer.experts.parameters() for v in opt.state[p].values()
                if torch.is_tensor(v) and v.dim() > 0]
    assert per_slot
    tensors = [p.data for p in layer.experts.parameters()] + per_slot
    before = [t.clone() for t in tensors]
    report = apply_placement(layer, PlacementTable(3, np.array([[2, 0, -1, 1]]), np.array([[1.0, 1, 0, 1]]), 1), opt)
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t[[0, 1, 3]], b[[2, 0, 1]], rtol=0, atol=0)
    assert report.bytes_per_slot == sum(t[0].numel() * t.element_size() for t in tensors)


def test_apply_placement_without_optimizer_state_moves_weights_only():
    table = one_rank_table([0, 1, -1])
    layer, opt = adam_layer(table)
    ea = opt.state[layer.experts.gate_up_proj]["exp_avg"]
    slot2_state = ea[2].clone()
    report = apply_placement(layer, migrate_replica(table, (0, 0), (0, 2)), opt, move_optimizer_state=False)
    torch.testing.assert_close(layer.experts.gate_up_proj[2], layer.experts.gate_up_proj[0])
    torch.testing.assert_close(ea[2], slot2_state)
    assert report.bytes_per_slot == sum(p[0].numel() * 8 for p in layer.experts.parameters())


def test_apply_placement_rejects_bad_tables_and_states():
    table = one_rank_table([0, 1, -1])
    layer, opt = adam_layer(table)
    same_version = swap_slots(table, (0, 0), (0, 1))
    same_version.version = table.version
    with pytest.raises(ValueError, match="higher version"):
        apply_placement(layer, same_version, opt)
    with pytest.raises(ValueError, match="shape"):
        apply_placement(layer, PlacementTable.static(2, 1, slots_per_rank=4), opt)
    opt.state[layer.experts.gate_up_proj]["odd"] = torch.zeros(7)
    with pytest.raises(ValueError, match="odd"):
        apply_placement(layer, swap_slots(table, (0, 0), (0, 1)), opt)


def test_sgd_without_state_and_no_optimizer():
    table = one_rank_table([0, 1, -1])
    torch.manual_seed(0)
    layer = SlotLayer(table)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    w0 = layer.experts.down_proj[0].clone()
    report = apply_placement(layer, swap_slots(table, (0, 0), (0, 2)), opt)
    torch.testing.assert_close(layer.experts.down_proj[2], w0, rtol=0, atol=0)
    assert report.transfers == 1
    apply_placement(layer, swap_slots(layer.experts.placement, (0, 2), (0, 0)), None)
    torch.testing.assert_close(layer.experts.down_proj[0], w0, rtol=0, atol=0)


# ---------------------------------------------------------------- scheduler, one process


EMA09_EVERY_2 = ReplanPolicy(interval=2, predictor=PredictorConfig(decay=0.9), guard=False)


class HotExpertPlanner:
    """Tiny deterministic planner for tests: give the hottest expert a replica in a free slot,
    or else take the extra replica of an expert away."""

    def __init__(self):
        self.calls = []

    def plan(self, table, counts_WE, cost_model):
        self.calls.append((table.version, np.array(counts_WE), cost_model))
        hot = int(np.argmax(counts_WE.sum(0)))
        free = np.argwhere(table.slot_expert_WS == -1)
        if len(free) and table.num_replicas_E()[hot] == 1:
            return expand_replica(table, hot, tuple(int(i) for i in free[0]))
        extra = [e for e in range(table.num_experts) if table.num_replicas_E()[e] > 1]
        if extra:
            r, s, _ = table.replicas(extra[0])[-1]
            return shrink_replica(table, (r, s))
        return table


def test_scheduler_cadence_metrics_log_and_trace(caplog, tmp_path):
    table = one_rank_table([0, 1, 2, -1])
    layers = nn.ModuleList([SlotLayer(table.copy()), SlotLayer(table.copy())])
    opt = torch.optim.Adam(layers.parameters())
    planner = HotExpertPlanner()
    sched = PlacementScheduler(layers, opt, planner, cost_model="cm",
                               policy=ReplanPolicy(interval=3, predictor=PredictorConfig(decay=0.0), guard=False),
                               trace=tmp_path / "trace.jsonl")
    assert len(sched.layers) == 2
    hot = [torch.tensor([1, 9, 2]), torch.tensor([7, 1, 1])]
    with caplog.at_level(logging.INFO, logger="flexmoe.placement"):
        for step in range(1, 7):
            for layer, c in zip(layers, hot):
                layer.last_counts = c * step
            result = sched.step()
            assert (result is not None) == (step % 3 == 0)
    trace = read_trace(tmp_path / "trace.jsonl")
    assert trace.steps_T.tolist() == [0, 1, 2, 3, 4, 5] and trace.counts_TLWE.shape == (6, 2, 1, 3)
    np.testing.assert_array_equal(trace.counts_TLWE[1, :, 0], np.stack(hot) * 2)
    # first plan: expand the hot expert in each layer; second plan: shrink it again (async: the
    # move lands before the layer's next forward; these layers have none, so land it by hand)
    assert sched.pending == (0, 1) and layers[0].experts.placement.version == 1
    sched.finish_moves()
    assert sched.pending == ()
    assert layers[0].experts.placement.num_replicas_E().tolist() == [1, 1, 1]
    assert layers[0].experts.placement.version == 2
    m = sched.last_metrics
    assert m["step"] == 6 and len(m["layers"]) == 2 and m["layers"][0]["shrinks"] == 1
    assert planner.calls[0][2] == "cm"
    np.testing.assert_allclose(planner.calls[0][1], (hot[0] * 3)[None].numpy())  # decay 0: last step
    assert "placement step 3 layer 0" in caplog.text and "bytes moved" in caplog.text


def test_scheduler_state_dict_round_trip_and_validation():
    table = one_rank_table([0, 1, -1])
    layer = SlotLayer(table)
    opt = torch.optim.Adam(layer.parameters())
    sched = PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", policy=EMA09_EVERY_2)
    for _ in range(3):
        layer.last_counts = torch.tensor([5, 1])
        sched.step()
    state = sched.state_dict()
    assert state["tables"][0]["version"] == 1

    fresh = SlotLayer(table.copy())
    sched2 = PlacementScheduler(fresh, opt, HotExpertPlanner(), "cm", policy=EMA09_EVERY_2)
    sched2.load_state_dict(state)
    assert fresh.experts.placement.version == 1 and sched2.num_steps == 3
    np.testing.assert_array_equal(fresh.experts.placement.slot_expert_WS, layer.experts.placement.slot_expert_WS)
    fresh.last_counts = torch.tensor([5, 1])
    layer.last_counts = torch.tensor([5, 1])
    assert sched.step()["layers"][0]["version"] == sched2.step()["layers"][0]["version"] == 2

    with pytest.raises(ValueError, match="interval"):
        PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", interval=0)
    with pytest.raises(ValueError, match="ema_decay"):
        PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", ema_decay=1.0)
    with pytest.raises(ValueError, match="planner"):
        PlacementScheduler(layer, opt, object(), "cm")
    with pytest.raises(ValueError, match="either policy"):
        PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", policy=EMA09_EVERY_2, interval=2)
    guarded = PlacementScheduler(SlotLayer(table.copy()), opt, HotExpertPlanner(), "cm", interval=1)
    guarded.layers[0].last_counts = torch.tensor([5, 1])
    with pytest.raises(ValueError, match="need a CostModel"):
        guarded.step()
    with pytest.raises(ValueError, match="placement table"):
        PlacementScheduler(nn.Linear(2, 2), opt, HotExpertPlanner(), "cm")


def test_scheduler_measures_a_cost_model_and_uses_the_planners_predictor():
    layer = SlotLayer(one_rank_table([0, 1, -1]))
    sched = PlacementScheduler(layer, None, make_planner("greedy"), interval=1)
    assert isinstance(sched.cost_model, CostModel) and sched.cost_model.c_tok > 0
    assert sched._predictors[0].decay == make_planner("greedy").predictor_decay
    layer.last_counts = torch.tensor([9, 1])
    m = sched.step()
    assert m["layers"][0]["balance_observed"] == 1.0 and layer.experts.placement.version == 0  # one rank


def test_observe_accumulates_micro_batches():
    layer = SlotLayer(one_rank_table([0, 1, -1]))
    planner = HotExpertPlanner()
    sched = PlacementScheduler(layer, None, planner, "cm", policy=ReplanPolicy(interval=1, guard=False))
    for c in ([1, 2], [3, 4]):
        layer.last_counts = torch.tensor(c)
        sched.observe()
    sched.step()
    np.testing.assert_allclose(planner.calls[0][1], [[4, 6]])


# ---------------------------------------------------------------- real layer, one process


def test_one_process_training_is_invariant_under_local_changes():
    """World size 1: every move is a local copy. Replicas on one rank, swaps, expand/shrink."""
    from flexmoe.runtime import sync_gradients

    cfg = MoEConfig(d_model=6, d_ff=4, num_experts=4, top_k=2, router_dtype=torch.float64, kernels="torch")
    start = one_rank_table([0, 1, 2, 3, -1, -1])
    changes = {
        1: lambda t: expand_replica(t, 0, (0, 4)),
        2: lambda t: swap_slots(t, (0, 0), (0, 3)),
        3: lambda t: expand_replica(t, 1, (0, 5)),
        4: lambda t: migrate_replica(t, (0, 4), (0, 5)) if t.slot_expert_WS[0, 5] == -1 else shrink_replica(t, (0, 5)),
        5: lambda t: PlacementTable(4, t.slot_expert_WS[:, ::-1].copy(), t.share_WS[:, ::-1].copy(), t.version + 1),
    }

    def run(with_changes):
        torch.manual_seed(3)
        layer = MoELayer(cfg, placement=start.copy()).double()
        with torch.no_grad():
            layer.router.weight[0] += 1.0
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for step in range(7):
            x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) + 0.5
            layer(x).pow(2).mean().backward()
            sync_gradients(layer)
            opt.step()
            opt.zero_grad()
            if with_changes and step in changes:
                apply_placement(layer, changes[step](layer.experts.placement), opt)
        rows = logical(layer, state_tensors(layer, opt))
        for e in range(4):  # replicas bit-identical
            slots = [s for _, s, _ in layer.experts.placement.replicas(e)]
            for t in state_tensors(layer, opt):
                assert all(torch.equal(t[s], t[slots[0]]) for s in slots)
        return rows, layer

    base, _ = run(False)
    moved, layer = run(True)
    assert layer.experts.placement.version == 5 and layer.experts.placement.num_replicas_E().sum() > 4
    for e in range(4):
        for a, b in zip(moved[e], base[e]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- asynchronous moves, one process


def _real_layer_run(steps, async_moves, checkpoint_after=None):
    """A real one-process EP layer (replicas and moves are local copies) under the scheduler with
    HotExpertPlanner every step. Returns the logical state, the final table and, per step, what
    was pending after ``step()`` and after the next forward. ``checkpoint_after``: save model,
    optimizer and scheduler right after that step's plan and go on with fresh objects."""
    cfg = MoEConfig(d_model=6, d_ff=4, num_experts=3, top_k=2, router_dtype=torch.float64, kernels="torch")

    def build():
        torch.manual_seed(3)
        layer = MoELayer(cfg, placement=one_rank_table([0, 1, 2, -1])).double()
        with torch.no_grad():
            layer.router.weight[1] += 1.0
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        return layer, opt, PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", async_moves=async_moves,
                                              policy=ReplanPolicy(interval=1, guard=False))

    layer, opt, sched = build()
    seen = []
    for step in range(steps):
        x = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step)) + 0.3
        version = layer.experts.placement.version
        layer(x).pow(2).mean().backward()
        seen.append(("forward", version, layer.experts.placement.version, sched.pending))
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append(("step", layer.experts.placement.version, sched.planned_tables[0].version, sched.pending))
        if step == checkpoint_after:
            saved = copy.deepcopy({"model": layer.state_dict(), "optimizer": opt.state_dict(),
                                   "placement": sched.state_dict()})
            layer, opt, sched = build()
            sched.load_state_dict(saved["placement"])
            layer.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            seen.append(("saved", saved["placement"]["tables"][0]["version"],
                         saved["placement"]["pending_tables"][0]["version"], sched.pending))
    sched.finish_moves()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state.update({f"adam.{i}.{k}": v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items()})
    return state, layer.experts.placement.state_dict(), seen


def test_async_moves_land_at_the_next_forward_and_equal_blocking_moves():
    blocking, blocking_table, seen_blocking = _real_layer_run(5, async_moves=False)
    moved, table, seen = _real_layer_run(5, async_moves=True)
    assert table == blocking_table and table["version"] >= 4
    assert moved.keys() == blocking.keys()
    assert all(torch.equal(moved[k], blocking[k]) for k in moved)  # same moves, same arithmetic
    # after step(): the layer still holds the old table, the new one pending; the forward lands it
    for kind, held, planned, pending in seen:
        if kind == "step":
            assert pending == (0,) and planned == held + 1, seen
        else:
            assert pending == () and (planned > held or held == 0), seen
    assert all(entry[3] == () and (entry[0] != "step" or entry[1] == entry[2]) for entry in seen_blocking)


def test_checkpoint_taken_while_a_move_is_pending_resumes_exactly():
    straight, straight_table, _ = _real_layer_run(5, async_moves=True)
    resumed, resumed_table, seen = _real_layer_run(5, async_moves=True, checkpoint_after=2)
    saved = [entry for entry in seen if entry[0] == "saved"]
    assert saved == [("saved", 2, 3, (0,))], seen  # old table saved, the pending one with it
    assert resumed_table == straight_table
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_stale_async_move_raises_and_writes_nothing():
    table = one_rank_table([0, 1, 2, -1])
    layer, opt = adam_layer(table)
    move = issue_placement(layer, swap_slots(table, (0, 0), (0, 1)), opt)
    assert layer.experts.placement.version == 0 and not move.done
    sum((p ** 3).sum() for p in layer.parameters()).backward()
    opt.step()  # between issue and apply: the staged rows no longer hold the current values
    current = [t.clone() for t in state_tensors(layer, opt)]
    with pytest.raises(RuntimeError, match="stale: gate_up_proj, down_proj"):
        move.apply()
    assert layer.experts.placement.version == 0
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(layer, opt), current))
    with pytest.raises(RuntimeError, match="already applied or cancelled"):
        move.apply()

    move = issue_placement(layer, swap_slots(table, (0, 0), (0, 1)), opt)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # replaces the state tensors
    with pytest.raises(RuntimeError, match=r"stale: optimizer0\.gate_up_proj\.exp_avg,"):
        move.apply()
    move = issue_placement(layer, swap_slots(table, (0, 0), (0, 1)), opt)
    before = [t.clone() for t in state_tensors(layer, opt)]
    assert move.apply().transfers == 2
    torch.testing.assert_close(state_tensors(layer, opt)[0][[1, 0]], before[0][[0, 1]], rtol=0, atol=0)


def test_scheduler_validates_async_moves():
    layer = SlotLayer(one_rank_table([0, 1, -1]))
    with pytest.raises(ValueError, match="PlacementScheduler.async_moves"):
        PlacementScheduler(layer, None, HotExpertPlanner(), "cm", async_moves=1)


def test_copying_a_model_with_a_pending_move_copies_the_old_state_only():
    """The landing hook holds the scheduler weakly: a deep copy (or a pickled model) is the
    consistent old state and no second scheduler comes with it."""
    cfg = MoEConfig(d_model=6, d_ff=4, num_experts=3, top_k=2, kernels="torch")
    layer = MoELayer(cfg, placement=one_rank_table([0, 1, 2, -1]))
    opt = torch.optim.Adam(layer.parameters())
    sched = PlacementScheduler(layer, opt, HotExpertPlanner(), "cm", policy=ReplanPolicy(interval=1, guard=False))
    layer(torch.randn(4, 6)).sum().backward()
    opt.step()
    sched.step()
    twin = copy.deepcopy(layer)
    twin(torch.randn(4, 6))
    assert twin.experts.placement.version == 0 and sched.pending == (0,)
    layer(torch.randn(4, 6))
    assert layer.experts.placement.version == 1 and sched.pending == ()
