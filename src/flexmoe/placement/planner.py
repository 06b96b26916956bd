"""Placement planners: given a table and predicted routing counts, return the next table.

Legend: E logical experts, W ranks, S slots per rank.

Every planner has one interface, ``plan(table, counts_WE, cost, step) -> PlacementTable``: it
returns ``table`` itself when nothing changes, else a new table with ``version + 1``. Plans are
pure functions of their inputs (stable sorts, ties broken by index), so ranks that hold the same
all-gathered counts compute the same plan without talking. ``counts_WE`` is what the planner
should balance for: a prediction (``LoadPredictor``) or, for the oracle, the true counts.

Planners: static EP, FasterMoE-style shadowing, DeepSeek EPLB, per-step proportional replication
(SYMI-like), flexmoe greedy, and the oracle (greedy on the true counts of the step).
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from .cost_model import CostModel
from .predict import LoadPredictor
from .split import balance_ratio, replica_quotas
from .table import EMPTY, PlacementTable


# ---- building blocks shared by the planners ----------------------------------------------------


def _as_counts(table: PlacementTable, counts_WE: np.ndarray) -> np.ndarray:
    counts_WE = np.asarray(counts_WE, dtype=np.float64)
    if counts_WE.shape != (table.world_size, table.num_experts):
        raise ValueError(f"counts_WE must have shape {(table.world_size, table.num_experts)}, got {counts_WE.shape}")
    if not np.isfinite(counts_WE).all() or (counts_WE < 0).any():
        raise ValueError("counts_WE must be finite and >= 0")
    return np.rint(counts_WE)


def _finish(table: PlacementTable, slot_expert_WS: np.ndarray, share_WS: np.ndarray) -> PlacementTable:
    """``table`` when nothing changed, else the new table with version + 1."""
    if np.array_equal(slot_expert_WS, table.slot_expert_WS) and np.allclose(share_WS, table.share_WS, atol=1e-12):
        return table
    return PlacementTable(table.num_experts, slot_expert_WS, share_WS, table.version + 1)


def replicate_greedy(load_E: np.ndarray, num_replicas: int, max_per_expert: int) -> np.ndarray:
    """One replica each, then each further one to argmax load / replicas (lowest index on ties)."""
    E = load_E.size
    reps_E = np.ones(E, dtype=np.int64)
    for _ in range(num_replicas - E):
        per = np.where(reps_E < max_per_expert, load_E / reps_E, -1.0)
        e = int(np.argmax(per))
        if per[e] < 0:
            break
        reps_E[e] += 1
    return reps_E


def proportional_replicas(load_E: np.ndarray, world_size: int, slots_per_rank: int) -> np.ndarray:
    """Replicas in proportion to load over all ``W * S`` slots: largest remainder, at least one and
    at most ``W`` each (needs ``load_E.sum() > 0``)."""
    W, S = world_size, slots_per_rank
    quota_E = load_E / load_E.sum() * (W * S)
    reps_E = np.clip(np.floor(quota_E), 1, W).astype(np.int64)
    while reps_E.sum() > W * S:
        over_E = np.where(reps_E > 1, quota_E - reps_E, np.inf)
        reps_E[int(np.argmin(over_E))] -= 1
    while reps_E.sum() < W * S and (reps_E < W).any():
        under_E = np.where(reps_E < W, quota_E - reps_E, -np.inf)
        reps_E[int(np.argmax(under_E))] += 1
    return reps_E


def source_affinity(src_WE: np.ndarray, ranks_per_node: int | None = None) -> np.ndarray:
    """Tokens of each expert a replica on rank r would find close by: its own rank's, plus (with
    several nodes) its node's, so the node sending most wins first and then the rank within it."""
    src_WE = np.asarray(src_WE, dtype=np.float64)
    W = src_WE.shape[0]
    if ranks_per_node is None or ranks_per_node >= W:
        return src_WE
    node_W = np.arange(W) // ranks_per_node
    node_NE = np.stack([src_WE[node_W == n].sum(0) for n in range(node_W[-1] + 1)])
    return src_WE + node_NE[node_W]


