"""Load predictors and the re-plan policy: predictors against plain float64 loops, the policy's
cadence against the scheduler's rule, the bytes budget, the guard, and resume.

Legend: T steps, L layers, W ranks, E experts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from flexmoe.placement import (
    CostModel, PlacementTable, PredictorConfig, ReplanPolicy, Replanner, StaticPlanner, WindowPredictor,
    expand_replica, make_planner,
)
from flexmoe.placement.policy import shed_replicas
from flexmoe.sim import SyntheticTraceConfig, generate_trace
from flexmoe.sim.simulator import simulate_planner, split_ranks

COST = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10)


def reference_predict(config: PredictorConfig, history: list[np.ndarray]) -> np.ndarray:
    """Plain loops over (rank, expert) on the last ``window`` steps."""
    last = history[-config.window:]
    W, E = last[0].shape
    out = np.zeros((W, E))
    n = len(last)
    for w in range(W):
        for e in range(E):
            xs = [float(h[w, e]) for h in last]
            mean = sum(xs) / n
            if config.kind == "window_max":
                out[w, e] = max(xs)
            elif config.kind == "mean_std":
                out[w, e] = mean + config.z * math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
            else:
                if n == 1:
                    out[w, e] = xs[0]
                    continue
                ts = [i - (n - 1) / 2 for i in range(n)]
                slope = sum(t * x for t, x in zip(ts, xs)) / sum(t * t for t in ts)
                out[w, e] = max(mean + slope * ((n - 1) / 2 + config.lead), 0.0)
    return out


def test_window_predictors_match_reference():
    rng = np.random.default_rng(0)
    for kind in ("window_max", "mean_std", "trend"):
        for _ in range(6):
            config = PredictorConfig(kind, window=int(rng.integers(1, 8)), z=float(rng.uniform(0, 2)),
                                     lead=float(rng.uniform(0, 20)))
            W, E = int(rng.integers(1, 4)), int(rng.integers(1, 6))
            pred = config.make()
            assert isinstance(pred, WindowPredictor) and pred.predict() is None
            history = []
            for _ in range(int(rng.integers(1, 12))):
                counts = rng.poisson(rng.uniform(0, 50), size=(W, E)).astype(float)
                history.append(counts)
                pred.update(counts)
                np.testing.assert_allclose(pred.predict(), reference_predict(config, history), rtol=1e-12, atol=1e-9)
            clone = config.make()
            clone.load_state_dict(pred.state_dict())
            np.testing.assert_allclose(clone.predict(), pred.predict())


def test_trend_extrapolates_a_line_and_ema_is_the_default():
    pred = PredictorConfig("trend", window=5, lead=3).make()
    for t in range(5):
        pred.update(np.array([[10.0 + 2 * t, 50.0 - 20 * t]]))
    np.testing.assert_allclose(pred.predict(), [[10 + 2 * 7, 0.0]])  # the falling one clips at 0
    ema = PredictorConfig(decay=0.5).make()
    ema.update(np.array([[4.0]]))
    ema.update(np.array([[0.0]]))
    np.testing.assert_allclose(ema.predict(), [[2.0]])


def test_predictor_and_policy_validation_names_the_field():
    for kwargs, field in ((dict(kind="median"), "kind"), (dict(window=0), "window"), (dict(z=-1), "z"),
                          (dict(decay=1.0), "decay"), (dict(lead=-1), "lead")):
        with pytest.raises(ValueError, match=field):
            PredictorConfig(**kwargs)
    for kwargs, field in ((dict(interval=0), "interval"), (dict(warmup=-1), "warmup"), (dict(guard_gain=1.0), "guard_gain"),
                          (dict(bytes_budget=-1.0), "bytes_budget"), (dict(predictor="ema"), "predictor"),
                          (dict(score_window=-1), "score_window"), (dict(noise_z=-0.5), "noise_z"),
                          (dict(noise_z=float("nan")), "noise_z"), (dict(trust=-1), "trust"), (dict(trust=1.5), "trust"),
                          (dict(drift_gate=1.0), "drift_gate"), (dict(drift_gate=True), "drift_gate"),
                          (dict(drift_gate=float("nan")), "drift_gate"), (dict(drift_gate=0.0, score_window=0), "drift_gate")):
        with pytest.raises(ValueError, match=field):
            ReplanPolicy(**kwargs)


def test_cadence_is_the_schedulers():
    """Due after n steps exactly when the scheduler plans: n >= warmup and (n - warmup) % interval == 0."""
    for interval in (1, 3, 10):
        for warmup in (None, 0, 1, 5, 12):
            policy = ReplanPolicy(interval=interval, warmup=warmup)
            w = interval if warmup is None else warmup
            for n in range(1, 60):
                assert policy.due(n) == (n >= w and (n - w) % interval == 0), (interval, warmup, n)
            assert not policy.due(0)


def _trace(seed: int, layers: int = 3, steps: int = 30) -> np.ndarray:
    config = SyntheticTraceConfig(num_steps=steps, num_layers=layers, world_size=4, num_experts=12,
                                  tokens_per_rank=2048, top_k=2, alpha=1.4, drift=0.05, seed=seed)
    return generate_trace(config).counts_TLWE


def test_bytes_budget_holds_across_layers():
    counts = _trace(1)
    free = simulate_planner(make_planner("greedy"), counts, COST, 5, ReplanPolicy(interval=3, guard_gain=0.0))
    assert free.bytes_moved > 0
    budget = COST.move_bytes * 2
    tables = [PlacementTable.static(12, 4, 5) for _ in range(3)]
    replanner = Replanner(ReplanPolicy(interval=3, guard_gain=0.0, bytes_budget=budget), make_planner("greedy"), 3)
    total = 0.0
    for t in range(counts.shape[0]):
        if replanner.due():
            plans = replanner.plan(tables, COST)
            moved = sum(COST.move_bytes_total(old, p.table) for old, p in zip(tables, plans))
            assert moved == pytest.approx(sum(p.bytes_moved for p in plans)) and moved <= budget
            total += moved
            tables = [p.table for p in plans]
        replanner.observe(counts[t])
    assert 0 < total < free.bytes_moved


def test_re_plans_under_the_bytes_budget_pass_the_gates_too():
    """A layer re-planned to fit the bytes budget gets a table that goes through the gates like
    any other (it used to be installed unchecked)."""

    class Recording(Replanner):
        def __init__(self, *args):
            super().__init__(*args)
            self.checked, self.budget_plans = set(), 0

        def _drifting(self, layer, table, new, cost, horizon):
            self.checked.add(id(new))
            return False

        def _fit_budget(self, *args):
            self.budget_plans += 1
            return super()._fit_budget(*args)

    counts = _trace(1)
    tables = [PlacementTable.static(12, 4, 5) for _ in range(3)]
    replanner = Recording(ReplanPolicy(interval=3, guard_gain=0.0, bytes_budget=COST.move_bytes * 2),
                          make_planner("greedy"), 3)
    changed = 0
    for t in range(counts.shape[0]):
        if replanner.due():
            plans = replanner.plan(tables, COST)
            for old, p in zip(tables, plans):
                if p.table is not old:
                    changed += 1
                    assert id(p.table) in replanner.checked, "a table that no gate saw"
            tables = [p.table for p in plans]
        replanner.observe(counts[t])
    assert changed > 0 and replanner.budget_plans > 0


def test_backtest_stops_moves_that_would_not_have_paid():
    """Proportional replication moves at every plan; with ruinously expensive moves the backtest
    (would the change have paid over the last interval?) stops every one: exactly static's time."""
    counts = _trace(2, layers=2, steps=40)
    ruinous = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10, move_bytes=1e9)
    static = simulate_planner(make_planner("static"), counts, ruinous, 5)
    guarded = simulate_planner(make_planner("proportional"), counts, ruinous, 5, ReplanPolicy(interval=4))
    assert guarded.bytes_moved == 0 and guarded.replans == 0
    np.testing.assert_allclose(guarded.time_T, static.time_T)


