"""Re-plan policy: when to plan, on what prediction, with what guard and bytes budget, for all layers.

Legend: L layers with a placement table, W ranks, E experts.

``ReplanPolicy`` is the configuration; ``Replanner`` runs it: feed it every step's all-gathered
counts (``observe``), ask ``due()`` after each step, and ``plan(tables, cost)`` when it is. Pure
numpy, so the simulator and the runtime scheduler run the same object and, on the same counts,
make the same plans.

Cadence (the scheduler's): after ``n`` observed steps a plan is due when ``n >= max(warmup, 1)``
and ``(n - warmup) % interval == 0``; the new tables apply from step ``n`` (0-based) on. A plan
is kept ``interval`` steps, so moves are amortised over ``interval`` steps.

Guard (hysteresis), per layer, judged on the steps observed since the last plan (each step's
true counts, through the cost model):

- the previous change is replayed: if, net of its move time, it did worse than keeping the table
  it replaced, that is a miss. After ``m`` consecutive misses a change must beat keeping the
  current table by an extra ``guard_gain * (2^m - 1)`` (relative); a planner's change that paid
  resets it (the guard's return to static does not: that it paid says the planner's table did not).
- the layer's modelled time so far (tables used plus moves) is compared with what static EP
  would have cost on the same steps: when it is behind, the layer goes back to static EP (a
  miss too), so a layer where planning does not pay loses at most a few excursions.
- backtest: a change (the planner's, or the return to static) is made only if it would have paid
  for its move (amortised over the interval) on those same steps, had it been made a plan ago.

Window (``score_window``): the last observed steps go to the planner (``PlanContext.window_NWE``),
which scores its candidates by their mean over them and needs ``noise_z`` standard errors of gain.

Trust (``trust``, with the guard), out of sample: every proposal of the planner, made or not, is
replayed on the steps after it, and each plan also runs a holdout (plan from the first half of
the window, replay on the second); a change other than the return to static EP is made only while
the mean relative gain of the last ``trust`` of these results is > 0.

Drift gate (``drift_gate``, with a window; off by default): routing that moves fast makes a table
planned on the window stale before its move is repaid. The window of the previous plan lies one
interval before the current one, as far back as the interval the new table will serve lies ahead:
a change other than the return to static EP is made only if, on that earlier window, the new table
beats static EP (relative gain, its move amortised over the interval) by more than ``drift_gate``.
Static EP is the reference, not the current table, which was fitted to that window. Where the
skew persists the new table wins there too; where routing drifts it does not. The first plan has
no earlier window: no change is made.

Shed (``shed_window``, with the guard and ``trust``): between plans, after every observed step, a
layer that holds replicas, and where the planner's out-of-sample record (trust) is not positive,
drops those that did not pay on the last ``shed_window`` observed steps of the scoring window
(their mean modelled time): single copies greedily (an expert's lowest-quota copy, never its
static home), or, for a table on the static base, all of them at once (static EP). Dropping moves
nothing, so a replica that stopped paying costs its gradient sync for a few steps, not for the
rest of the interval. ``due()`` is then also true on those steps while replicas are held, and
``plan()`` off the cadence sheds. A layer whose record is positive (the planner's tables pay
there) never sheds: its plans are those of the policy without shedding. The guard counts the time
of every step under the table it ran with.

Budget: when the layers' plans together move more than ``bytes_budget`` network bytes, layers keep
their plans in order of modelled gain per byte while the budget lasts; the others re-plan under
what is left (a share-only update always fits).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from collections.abc import Sequence

import numpy as np

from .cost_model import CostModel
from .edits import shrink_replica
from .planner import PlanContext, Planner, on_static_base
from .predict import LoadPredictor, PredictorConfig
from .split import replica_quotas
from .table import PlacementTable

MAX_MISSES = 6


@dataclasses.dataclass(frozen=True)
class ReplanPolicy:
    """interval: steps between plans (a plan is kept that long). warmup: steps before the first
    plan (None: ``interval``). predictor: the load predictor of every layer (None: the planner's
    own, ``planner.make_predictor()``). guard: judge past plans on the observed steps (misses,
    account against static, backtest; needs a ``CostModel``). guard_gain: hysteresis step.
    bytes_budget: network bytes one plan may move over all layers (None: no limit).
    score_window: the last steps a plan is scored on (``PlanContext.window_NWE``; None: ``interval``,
    0: the prediction alone). noise_z: standard errors of its gain over that window a change must
    clear (``PlanContext.noise_z``). trust: out-of-sample results whose mean gain must be > 0 for a
    change (0: off). drift_gate: the net relative gain over static EP a change must also show on
    the window one interval earlier (module doc; None: off). shed_window: observed steps a
    shed between plans is judged on (module doc; at most the scoring window; with the guard and
    trust > 0; None: no shedding).
    """

    interval: int = 10
    warmup: int | None = None
    predictor: PredictorConfig | None = None
    guard: bool = True
    guard_gain: float = 0.02
    bytes_budget: float | None = None
    score_window: int | None = None
    noise_z: float = 2.0
    trust: int = 3
    drift_gate: float | None = None
    shed_window: int | None = None

    def __post_init__(self) -> None:
        for name, value, low in (("interval", self.interval, 1), ("warmup", self.warmup, 0),
                                 ("score_window", self.score_window, 0), ("trust", self.trust, 0),
                                 ("shed_window", self.shed_window, 1)):
            if value is None and name != "interval":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ReplanPolicy.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.guard, bool):
            raise ValueError(f"ReplanPolicy.guard must be a bool, got {self.guard!r}")
        if self.predictor is not None and not isinstance(self.predictor, PredictorConfig):
            raise ValueError(f"ReplanPolicy.predictor must be None or a PredictorConfig, got {self.predictor!r}")
        if not (np.isfinite(self.guard_gain) and 0 <= self.guard_gain < 1):
            raise ValueError(f"ReplanPolicy.guard_gain must be in [0, 1), got {self.guard_gain}")
        if self.bytes_budget is not None and not self.bytes_budget >= 0:
            raise ValueError(f"ReplanPolicy.bytes_budget must be None or >= 0, got {self.bytes_budget}")
        if isinstance(self.noise_z, bool) or not (np.isfinite(self.noise_z) and self.noise_z >= 0):
            raise ValueError(f"ReplanPolicy.noise_z must be finite and >= 0, got {self.noise_z!r}")
        if self.drift_gate is not None and (isinstance(self.drift_gate, bool) or not isinstance(self.drift_gate, (int, float))
                                            or not (np.isfinite(self.drift_gate) and -1 < self.drift_gate < 1)):
            raise ValueError(f"ReplanPolicy.drift_gate must be None or in (-1, 1), got {self.drift_gate!r}")
        if self.drift_gate is not None and self.score_window == 0:
            raise ValueError("ReplanPolicy.drift_gate needs the scoring window (score_window=0 turns it off)")

    @property
    def sheds(self) -> bool:
        """Whether replicas are shed between plans (``shed_window`` set, with the guard, a window
        and the trust record)."""
        return self.shed_window is not None and self.guard and self.window > 0 and self.trust > 0

    @property
    def window(self) -> int:
        """Steps a plan is scored on (``score_window``, None: ``interval``)."""
        return self.interval if self.score_window is None else self.score_window

    @property
    def first_plan(self) -> int:
        return max(self.interval if self.warmup is None else self.warmup, 1)

    def due(self, steps_done: int) -> bool:
        """Whether a (full) plan is due after ``steps_done`` observed steps."""
        warmup = self.interval if self.warmup is None else self.warmup
        return steps_done >= self.first_plan and (steps_done - warmup) % self.interval == 0


@dataclasses.dataclass
class _Change:
    """A layer's last change, to be judged on the counts that follow it."""

    old: PlacementTable
    new: PlacementTable
    move_time: float
    revert: bool = False  # the guard's return to static EP, not the planner's change


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's outcome of a plan: the new table (``table`` itself when unchanged), the network
    bytes it moves and the guard's margin that applied."""

    table: PlacementTable
    bytes_moved: float
    margin: float


