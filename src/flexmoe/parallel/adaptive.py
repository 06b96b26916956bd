"""MethodTuner: the adaptive layer's online choice of parallel method per load level.

Legend: C candidate methods (codes: 0 = data parallel, r >= 1 = spread, shard_layout.py).
A load level is the power-of-two bucket of the largest per-(rank, expert) token count (the
same key as the pipeline tuner), known identically on every rank after the counts all-gather.
The first forwards at a new level are trials, one candidate each, in rounds (every candidate
once, then again: ``trials`` rounds, so the first round also warms each path up), timed on
every rank; at the next forward of that level the ranks take each candidate's best time, the
slowest rank's (one all-reduce of C floats), and keep the fastest candidate for that level. Trials and
resolutions happen at the same forward on every rank because they depend only on the shared
level sequence (the layer checks that the tuner states agree before the all-reduce).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import collectives
from .agreement import bounded_wait
from .groups import EPGroup

TRIAL, RESOLVE, CACHED = "trial", "resolve", "cached"


class MethodTuner:
    """Times the candidates per load level, caches the agreed winner."""

    def __init__(self, candidates: tuple[int, ...], trials: int = 2):
        self.candidates = tuple(candidates)
        self.trials = trials
        self.trial_s: dict[int, dict[int, list[float]]] = {}
        self.best: dict[int, int] = {}

    @staticmethod
    def level(counts_WE: np.ndarray) -> int:
        return int(counts_WE.max(initial=0)).bit_length()

    def choose(self, level: int) -> tuple[int, str]:
        """(method code, TRIAL / RESOLVE / CACHED) for a forward at ``level``."""
        if level in self.best:
            return self.best[level], CACHED
        if len(self.candidates) == 1:
            self.best[level] = self.candidates[0]
            return self.candidates[0], CACHED
        tried = self.trial_s.get(level, {})
        for round_ in range(self.trials):
            for c in self.candidates:
                if len(tried.get(c, ())) <= round_:
                    return c, TRIAL
        return -1, RESOLVE

    def record(self, level: int, code: int, seconds: float) -> None:
        self.trial_s.setdefault(level, {}).setdefault(code, []).append(seconds)

    def resolve(self, level: int, ep: EPGroup, timeout_s: float, device: torch.device) -> int:
        """Agree on the winner of ``level``: per candidate its best trial, the slowest rank's
        (one all-reduce)."""
        times_C = torch.tensor([min(self.trial_s[level][c]) for c in self.candidates], dtype=torch.float64,
                               device=device)
        if ep.size > 1:
            collectives.run(lambda: dist.all_reduce(times_C, op=dist.ReduceOp.MAX, group=ep.group, async_op=True),
                            [times_C], bounded_wait(timeout_s, "the method choice of an adaptive MoE layer"))
        self.best[level] = self.candidates[int(torch.argmin(times_C.cpu()))]
        return self.best[level]

    def state(self) -> str:
        """What the next choice depends on (levels tried and won), equal on agreeing ranks."""
        tried = {level: sorted((c, len(t)) for c, t in times.items()) for level, times in sorted(self.trial_s.items())}
        return f"tried {tried} best {sorted(self.best.items())}"
