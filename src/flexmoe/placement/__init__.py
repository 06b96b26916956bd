"""Dynamic expert placement: table, cost model, planner, migration, scheduler."""

from .table import PlacementTable

__all__ = ["PlacementTable"]