class Replanner:
    """Runs a ``ReplanPolicy`` with one planner over ``num_layers`` layers (see the module doc)."""

    def __init__(self, policy: ReplanPolicy, planner: Planner, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not callable(getattr(planner, "plan", None)):
            raise ValueError(f"Replanner.planner must have a plan(table, counts_WE, cost[, step, context]) method, got {planner!r}")
        self.policy, self.planner, self.num_layers = policy, planner, num_layers
        params = inspect.signature(planner.plan).parameters
        self._takes = ("step" in params, "context" in params)
        make = policy.predictor.make if policy.predictor is not None else getattr(planner, "make_predictor", None)
        self._make = make or (lambda: LoadPredictor(0.0))
        self.predictors = [self._make() for _ in range(num_layers)]
        self.steps_done = 0
        self.misses_L = [0] * num_layers
        self.spent_L = [0.0] * num_layers
        self.static_L = [0.0] * num_layers
        self._recent: list[np.ndarray] = []
        self._window: collections.deque = collections.deque(maxlen=max(policy.window, 1))
        self._changes: list[_Change | None] = [None] * num_layers
        self._proposals: list[_Change | None] = [None] * num_layers
        self.track_L: list[list[float]] = [[] for _ in range(num_layers)]
        self._earlier: np.ndarray | None = None  # the window at the previous plan, (N, L, W, E)
        self._used_L: list[list[float]] = [[] for _ in range(num_layers)]  # each step of _recent, as it ran
        self._replicated_L = [False] * num_layers  # the layer's table of the last plan or shed holds replicas
        # per layer, (table contents, observed step) -> modelled time: the shed's window slides one
        # step at a time, so most of its evaluations repeat (a cache: not saved, same results)
        self._shed_memo: list[dict] = [{} for _ in range(num_layers)]
        self._shed_memo_cost = None

    def observe(self, counts_LWE: np.ndarray) -> None:
        """One step's all-gathered counts of every layer."""
        counts_LWE = np.asarray(counts_LWE, dtype=np.float64)
        if counts_LWE.ndim != 3 or counts_LWE.shape[0] != self.num_layers:
            raise ValueError(f"counts_LWE must have shape ({self.num_layers}, W, E), got {counts_LWE.shape}")
        for predictor, counts_WE in zip(self.predictors, counts_LWE):
            predictor.update(counts_WE)
        if self.policy.guard and not self._truth:
            self._recent.append(counts_LWE.copy())
        if self.policy.window and not self._truth:
            self._window.append(counts_LWE.copy())
        self.steps_done += 1

    def due(self, steps_done: int | None = None) -> bool:
        """A plan or a shed is due after ``steps_done`` observed steps (None: those observed so
        far; the scheduler passes its own count, it observes at plans only). The planner that
        plans on the true counts: before every step."""
        n = self.steps_done if steps_done is None else steps_done
        return self._truth or self.policy.due(n) or self._shed_due(n)

    def _shed_due(self, steps_done: int) -> bool:
        return (self.policy.sheds and steps_done > self.policy.first_plan
                and any(self._sheddable(i) for i in range(self.num_layers)))

    def _sheddable(self, layer: int) -> bool:
        """The layer holds replicas and the planner's out-of-sample record there is not positive."""
        track = self.track_L[layer]
        return self._replicated_L[layer] and bool(track) and float(np.mean(track)) <= 0

    @property
    def _truth(self) -> bool:
        return bool(getattr(self.planner, "uses_true_counts", False))

    def _plan_one(self, table, counts_WE, cost, context):
        step, ctx = self._takes
        if ctx:
            return self.planner.plan(table, counts_WE, cost, self.steps_done, context)
        if step:
            return self.planner.plan(table, counts_WE, cost, step=self.steps_done)
        return self.planner.plan(table, counts_WE, cost)

    def plan(self, tables: list[PlacementTable], cost: CostModel, true_LWE: np.ndarray | None = None,
             future_NLWE: np.ndarray | None = None) -> list[LayerPlan]:
        """Plan every layer; ``true_LWE`` replaces the prediction (for planners that use true counts).

        ``future_NLWE`` (a simulator's perfect prediction): the true counts of the steps the plan
        will be kept; they replace both the prediction (their mean) and the scoring window.
        """
        if len(tables) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} tables, got {len(tables)}")
        truth = self._truth
        if truth and true_LWE is None:
            raise ValueError(f"{getattr(self.planner, 'name', 'this planner')} plans on true counts: pass true_LWE")
        needs_cost = (self.policy.guard or self.policy.drift_gate is not None) and not truth or self.policy.bytes_budget is not None
        if needs_cost and not isinstance(cost, CostModel):
            raise ValueError(f"ReplanPolicy.guard, drift_gate and bytes_budget need a CostModel, got {cost!r}")
        if not truth and self.policy.guard:
            self._account(tables, cost)
        if self.policy.sheds and not truth and future_NLWE is None and not self.policy.due(self.steps_done):
            return self._shed(tables, cost)
        horizon = 1.0 if truth else float(self.policy.interval)
        if future_NLWE is not None and not truth:
            future_NLWE = np.asarray(future_NLWE, dtype=np.float64)
            seen = list(np.rint(future_NLWE.mean(0)))
            windows = list(future_NLWE.transpose(1, 0, 2, 3))
        else:
            seen = [true_LWE[i] if truth else p.predict() for i, p in enumerate(self.predictors)]
            recent = np.stack(self._window) if self._window and not truth else None
            windows = [None if recent is None else recent[:, i] for i in range(self.num_layers)]
        plans, reverts, used_L = [], set(), []
        for i, table in enumerate(tables):
            margin, behind, used = (0.0, False, []) if truth or not self.policy.guard else self._judge(i, table, cost)
            used_L.append(used)
            if behind:
                new = _finish_as(table, table.static_like())
                if new is not table and used and not self._backtest(i, table, new, used, cost, horizon):
                    new = table
                reverts.add(i)
            elif seen[i] is None:
                new = table
            else:
                context = PlanContext(horizon=horizon, margin=margin, window_NWE=windows[i], noise_z=self.policy.noise_z)
                new = self._plan_one(table, seen[i], cost, context)
                if new is not table and self.policy.guard and self.policy.trust and not truth:
                    self._proposals[i] = _Change(table, new, cost.move_time(table, new))
                new = self._gated(i, table, new, used, cost, context)
            plans.append(LayerPlan(new, _bytes(cost, table, new), margin))
        if self.policy.bytes_budget is not None and sum(p.bytes_moved for p in plans) > self.policy.bytes_budget:
            plans = self._fit_budget(tables, seen, windows, used_L, plans, cost, horizon)
        self._recent = []
        self._used_L = [[] for _ in range(self.num_layers)]
        self._replicated_L = _holding_replicas(plans)
        if self.policy.drift_gate is not None and self._window and not truth:
            self._earlier = np.stack(self._window)
        for i, (table, p) in enumerate(zip(tables, plans)):
            if p.table is not table and self.policy.guard and isinstance(cost, CostModel):
                move = cost.move_time(table, p.table)
                self._changes[i] = _Change(table, p.table, move, i in reverts)
                self.spent_L[i] += move
        return plans

    def _account(self, tables: list[PlacementTable], cost: CostModel) -> None:
        """Charge the steps observed since the last plan or shed to the tables that ran them: each
        step's modelled time under ``tables`` (``_used_L``), and the account against static EP."""
        start = len(self._used_L[0])
        statics = [table.static_like() for table in tables] if len(self._recent) > start else []
        for c_LWE in self._recent[start:]:
            for i, (table, static) in enumerate(zip(tables, statics)):
                used = cost.step_time(table, c_LWE[i]).total
                self._used_L[i].append(used)
                self.spent_L[i] += used
                self.static_L[i] += cost.step_time(static, c_LWE[i]).total

    def _shed(self, tables: list[PlacementTable], cost: CostModel) -> list[LayerPlan]:
        """Between plans: every layer drops the replicas that did not pay on the last
        ``shed_window`` observed steps (module doc)."""
        steps_NLWE = np.stack(list(self._window)[-self.policy.shed_window:])
        first = self.steps_done - steps_NLWE.shape[0]  # the window's steps, by observed index
        if self._shed_memo_cost is not cost:
            self._shed_memo, self._shed_memo_cost = [{} for _ in range(self.num_layers)], cost
        plans = []
        for i, table in enumerate(tables):
            memo = self._shed_memo[i]
            for key in [k for k in memo if k[1] < first]:
                del memo[key]
            new = table if not self._sheddable(i) else shed_replicas(
                table, steps_NLWE[:, i], cost, (range(first, self.steps_done), memo))
            plans.append(LayerPlan(new, _bytes(cost, table, new), 0.0))
        self._replicated_L = _holding_replicas(plans)
        return plans

    def _gated(self, i: int, table: PlacementTable, new: PlacementTable, used: list[float], cost,
               context: PlanContext) -> PlacementTable:
        """``new`` if it passes the drift gate, the backtest on the steps since the last plan
        (``used``: their time under ``table``) and the trust gate (the costly one, last), else
        ``table``. Every table the planner proposes goes through here, re-plans under the bytes
        budget too."""
        if new is table:
            return table
        if self._drifting(i, table, new, cost, context.horizon):
            return table
        if used and not self._backtest(i, table, new, used, cost, context.horizon):
            return table
        if (self.policy.guard and self.policy.trust and not self._truth and not _same_slots(new, table.static_like())
                and not self._trusted(i, self._holdout(i, table, cost, context))):
            return table
        return new

    def _trusted(self, layer: int, holdout: float | None) -> bool:
        """Out-of-sample evidence that the planner's changes pay on this layer: the mean relative
        gain of its last ``trust`` proposals (each replayed on the steps after it) and of the
        holdout check is > 0."""
        evidence = (self.track_L[layer] + ([] if holdout is None else [holdout]))[-self.policy.trust:]
        return bool(evidence) and float(np.mean(evidence)) > 0

    def _holdout(self, layer: int, table: PlacementTable, cost: CostModel, context: PlanContext) -> float | None:
        """The planner checked out of sample on the window: planned from the first half (a fresh
        predictor), replayed on the second half; its relative gain over keeping ``table``, the
        move charged pro rata of ``context.horizon`` (None: window too short, or no change)."""
        steps = [c_LWE[layer] for c_LWE in self._window]
        half = len(steps) // 2
        if half < 1:
            return None
        predictor = self._make()
        for c_WE in steps[:half]:
            predictor.update(c_WE)
        ctx = dataclasses.replace(context, window_NWE=np.stack(steps[:half]))
        new = self._plan_one(table, predictor.predict(), cost, ctx)
        if new is table:
            return None
        keep = sum(cost.step_time(table, c_WE).total for c_WE in steps[half:])
        after = sum(cost.step_time(new, c_WE).total for c_WE in steps[half:])
        move = cost.move_time(table, new) * (len(steps) - half) / context.horizon
        return (keep - after - move) / keep if keep > 0 else None

    def _drifting(self, layer: int, table: PlacementTable, new: PlacementTable, cost: CostModel, horizon: float) -> bool:
        """The drift gate stops ``new`` (not a return to static EP): no earlier window yet, or on
        it ``new`` gains no more than ``drift_gate`` over static EP, net of its move."""
        static = table.static_like()
        if self.policy.drift_gate is None or self._truth or _same_slots(new, static):
            return False
        if self._earlier is None:
            return True
        steps = self._earlier[:, layer]
        base = float(np.mean([cost.step_time(static, c_WE).total for c_WE in steps]))
        after = float(np.mean([cost.step_time(new, c_WE).total for c_WE in steps]))
        gain = (base - after - cost.move_time(table, new) / horizon) / base if base > 0 else 0.0
        return not gain > self.policy.drift_gate

    def _backtest(self, layer, table, new, used, cost, horizon) -> bool:
        """Would ``new`` have paid for its move over the steps since the last plan (per step true
        counts, move amortised over ``horizon``)?"""
        saved = sum(used) - sum(cost.step_time(new, c_LWE[layer]).total for c_LWE in self._recent)
        return saved / len(used) * horizon > cost.move_time(table, new)

    def _judge(self, layer: int, table: PlacementTable, cost: CostModel) -> tuple[float, bool, list[float]]:
        """Judge the steps since the last plan (charged by ``_account``): update the layer's misses;
        return the margin that applies now, whether the layer is behind static EP, and the modelled
        time of each of those steps under the tables that ran them."""
        static = table.static_like()
        used = list(self._used_L[layer])
        change = self._changes[layer]
        if change is not None and self._recent:
            before = sum(cost.step_time(change.old, c_LWE[layer]).total for c_LWE in self._recent)
            paid = before - sum(used) - change.move_time >= 0
            if not change.revert:  # a return to static that paid says the planner's table did not
                self.misses_L[layer] = 0 if paid else min(self.misses_L[layer] + 1, MAX_MISSES)
            self._changes[layer] = None
        proposal = self._proposals[layer]
        if proposal is not None and self._recent:
            before = sum(cost.step_time(proposal.old, c_LWE[layer]).total for c_LWE in self._recent)
            after = sum(cost.step_time(proposal.new, c_LWE[layer]).total for c_LWE in self._recent)
            if before > 0:
                gain = (before - after - proposal.move_time) / before
                self.track_L[layer] = (self.track_L[layer] + [gain])[-self.policy.trust:]
            self._proposals[layer] = None
        behind = self.spent_L[layer] > self.static_L[layer] * (1.0 + 1e-12) and not _same_slots(table, static)
        if behind:
            self.misses_L[layer] = min(self.misses_L[layer] + 1, MAX_MISSES)
        return min(self.policy.guard_gain * (2.0 ** self.misses_L[layer] - 1.0), 0.99), behind, used

    def state_dict(self) -> dict:
        """Predictors, step count and guard state (every rank holds the same)."""
        return {
            "steps_done": self.steps_done,
            "predictors": [p.state_dict() for p in self.predictors],
            "misses": list(self.misses_L),
            "spent": list(self.spent_L),
            "static": list(self.static_L),
            "recent": [c.tolist() for c in self._recent],
            "window": [c.tolist() for c in self._window],
            "changes": [_change_state(c) for c in self._changes],
            "proposals": [_change_state(c) for c in self._proposals],
            "track": [list(t) for t in self.track_L],
            "earlier": None if self._earlier is None else self._earlier.tolist(),
            "used": [list(u) for u in self._used_L],
            "replicated": list(self._replicated_L),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["predictors"]) != self.num_layers:
            raise ValueError(f"state has {len(state['predictors'])} layers, this replanner {self.num_layers}")
        self.steps_done = int(state["steps_done"])
        for predictor, p_state in zip(self.predictors, state["predictors"]):
            predictor.load_state_dict(p_state)
        self.misses_L = [int(m) for m in state["misses"]]
        self.spent_L = [float(x) for x in state["spent"]]
        self.static_L = [float(x) for x in state["static"]]
        self._recent = [np.array(c, dtype=np.float64) for c in state["recent"]]
        self._window.clear()
        self._window.extend(np.array(c, dtype=np.float64) for c in state.get("window", state["recent"]))
        self._changes = [_change_from(c) for c in state["changes"]]
        self._proposals = [_change_from(c) for c in state.get("proposals", [None] * self.num_layers)]
        self.track_L = [[float(x) for x in t] for t in state.get("track", [[] for _ in range(self.num_layers)])]
        earlier = state.get("earlier")
        self._earlier = None if earlier is None else np.array(earlier, dtype=np.float64)
        self._used_L = [[float(x) for x in u] for u in state.get("used", [[] for _ in range(self.num_layers)])]
        self._replicated_L = [bool(r) for r in state.get("replicated", [False] * self.num_layers)]

    def _fit_budget(self, tables, seen, windows, used_L, plans, cost, horizon) -> list[LayerPlan]:
        gain = []
        for table, counts_WE, p in zip(tables, seen, plans):
            if p.bytes_moved <= 0:
                gain.append(np.inf)
                continue
            saved = cost.step_time(table, counts_WE).total - cost.step_time(p.table, counts_WE).total
            gain.append((saved * horizon - cost.move_time(table, p.table)) / p.bytes_moved)
        left = float(self.policy.bytes_budget)
        out = list(plans)
        for i in sorted(range(len(plans)), key=lambda i: (-gain[i], i)):
            if plans[i].bytes_moved <= left:
                left -= plans[i].bytes_moved
                continue
            context = PlanContext(horizon=horizon, margin=plans[i].margin, max_move_bytes=left, window_NWE=windows[i],
                                  noise_z=self.policy.noise_z)
            new = self._gated(i, tables[i], self._plan_one(tables[i], seen[i], cost, context), used_L[i], cost, context)
            moved = cost.move_bytes_total(tables[i], new)
            if moved > left:  # a planner that ignores the limit: keep the table
                new, moved = tables[i], 0.0
            left -= moved
            out[i] = LayerPlan(new, moved, plans[i].margin)
        return out


