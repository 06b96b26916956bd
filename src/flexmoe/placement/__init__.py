"""Dynamic expert placement: table, cost model, planner, migration, scheduler."""

from .table import PlacementTable
from .split import balance_ratio, rank_loads, replica_quotas, split_tokens
from .cost_model import CostModel, Move, StepCost, plan_moves
from .predict import PREDICTORS, LoadPredictor, PredictorConfig, WindowPredictor
from .planner import (
    PLANNERS, EPLBPlanner, GreedyPlanner, OraclePlanner, PlanContext, Planner, ProportionalPlanner,
    ShadowingPlanner, StaticPlanner, make_planner,
)
from .policy import ReplanPolicy, Replanner

__all__ = ["PlacementTable"]
__all__ += ["balance_ratio", "rank_loads", "replica_quotas", "split_tokens"]
__all__ += ["CostModel", "Move", "StepCost", "plan_moves", "LoadPredictor", "PredictorConfig", "WindowPredictor",
            "PREDICTORS", "PlanContext", "ReplanPolicy", "Replanner", "Planner", "PLANNERS", "make_planner",
            "StaticPlanner", "ShadowingPlanner", "EPLBPlanner", "ProportionalPlanner", "GreedyPlanner", "OraclePlanner"]
from .migration import (
    MigrationPlan, MigrationReport, Transfer, apply_placement, check_same_placement, diff_placement,
    expand_replica, migrate_replica, shrink_replica, swap_slots,
)
from .scheduler import PlacementScheduler

__all__ += ["MigrationPlan", "MigrationReport", "Transfer", "apply_placement", "check_same_placement",
            "diff_placement", "expand_replica", "migrate_replica", "shrink_replica", "swap_slots",
            "PlacementScheduler"]