def pack(
    reps_E: np.ndarray,
    load_E: np.ndarray,
    world_size: int,
    slots_per_rank: int,
    keep: PlacementTable | None = None,
    affinity_WE: np.ndarray | None = None,
) -> np.ndarray:
    """Place ``reps_E[e]`` replicas of every expert; returns ``slot_expert_WS``.

    With ``keep``, each expert keeps up to ``reps_E[e]`` of its current locations: first the
    experts that keep them all, then the shrinking ones (heaviest per replica first), preferring
    the ranks with most affinity (tokens sent from there), then the least loaded so far, then
    the lowest rank: a replica being dropped is the one that serves
    fewest local tokens, not the highest-numbered one (which drifted experts to low ranks).
    The other replicas go heaviest first (load / replicas) onto a rank with a free slot and no
    replica of that expert yet, into its lowest free slot: the least loaded one, or with
    ``affinity_WE`` the one minimising load minus the tokens that would stay local.
    A replica that fits nowhere is dropped (never an expert's first one, since slots suffice).
    """
    W, S = world_size, slots_per_rank
    E = reps_E.size
    if reps_E.sum() > W * S:
        raise ValueError(f"{int(reps_E.sum())} replicas do not fit in {W} x {S} slots")
    slot = [[EMPTY] * S for _ in range(W)]
    held = [set() for _ in range(W)]
    rank_load = [0.0] * W
    per_E = (load_E / reps_E).tolist()
    aff_WE = np.zeros((W, E)) if affinity_WE is None else np.asarray(affinity_WE, dtype=np.float64)
    placed_E = [0] * E
    if keep is not None:
        where = [[] for _ in range(E)]
        for r, s in zip(*np.nonzero(keep.slot_expert_WS >= 0)):
            where[int(keep.slot_expert_WS[r, s])].append((int(r), int(s)))
        shrinking = lambda e: len(where[e]) > reps_E[e]
        for e in sorted(range(E), key=lambda e: (shrinking(e), -per_E[e], e)):
            spots = sorted(where[e], key=lambda rs: (-aff_WE[rs[0], e], rank_load[rs[0]], rs[0], rs[1]))
            for r, s in spots[: int(reps_E[e])]:
                slot[r][s] = e
                held[r].add(e)
                rank_load[r] += per_E[e]
                placed_E[e] += 1
    items = sorted((-per_E[e], e) for e in range(E) for _ in range(int(reps_E[e]) - placed_E[e]))
    free = [row.count(EMPTY) for row in slot]
    for _, e in items:
        best, best_key = None, None
        for r in range(W):
            if free[r] and e not in held[r]:
                key = rank_load[r] - (min(aff_WE[r, e], per_E[e]) if affinity_WE is not None else 0.0)
                if best is None or key < best_key:
                    best, best_key = r, key
        if best is None:
            continue
        slot[best][slot[best].index(EMPTY)] = e
        held[best].add(e)
        rank_load[best] += per_E[e]
        free[best] -= 1
    return np.array(slot, dtype=np.int64)


def equal_shares(slot_WS: np.ndarray, num_experts: int) -> np.ndarray:
    reps_E = np.bincount(slot_WS[slot_WS >= 0], minlength=num_experts)
    return np.where(slot_WS >= 0, 1.0 / np.maximum(reps_E[np.maximum(slot_WS, 0)], 1), 0.0)


def _water_fill(base: list[float], amount: float) -> list[float]:
    """Split ``amount`` over bins with levels ``base`` so the lowest bins rise to one common level."""
    order = sorted(range(len(base)), key=lambda i: (base[i], i))
    acc, level = 0.0, 0.0
    for k, i in enumerate(order, start=1):
        acc += base[i]
        level = (amount + acc) / k
        if k == len(order) or level <= base[order[k]]:
            break
    return [max(level - b, 0.0) for b in base]