def shed_replicas(table: PlacementTable, steps_NWE: np.ndarray, cost: CostModel,
                  memo: tuple[Sequence[int], dict] | None = None) -> PlacementTable:
    """``table`` less the replicas that did not pay on ``steps_NWE`` (their mean modelled time):
    one copy at a time, the drop that saves most first (an expert's lowest-quota copy, never its
    static home), while a drop saves time; then static EP, when ``table`` is on its base and that
    is faster still. Returns ``table`` itself when nothing is dropped. ``memo``: (an id per step,
    a dict) caching each (table, step) time across calls on overlapping windows."""
    step_ids, times = memo if memo is not None else (None, None)

    def step_time(tb: PlacementTable, n: int) -> float:
        if times is None:
            return cost.step_time(tb, steps_NWE[n]).total
        key = (tb.slot_expert_WS.tobytes() + tb.share_WS.tobytes(), step_ids[n])
        if key not in times:
            times[key] = cost.step_time(tb, steps_NWE[n]).total
        return times[key]

    def mean_time(tb: PlacementTable) -> float:
        return float(np.mean([step_time(tb, n) for n in range(len(steps_NWE))]))

    home_WS = table.static_like().slot_expert_WS
    load_E = steps_NWE.sum(axis=(0, 1))
    cur, cur_t = table, mean_time(table)
    while (cur.num_replicas_E() > 1).any():
        quota_WS = replica_quotas(cur, load_E, cost.adaptive_split)
        best = None
        for e in np.flatnonzero(cur.num_replicas_E() > 1):
            copies = [(r, s) for r, s, _ in cur.replicas(int(e))]
            copies = [c for c in copies if home_WS[c] != e] or copies
            cand = shrink_replica(cur, min(copies, key=lambda c: quota_WS[c]))
            cand_t = mean_time(cand)
            if best is None or cand_t < best[1]:
                best = (cand, cand_t)
        if not best[1] < cur_t:
            break
        cur, cur_t = best
    if on_static_base(table) and mean_time(table.static_like()) < cur_t:
        return _finish_as(table, table.static_like())
    return cur if cur is table else _finish_as(table, cur)