class _KeepPlanner(StaticPlanner):
    """Never changes anything: only the policy's guard can move a layer."""


def test_guard_returns_a_layer_that_is_behind_static():
    """A layer held in a replicated table that costs more than static EP on the steps observed
    (replica gradient sync, no imbalance to fix) is sent back to static by the guard."""
    E, W, S = 8, 4, 3
    static = PlacementTable.static(E, W, S)
    slot = static.slot_expert_WS.copy()
    slot[:, 2] = [4, 6, 0, 2]
    reps_E = np.bincount(slot[slot >= 0], minlength=E)
    replicated = PlacementTable(E, slot, np.where(slot >= 0, 1.0 / reps_E[np.maximum(slot, 0)], 0.0))
    cost = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10, grad_bytes=1e6)
    uniform = np.full((1, W, E), 200)
    replanner = Replanner(ReplanPolicy(interval=5), _KeepPlanner(), 1)
    tables = [replicated]
    for _ in range(5):
        replanner.observe(uniform)
    assert replanner.due()
    tables = [p.table for p in replanner.plan(tables, cost)]
    np.testing.assert_array_equal(tables[0].slot_expert_WS, static.slot_expert_WS)
    assert tables[0].version == replicated.version + 1 and replanner.misses_L[0] == 1
    # the return to static pays (no replica sync any more), but that shows the planner's table did
    # not: the miss stands, so the planner's next change still needs the margin
    for _ in range(5):
        replanner.observe(uniform)
    (again,) = replanner.plan(tables, cost)
    assert again.table is tables[0] and replanner.misses_L[0] == 1
    assert again.margin == pytest.approx(ReplanPolicy().guard_gain)