def balanced_shares(slot_WS: np.ndarray, load_E: np.ndarray, sweeps: int = 8) -> np.ndarray:
    """Shares that even out rank loads for a fixed placement (block coordinate descent).

    Starting from equal shares, each sweep re-splits every replicated expert's load over its
    replicas by water-filling against the rest of each replica rank's load, heaviest expert first.
    """
    E = load_E.size
    share_WS = equal_shares(slot_WS, E)
    reps = [[] for _ in range(E)]
    for r, s in zip(*np.nonzero(slot_WS >= 0)):
        reps[slot_WS[r, s]].append((int(r), int(s)))
    multi = sorted((e for e in range(E) if len(reps[e]) > 1 and load_E[e] > 0), key=lambda e: (-load_E[e], e))
    if not multi:
        return share_WS
    rank_load = (np.where(slot_WS >= 0, load_E[np.maximum(slot_WS, 0)], 0.0) * share_WS).sum(1).tolist()
    amounts = {e: [load_E[e] * share_WS[r, s] for r, s in reps[e]] for e in multi}
    for _ in range(sweeps):
        change = 0.0
        for e in multi:
            base = [rank_load[r] - a for (r, _), a in zip(reps[e], amounts[e])]
            new = _water_fill(base, float(load_E[e]))
            for (r, _), b, a in zip(reps[e], base, new):
                rank_load[r] = b + a
            change = max(change, max(abs(a - b) for a, b in zip(new, amounts[e])))
            amounts[e] = new
        if change <= 1e-9 * max(float(load_E.max()), 1.0):
            break
    for e in multi:
        for (r, s), a in zip(reps[e], amounts[e]):
            share_WS[r, s] = a / load_E[e]
    return _normalise(slot_WS, share_WS, E)


def _rank_loads(slot_WS: np.ndarray, share_WS: np.ndarray, load_E: np.ndarray) -> np.ndarray:
    return (np.where(slot_WS >= 0, load_E[np.maximum(slot_WS, 0)], 0.0) * share_WS).sum(1)


def _neighbours(slot_WS: np.ndarray, load_W: np.ndarray, partners: int):
    """Slot tables one step from ``slot_WS``: a replica of the busiest rank moved to a free slot
    of, or swapped with a replica of, one of the ``partners`` least loaded ranks (never putting
    two replicas of one expert on one rank)."""
    order = np.argsort(load_W, kind="stable")
    hot = int(order[-1])
    for cold in (int(r) for r in order[:partners] if r != hot):
        for s in range(slot_WS.shape[1]):
            e = int(slot_WS[hot, s])
            if e < 0:
                continue
            for t in range(slot_WS.shape[1]):
                f = int(slot_WS[cold, t])
                if f == e or e in slot_WS[cold] or (f >= 0 and f in slot_WS[hot]):
                    continue
                out = slot_WS.copy()
                out[hot, s], out[cold, t] = f, e
                yield out
                if f < 0:
                    break  # one free slot of a rank is as good as another


def refine(table: PlacementTable, load_E: np.ndarray, score, rounds: int, partners: int = 2):
    """Local search after a greedy packing: while ``score`` (lower is better) improves, for up to
    ``rounds`` rounds, take the best single-slot move or swap between the busiest rank and the
    ``partners`` least loaded ones, shares re-balanced. Returns (table, its score)."""
    best, best_score = table, score(table)
    for _ in range(rounds):
        load_W = _rank_loads(best.slot_expert_WS, best.share_WS, load_E)
        step, step_score = None, best_score
        for slot_WS in _neighbours(best.slot_expert_WS, load_W, partners):
            cand = PlacementTable(table.num_experts, slot_WS, balanced_shares(slot_WS, load_E))
            s = score(cand)
            if s < step_score:
                step, step_score = cand, s
        if step is None:
            break
        best, best_score = step, step_score
    return best, best_score


def on_static_base(table: PlacementTable) -> bool:
    """Every slot that static EP fills holds the same expert here (only spare slots differ)."""
    home_WS = table.static_like().slot_expert_WS
    return bool(np.array_equal(table.slot_expert_WS[home_WS >= 0], home_WS[home_WS >= 0]))


def _with_spares(static: PlacementTable, spare_WS: np.ndarray) -> PlacementTable:
    """Static EP plus the replicas ``spare_WS`` (-1: empty) in its empty slots, with share 0: the
    fixed-share split is static EP's, so the adaptive split starts from it (``split``)."""
    slot_WS = np.where(static.slot_expert_WS >= 0, static.slot_expert_WS, spare_WS)
    return PlacementTable(static.num_experts, slot_WS, static.share_WS.copy())


