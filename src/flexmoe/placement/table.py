"""PlacementTable: which physical expert slot on which rank holds which logical expert.

Legend: E logical experts, W ranks, S slots per rank.
Routing picks logical experts; the table maps each to one or more replicas (rank, slot) with
token shares that sum to one. Everything after the router sees physical slots only.
The table lives on the host (numpy); every rank holds an identical copy, checked by version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

EMPTY = -1


@dataclasses.dataclass
class PlacementTable:
    """slot_expert_WS[r, s]: logical expert in slot s of rank r, or -1 (empty).
    share_WS[r, s]: fraction of that expert's tokens the replica takes (0 for empty slots).
    version: bumped by every change, so ranks can check they agree.
    """

    num_experts: int
    slot_expert_WS: np.ndarray
    share_WS: np.ndarray
    version: int = 0

    def __post_init__(self) -> None:
        self.slot_expert_WS = np.asarray(self.slot_expert_WS, dtype=np.int64)
        self.share_WS = np.asarray(self.share_WS, dtype=np.float64)
        self.validate()

    @property
    def world_size(self) -> int:
        return self.slot_expert_WS.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.slot_expert_WS.shape[1]

    def static_like(self) -> "PlacementTable":
        """The static table of this table's shape (experts, ranks, slots per rank)."""
        return PlacementTable.static(self.num_experts, self.world_size, self.slots_per_rank)

    @classmethod
    def static(cls, num_experts: int, world_size: int, slots_per_rank: int | None = None) -> "PlacementTable":
        """Plain expert parallelism: experts laid out contiguously, ``ceil(E / W)`` per rank.

        When W does not divide E the last ranks hold fewer experts (their spare slots stay empty).
        """
        if num_experts < 1 or world_size < 1:
            raise ValueError(f"need num_experts >= 1 and world_size >= 1, got {num_experts}, {world_size}")
        per_rank = math.ceil(num_experts / world_size)
        S = per_rank if slots_per_rank is None else slots_per_rank
        if S < per_rank:
            raise ValueError(f"slots_per_rank={S} cannot hold {num_experts} experts on {world_size} ranks")
        slot_expert = np.full((world_size, S), EMPTY, dtype=np.int64)
        share = np.zeros((world_size, S))
        for e in range(num_experts):
            slot_expert[e // per_rank, e % per_rank] = e
            share[e // per_rank, e % per_rank] = 1.0
        return cls(num_experts, slot_expert, share)

    def replicas(self, expert: int) -> list[tuple[int, int, float]]:
        """(rank, slot, share) of every replica of ``expert``, in (rank, slot) order."""
        ranks, slots = np.nonzero(self.slot_expert_WS == expert)
        return [(int(r), int(s), float(self.share_WS[r, s])) for r, s in zip(ranks, slots)]

    def num_replicas_E(self) -> np.ndarray:
        valid = self.slot_expert_WS[self.slot_expert_WS >= 0]
        return np.bincount(valid, minlength=self.num_experts)

    def validate(self) -> None:
        """Raise ValueError unless every expert has a replica and its shares sum to one."""
        se, sh = self.slot_expert_WS, self.share_WS
        if se.ndim != 2 or sh.shape != se.shape:
            raise ValueError(f"slot_expert {se.shape} and share {sh.shape} must be equal 2-d shapes")
        if ((se < EMPTY) | (se >= self.num_experts)).any():
            raise ValueError(f"slot entries must be -1 or in [0, {self.num_experts})")
        if (sh < 0).any() or (sh[se == EMPTY] != 0).any():
            raise ValueError("shares must be >= 0 and 0 for empty slots")
        counts = self.num_replicas_E()
        if (counts == 0).any():
            raise ValueError(f"experts without a replica: {np.nonzero(counts == 0)[0].tolist()}")
        totals = np.bincount(se[se >= 0], weights=sh[se >= 0], minlength=self.num_experts)
        if not np.allclose(totals, 1.0, atol=1e-9):
            raise ValueError(f"replica shares must sum to 1 per expert, got {totals.tolist()}")

    def copy(self) -> "PlacementTable":
        return PlacementTable(self.num_experts, self.slot_expert_WS.copy(), self.share_WS.copy(), self.version)

    def state_dict(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "slot_expert": self.slot_expert_WS.tolist(),
            "share": self.share_WS.tolist(),
            "version": self.version,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "PlacementTable":
        return cls(int(state["num_experts"]), np.array(state["slot_expert"]), np.array(state["share"]),
                   int(state["version"]))


def table_digest(table: PlacementTable) -> int:
    """A 62-bit digest of the table contents and version, equal on ranks with equal tables."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(table.slot_expert_WS, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(table.share_WS, dtype=np.float64).tobytes())
    h.update(int(table.version).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 2
