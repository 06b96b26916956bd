"""Placement runtime on 4 gloo processes (one spawn runs every scenario, the tests read its results).

1. migration alone: random table changes move every logical expert's weights and Adam state intact
   between ranks (swaps across ranks included); ranks that disagree on a table get a clear error.
2. invariance: float64 EP training with Adam and skewed routing, with placement changes of every
   kind (expand, shrink, migrate, swap, multi-change plans) at random steps, equals training with the
   static table in the logical view (weights, exp_avg, exp_avg_sq, step) to 1e-10 relative; replicas
   stay bit-identical. Once by direct ``apply_placement`` calls, once by direct asynchronous moves
   (``issue_placement`` after the optimizer step, ``apply`` before the next forward), through
   ``PlacementScheduler`` with the greedy planner with asynchronous moves (the default) and with
   blocking ones, once more resuming the asynchronous run from a checkpoint taken half-way while a
   move is in flight, and once with data parallelism over two EP groups of two ranks (the groups
   must plan identical tables). test_placement_runtime_async.py runs the same on 2 processes.
3. the check has teeth: averaging replica gradients instead of summing them, or migrating without the
   optimizer state, is detected.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flexmoe import MoEConfig, MoELayer, PlacementScheduler
from flexmoe.parallel import EPGroup, ParallelExperts
from flexmoe.placement import (
    CostModel,
    PlacementTable,
    expand_replica,
    ReplanPolicy,
    Replanner,
    make_planner,
    migrate_replica,
    shrink_replica,
    swap_slots,
    table_digest,
)
from flexmoe.runtime import apply_placement, issue_placement, sync_gradients
from helpers import free_port

WORLD = 4
E, S = 6, 3
TOL = 1e-10
SPAWN_TIMEOUT_S = 240


# ------------------------------------------------------------------------------- helpers (all ranks)


def initial_table(world: int = WORLD) -> PlacementTable:
    """4 ranks: 3 slots each, experts 0-3 two per rank on ranks 0-1; 2 ranks: 5 slots, 3 experts each."""
    if world == 2:
        se = np.array([[0, 1, 2, -1, -1], [3, 4, 5, -1, -1]])
    else:
        se = np.array([[0, 1, -1], [2, 3, -1], [4, -1, -1], [5, -1, -1]])
    return PlacementTable(E, se, (se >= 0).astype(float))


def random_change(table: PlacementTable, kind: str, rng: np.random.Generator) -> PlacementTable:
    """One primitive of ``kind`` on ``table`` (rng identical on all ranks)."""
    se = table.slot_expert_WS
    free = [tuple(map(int, x)) for x in np.argwhere(se == -1)]
    full = [tuple(map(int, x)) for x in np.argwhere(se >= 0)]
    reps = table.num_replicas_E()
    if kind == "expand":
        cands = [(e, f) for f in free for e in range(E) if not (se[f[0]] == e).any()]
        e, f = cands[rng.integers(len(cands))]
        return expand_replica(table, e, f)
    if kind == "shrink":
        cands = [s for s in full if reps[se[s]] > 1]
        return shrink_replica(table, cands[rng.integers(len(cands))])
    if kind == "migrate":  # to another rank that does not hold the expert
        cands = [(src, f) for src in full for f in free if f[0] != src[0] and not (se[f[0]] == se[src]).any()]
        return migrate_replica(table, *cands[rng.integers(len(cands))])
    if kind == "swap":  # two experts on different ranks, neither already on the other's rank
        cands = [(a, b) for a in full for b in full if b[0] != a[0] and se[b] != se[a]
                 and not (se[b[0]] == se[a]).any() and not (se[a[0]] == se[b]).any()]
        return swap_slots(table, *cands[rng.integers(len(cands))])
    if kind == "reshuffle":  # a multi-change plan: random permutation of all slot contents
        perm = rng.permutation(se.size)
        new = PlacementTable(E, se.reshape(-1)[perm].reshape(se.shape),
                             table.share_WS.reshape(-1)[perm].reshape(se.shape), table.version + 1)
        return new
    raise ValueError(kind)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def gather_slots(t: torch.Tensor, group=None) -> torch.Tensor:
    """[S, ...] on every rank of ``group`` -> [W, S, ...] everywhere."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def logical_view(layer, opt) -> tuple[dict[str, torch.Tensor], float]:
    """Per field, ``[E, ...]`` rows of each logical expert (first replica), and the largest
    difference between replicas of one expert (0.0 when they are bit-identical)."""
    table = layer.experts.placement
    out, replica_diff = {}, 0.0
    for pname, p in layer.experts.named_parameters():
        fields = {pname: p.data}
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                fields[f"{pname}.{key}"] = st[key]
        for name, t in fields.items():
            all_WS = gather_slots(t, layer.experts.ep_group.group)
            rows = []
            for e in range(E):
                reps = [all_WS[r, s] for r, s, _ in table.replicas(e)]
                replica_diff = max(replica_diff, max(float((x - reps[0]).abs().max()) for x in reps))
                rows.append(reps[0])
            out[name] = torch.stack(rows)
    for pname, p in layer.named_parameters():
        if not pname.startswith("experts."):
            out[pname] = p.data.clone()
            for key, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    out[f"{pname}.{key}"] = v.clone()
    steps = {float(v["step"]) for v in opt.state.values() if "step" in v}
    out["step"] = torch.tensor(sorted(steps), dtype=torch.float64)
    return out, replica_diff