@pytest.mark.parametrize("drift_gate,shed_window,seed,steps,trust,split",
                         [(None, None, 3, 24, 3, 13), (-0.5, None, 3, 24, 3, 13), (None, 1, 11, 30, 1, 11)])
def test_replanner_resume_makes_the_same_plans(drift_gate, shed_window, seed, steps, trust, split):
    """Checkpointed mid-interval (after a shed, with ``shed_window``), the replanner resumes into the same plans."""
    counts = _trace(seed, layers=2, steps=steps)
    policy = ReplanPolicy(interval=3, predictor=PredictorConfig("mean_std", window=4, z=1.0), drift_gate=drift_gate,
                          shed_window=shed_window, trust=trust)

    def run(split_at: int | None):
        replanner = Replanner(policy, make_planner("greedy"), 2)
        tables = [PlacementTable.static(12, 4, 5) for _ in range(2)]
        history = []
        for t in range(counts.shape[0]):
            if t == split_at:
                state = replanner.state_dict()
                replanner = Replanner(policy, make_planner("greedy"), 2)
                replanner.load_state_dict(state)
            if replanner.due():
                new = [p.table for p in replanner.plan(tables, COST)]
                if not policy.due(t) and any(n is not o for n, o in zip(new, tables)):
                    sheds.append(t)
                tables = new
            history.append([(t_.slot_expert_WS.copy(), t_.share_WS.copy()) for t_ in tables])
            replanner.observe(counts[t])
        return history

    sheds: list[int] = []
    a = run(None)
    assert (len(sheds) > 0) == (shed_window is not None) and all(t < split for t in sheds[:1]), sheds
    assert split % policy.interval, "the checkpoint is taken between plans"
    b = run(split)
    assert any(not np.array_equal(a[0][0][0], h[0][0]) for h in a)
    for step_a, step_b in zip(a, b):
        for (sa, ha), (sb, hb) in zip(step_a, step_b):
            np.testing.assert_array_equal(sa, sb)
            np.testing.assert_array_equal(ha, hb)


def test_split_ranks_keeps_every_count():
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 100, size=(5, 2, 1, 7))
    split = split_ranks(counts, 4, seed=1)
    assert split.shape == (5, 2, 4, 7)
    np.testing.assert_array_equal(split.sum(2), counts[:, :, 0])
    two = rng.integers(0, 100, size=(3, 1, 2, 5))
    np.testing.assert_array_equal(split_ranks(two, 4).reshape(3, 1, 2, 2, 5).sum(3), two)
    with pytest.raises(ValueError, match="divide"):
        split_ranks(two, 3)


def _flip_trace(phases: int = 12, length: int = 10) -> np.ndarray:
    """2 ranks, 4 experts, no spare slot; phases of ``length`` steps alternate between experts 0
    and 1 hot (both on rank 0 under static EP: swapping 1 and 2 pays) and experts 0 and 2 hot
    (static is balanced, the swap is not). A plan made in one phase is kept in the next: the
    last step and the steps since the last plan (in sample) always favour the wrong table."""
    counts = np.full((phases * length, 1, 2, 4), 20, dtype=np.int64)
    for p in range(phases):
        counts[p * length:(p + 1) * length, 0][:, :, [0, 1] if p % 2 == 0 else [0, 2]] = 500
    return counts


