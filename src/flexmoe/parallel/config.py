"""ParallelConfig: how an expert-parallel MoE layer moves and keeps its tokens.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Union

MemoryStrategy = Literal["keep", "recompute", "recommunicate", "both", "auto"]
AllToAll = Literal["flat", "hierarchical"]
Dispatch = Literal["exact", "bounded"]
BoundedTransport = Literal["auto", "all_to_all", "symmetric_memory"]

MEMORY_STRATEGIES = ("keep", "recompute", "recommunicate", "both")
_ALL_TO_ALL = ("flat", "hierarchical")
_DISPATCH = ("exact", "bounded")
_BOUNDED_TRANSPORT = ("auto", "all_to_all", "symmetric_memory")


@dataclasses.dataclass
class ParallelConfig:
    """Expert-parallel execution of one MoE layer.

    pipeline_degree: chunks the dispatched tokens are split into (Tutel's overlap degree).
        Chunk i's expert compute overlaps chunk i+1's dispatch and chunk i-1's return, in forward
        and backward. 1 = no chunking. "auto" times ``pipeline_candidates`` on successive
        forwards the first time a load level (power-of-two bucket of the largest per-(rank,
        expert) token count) is seen, then keeps the fastest (slowest rank's time decides,
        so all ranks agree).
    pipeline_candidates: degrees "auto" tries, each >= 1.
    memory: what the expert stage keeps for backward (MPipeMoE).
        "keep": expert input and hidden activations.
        "recompute": only the expert input; backward recomputes the hidden activation.
        "recommunicate": the hidden activations, not the expert input; backward re-runs the
            dispatch all-to-all from the token rows the source rank keeps (T x D, not T*k x D).
        "both": neither; backward re-runs the dispatch and recomputes.
        "auto": "keep" while its activations fit in ``memory_budget_bytes`` (default:
            ``free_memory_fraction`` of the free device memory, smallest over ranks), else the
            fitting strategy with the least measured extra time (recompute time per row,
            all-to-all bandwidth), else "both".
    memory_budget_bytes: per-rank budget for "auto"; None measures free memory on every forward.
    free_memory_fraction: share of the free memory "auto" lets one layer keep, in (0, 1].
    all_to_all: "flat" (one all-to-all over the group) or "hierarchical" (Tutel 2DH: within
        each node, then between nodes; needs ``EPGroup.create(group, ranks_per_node=...)``).
    dispatch: "exact" (default): dropless, splits sized exactly; the host reads the counts
        (small all-gathers, each a device-to-host synchronisation). "bounded": no host
        synchronisation and fixed-size exchanges (``torch.compile(fullgraph=True)`` captures
        it): every rank sends ``rows_per_rank_pair`` (token, rank) pair rows to every rank;
        pairs past that many to one rank are dropped like capacity drops and counted
        (``ParallelExperts.last_bounded``). Needs pipeline_degree=1, memory="keep", flat
        all-to-all.
    rows_per_rank_pair: the bounded buffer: pair rows each rank sends each rank per forward.
        The most tokens any rank has per forward means no overflow (every token may reach every
        rank); about ``tokens * min(1, 1.5 * top_k / ranks)`` suits balanced routing.
    bounded_transport: how the bounded dispatch moves its buffers. "all_to_all": equal-split
        all-to-alls (every buffer row, used or not). "symmetric_memory": torch's
        symmetric-memory ``all_to_all_vdev`` with splits on the device (only used rows move;
        CUDA with NVSHMEM only, else the forward raises). "auto" (default): symmetric memory
        where available and not under ``torch.compile``, else "all_to_all".
    local_first: the exact dispatch computes the rows of experts whose only replica is on this
        rank (the local rows) before it reads the counts all-gather, so they overlap that wait;
        only the other rows are exchanged. The price, when a rank has both local and exchanged
        rows: two grouped GEMMs per direction instead of one, and at pipeline degree 1 either
        the weight-gradient rows copied once into slot-major buffers (few rows; degree > 1
        copies them anyway) or two weight-gradient GEMMs summed (many rows: one extra
        full-size gradient). At world size 1 with every expert held once, the one-device FFN over the slots
        runs instead. False: every row goes through the exchange, a token's own rank included.
    timeout_s: the longest a collective of this layer waits for the other ranks before raising
        ``TimeoutError``: agreement checks, counts, and the exact dispatch's all-to-alls (the
        bounded dispatch's exchanges are bounded by the process group's own ``timeout=``).
        Default 5 minutes.
    """

    pipeline_degree: Union[int, Literal["auto"]] = 1
    pipeline_candidates: tuple[int, ...] = (1, 2, 4, 8)
    memory: MemoryStrategy = "keep"
    memory_budget_bytes: int | None = None
    free_memory_fraction: float = 0.5
    all_to_all: AllToAll = "flat"
    dispatch: Dispatch = "exact"
    rows_per_rank_pair: int | None = None
    bounded_transport: BoundedTransport = "auto"
    local_first: bool = True
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        degree = self.pipeline_degree
        if degree != "auto" and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise ValueError(f"ParallelConfig.pipeline_degree must be an int >= 1 or 'auto', got {degree!r}")
        candidates = tuple(self.pipeline_candidates)
        if not candidates or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates):
            raise ValueError(
                f"ParallelConfig.pipeline_candidates must be a non-empty tuple of ints >= 1, got {self.pipeline_candidates!r}"
            )
        self.pipeline_candidates = tuple(sorted(set(candidates)))
        if self.memory not in MEMORY_STRATEGIES + ("auto",):
            raise ValueError(f"ParallelConfig.memory must be one of {MEMORY_STRATEGIES + ('auto',)}, got {self.memory!r}")
        budget = self.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"ParallelConfig.memory_budget_bytes must be None or an int >= 0, got {budget!r}")
        fraction = self.free_memory_fraction
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction)
                or not 0 < fraction <= 1):
            raise ValueError(f"ParallelConfig.free_memory_fraction must be in (0, 1], got {fraction!r}")
        if self.all_to_all not in _ALL_TO_ALL:
            raise ValueError(f"ParallelConfig.all_to_all must be one of {_ALL_TO_ALL}, got {self.all_to_all!r}")
        if self.dispatch not in _DISPATCH:
            raise ValueError(f"ParallelConfig.dispatch must be one of {_DISPATCH}, got {self.dispatch!r}")
        if self.bounded_transport not in _BOUNDED_TRANSPORT:
            raise ValueError(f"ParallelConfig.bounded_transport must be one of {_BOUNDED_TRANSPORT}, "
                             f"got {self.bounded_transport!r}")
        rows = self.rows_per_rank_pair
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"ParallelConfig.rows_per_rank_pair must be None or an int >= 1, got {rows!r}")
        if self.dispatch == "bounded":
            if rows is None:
                raise ValueError("ParallelConfig.rows_per_rank_pair is needed with dispatch='bounded'")
            for name, allowed in (("pipeline_degree", 1), ("memory", "keep"), ("all_to_all", "flat")):
                if getattr(self, name) != allowed:
                    raise ValueError(f"ParallelConfig.{name}={getattr(self, name)!r} is not supported with "
                                     f"dispatch='bounded' (use {allowed!r})")
        if not isinstance(self.local_first, bool):
            raise ValueError(f"ParallelConfig.local_first must be a bool, got {self.local_first!r}")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"ParallelConfig.timeout_s must be a finite number > 0, got {timeout!r}")
