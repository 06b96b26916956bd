"""Replay a routing trace under each planner and add up the modelled cost.

Legend: T steps, L layers, W ranks, E experts, S slots per rank.

Every layer starts from static expert parallelism. The planner runs under a ``ReplanPolicy`` (the
runtime scheduler's cadence: interval, warmup, predictor, guard, bytes budget): before step t, when
a plan is due after t observed steps, it plans every layer on the predictions built from steps < t
(the oracle plans before every step on step t's true counts); then step t is charged with
``CostModel.step_time`` on its true counts plus the move time of the re-plan.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..placement.cost_model import CostModel
from ..placement.planner import Planner
from ..placement.policy import ReplanPolicy, Replanner
from ..placement.split import rank_loads
from ..placement.table import PlacementTable
from .trace import RoutingTrace


@dataclasses.dataclass
class SimResult:
    """Per-step records of one planner (times in seconds, summed over layers).

    balance_TL: max rank load / mean rank load. time_T: step time including moves.
    compute_T, a2a_T, sync_T, move_T: its terms. bytes_moved: network bytes of all moves.
    replans: placement changes (replicas added, dropped or moved), over all layers.
    share_updates: table changes that only re-split tokens among the same replicas.
    layer_time_TL: each layer's step time including its moves.
    """

    name: str
    balance_TL: np.ndarray
    time_T: np.ndarray
    compute_T: np.ndarray
    a2a_T: np.ndarray
    sync_T: np.ndarray
    move_T: np.ndarray
    bytes_moved: float
    replans: int
    share_updates: int
    layer_time_TL: np.ndarray | None = None

    def summary(self) -> dict:
        return {
            "planner": self.name,
            "balance_mean": float(self.balance_TL.mean()),
            "balance_p99": float(np.percentile(self.balance_TL, 99)),
            "step_ms": float(self.time_T.mean() * 1e3),
            "compute_ms": float(self.compute_T.mean() * 1e3),
            "a2a_ms": float(self.a2a_T.mean() * 1e3),
            "sync_ms": float(self.sync_T.mean() * 1e3),
            "move_ms": float(self.move_T.mean() * 1e3),
            "bytes_moved": float(self.bytes_moved),
            "replans": int(self.replans),
            "share_updates": int(self.share_updates),
        }


def merge_ranks(counts_TLWE: np.ndarray, world_size: int) -> np.ndarray:
    """Counts of ``world_size`` ranks from a trace of a multiple of that many (neighbours merged)."""
    W = counts_TLWE.shape[2]
    if W % world_size:
        raise ValueError(f"world_size={world_size} must divide the trace's {W} ranks")
    T, L, _, E = counts_TLWE.shape
    return counts_TLWE.reshape(T, L, world_size, W // world_size, E).sum(3)


def split_ranks(counts_TLWE: np.ndarray, world_size: int, seed: int = 0) -> np.ndarray:
    """Counts of ``world_size`` source ranks from a trace recorded on fewer (one process): each
    recorded rank's tokens of every expert are dealt to its ``world_size / W`` ranks by a
    multinomial with equal odds (seeded). A stand-in: it has none of real ranks' source skew."""
    T, L, W, E = counts_TLWE.shape
    if world_size % W:
        raise ValueError(f"the trace's {W} ranks must divide world_size={world_size}")
    k = world_size // W
    rng = np.random.default_rng(seed)
    flat = counts_TLWE.transpose(0, 1, 3, 2).reshape(-1, W)
    out = np.stack([rng.multinomial(n, [1.0 / k] * k) for n in flat.reshape(-1)])
    return out.reshape(T, L, E, W * k).transpose(0, 1, 3, 2).copy()