def test_trust_stops_a_planner_whose_changes_do_not_pay_out_of_sample():
    """Changes are made only while the layer's proposals, replayed on the steps after them, pay:
    on the flip trace the planner goes out once and back, then stays on static EP; without the
    track record (trust 0) it keeps swapping into the wrong table and loses to static."""
    cost = CostModel(c_tok=1e-6, bytes_per_token=0, a2a_bw=1e10, grad_bytes=0, move_bytes=4e6)
    counts = _flip_trace()
    static = simulate_planner(make_planner("static"), counts, cost, 2).time_T.sum()
    blind = simulate_planner(make_planner("greedy"), counts, cost, 2, ReplanPolicy(trust=0))
    trusting = simulate_planner(make_planner("greedy"), counts, cost, 2, ReplanPolicy())
    assert blind.replans > 2 and blind.time_T.sum() > 1.1 * static
    assert trusting.replans <= 2
    phase_loss = 10 * (cost.c_tok * 2000 - cost.c_tok * 1040)  # one phase on the wrong table
    assert trusting.time_T.sum() <= static + phase_loss + 2 * trusting.move_T.max() + 1e-12


def test_drift_gate_stops_changes_that_do_not_pay_on_the_interval_before():
    """On the flip trace every window favours the table the next phase does not want; without the
    track record (trust 0) the planner keeps swapping and loses to static. The drift gate scores
    each change on the window one interval earlier as well (the other phase, where it loses) and
    makes none; on a steady skew (the first phase forever) it lets the change through one
    interval late and keeps nearly all of the ungated gain."""
    cost = CostModel(c_tok=1e-6, bytes_per_token=0, a2a_bw=1e10, grad_bytes=0, move_bytes=4e6)
    counts = _flip_trace()
    static = simulate_planner(make_planner("static"), counts, cost, 2).time_T.sum()
    blind = simulate_planner(make_planner("greedy"), counts, cost, 2, ReplanPolicy(trust=0))
    gated = simulate_planner(make_planner("greedy"), counts, cost, 2, ReplanPolicy(trust=0, drift_gate=0.0))
    assert blind.replans > 2 and blind.time_T.sum() > 1.1 * static
    assert gated.replans == 0 and gated.time_T.sum() == pytest.approx(static, rel=1e-12)
    steady = np.repeat(counts[:1], counts.shape[0], axis=0)
    static = simulate_planner(make_planner("static"), steady, cost, 2).time_T.sum()
    free = simulate_planner(make_planner("greedy"), steady, cost, 2, ReplanPolicy(trust=0))
    gated = simulate_planner(make_planner("greedy"), steady, cost, 2, ReplanPolicy(trust=0, drift_gate=0.0))
    assert gated.replans == 1 and free.replans == 1
    one_interval = 10 * cost.c_tok * (2000 - 1040)  # the swap's gain per step, 10 steps later
    assert gated.time_T.sum() == pytest.approx(free.time_T.sum() + one_interval, rel=1e-9)
    assert gated.time_T.sum() < 0.65 * static


def test_perfect_prediction_plans_on_the_steps_it_keeps_the_table():
    """With the true counts of the coming interval (the simulator's perfect prediction, guard
    off) the planner swaps exactly when the next phase calls for it and beats static EP."""
    cost = CostModel(c_tok=1e-6, bytes_per_token=0, a2a_bw=1e10, grad_bytes=0, move_bytes=4e6)
    counts = _flip_trace()
    static = simulate_planner(make_planner("static"), counts, cost, 2)
    prophet = simulate_planner(make_planner("greedy"), counts, cost, 2, ReplanPolicy(guard=False),
                               perfect_prediction=True)
    assert prophet.name == "greedy (perfect prediction)"
    assert prophet.time_T.sum() < static.time_T.sum()
    # the table in force during each phase is the one that phase wants (static in odd phases)
    odd_phases = np.concatenate([np.arange(p * 10, p * 10 + 10) for p in range(1, 12, 2)])
    np.testing.assert_allclose(prophet.balance_TL[odd_phases], static.balance_TL[odd_phases])
    assert (prophet.balance_TL[10:] < 1.5).all()