def _change_state(c: _Change | None) -> dict | None:
    if c is None:
        return None
    return {"old": c.old.state_dict(), "new": c.new.state_dict(), "move_time": c.move_time, "revert": c.revert}


def _change_from(c: dict | None) -> _Change | None:
    if c is None:
        return None
    return _Change(PlacementTable.from_state_dict(c["old"]), PlacementTable.from_state_dict(c["new"]),
                   float(c["move_time"]), bool(c.get("revert", False)))


def _holding_replicas(plans: list[LayerPlan]) -> list[bool]:
    return [bool((p.table.num_replicas_E() > 1).any()) for p in plans]


def _bytes(cost, old: PlacementTable, new: PlacementTable) -> float:
    """Network bytes of a change (0 when the caller's cost object is not a ``CostModel``)."""
    return cost.move_bytes_total(old, new) if isinstance(cost, CostModel) and new is not old else 0.0


def _same_slots(a: PlacementTable, b: PlacementTable) -> bool:
    return np.array_equal(a.slot_expert_WS, b.slot_expert_WS) and np.allclose(a.share_WS, b.share_WS, atol=1e-12)


def _finish_as(table: PlacementTable, target: PlacementTable) -> PlacementTable:
    """``table`` when it already is ``target``, else ``target`` with the next version."""
    if _same_slots(table, target):
        return table
    return PlacementTable(table.num_experts, target.slot_expert_WS, target.share_WS, table.version + 1)
