"""Placement runtime on 4 gloo processes (one spawn runs every scenario, the tests read its results).

1. migration alone: random table changes move every logical expert's weights and Adam state intact
   between ranks (swaps across ranks included); ranks that disagree on a table get a clear error.
2. invariance: float64 EP training with Adam and skewed routing, with placement changes of every
   kind (expand, shrink, migrate, swap, multi-change plans) at random steps, equals training with the
   static table in the logical view (weights, exp_avg, exp_avg_sq, step) to 1e-10 relative; replicas
   stay bit-identical. Once by direct ``apply_placement`` calls, once through ``PlacementScheduler``
   with the greedy planner.
3. the check has teeth: averaging replica gradients instead of summing them, or migrating without the
   optimizer state, is detected.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flexmoe import MoEConfig, MoELayer, PlacementScheduler
from flexmoe.experts import GroupedExperts
from flexmoe.placement import CostModel, PlacementTable, make_planner, replica_quotas
from flexmoe.plan import make_dispatch_plan
from flexmoe.placement.migration import (
    apply_placement,
    expand_replica,
    migrate_replica,
    shrink_replica,
    swap_slots,
)

WORLD = 4
E, S = 6, 3
TOL = 1e-10
SPAWN_TIMEOUT_S = 240


# ------------------------------------------------------------------------------- helpers (all ranks)


def initial_table() -> PlacementTable:
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
    if kind == "migrate":
        src = full[rng.integers(len(full))]
        cands = [f for f in free if f[0] != src[0] and not (se[f[0]] == se[src]).any()]
        return migrate_replica(table, src, cands[rng.integers(len(cands))])
    if kind == "swap":
        a = full[rng.integers(len(full))]
        cands = [b for b in full if b[0] != a[0] and se[b] != se[a]
                 and not (se[b[0]] == se[a]).any() and not (se[a[0]] == se[b]).any()]
        return swap_slots(table, a, cands[rng.integers(len(cands))])
    if kind == "reshuffle":  # a multi-change plan: random permutation of all slot contents
        perm = rng.permutation(se.size)
        new = PlacementTable(E, se.reshape(-1)[perm].reshape(se.shape),
                             table.share_WS.reshape(-1)[perm].reshape(se.shape), table.version + 1)
        return new
    raise ValueError(kind)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def gather_slots(t: torch.Tensor) -> torch.Tensor:
    """[S, ...] on every rank -> [W, S, ...] everywhere."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def logical_view(layer, opt) -> tuple[dict[str, torch.Tensor], float]:
    """Per field, ``[E, ...]`` rows of each logical expert (first replica), and the largest
    difference between replicas of one expert (0.0 when they are bit-identical)."""
    table = layer.placement
    out, replica_diff = {}, 0.0
    for pname, p in layer.experts.named_parameters():
        fields = {pname: p.data}
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                fields[f"{pname}.{key}"] = st[key]
        for name, t in fields.items():
            all_WS = gather_slots(t)
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
        self.experts = GroupedExperts(self.config, num_experts=S).double()
        self.placement = table
        self.ep_group = None
        self.last_counts = None

    def set_placement(self, table):
        self.placement = table


def scenario_migration(rank: int) -> dict:
    torch.manual_seed(100 + rank)
    layer = SlotLayer(initial_table())
    opt = torch.optim.Adam(layer.parameters())
    # fill the slots from one logical set of experts so replicas agree, then build Adam state
    torch.manual_seed(7)
    logical = [torch.randn(E, *p.shape[1:], dtype=torch.float64) for p in layer.experts.parameters()]
    with torch.no_grad():
        for p, lg in zip(layer.experts.parameters(), logical):
            for r, s in np.argwhere(layer.placement.slot_expert_WS >= 0):
                if r == rank:
                    p[s] = lg[layer.placement.slot_expert_WS[r, s]]
    sum((p.double() ** 3).sum() for p in layer.experts.parameters()).backward()
    opt.step()
    before, _ = logical_view(layer, opt)
    rng = np.random.default_rng(3)
    kinds = ["expand", "swap", "expand", "migrate", "shrink", "reshuffle", "swap", "expand", "migrate"]
    errs, diffs, bytes_moved, table = [], [], 0, layer.placement
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
    bad = expand_replica(layer.placement, 0, tuple(map(int, np.argwhere(layer.placement.slot_expert_WS == -1)[rank % 2])))
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


