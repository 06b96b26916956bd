"""Routing traces, a synthetic trace generator and a placement simulator."""

from .simulator import SimResult, format_table, plot_results, simulate
from .synthetic import SyntheticTraceConfig, generate_trace
from .trace import RoutingTrace, TraceRecorder, read_trace

__all__ = [
    "RoutingTrace",
    "SimResult",
    "SyntheticTraceConfig",
    "TraceRecorder",
    "format_table",
    "generate_trace",
    "plot_results",
    "read_trace",
    "simulate",
]