def compare(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(rel_err(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- scenario 1: migration


class SlotLayer(MoELayer):
    """Slots + table only (no data path), to test migration independently of EP."""

    def __init__(self, table):
        nn.Module.__init__(self)
        self.config = MoEConfig(d_model=4, d_ff=6, num_experts=E, top_k=1)
        self.experts = ParallelExperts(self.config, EPGroup.create(), table).double()
        self.last_counts = None


def scenario_migration(rank: int) -> dict:
    torch.manual_seed(100 + rank)
    layer = SlotLayer(initial_table())
    opt = torch.optim.Adam(layer.parameters())
    # fill the slots from one logical set of experts so replicas agree, then build Adam state
    torch.manual_seed(7)
    logical = [torch.randn(E, *p.shape[1:], dtype=torch.float64) for p in layer.experts.parameters()]
    with torch.no_grad():
        for p, lg in zip(layer.experts.parameters(), logical):
            for r, s in np.argwhere(layer.experts.placement.slot_expert_WS >= 0):
                if r == rank:
                    p[s] = lg[layer.experts.placement.slot_expert_WS[r, s]]
    sum((p.double() ** 3).sum() for p in layer.experts.parameters()).backward()
    opt.step()
    before, _ = logical_view(layer, opt)
    rng = np.random.default_rng(3)
    kinds = ["expand", "swap", "expand", "migrate", "shrink", "reshuffle", "swap", "expand", "migrate"]
    errs, diffs, bytes_moved, table = [], [], 0, layer.experts.placement
    for kind in kinds:
        table = random_change(table, kind, rng)
        report = apply_placement(layer, table, opt)
        bytes_moved += report.bytes_moved
        view, diff = logical_view(layer, opt)
        errs.append(compare(view, before))
        diffs.append(diff)
    sent = torch.tensor([float(report.bytes_sent), float(report.bytes_received)])
    dist.all_reduce(sent)

    # ranks that disagree on the new table get a clear error, before anything moves
    free = np.argwhere(layer.experts.placement.slot_expert_WS == -1)
    bad = expand_replica(layer.experts.placement, 0, tuple(map(int, free[rank % 2])))
    mismatch = ""
    try:
        apply_placement(layer, bad, opt)
    except RuntimeError as exc:
        mismatch = str(exc)
    return {"max_err": max(errs), "max_replica_diff": max(diffs), "bytes_moved": bytes_moved,
            "last_sent_equals_received": bool(sent[0] == sent[1]), "mismatch_error": mismatch}


# ------------------------------------------------------------------------------- scenario 2/3: training


D, F, T, K, STEPS = 8, 6, 24, 2, 12
CONFIG = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, router_dtype=torch.float64, kernels="torch",
                   validate_inputs=False)


def average_replica_grads(layer):
    """The bug to catch: after ``sync_gradients`` summed replica gradients, divide by replicas."""
    reps_E = layer.experts.placement.num_replicas_E()
    for p in layer.experts.parameters():
        for s, e in enumerate(layer.experts.placement.slot_expert_WS[layer.experts.rank]):
            if e >= 0:
                p.grad[s] /= float(reps_E[e])


@dataclasses.dataclass
class Topology:
    """ep_group: this rank's EP group; expert_dp_group: the ranks holding the same slots in the
    other EP groups (None: one EP group over the world); table: the initial placement."""

    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup | None
    table: PlacementTable


def build_layer(topo: Topology):
    """The real EP layer (same seed on every rank, so the logical experts agree), skewed router."""
    torch.manual_seed(11)
    layer = MoELayer(CONFIG, ep_group=topo.ep_group, placement=topo.table.copy()).double()
    hot = torch.zeros(E, D, dtype=torch.float64)
    hot[0, :4] = hot[1, 4:] = 3.0  # experts 0 and 1 attract the shifted tokens of the first phase
    hot[4, :4] = hot[5, 4:] = -3.0  # experts 4 and 5 those of the second phase
    with torch.no_grad():
        layer.router.weight.add_(hot)
    return layer


def batch(step, rank):
    """This rank's batch; every rank's tokens lean towards the same hot experts, which shift
    half-way."""
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    x += (0.6 if step < STEPS // 2 else -0.6) * (1 + 0.3 * rank)
    target = torch.randn(T, D, generator=g, dtype=torch.float64)
    return x, target


def train(rank, topo, on_step=None, average_replicas=False, before_forward=None):
    """STEPS Adam steps; ``on_step(step, layer, opt)`` runs after each optimizer step and may
    return a replacement ``(layer, opt)`` (a resumed checkpoint); ``before_forward(step)`` runs
    before each forward, after the batch is built. Returns the logical view (a collective, taken
    while asynchronous moves are in flight) and the largest replica difference after each step."""
    layer = build_layer(topo)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    views, diffs = [], []
    for step in range(STEPS):
        x, target = batch(step, rank)
        if before_forward is not None:
            before_forward(step)
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        sync_gradients(layer, expert_dp_group=topo.expert_dp_group)
        if average_replicas:
            average_replica_grads(layer)
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            layer, opt = on_step(step, layer, opt) or (layer, opt)
        view, diff = logical_view(layer, opt)
        views.append(view)
        diffs.append(diff)
    return views, diffs


CHANGE_KINDS = ["expand", "expand", "swap", "migrate", "reshuffle", "shrink", "expand", "migrate", "swap", "shrink"]


def random_changes(move_optimizer_state=True, async_moves=False):
    """Changes of every kind at random steps (the same on all ranks). ``async_moves``: the step's
    changes in one table, issued after the optimizer step and applied before the next forward
    (use ``before_forward`` as ``train``'s)."""
    rng = np.random.default_rng(5)
    steps = sorted(rng.choice(np.arange(STEPS - 1), size=len(CHANGE_KINDS) - 2, replace=False).tolist())
    plan = {}
    for i, kind in enumerate(CHANGE_KINDS):  # two steps get two changes
        plan.setdefault(steps[min(i, len(steps) - 1)], []).append(kind)
    log, pending = [], []

    def on_step(step, layer, opt):
        if async_moves and step in plan:
            new = layer.experts.placement
            for kind in plan[step]:
                new = random_change(new, kind, rng)
            pending.append(issue_placement(layer, new, opt))
            r = pending[-1].report
            log.append((step, "+".join(plan[step]), r.expands, r.shrinks, r.migrates, r.bytes_moved))
            return
        for kind in plan.get(step, []):
            new = random_change(layer.experts.placement, kind, rng)
            report = apply_placement(layer, new, opt, move_optimizer_state=move_optimizer_state)
            log.append((step, kind, report.expands, report.shrinks, report.migrates, report.bytes_moved))

    def before_forward(step):
        while pending:
            pending.pop().apply()

    on_step.before_forward = before_forward
    return on_step, log


SCHEDULED_COST = CostModel(c_tok=1e-6, bytes_per_token=8 * D, a2a_bw=1e9, grad_bytes=8 * 3 * D * F,
                           move_bytes=24 * 3 * D * F)
SCHEDULED_POLICY = ReplanPolicy(interval=2, warmup=1, guard=False)
# with the guard, and sheds between plans (ReplanPolicy.shed_window): plans every 4 steps
SHED_POLICY = ReplanPolicy(interval=4, warmup=1, trust=1, noise_z=0.0, score_window=2, shed_window=1)


def distrust(replanner, tables) -> None:
    """After a plan that left replicas: the planner's out-of-sample record set to a loss on every
    layer (as if its proposals had not paid), which lets the shed run until the next plan."""
    if any((t.num_replicas_E() > 1).any() for t in tables):
        replanner.track_L = [[-1.0] for _ in replanner.track_L]


def SCHEDULED_PLANNER():
    return make_planner("greedy", threshold=1.05, horizon=5.0)


class ListRecorder:
    """Keeps the all-gathered counts the scheduler records, per (step, layer)."""

    def __init__(self):
        self.records = {}

    def record(self, step, layer, counts_WE):
        self.records[(int(step), int(layer))] = np.asarray(counts_WE).tolist()


def scheduled(rank, topo, resume_after=None, async_moves=True, policy=SCHEDULED_POLICY, after_plan=None):
    """A PlacementScheduler with the greedy planner, every 2 steps. With ``resume_after``, the
    model, optimizer and scheduler are checkpointed after that step (with the plan's moves still in
    flight: ``pending_at_save``) and training goes on with fresh objects loaded from the checkpoint
    (scheduler state first, so the logical model state dict is laid out by the saved tables)."""
    holder = {"metrics": [], "tables": [], "trace": ListRecorder()}

    def make(layer, opt):
        return PlacementScheduler(layer, opt, SCHEDULED_PLANNER(), SCHEDULED_COST, policy=policy,
                                  expert_dp_group=topo.expert_dp_group, trace=holder["trace"],
                                  async_moves=async_moves)

    def on_step(step, layer, opt):
        if "s" not in holder:
            holder["s"] = make(layer, opt)
        metrics = holder["s"].step()
        if metrics and metrics["kind"] == "plan" and after_plan is not None:
            after_plan(holder["s"].replanner, holder["s"].planned_tables)
        if metrics:
            holder["metrics"].append(metrics)
            holder["tables"].append((step + 1, holder["s"].planned_tables[0].state_dict()))
        if step == resume_after:
            holder["pending_at_save"] = list(holder["s"].pending)
            saved = copy.deepcopy({"model": layer.state_dict(), "optimizer": opt.state_dict(),
                                   "placement": holder["s"].state_dict()})
            layer = build_layer(topo)
            with torch.no_grad():  # scramble what the checkpoint must restore
                for p in layer.parameters():
                    p.normal_()
            opt = torch.optim.Adam(layer.parameters(), lr=0.02)
            holder["s"] = make(layer, opt)
            holder["s"].load_state_dict(saved["placement"])
            layer.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            return layer, opt
        return None

    return on_step, holder


def invariance_scenarios(rank, world):
    """Baseline, direct (blocking and asynchronous), scheduler (asynchronous), resume mid-move."""
    topo = Topology(dist.group.WORLD, None, initial_table(world))
    base_views, base_diffs = train(rank, topo)
    out = {"baseline_replica_diff": max(base_diffs)}

    def errors(views, base=base_views):
        return [compare(v, b) for v, b in zip(views, base)]

    for name, async_moves in (("direct", False), ("direct_async", True)):
        on_step, log = random_changes(async_moves=async_moves)
        views, diffs = train(rank, topo, on_step, before_forward=on_step.before_forward)
        out[name] = {"errors": errors(views), "replica_diff": max(diffs), "log": log}

    on_step, sched = scheduled(rank, topo)
    views, diffs = train(rank, topo, on_step)
    scheduler_views = views
    records = sched["trace"].records
    out["scheduler"] = {"errors": errors(views), "replica_diff": max(diffs), "metrics": sched["metrics"],
                        "final_table": sched["s"].planned_tables[0].state_dict(), "plans": sched["tables"],
                        "trace": [records[(t, 0)] for t in range(len(records))]}
    moved = [m["step"] - 1 for m in sched["metrics"] if m["layers"][0]["transfers"] and m["step"] < STEPS]
    resume_after = min(moved, key=lambda step: abs(step - STEPS // 2))  # a move is in flight then
    on_step, resumed = scheduled(rank, topo, resume_after=resume_after)
    views, _ = train(rank, topo, on_step)
    out["resumed"] = {"errors": errors(views), "final_table": resumed["s"].planned_tables[0].state_dict(),
                      "pending_at_save": resumed["pending_at_save"], "resume_after": resume_after}
    on_step, shed = scheduled(rank, topo, policy=SHED_POLICY, after_plan=distrust)
    views, diffs = train(rank, topo, on_step)
    records = shed["trace"].records
    out["scheduler_shed"] = {"errors": errors(views), "replica_diff": max(diffs), "plans": shed["tables"],
                             "kinds": [m["kind"] for m in shed["metrics"]],
                             "trace": [records[(t, 0)] for t in range(len(records))]}
    return out, errors, scheduler_views


def run_training_scenarios(rank):
    out, errors, async_views = invariance_scenarios(rank, WORLD)
    topo = Topology(dist.group.WORLD, None, initial_table())
    on_step, sched = scheduled(rank, topo, async_moves=False)
    views, _ = train(rank, topo, on_step)
    out["scheduler_blocking"] = {"errors": errors(views), "final_table": sched["s"].planned_tables[0].state_dict(),
                                 "vs_async": errors(views, async_views)}

    on_step, _ = random_changes()
    views, _ = train(rank, topo, on_step, average_replicas=True)
    out["averaged_grads"] = {"errors": errors(views)}
    on_step, _ = random_changes(move_optimizer_state=False)
    views, _ = train(rank, topo, on_step)
    out["no_optimizer_state"] = {"errors": errors(views)}

    # data parallel over 2 EP groups of 2 ranks: {0, 1}, {2, 3}; slot twins {0, 2}, {1, 3}
    ep_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    se = np.array([[0, 1, 2, -1, -1], [3, 4, 5, -1, -1]])
    topo = Topology(ep_groups[rank // 2], dp_groups[rank % 2], PlacementTable(E, se, (se >= 0) * 1.0))
    base_views, _ = train(rank, topo)
    on_step, sched = scheduled(rank, topo)
    views, diffs = train(rank, topo, on_step)
    digests = torch.tensor([table_digest(sched["s"].planned_tables[0])])
    everyone = [torch.zeros_like(digests) for _ in range(WORLD)]
    dist.all_gather(everyone, digests)
    out["dp_ep"] = {"errors": errors(views, base_views), "replica_diff": max(diffs),
                    "changes": sum(m["layers"][0]["transfers"] for m in sched["metrics"]),
                    "same_tables_everywhere": len({int(d) for d in everyone}) == 1}
    return out


# ------------------------------------------------------------------------------- worker


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        results = {"migration": scenario_migration(rank), "training": run_training_scenarios(rank)}
        if rank == 0:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()




@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("placement_dist"))
    ctx = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False)
    import time

    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed placement scenarios did not finish in {SPAWN_TIMEOUT_S} s")
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def test_migration_moves_weights_and_state_across_ranks(results):
    r = results["migration"]
    assert r["max_err"] == 0.0, r
    assert r["max_replica_diff"] == 0.0, r
    assert r["bytes_moved"] > 0 and r["last_sent_equals_received"]


def test_migration_detects_table_mismatch(results):
    assert "disagree on the new placement table" in results["migration"]["mismatch_error"]


def check_direct(training, name):
    r = training[name]
    kinds = {k for entry in r["log"] for k in entry[1].split("+")}
    assert kinds == {"expand", "shrink", "migrate", "swap", "reshuffle"}, r["log"]
    assert sum(entry[-1] for entry in r["log"]) > 0, r["log"]
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0 and training["baseline_replica_diff"] == 0.0


@pytest.mark.parametrize("name", ["direct", "direct_async"])
def test_training_invariant_under_direct_placement_changes(results, name):
    check_direct(results["training"], name)


def check_scheduler(training):
    r = training["scheduler"]
    layers = [m["layers"][0] for m in r["metrics"]]
    assert sum(m["expands"] for m in layers) > 0 and sum(m["bytes_moved"] for m in layers) > 0, layers
    assert all(m["pending"] for m in layers if m["transfers"]), layers  # asynchronous moves
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0


def test_training_invariant_under_scheduler(results):
    check_scheduler(results["training"])


def test_blocking_moves_make_the_same_plans_and_stay_invariant(results):
    r = results["training"]["scheduler_blocking"]
    assert max(r["errors"]) < TOL, r["errors"]
    assert max(r["vs_async"]) == 0.0, r["vs_async"]  # bit-identical to asynchronous moves
    assert r["final_table"] == results["training"]["scheduler"]["final_table"]


def replayed_plans(trace, policy: ReplanPolicy, after_plan=None) -> dict:
    """The scheduler's recorded counts replayed through the policy object the simulator runs
    (same planner and cost model): the table after every plan, and after every shed that dropped
    something (what the scheduler reports), by step."""
    replanner = Replanner(policy, SCHEDULED_PLANNER(), 1)
    table, plans = initial_table(), {}
    for t, counts_WE in enumerate(np.array(trace, dtype=np.int64)):
        replanner.observe(counts_WE[None])
        if replanner.due():
            new = replanner.plan([table], SCHEDULED_COST)[0].table
            if policy.due(t + 1) or new.num_replicas_E().sum() < table.num_replicas_E().sum():
                plans[t + 1] = new.state_dict()
            if policy.due(t + 1) and after_plan is not None:
                after_plan(replanner, [new])
            table = new
    return plans


def check_same_plans(real_plans, plans):
    assert len(real_plans) == len(plans) > 0
    for step, real in real_plans:
        assert plans[step]["slot_expert"] == real["slot_expert"], step
        np.testing.assert_allclose(plans[step]["share"], real["share"], rtol=0, atol=0)
    assert any(p["slot_expert"] != initial_table().state_dict()["slot_expert"] for p in plans.values())


def test_simulated_and_real_runs_make_the_same_plans(results):
    """Replayed through the simulator's policy object, the scheduler's recorded counts give the
    same table at every plan."""
    r = results["training"]["scheduler"]
    check_same_plans(r["plans"], replayed_plans(r["trace"], SCHEDULED_POLICY))


def test_sheds_between_plans_stay_invariant_and_replay_alike(results):
    """With ``shed_window`` the scheduler drops replicas between plans (counts gathered after
    every step while a layer may shed; the planner's record set to a loss after each plan that
    leaves replicas, ``distrust``): training is unchanged, and the simulator's policy object makes
    the same plans and sheds on the recorded counts."""
    r = results["training"]["scheduler_shed"]
    assert "shed" in r["kinds"] and "plan" in r["kinds"], r["kinds"]
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0
    check_same_plans(r["plans"], replayed_plans(r["trace"], SHED_POLICY, distrust))


def check_resumed(training):
    """The checkpoint was taken while a move was in flight; resuming loses nothing."""
    r = training["resumed"]
    assert r["pending_at_save"] == [0], r
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["final_table"] == training["scheduler"]["final_table"]
    assert r["final_table"]["version"] > 0


def test_resuming_from_a_checkpoint_mid_run(results):
    check_resumed(results["training"])


def test_data_parallel_ep_groups_plan_alike_and_stay_invariant(results):
    r = results["training"]["dp_ep"]
    assert r["changes"] > 0 and r["same_tables_everywhere"], r
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0


def test_averaging_replica_gradients_is_detected(results):
    assert max(results["training"]["averaged_grads"]["errors"]) > 1e-6


def test_skipping_optimizer_state_is_detected(results):
    assert max(results["training"]["no_optimizer_state"]["errors"]) > 1e-6