class EmulatedEPLayer(MoELayer):
    """The EP contract's maths without all-to-all: every rank sees the global batch ``[W, T, D]``
    (ordered by source rank), computes the rows its own slots take under the table's split
    (``replica_quotas``: contiguous intervals of each expert's rows, replicas in (rank, slot)
    order), and the partial outputs are summed over ranks. ``last_counts`` are this rank's own
    tokens per expert, as in EP."""

    def __init__(self, table, rank):
        super().__init__(CONFIG)
        self.experts = GroupedExperts(CONFIG, num_experts=S)
        self.placement, self.ep_group, self.ep_rank, self.ep_size = table, None, rank, WORLD

    def set_placement(self, table):
        self.placement = table

    def forward(self, x_WTD):
        x_TD = x_WTD.reshape(-1, D)
        routing = self.router(x_TD)
        plan = make_dispatch_plan(routing)
        self.last_counts = torch.bincount(routing.expert_TK[self.ep_rank * T:(self.ep_rank + 1) * T].reshape(-1),
                                          minlength=E)
        table, me = self.placement, self.ep_rank
        quota_WS = replica_quotas(table, plan.counts_E.numpy())
        start_E = (plan.offsets_E.long() - plan.counts_E).tolist()
        rows, sizes = [], []
        for s in range(S):
            e = int(table.slot_expert_WS[me, s])
            n = int(quota_WS[me, s]) if e >= 0 else 0
            if n:
                before = sum(int(quota_WS[r, t]) for r, t, _ in table.replicas(e) if (r, t) < (me, s))
                rows.append(torch.arange(start_E[e] + before, start_E[e] + before + n))
            sizes.append(n)
        idx_N = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        offsets_S = torch.tensor(np.cumsum(sizes), dtype=torch.int32)
        token_N = plan.row_token_N[idx_N]
        y_ND = self.experts(x_TD[token_N], offsets_S, plan.row_weight_N[idx_N], False)
        y_TD = torch.zeros_like(x_TD).index_add(0, token_N, y_ND)
        total_TD = y_TD.detach().clone()
        dist.all_reduce(total_TD)
        return (y_TD + (total_TD - y_TD.detach())).view_as(x_WTD)


def sync_grads(layer, average_replicas=False):
    """Router: sum of the ranks' partial gradients. Expert slots: sum over the replicas of each
    expert (``average_replicas`` injects the bug of averaging them); empty slots get zero."""
    dist.all_reduce(layer.router.weight.grad)
    table, me = layer.placement, layer.ep_rank
    reps_E = table.num_replicas_E()
    for p in layer.experts.parameters():
        logical = torch.zeros(E, *p.shape[1:], dtype=p.dtype)
        for s, e in enumerate(table.slot_expert_WS[me]):
            if e >= 0:
                logical[e] += p.grad[s]
        dist.all_reduce(logical)
        for s, e in enumerate(table.slot_expert_WS[me]):
            p.grad[s] = logical[e] / (reps_E[e] if average_replicas else 1) if e >= 0 else 0.0


def build_layer(rank):
    torch.manual_seed(11)
    layer = EmulatedEPLayer(initial_table(), rank).double()
    hot = torch.zeros(E, D, dtype=torch.float64)
    hot[0, :4] = hot[1, 4:] = 3.0  # experts 0 and 1 attract the shifted tokens of the first phase
    hot[4, :4] = hot[5, 4:] = -3.0  # experts 4 and 5 those of the second phase
    with torch.no_grad():
        layer.router.weight.add_(hot)
        logical = [torch.randn(E, *p.shape[1:], dtype=torch.float64) * 0.3 for p in layer.experts.parameters()]
        for p, lg in zip(layer.experts.parameters(), logical):
            for s, e in enumerate(layer.placement.slot_expert_WS[rank]):
                p[s] = lg[e] if e >= 0 else 0.0
    return layer