def simulate_planner(
    planner: Planner,
    counts_TLWE: np.ndarray,
    cost: CostModel,
    slots_per_rank: int | None = None,
    policy: ReplanPolicy | None = None,
    on_step: Callable[[int, list[PlacementTable], np.ndarray], None] | None = None,
    perfect_prediction: bool = False,
) -> SimResult:
    """Replay ``counts_TLWE`` under ``planner`` run by ``policy`` (default ``ReplanPolicy()``).

    ``on_step(t, tables_L, counts_LWE)``, if given, sees each step's tables (after that step's
    re-plan) and true counts before the step is charged: e.g. to time the plan on real kernels.
    ``perfect_prediction``: each plan is made on the true counts of the ``interval`` steps it will
    be kept (``Replanner.plan(future_NLWE=...)``): what is left of the gap to the oracle is search
    and cadence, not prediction.
    """
    T, L, W, E = counts_TLWE.shape
    tables = [PlacementTable.static(E, W, slots_per_rank) for _ in range(L)]
    policy = policy or ReplanPolicy()
    replanner = Replanner(policy, planner, L)
    balance_TL = np.ones((T, L))
    terms_T4 = np.zeros((T, 4))
    layer_TL = np.zeros((T, L))
    bytes_moved, replans, share_updates = 0.0, 0, 0
    for t in range(T):
        true_LWE = counts_TLWE[t]
        if replanner.due():
            future = counts_TLWE[t: t + policy.interval] if perfect_prediction else None
            for layer, p in enumerate(replanner.plan(tables, cost, true_LWE, future)):
                old, new = tables[layer], p.table
                if new is old:
                    continue
                if np.array_equal(new.slot_expert_WS, old.slot_expert_WS):
                    share_updates += 1
                else:
                    replans += 1
                    bytes_moved += p.bytes_moved
                    move = cost.move_time(old, new)
                    terms_T4[t, 3] += move
                    layer_TL[t, layer] += move
                tables[layer] = new
        if on_step is not None:
            on_step(t, list(tables), true_LWE)
        for layer in range(L):
            step = cost.step_time(tables[layer], true_LWE[layer])
            terms_T4[t, :3] += (step.compute, step.a2a, step.sync)
            layer_TL[t, layer] += step.total
            load_W = rank_loads(tables[layer], true_LWE[layer].sum(0), cost.adaptive_split)
            balance_TL[t, layer] = load_W.max() / load_W.mean() if load_W.sum() > 0 else 1.0
        replanner.observe(true_LWE)
    name = planner.name + (" (perfect prediction)" if perfect_prediction else "")
    return SimResult(name, balance_TL, terms_T4.sum(1), *terms_T4.T, bytes_moved, replans, share_updates,
                     layer_TL)


def simulate(
    trace: RoutingTrace,
    planners: list[Planner],
    cost: CostModel,
    world_size: int | None = None,
    slots_per_rank: int | None = None,
    policy: ReplanPolicy | None = None,
    on_step: Callable[[str, int, list[PlacementTable], np.ndarray], None] | None = None,
    perfect_prediction: bool = False,
) -> list[SimResult]:
    """One ``SimResult`` per planner, in order. ``world_size`` below the trace's merges neighbouring
    ranks; above it (a multiple), ``split_ranks`` deals each rank's tokens out to several.
    ``on_step(planner_name, t, tables_L, counts_LWE)`` and ``perfect_prediction``: as in
    ``simulate_planner``."""
    counts = trace.counts_TLWE
    if world_size is not None and world_size < trace.world_size:
        counts = merge_ranks(counts, world_size)
    elif world_size is not None and world_size > trace.world_size:
        counts = split_ranks(counts, world_size)
    def hook(p: Planner):
        return None if on_step is None else (lambda t, tables, c: on_step(p.name, t, tables, c))

    return [simulate_planner(p, counts, cost, slots_per_rank, policy, hook(p), perfect_prediction) for p in planners]


def format_table(results: list[SimResult], baseline: str = "static") -> str:
    """A Markdown table; ``vs static`` = baseline mean step time / this planner's; rank balance =
    max / mean token load over ranks."""
    rows = [r.summary() for r in results]
    base = next((r["step_ms"] for r in rows if r["planner"] == baseline), None)
    head = ("| planner | rank balance mean | rank balance p99 | step ms | compute | a2a | sync | move "
            f"| vs {baseline} | GB moved | re-plans | share updates |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        speedup = f"{base / r['step_ms']:.2f}x" if base else "-"
        lines.append(
            f"| {r['planner']} | {r['balance_mean']:.3f} | {r['balance_p99']:.3f} | {r['step_ms']:.3f} "
            f"| {r['compute_ms']:.3f} | {r['a2a_ms']:.3f} | {r['sync_ms']:.3f} | {r['move_ms']:.3f} "
            f"| {speedup} | {r['bytes_moved'] / 1e9:.2f} | {r['replans']} | {r['share_updates']} |"
        )
    return "\n".join(lines)


def plot_results(results: list[SimResult], path: str, title: str = "") -> None:
    """PNG: balance ratio (mean over layers) and modelled step time over steps, per planner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_t) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for r in results:
        ax_b.plot(r.balance_TL.mean(1), label=r.name, linewidth=1)
        ax_t.plot(r.time_T * 1e3, label=r.name, linewidth=1)
    ax_b.set_ylabel("balance ratio (max / mean rank load)")
    ax_t.set_ylabel("modelled step time (ms)")
    ax_t.set_xlabel("step")
    ax_b.legend(ncol=3, fontsize=8)
    ax_b.grid(alpha=0.3)
    ax_t.grid(alpha=0.3)
    if title:
        ax_b.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
