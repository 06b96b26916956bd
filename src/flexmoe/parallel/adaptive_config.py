"""AdaptiveConfig: an MoE layer whose experts are sharded over the ranks that serve them, run by
data-parallel, expert-parallel or sharded-expert execution chosen per step (Tutel's adaptive r).

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
The layout and the methods are described in ``flexmoe.parallel.shard_layout`` and docs/parallel.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Union

MethodName = Literal["dp", "ep", "sharded", "auto"]
METHOD_NAMES = ("dp", "ep", "sharded", "auto")


@dataclasses.dataclass
class AdaptiveConfig:
    """Adaptive parallelism of one MoE layer over an expert group of W ranks.

    method: how the expert stage runs.
        "dp": all-gather every shard, run all experts on the local tokens (Tutel r = 0);
        "ep": gather each expert's shards within the m ranks that serve it, send each token to
            one of them (r = 1);
        "sharded": send each token to all m shard holders of its expert, each computes its
            slice of the FFN width, the partial outputs are summed (r = m);
        an int r (1 <= r, r divides m): the mixes between, a token goes to r ranks, each
            holding a slice F / r of its expert gathered from m / r shards;
        "auto": time ``candidates`` when a load level is first seen, keep the fastest
            (slowest rank decides, agreed with one all-reduce).
    shard_degree: m, the ranks that serve (and shard) each expert; W = G * m for G groups of
        experts, E divisible by G. None: the smallest m with E * m divisible by W that
        divides d_ff (m = 1, whole experts, when W divides E).
    candidates: methods "auto" tries (names or ints r); None = "dp" and every divisor of m.
    trials: forwards "auto" times each candidate for at a new load level (it keeps the best;
        the first round also warms each path up), >= 1.
    timeout_s: the longest a control collective of this layer waits for the other ranks.
    """

    method: Union[MethodName, int] = "auto"
    shard_degree: int | None = None
    candidates: tuple[Union[str, int], ...] | None = None
    trials: int = 2
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not _is_method(self.method, allow_auto=True):
            raise ValueError(f"AdaptiveConfig.method must be one of {METHOD_NAMES} or an int r >= 1, got {self.method!r}")
        m = self.shard_degree
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"AdaptiveConfig.shard_degree must be None or an int >= 1, got {m!r}")
        if self.candidates is not None:
            cands = tuple(self.candidates)
            if not cands or not all(_is_method(c, allow_auto=False) for c in cands):
                raise ValueError(
                    "AdaptiveConfig.candidates must be None or a non-empty tuple of 'dp', 'ep', 'sharded' "
                    f"or ints r >= 1, got {self.candidates!r}"
                )
            self.candidates = cands
        n = self.trials
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"AdaptiveConfig.trials must be an int >= 1, got {n!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"AdaptiveConfig.timeout_s must be a finite number > 0, got {t!r}")


def _is_method(value, allow_auto: bool) -> bool:
    if isinstance(value, str):
        return value in METHOD_NAMES and (allow_auto or value != "auto")
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1
