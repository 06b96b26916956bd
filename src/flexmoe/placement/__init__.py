"""Expert placement planning, pure numpy: table, split, move diff, cost model, predictors, planners,
re-plan policy.

Executing a plan (migration, the scheduler) happens between steps: ``flexmoe.runtime``.
"""

from .cost_model import CostModel, StepCost
from .edits import expand_replica, migrate_replica, shrink_replica, swap_slots
from .moves import MigrationPlan, Transfer, diff_placement
from .predict import PREDICTORS, LoadPredictor, PredictorConfig, WindowPredictor
from .planner import (
    PLANNERS, EPLBPlanner, GreedyPlanner, OraclePlanner, PlanContext, Planner, ProportionalPlanner,
    ShadowingPlanner, StaticPlanner, make_planner,
)
from .policy import ReplanPolicy, Replanner
from .split import balance_ratio, rank_loads, replica_quotas, split_tokens
from .table import PlacementTable, table_digest

__all__ = ["PlacementTable", "table_digest"]
__all__ += ["balance_ratio", "rank_loads", "replica_quotas", "split_tokens"]
__all__ += ["MigrationPlan", "Transfer", "diff_placement"]
__all__ += ["expand_replica", "migrate_replica", "shrink_replica", "swap_slots"]
__all__ += ["CostModel", "StepCost", "LoadPredictor", "PredictorConfig", "WindowPredictor", "PREDICTORS",
            "PlanContext", "ReplanPolicy", "Replanner", "Planner", "PLANNERS", "make_planner",
            "StaticPlanner", "ShadowingPlanner", "EPLBPlanner", "ProportionalPlanner", "GreedyPlanner", "OraclePlanner"]
