"""Exploration (issue 14), not a flexmoe feature: shed replicas between plans.

Replays a trace like ``placement_sim.py`` (same cost constants, default ``ReplanPolicy()``, 8
ranks, 10 slots per rank) with one addition patched into the simulator's ``Replanner``: after the
first plan, every ``--every`` steps between plans, each layer holding replicas drops those that
did not pay on the last ``--m`` observed steps (modelled mean time; dropping moves nothing):
single copies greedily (the lowest-quota copy of an expert, never its static home) and, for a
table on the static base, static EP itself (``--only-static``: that candidate alone). The guard's
accounting is not adjusted for the mid-interval change (it judges the shed table on the whole
interval). ``--off`` reproduces ``placement_sim.py --planners static,greedy``; ``--diag L`` prints
layer L's per-interval time against static EP.

    python benchmarks/placement_shed.py --trace benchmarks/traces/train_tiny_cpu_e64_top4_aux001.jsonl --scale 16 --m 2
"""
import sys, time, argparse
import numpy as np
import flexmoe.sim.simulator as S
from flexmoe.placement import CostModel, ReplanPolicy, make_planner
from flexmoe.placement.policy import Replanner, LayerPlan
from flexmoe.placement.table import PlacementTable, EMPTY
from flexmoe.placement.split import replica_quotas
from flexmoe.sim import read_trace, generate_trace, SyntheticTraceConfig

ap = argparse.ArgumentParser()
ap.add_argument("--trace"); ap.add_argument("--scale", type=int, default=1); ap.add_argument("--steps", type=int, default=None)
ap.add_argument("--m", type=int, default=2); ap.add_argument("--every", type=int, default=1); ap.add_argument("--eps", type=float, default=0.0)
ap.add_argument("--off", action="store_true"); ap.add_argument("--diag", type=int, default=None); ap.add_argument("--only-static", action="store_true"); ap.add_argument("--mode", default="greedy")
a = ap.parse_args()

def drop(table, r, s):
    se = table.slot_expert_WS.copy(); sh = table.share_WS.copy(); e = se[r, s]
    se[r, s] = EMPTY; sh[r, s] = 0.0
    m = se == e; tot = sh[m].sum()
    sh[m] = sh[m] / tot if tot > 0 else 1.0 / m.sum()
    return PlacementTable(table.num_experts, se, sh, table.version + 1)

def shed(table, steps, cost):
    def t(tb): return float(np.mean([cost.step_time(tb, c).total for c in steps]))
    cur, cur_t = table, t(table)
    load_E = np.sum([c.sum(0) for c in steps], axis=0)
    home = table.static_like().slot_expert_WS
    from flexmoe.placement.planner import on_static_base
    if on_static_base(table):
        st = table.static_like(); st = PlacementTable(st.num_experts, st.slot_expert_WS, st.share_WS, table.version + 1)
        stt = t(st)
    else:
        st = None
    while not a.only_static:
        reps = cur.num_replicas_E()
        if (reps <= 1).all(): break
        q = replica_quotas(cur, load_E, cost.adaptive_split)
        best = None
        for e in np.flatnonzero(reps > 1):
            rs = [(r, s) for r, s, _ in cur.replicas(int(e))]
            # drop the copy with the lowest quota, never the static home
            rs = [x for x in rs if home[x] != e] or rs
            r, s = min(rs, key=lambda x: q[x])
            cand = drop(cur, r, s); ct = t(cand)
            if best is None or ct < best[1]: best = (cand, ct)
        if best is None or not best[1] < cur_t * (1 - a.eps): break
        cur, cur_t = best
    if st is not None and stt < cur_t * (1 - a.eps):
        return st
    return cur

class ShedReplanner(Replanner):
    def due(self):
        self._full = super().due()
        if a.off: return self._full
        return self._full or (self.steps_done > self.policy.first_plan and self.steps_done % a.every == 0)
    def plan(self, tables, cost, true_LWE=None, future_NLWE=None):
        if self._full: return super().plan(tables, cost, true_LWE, future_NLWE)
        recent = list(self._window)[-a.m:]
        out = []
        for i, tb in enumerate(tables):
            if (tb.num_replicas_E() <= 1).all(): out.append(LayerPlan(tb, 0.0, 0.0)); continue
            new = shed(tb, [c[i] for c in recent], cost)
            out.append(LayerPlan(new, 0.0, 0.0))
        return out
S.Replanner = ShedReplanner

if a.trace:
    tr = read_trace(a.trace); counts = tr.counts_TLWE
    if a.steps: counts = counts[:a.steps]
    counts = counts * a.scale
    if tr.world_size < 8: counts = S.split_ranks(counts, 8)
else:
    counts = generate_trace(SyntheticTraceConfig(num_steps=a.steps or 1000, world_size=8, num_experts=64, tokens_per_rank=16384, top_k=8, alpha=1.0, seed=0)).counts_TLWE
cost = CostModel.from_shape(2048, 768, flops=764e12, mem_bw=3.0e12, a2a_bw=350e9, adaptive_split=True)
T, L, W, E = counts.shape
t0 = time.time()
res = [S.simulate_planner(make_planner(n), counts, cost, E // W + 2) for n in ("static", a.mode)]
base = res[0].layer_time_TL.sum(0); g = res[1].layer_time_TL.sum(0)
print(sys.argv[1:], f"{res[0].time_T.mean()/res[1].time_T.mean():.4f}x", "layers", " ".join(f"{x:.3f}" for x in base / g),
      f"min {min(base/g):.3f} GB {res[1].bytes_moved/1e9:.1f} replans {res[1].replans} ({time.time()-t0:.0f}s)", flush=True)
if a.diag is not None:
    li = a.diag
    st = res[0].layer_time_TL[:, li]; gt = res[1].layer_time_TL[:, li]
    iv = 10
    for k in range(0, T, iv):
        d = st[k:k+iv].sum() - gt[k:k+iv].sum()
        if abs(d) > 1e-6:
            print(f"steps {k}-{k+iv-1}: static-greedy {d*1e3:+.3f} ms (static {st[k:k+iv].sum()*1e3:.2f})  per-step " + " ".join(f"{(x-y)*1e3:+.2f}" for x, y in zip(st[k:k+iv], gt[k:k+iv])))