def spare_search(table: PlacementTable, counts_WE: np.ndarray, score, adaptive: bool = True,
                 experts: int = 3, targets: int = 2):
    """Static EP's layout plus replicas of hot experts in its spare slots, by local search.

    Starts from ``table``'s spare replicas when it is on the static base (else none); each round
    takes the best-scoring (lower is better) of: dropping one spare replica, or adding a replica of
    one of the ``experts`` heaviest experts on the busiest rank (under the split, adaptive or not)
    to one of the ``targets`` least loaded ranks with a free spare slot, or the rank sending it
    most tokens; stops when nothing improves. Moves only fill spare slots, so the way back to
    static EP moves nothing; with the adaptive split no step's busiest rank gets more tokens than
    under static EP. Returns [(table, score)] when it found a table other than static EP, else [].
    """
    static = table.static_like()
    spare_mask_WS = static.slot_expert_WS < 0
    if not spare_mask_WS.any():
        return []
    load_E = counts_WE.sum(0)
    spare_WS = np.where(spare_mask_WS & on_static_base(table), table.slot_expert_WS, EMPTY)
    cur = _with_spares(static, spare_WS)
    cur_score = score(cur)
    for _ in range(2 * int(spare_mask_WS.sum())):
        options = []
        for f in np.flatnonzero(spare_WS >= 0):  # drop one spare replica
            out = spare_WS.copy()
            out.flat[f] = EMPTY
            options.append(out)
        quota_WS = replica_quotas(cur, load_E, adaptive)
        load_W = quota_WS.sum(1)
        hot = int(np.argmax(load_W))
        on_hot = [(int(-quota_WS[hot, s]), int(cur.slot_expert_WS[hot, s])) for s in range(cur.slots_per_rank)
                  if cur.slot_expert_WS[hot, s] >= 0 and quota_WS[hot, s] > 0]
        free_WS = spare_mask_WS & (spare_WS == EMPTY)
        for _, e in sorted(on_hot)[:experts]:
            ok_W = free_WS.any(1) & ~(cur.slot_expert_WS == e).any(1)
            ranks = [int(r) for r in np.argsort(load_W, kind="stable") if ok_W[r]][:targets]
            src = int(np.argmax(np.where(ok_W, counts_WE[:, e], -1)))
            if ok_W[src] and src not in ranks:
                ranks.append(src)
            for r in ranks:
                out = spare_WS.copy()
                out[r, int(np.argmax(free_WS[r]))] = e
                options.append(out)
        best, best_score = None, cur_score
        for out in options:
            cand = _with_spares(static, out)
            s = score(cand)
            if s < best_score:
                best, best_score = (out, cand), s
        if best is None:
            break
        (spare_WS, cur), cur_score = best, best_score
    return [] if (spare_WS == EMPTY).all() else [(cur, cur_score)]


def _normalise(slot_WS: np.ndarray, share_WS: np.ndarray, num_experts: int) -> np.ndarray:
    valid = slot_WS >= 0
    total_E = np.bincount(slot_WS[valid], weights=share_WS[valid], minlength=num_experts)
    return np.where(valid, share_WS / total_E[np.maximum(slot_WS, 0)], 0.0)


