"""Online choices of the expert-parallel stage: pipeline degree (Tutel) and memory strategy
(MPipeMoE), plus the activation-memory accounting behind the latter.

Legend: W ranks, R rows a rank's experts process, T local tokens.
Both choices are made from numbers every rank has after the per-forward all-gather, so all
ranks agree without another message. ``TrainingTrialClock`` times a trial of a training forward
over the stage's forward and backward (the adaptive layer's method tuner uses it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from ..experts import GroupedExperts
from .config import MEMORY_STRATEGIES


class PipelineTuner:
    """Pipeline degree per load level.

    The load level is the bit length of the largest per-(rank, expert) count (power-of-two
    buckets). The first forwards that see a level try each candidate once; every rank times its
    own forward, the times travel with the next forward's counts, and the slowest rank's time
    counts. Once all candidates are timed the fastest is kept (ties: the smaller degree).
    """

    def __init__(self, candidates: tuple[int, ...]):
        self.candidates = candidates
        self.best: dict[int, int] = {}
        self.times_ns: dict[int, dict[int, int]] = {}
        self._pending: tuple[int, int, int] | None = None

    @staticmethod
    def level(counts_WE: np.ndarray) -> int:
        return int(counts_WE.max(initial=0)).bit_length()

    def choose(self, level: int) -> tuple[int, bool]:
        """(degree, whether this forward is a timed trial)."""
        if level in self.best:
            return self.best[level], False
        tried = self.times_ns.get(level, {})
        return next(c for c in self.candidates if c not in tried), True

    def record(self, level: int, degree: int, seconds: float) -> None:
        """This rank's time of a trial; shared by ``shared_row`` with the next forward."""
        self._pending = (level, degree, int(seconds * 1e9))

    def shared_row(self) -> list[int]:
        row = list(self._pending) if self._pending is not None else [-1, 0, 0]
        self._pending = None
        return row

    def absorb(self, rows_W3: np.ndarray) -> None:
        """Take every rank's trial row (identical level and degree on all ranks)."""
        level, degree = int(rows_W3[0, 0]), int(rows_W3[0, 1])
        if level < 0:
            return
        times = self.times_ns.setdefault(level, {})
        times[degree] = int(rows_W3[:, 2].max())
        if all(c in times for c in self.candidates):
            self.best[level] = min(self.candidates, key=lambda c: (times[c], c))


class TrainingTrialClock:
    """Times a tuner trial on a training forward over what the step spends in the stage: its
    forward, plus its backward from the output's gradient arriving to the last gradient of the
    stage's inputs (rows and weights). The rest of the model, between the two, is not counted.

    ``now()``: a synchronised clock (seconds); ``record(seconds)`` is called when the backward
    ends (never, if no backward reaches the stage). Route the stage's inputs through
    ``wrap_inputs`` and its output through ``wrap_output``; forwards without an autograd graph
    are timed by the caller alone.
    """

    def __init__(self, now: Callable[[], float], record: Callable[[float], None]):
        self._now, self._record = now, record
        self._forward_s = 0.0
        self._backward_start: float | None = None

    def wrap_inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Identities whose backward, once every one of their gradients is out, stops the clock."""
        return _AfterBackward.apply(self._backward_done, *tensors)

    def wrap_output(self, y: torch.Tensor, forward_s: float) -> torch.Tensor:
        """Identity whose backward starts the backward's clock; ``forward_s``: the forward's time."""
        self._forward_s = forward_s
        return BeforeBackward.apply(y, self._backward_starts)

    def _backward_starts(self) -> None:
        self._backward_start = self._now()

    def _backward_done(self) -> None:
        if self._backward_start is not None:
            self._record(self._forward_s + self._now() - self._backward_start)


class BeforeBackward(torch.autograd.Function):
    """Identity whose backward first runs ``before()`` (a check, a clock)."""

    @staticmethod
    def forward(ctx, y, before):
        ctx.before = before
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.before()
        return grad, None


class _AfterBackward(torch.autograd.Function):
    """Identities whose backward, run once all their gradients are computed, calls ``done()``."""

    @staticmethod
    def forward(ctx, done, *tensors):
        ctx.done = done
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.done()
        return (None, *grads)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Activation memory the expert stage of one layer keeps for backward on this rank.

    strategy: the strategy used. kept_bytes: what it keeps. saved_bytes: ``keep``'s bytes minus
    ``kept_bytes``. by_strategy: the bytes every strategy would keep for the same forward.
    """

    strategy: str
    kept_bytes: int
    saved_bytes: int
    by_strategy: dict[str, int]


def kept_bytes(recv_rows: int, tokens: int, row: "RowBytes") -> dict[str, int]:
    """Bytes each strategy keeps for ``recv_rows`` expert rows and ``tokens`` local tokens."""
    return {
        "keep": recv_rows * (row.input + row.hidden + row.weight),
        "recompute": recv_rows * (row.input + row.weight),
        "recommunicate": recv_rows * (row.hidden + row.weight) + tokens * row.input,
        "both": recv_rows * row.weight + tokens * row.input,
    }


@dataclasses.dataclass(frozen=True)
class RowBytes:
    """Bytes per expert row: its input, the hidden activations autograd keeps, its weight."""

    input: int
    hidden: int
    weight: int


def measure_row_bytes(experts: GroupedExperts, dtype: torch.dtype, weight_dtype: torch.dtype, use_triton: bool) -> RowBytes:
    """Count what autograd saves for the expert FFN on 8 and 16 rows; the difference per row,
    without the input, the weights and the parameters, is the hidden activation."""
    params = {name: p.detach().requires_grad_() for name, p in experts.named_parameters()}
    D, S = experts.gate_up_proj.shape[2], experts.num_experts
    device = experts.gate_up_proj.device

    def saved_bytes(rows: int) -> int:
        x = torch.zeros(rows, D, dtype=dtype, device=device, requires_grad=True)
        w = torch.ones(rows, dtype=weight_dtype, device=device, requires_grad=True)
        offsets = torch.full((S,), rows, dtype=torch.int32, device=device)
        skip = {t.data_ptr() for t in [x, w, *params.values()]}
        seen: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in skip and t.numel():
                seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(experts, params, (x, offsets, w, use_triton))
        return sum(seen.values())

    hidden = (saved_bytes(16) - saved_bytes(8)) // 8
    return RowBytes(D * dtype.itemsize, hidden, weight_dtype.itemsize)


def choose_memory_strategy(
    kept_by_strategy: dict[str, int], budget_bytes: int, recompute_s: float | None, resend_s: float | None
) -> str:
    """"keep" if it fits the budget; else the fitting strategy with the least extra time (when
    the times are known); else the one keeping the least.

    kept_by_strategy: bytes per strategy on the rank that keeps most. recompute_s / resend_s:
    extra backward time of recomputing the hidden activation / re-sending the input.
    """
    if kept_by_strategy["keep"] <= budget_bytes:
        return "keep"
    fitting = [s for s in MEMORY_STRATEGIES if kept_by_strategy[s] <= budget_bytes]
    if fitting and recompute_s is not None and resend_s is not None:
        extra = {"keep": 0.0, "recompute": recompute_s, "recommunicate": resend_s, "both": recompute_s + resend_s}
        return min(fitting, key=lambda s: (extra[s], MEMORY_STRATEGIES.index(s)))
    return min(MEMORY_STRATEGIES, key=lambda s: (kept_by_strategy[s], MEMORY_STRATEGIES.index(s)))


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` could still use (CUDA: free plus cached-unused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def synchronized_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