def test_default_policy_on_layers_without_tokens():
    """A layer with no tokens at all (and one with a single token) under the default policy:
    the holdout and track record have nothing to divide by; the planner keeps static EP's time."""
    counts = np.zeros((25, 2, 2, 4), dtype=np.int64)
    counts[:, 1, 0, 3] = 1
    static = simulate_planner(make_planner("static"), counts, COST, 3)
    greedy = simulate_planner(make_planner("greedy"), counts, COST, 3, ReplanPolicy(interval=4))
    assert greedy.time_T.sum() <= static.time_T.sum() * (1 + 1e-12)


def test_shed_window_validation_and_when_it_applies():
    assert ReplanPolicy(shed_window=2).shed_window == 2
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="shed_window"):
            ReplanPolicy(shed_window=bad)
    assert ReplanPolicy(shed_window=2).sheds
    assert not ReplanPolicy(shed_window=2, guard=False).sheds and not ReplanPolicy(shed_window=2, score_window=0).sheds
    assert not ReplanPolicy(shed_window=None).sheds


def _random_replicated(rng, E: int, W: int, S: int, adds: int) -> PlacementTable:
    """Static EP (or a greedy plan) plus ``adds`` replicas of random experts in random free slots."""
    table = PlacementTable.static(E, W, S)
    for _ in range(adds):
        free = np.argwhere(table.slot_expert_WS == -1)
        if not len(free):
            break
        r, s_ = free[rng.integers(len(free))]
        e = int(rng.integers(E))
        if e not in table.slot_expert_WS[r]:
            table = expand_replica(table, e, (int(r), int(s_)))
    return table