# ---- planners ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What the caller (the re-plan policy) knows about a plan beyond the counts.

    horizon: steps the new table will be kept (the re-plan interval): a move is amortised over it.
    margin: extra relative gain a change must show over keeping the table (the hysteresis guard).
    max_move_bytes: network bytes the plan may move (None: no limit; the policy's budget share).
    window_NWE: counts of recent observed steps (None: none). A planner that uses it scores its
        candidates by their mean modelled time over these steps (a sample-average plan) rather
        than on the one prediction, so one noisy step does not decide the plan.
    noise_z: with ``window_NWE``, a change must beat keeping the table by ``noise_z`` standard
        errors of its per-step gain over the window (its own spread), on top of ``margin``.
    """

    horizon: float = 1.0
    margin: float = 0.0
    max_move_bytes: float | None = None
    window_NWE: np.ndarray | None = None
    noise_z: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.horizon) and self.horizon > 0):
            raise ValueError(f"PlanContext.horizon must be finite and > 0, got {self.horizon}")
        if not (np.isfinite(self.margin) and 0 <= self.margin < 1):
            raise ValueError(f"PlanContext.margin must be in [0, 1), got {self.margin}")
        if self.max_move_bytes is not None and not self.max_move_bytes >= 0:
            raise ValueError(f"PlanContext.max_move_bytes must be None or >= 0, got {self.max_move_bytes}")
        if self.window_NWE is not None:
            w = np.asarray(self.window_NWE, dtype=np.float64)
            if w.ndim != 3 or w.shape[0] < 1 or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError("PlanContext.window_NWE must be None or finite counts >= 0 of shape (N >= 1, W, E)")
            object.__setattr__(self, "window_NWE", np.rint(w))
        if not (np.isfinite(self.noise_z) and self.noise_z >= 0):
            raise ValueError(f"PlanContext.noise_z must be finite and >= 0, got {self.noise_z}")


class Planner(abc.ABC):
    """Base: ``plan`` returns the next table; ``make_predictor`` the load predictor it wants.

    ``uses_true_counts``: the simulator feeds this planner the step's true counts (oracle only).
    """

    name = "planner"
    uses_true_counts = False
    predictor_decay = 0.0

    @abc.abstractmethod
    def plan(
        self, table: PlacementTable, counts_WE: np.ndarray, cost: CostModel, step: int = 0,
        context: PlanContext | None = None,
    ) -> PlacementTable:
        """The table for the next steps: ``table`` itself when nothing changes, else version + 1."""

    def make_predictor(self):
        return LoadPredictor(self.predictor_decay)


class StaticPlanner(Planner):
    """Plain expert parallelism: the table never changes."""

    name = "static"

    def plan(self, table, counts_WE, cost, step=0, context=None):
        _as_counts(table, counts_WE)
        return table


@dataclasses.dataclass
class ShadowingPlanner(Planner):
    """FasterMoE shadowing: broadcast the hottest experts to every rank while modelled time drops.

    Experts keep their static home slot; a shadowed expert also sits on every other rank and each
    rank processes its own tokens for it (shares = each source rank's fraction). Re-decided every
    step from the prediction, limited by the spare slots of the fullest rank.
    """

    name = "shadow"
    predictor_decay: float = 0.0

    def plan(self, table, counts_WE, cost, step=0, context=None):
        counts_WE = _as_counts(table, counts_WE)
        W, S, E = table.world_size, table.slots_per_rank, table.num_experts
        home = PlacementTable.static(E, W, S)
        load_E = counts_WE.sum(0)
        max_shadow = int((home.slot_expert_WS == EMPTY).sum(1).min())
        best_slot, best_share = home.slot_expert_WS, home.share_WS
        best_cost = cost.step_time(home, counts_WE).total
        slot_WS, share_WS = best_slot.copy(), best_share.copy()
        for e in np.argsort(-load_E, kind="stable")[:max_shadow]:
            if load_E[e] <= 0:
                break
            slot_WS, share_WS = slot_WS.copy(), share_WS.copy()
            home_rank = int(np.nonzero((home.slot_expert_WS == e).any(1))[0][0])
            frac_W = counts_WE[:, e] / load_E[e]
            for r in range(W):
                if r == home_rank:
                    s = int(np.argmax(home.slot_expert_WS[r] == e))
                else:
                    s = int(np.argmax(slot_WS[r] == EMPTY))
                    slot_WS[r, s] = e
                share_WS[r, s] = frac_W[r]
            share_WS = _normalise(slot_WS, share_WS, E)
            candidate = PlacementTable(E, slot_WS, share_WS)
            c = cost.step_time(candidate, counts_WE).total
            if c >= best_cost:
                break
            best_slot, best_share, best_cost = slot_WS, share_WS, c
        return _finish(table, best_slot, best_share)


@dataclasses.dataclass
class EPLBPlanner(Planner):
    """DeepSeek EPLB: fill all slots by giving one more replica to argmax load / replicas, then pack
    heaviest first onto the least loaded rank; equal shares. Plans at the first call (a version-0
    table) and then at every step that is a multiple of ``period``."""

    name = "eplb"
    period: int = 100
    predictor_decay: float = 0.95

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"period must be >= 1, got {self.period}")

    def plan(self, table, counts_WE, cost, step=0, context=None):
        counts_WE = _as_counts(table, counts_WE)
        if step % self.period != 0 and table.version > 0:
            return table
        W, S = table.world_size, table.slots_per_rank
        load_E = counts_WE.sum(0)
        reps_E = replicate_greedy(load_E, W * S, W)
        slot_WS = pack(reps_E, load_E, W, S)
        return _finish(table, slot_WS, equal_shares(slot_WS, table.num_experts))


@dataclasses.dataclass
class ProportionalPlanner(Planner):
    """Per-step proportional replication (SYMI-like): every step, replicas in proportion to the
    predicted load (largest remainder, at least one each, all slots used), fresh packing, equal shares."""

    name = "proportional"
    predictor_decay: float = 0.0

    def plan(self, table, counts_WE, cost, step=0, context=None):
        counts_WE = _as_counts(table, counts_WE)
        W, S, E = table.world_size, table.slots_per_rank, table.num_experts
        load_E = counts_WE.sum(0)
        if load_E.sum() <= 0:
            return table
        reps_E = proportional_replicas(load_E, W, S)
        slot_WS = pack(reps_E, load_E, W, S)
        return _finish(table, slot_WS, equal_shares(slot_WS, E))


def _amortised(cost: CostModel, old: PlacementTable, counts_WE: np.ndarray, horizon: float, return_weight: float,
               limit: float | None = None):
    """Score of a candidate table: modelled step time + its move time amortised over ``horizon``
    (infinite past ``limit`` bytes moved: such a candidate never wins).

    With ``return_weight`` w, a move is also charged w times the change in the cost of moving
    back to static EP (``move_time(table, static)``); with w = 1 and horizon 1 the charges
    telescope, so a planner that always has static as a candidate never loses to static over a
    whole trace (the oracle's guarantee).
    """
    static = old.static_like()
    back_old = cost.move_time(old, static) if return_weight else 0.0

    def score(cand: PlacementTable) -> float:
        if limit is not None and cost.move_bytes_total(old, cand) > limit:
            return np.inf
        move = cost.move_time(old, cand)
        if return_weight:
            move += return_weight * (cost.move_time(cand, static) - back_old)
        return cost.step_time(cand, counts_WE).total + move / horizon

    return static, score


@dataclasses.dataclass
class GreedyPlanner(Planner):
    """flexmoe greedy planner: the best of keeping the table, static EP, a share update and a
    greedy replica search, scored by modelled step time + amortised move time.

    Candidates (all scored on the predicted counts, moves amortised over the horizon the table is
    kept: ``horizon``, or None for the caller's ``PlanContext.horizon``, i.e. the re-plan interval):

    - the current table (always; its score is its step time, nothing moves);
    - static expert parallelism (always);
    - when the predicted balance ratio exceeds ``rebalance_threshold`` (None: the lower of 1.02 and
      ``threshold``): the current replicas with balanced shares (water-filling; nothing moves);
    - when that still exceeds ``threshold``: replicas in proportion to load over all slots, and
      from one replica per expert one more replica at a time to argmax load / replicas (at most
      one per rank), each packed four ways (keeping current locations or fresh; least loaded rank
      or where the expert's tokens come from), shares balanced. The search stops after ``patience`` replicas without improvement (None:
      ``world_size``). Cold experts fall back to one replica, freeing slots for hot ones. With
      ``refine_rounds`` > 0 the search's best is refined (``refine``: up to that many moves or
      swaps of single slots off the busiest rank); off by default: on the CPU aux 0.01 trace it
      did not gain (1.025x vs 1.026x static) at about 7x the planning time;
    - with ``spare_replicas`` and the same balance condition as the share update: static EP plus
      replicas of hot experts in its spare slots (``spare_search``); with the adaptive split such
      a table never gives a step's busiest rank more tokens than static EP, and moving back to
      static EP moves nothing.

    The best candidate replaces the table if its score beats keeping it by a relative
    ``min_gain`` (0 for a change that moves nothing) plus the caller's ``margin`` (hysteresis),
    and it moves at most ``context.max_move_bytes``. So the chosen table's score is never above
    the current table's step time. ``return_weight``: see ``_amortised``.

    With ``context.window_NWE`` (recent observed steps), the candidates planned for the window's
    mean counts join (``window_candidates``), and the choice is the largest mean gain over keeping
    the table across the window whose gain less ``context.noise_z`` standard errors clears the
    margin (``_pick_on_window``). Static EP never needs the hysteresis margin.
    """

    name = "greedy"
    threshold: float = 1.1
    rebalance_threshold: float | None = None
    horizon: float | None = None
    min_gain: float = 0.01
    patience: int | None = None
    predictor_decay: float = 0.0
    return_weight: float = 0.0
    window_candidates: bool = True
    refine_rounds: int = 0
    spare_replicas: bool = True

    def __post_init__(self):
        if isinstance(self.refine_rounds, bool) or not isinstance(self.refine_rounds, int) or self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be an int >= 0, got {self.refine_rounds!r}")
        if not self.threshold >= 1.0:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if self.rebalance_threshold is None:
            self.rebalance_threshold = min(1.02, self.threshold)
        if not 1.0 <= self.rebalance_threshold <= self.threshold:
            raise ValueError(f"need 1 <= rebalance_threshold <= threshold, got {self.rebalance_threshold}, {self.threshold}")
        if self.horizon is not None and not self.horizon > 0:
            raise ValueError(f"horizon must be None or > 0, got {self.horizon}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience}")
        if not 0.0 <= self.predictor_decay < 1.0:
            raise ValueError(f"predictor_decay must be in [0, 1), got {self.predictor_decay}")
        if not 0.0 <= self.return_weight <= 1.0:
            raise ValueError(f"return_weight must be in [0, 1], got {self.return_weight}")

    def plan(self, table, counts_WE, cost, step=0, context=None):
        context = context or PlanContext()
        counts_WE = _as_counts(table, counts_WE)
        window_NWE = context.window_NWE
        if window_NWE is not None and window_NWE.shape[1:] != counts_WE.shape:
            raise ValueError(f"PlanContext.window_NWE must have shape (N, {counts_WE.shape[0]}, {counts_WE.shape[1]}), "
                             f"got {window_NWE.shape}")
        horizon = self.horizon or context.horizon
        static, score = _amortised(cost, table, counts_WE, horizon, self.return_weight, context.max_move_bytes)
        candidates = [(static, score(static))] + self._candidates(table, counts_WE, score, cost)
        if window_NWE is not None:
            return self._pick_on_window(table, candidates, window_NWE, cost, horizon, context)
        keep_time = cost.step_time(table, counts_WE).total
        best, best_score = table, keep_time
        for cand, s in candidates:
            moved = cost.move_bytes_total(table, cand)
            need = (context.margin if cand is not static else 0.0) + (self.min_gain if moved > 0 else 0.0)
            if s < best_score and s < keep_time * (1.0 - need):
                best, best_score = cand, s
        return _finish(table, best.slot_expert_WS, best.share_WS)

    def _candidates(self, table, counts_WE, score, cost) -> list:
        """Share update and replica search for ``counts_WE`` (when its balance calls for them)."""
        load_E = counts_WE.sum(0)
        if balance_ratio(table, load_E, cost.adaptive_split) <= self.rebalance_threshold:
            return []
        shares = balanced_shares(table.slot_expert_WS, load_E)
        rebalanced = PlacementTable(table.num_experts, table.slot_expert_WS, shares)
        out = [(rebalanced, score(rebalanced))]
        if self.spare_replicas:
            out += spare_search(table, counts_WE, score, cost.adaptive_split)
        if balance_ratio(rebalanced, load_E, cost.adaptive_split) > self.threshold:
            out += self._search(table, counts_WE, load_E, score, cost.ranks_per_node)
        return out

    def _pick_on_window(self, table, candidates, window_NWE, cost, horizon, context) -> PlacementTable:
        """Sample-average choice: the candidate with the largest mean gain over keeping the table on
        the window's steps (move amortised over ``horizon``) among those whose gain, less
        ``noise_z`` standard errors of it, beats ``margin`` (+ ``min_gain`` for a move)."""
        def times(cand) -> np.ndarray:
            return np.array([cost.step_time(cand, c_WE).total for c_WE in window_NWE])

        keep_N = times(table)
        N = keep_N.size
        limit = context.max_move_bytes
        static = table.static_like()
        back = cost.move_time(table, static) if self.return_weight else 0.0
        best, best_gain, seen = table, 0.0, set()
        from_window = self._window_candidates(table, window_NWE, cost, horizon, limit)
        for cand, _ in candidates + [(c, 0.0) for c in from_window]:
            key = (cand.slot_expert_WS.tobytes(), np.round(cand.share_WS, 12).tobytes())
            if key in seen:
                continue
            seen.add(key)
            moved = cost.move_bytes_total(table, cand)
            if limit is not None and moved > limit:
                continue
            move = cost.move_time(table, cand)
            if self.return_weight:
                move += self.return_weight * (cost.move_time(cand, static) - back)
            gain_N = keep_N - times(cand) - move / horizon
            spread = gain_N.std(ddof=1) / np.sqrt(N) if N > 1 else 0.0
            margin = 0.0 if cand is candidates[0][0] else context.margin  # static EP needs no hysteresis
            need = (margin + (self.min_gain if moved > 0 else 0.0)) * keep_N.mean()
            if gain_N.mean() - context.noise_z * spread > need and gain_N.mean() > best_gain:
                best, best_gain = cand, float(gain_N.mean())
        return _finish(table, best.slot_expert_WS, best.share_WS)

    def _window_candidates(self, table, window_NWE, cost, horizon, limit) -> list[PlacementTable]:
        """Candidates planned for the window's mean counts (the sample average), scored like the
        prediction's (the same return weight and bytes limit)."""
        if not self.window_candidates:
            return []
        mean_WE = np.rint(window_NWE.mean(0))
        _, amortised = _amortised(cost, table, mean_WE, horizon, self.return_weight, limit)
        return [c for c, _ in self._candidates(table, mean_WE, amortised, cost)]

    def _search(self, table, counts_WE, load_E, score, ranks_per_node):
        W, S, E = table.world_size, table.slots_per_rank, table.num_experts
        affinity_WE = source_affinity(counts_WE, ranks_per_node)
        kept, best_score = [], np.inf

        def packings(reps_E) -> bool:
            nonlocal best_score
            improved = False
            for keep in (table, None):
                for affinity in (None, affinity_WE):
                    slot_WS = pack(reps_E, load_E, W, S, keep, affinity)
                    cand = PlacementTable(E, slot_WS, balanced_shares(slot_WS, load_E))
                    s = score(cand)
                    if s < best_score:
                        kept.append((cand, s))
                        best_score, improved = s, True
            return improved

        if load_E.sum() > 0:  # every slot used, replicas in proportion to load
            packings(proportional_replicas(load_E, W, S))
        patience = self.patience or W
        reps_E = np.ones(E, dtype=np.int64)
        since_best = 0
        for extra in range(W * S - E + 1):
            if extra > 0:
                per_E = np.where(reps_E < W, load_E / reps_E, -1.0)
                e = int(np.argmax(per_E))
                if per_E[e] <= 0:
                    break
                reps_E[e] += 1
            since_best = 0 if packings(reps_E) else since_best + 1
            if since_best >= patience:
                break
        if kept and self.refine_rounds:
            cand, s = refine(kept[-1][0], load_E, score, self.refine_rounds)
            if s < kept[-1][1]:
                kept.append((cand, s))
        return kept


@dataclasses.dataclass
class OraclePlanner(GreedyPlanner):
    """The greedy planner run before every step on the true counts of that step: a reference with
    perfect knowledge of the step, not a policy (and, being greedy and myopic, not a strict lower
    bound). A plan lives one step (horizon 1); each move is also charged its way back to static
    (``return_weight`` 1) and any gain is taken (``min_gain`` 0), so over a whole trace the oracle's
    modelled time is never above static EP's.
    """

    name = "oracle"
    threshold: float = 1.0
    rebalance_threshold: float = 1.0
    horizon: float = 1.0
    min_gain: float = 0.0
    return_weight: float = 1.0
    uses_true_counts = True


PLANNERS = {
    "static": StaticPlanner,
    "shadow": ShadowingPlanner,
    "eplb": EPLBPlanner,
    "proportional": ProportionalPlanner,
    "greedy": GreedyPlanner,
    "oracle": OraclePlanner,
}


def make_planner(name: str, **options) -> Planner:
    """A planner by name (see ``PLANNERS``), with its dataclass options."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose from {sorted(PLANNERS)}")
    return PLANNERS[name](**options)