def batch(step):
    """Global batch (identical on every rank); the hot experts shift half-way."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD, T, D, generator=g, dtype=torch.float64)
    x += (0.6 if step < STEPS // 2 else -0.6)
    target = torch.randn(WORLD, T, D, generator=g, dtype=torch.float64)
    return x, target


def train(rank, on_step=None, average_replicas=False):
    """STEPS Adam steps; ``on_step(step, layer, opt)`` runs after each optimizer step.
    Returns the logical view and the largest replica difference after each step."""
    layer = build_layer(rank)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    views, diffs = [], []
    for step in range(STEPS):
        x, target = batch(step)
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        sync_grads(layer, average_replicas)
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step, layer, opt)
        view, diff = logical_view(layer, opt)
        views.append(view)
        diffs.append(diff)
    return views, diffs


CHANGE_KINDS = ["expand", "expand", "swap", "migrate", "reshuffle", "shrink", "expand", "migrate", "swap", "shrink"]


def random_changes(move_optimizer_state=True):
    """Changes of every kind at random steps (the same on all ranks)."""
    rng = np.random.default_rng(5)
    steps = sorted(rng.choice(np.arange(STEPS - 1), size=len(CHANGE_KINDS) - 2, replace=False).tolist())
    plan = {}
    for i, kind in enumerate(CHANGE_KINDS):  # two steps get two changes
        plan.setdefault(steps[min(i, len(steps) - 1)], []).append(kind)
    log = []

    def on_step(step, layer, opt):
        for kind in plan.get(step, []):
            new = random_change(layer.placement, kind, rng)
            report = apply_placement(layer, new, opt, move_optimizer_state=move_optimizer_state)
            log.append((step, kind, report.expands, report.shrinks, report.migrates, report.bytes_moved))

    return on_step, log


def run_training_scenarios(rank):
    base_views, base_diffs = train(rank)
    out = {"baseline_replica_diff": max(base_diffs)}

    def errors(views):
        return [compare(v, b) for v, b in zip(views, base_views)]

    on_step, log = random_changes()
    views, diffs = train(rank, on_step)
    out["direct"] = {"errors": errors(views), "replica_diff": max(diffs), "log": log}

    cost = CostModel(c_tok=1e-6, bytes_per_token=8 * D, a2a_bw=1e9, grad_bytes=8 * 3 * D * F,
                     move_bytes=24 * 3 * D * F)
    sched = {}

    def scheduler_step(step, layer, opt):
        if "s" not in sched:
            sched["s"] = PlacementScheduler(layer, opt, make_planner("greedy", threshold=1.05, horizon=5.0),
                                            cost, interval=2, warmup=1)
            sched["metrics"] = []
        metrics = sched["s"].step()
        if metrics:
            sched["metrics"].append(metrics)

    views, diffs = train(rank, scheduler_step)
    out["scheduler"] = {"errors": errors(views), "replica_diff": max(diffs), "metrics": sched["metrics"],
                        "final_replicas": sched["s"].tables[0].num_replicas_E().tolist()}

    on_step, _ = random_changes()
    views, _ = train(rank, on_step, average_replicas=True)
    out["averaged_grads"] = {"errors": errors(views)}
    on_step, _ = random_changes(move_optimizer_state=False)
    views, _ = train(rank, on_step)
    out["no_optimizer_state"] = {"errors": errors(views)}
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_training_invariant_under_direct_placement_changes(results):
    r = results["training"]["direct"]
    kinds = {entry[1] for entry in r["log"]}
    assert kinds == {"expand", "shrink", "migrate", "swap", "reshuffle"}, r["log"]
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0 and results["training"]["baseline_replica_diff"] == 0.0


def test_training_invariant_under_scheduler(results):
    r = results["training"]["scheduler"]
    layers = [m["layers"][0] for m in r["metrics"]]
    assert sum(m["expands"] for m in layers) > 0 and sum(m["bytes_moved"] for m in layers) > 0, layers
    assert max(r["errors"]) < TOL, r["errors"]
    assert r["replica_diff"] == 0.0


def test_averaging_replica_gradients_is_detected(results):
    assert max(results["training"]["averaged_grads"]["errors"]) > 1e-6


def test_skipping_optimizer_state_is_detected(results):
    assert max(results["training"]["no_optimizer_state"]["errors"]) > 1e-6