def test_shed_never_raises_the_modelled_time_on_its_window():
    """On random replicated tables and random windows (skewed, uniform, one token, an empty
    expert, everything on one expert): the shed table is valid, keeps every expert and every
    static home it held, holds no more replicas, and its mean modelled time on the window is
    never above the table's; a table without useful replicas under uniform load goes to static."""
    rng = np.random.default_rng(11)
    cost = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10, grad_bytes=2e5)
    shed_any = 0
    for trial in range(60):
        E, W = int(rng.choice([4, 6, 8, 12])), int(rng.choice([2, 3, 4]))
        S = -(-E // W) + int(rng.integers(1, 3))
        table = _random_replicated(rng, E, W, S, int(rng.integers(1, 6)))
        N = int(rng.integers(1, 4))
        kind = trial % 5
        if kind == 0:
            steps = rng.integers(0, 400, size=(N, W, E))
        elif kind == 1:
            steps = np.full((N, W, E), 50)
        elif kind == 2:
            steps = np.zeros((N, W, E), dtype=np.int64)
            steps[:, 0, int(rng.integers(E))] = 1
        elif kind == 3:
            steps = rng.integers(0, 400, size=(N, W, E))
            steps[:, :, int(rng.integers(E))] = 0
        else:
            steps = np.zeros((N, W, E), dtype=np.int64)
            steps[:, :, int(rng.integers(E))] = 500
        new = shed_replicas(table, steps, cost)
        new.validate()
        assert (new.num_replicas_E() >= 1).all() and (new.num_replicas_E() <= table.num_replicas_E()).all()
        home = table.static_like().slot_expert_WS
        held = (table.slot_expert_WS == home) & (home >= 0)
        np.testing.assert_array_equal(new.slot_expert_WS[held], home[held])
        before = np.mean([cost.step_time(table, c).total for c in steps])
        after = np.mean([cost.step_time(new, c).total for c in steps])
        assert after <= before * (1 + 1e-12), (trial, before, after)
        if new is not table:
            shed_any += 1
            assert new.version == table.version + 1
    assert shed_any > 10
    uniform = shed_replicas(_random_replicated(rng, 8, 4, 3, 4), np.full((2, 4, 8), 50), cost)
    np.testing.assert_array_equal(uniform.slot_expert_WS, PlacementTable.static(8, 4, 3).slot_expert_WS)


def _hot_then_uniform() -> np.ndarray:
    """4 ranks, 8 experts: expert 0 hot for 14 steps (the plan at step 10 replicates it), then uniform."""
    counts = np.full((30, 1, 4, 8), 100, dtype=np.int64)
    counts[:14, 0, :, 0] = 1500
    return counts


def _replay(counts: np.ndarray, policy: ReplanPolicy, record: list[float] | None = None):
    """Greedy under ``policy`` on one layer (3 slots per rank): extra replicas and modelled time
    per step. ``record``: the planner's out-of-sample record set to it after the first plan."""
    replanner = Replanner(policy, make_planner("greedy"), 1)
    table = PlacementTable.static(counts.shape[3], counts.shape[2], 3)
    extra, time_T = [], []
    for t, c_LWE in enumerate(counts):
        if replanner.due():
            table = replanner.plan([table], COST)[0].table
            if record is not None and t == policy.first_plan:
                replanner.track_L[0] = list(record)
        extra.append(int(table.num_replicas_E().sum()) - counts.shape[3])
        time_T.append(COST.step_time(table, c_LWE[0]).total)
        replanner.observe(c_LWE)
    return extra, np.array(time_T)


def test_replicas_that_stop_paying_are_shed_where_the_planner_does_not_pay():
    """The plan at step 10 replicates the hot expert; routing turns uniform at step 14. Where the
    planner's out-of-sample record is not positive, ``shed_window=1`` drops the replicas at step
    15, after one uniform step (window 2: step 16) and the modelled time falls; without shedding
    they stay. Where the record is positive (here as it comes: the replicas paid) shedding changes
    nothing at all."""
    counts = _hot_then_uniform()
    kept, kept_T = _replay(counts, ReplanPolicy())
    assert kept[10] > 0 and min(kept[10:]) == kept[10]
    same, same_T = _replay(counts, ReplanPolicy(shed_window=1))
    assert same == kept
    np.testing.assert_array_equal(same_T, kept_T)
    for window, first_shed in ((1, 15), (2, 16)):
        unshed, unshed_T = _replay(counts, ReplanPolicy(), record=[-0.01])
        shed, shed_T = _replay(counts, ReplanPolicy(shed_window=window), record=[-0.01])
        assert unshed[10] > 0 and min(unshed[10:20]) == unshed[10]
        assert shed[:first_shed] == unshed[:first_shed] and shed[first_shed:20] == [0] * (20 - first_shed), shed
        np.testing.assert_array_equal(shed_T[:first_shed], unshed_T[:first_shed])
        assert shed_T[:20].sum() < unshed_T[:20].sum()


def test_shed_gate_follows_the_record_and_needs_trust():
    policy = ReplanPolicy(shed_window=2)
    assert policy.sheds and not ReplanPolicy(shed_window=2, trust=0).sheds
    replanner = Replanner(policy, make_planner("greedy"), 2)
    for _ in range(12):
        replanner.observe(np.full((2, 4, 8), 10))
    replanner._replicated_L = [True, False]
    for record, due in (([], False), ([0.02], False), ([-0.01, 0.005], True), ([0.0], True)):
        replanner.track_L = [list(record), [-1.0]]  # layer 1 holds no replicas: never a reason
        assert replanner.due() == due, record


def test_shed_cache_over_sliding_windows_changes_nothing():
    """The replanner's cache of (table, step) times, reused as the shed's window slides, gives
    the tables the uncached shed gives, with fewer cost-model evaluations."""
    rng = np.random.default_rng(5)
    cost = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10, grad_bytes=2e5)
    calls = {"n": 0}

    class Counting(CostModel):
        def step_time(self, table, counts_WE):
            calls["n"] += 1
            return super().step_time(table, counts_WE)

    counting = Counting(**{f.name: getattr(cost, f.name) for f in dataclasses.fields(CostModel)})
    steps_TWE = rng.integers(0, 300, size=(30, 4, 8))
    memo: dict = {}
    cached = uncached = 0
    for trial in range(6):
        table = _random_replicated(rng, 8, 4, 3, 4)
        for t in range(4, 30):
            window = steps_TWE[t - 4:t]
            calls["n"] = 0
            a = shed_replicas(table, window, counting, (range(100 * trial + t - 4, 100 * trial + t), memo))
            cached += calls["n"]
            calls["n"] = 0
            b = shed_replicas(table, window, counting)
            uncached += calls["n"]
            np.testing.assert_array_equal(a.slot_expert_WS, b.slot_expert_WS)
            np.testing.assert_array_equal(a.share_WS, b.share_WS)
    assert cached < uncached / 2
