"""Group-limited routing: each token picks its experts among its few best groups of experts.

Legend: T tokens, E experts, G groups, M members of the largest group.

A group's score for a token is the sum of its ``score_experts`` best finite selection scores
(DeepSeek-V3: 2; 1 = the max, DeepSeek-V2); a group with no finite score (all masked by an
earlier limit) scores -inf. The token keeps the ``top_groups`` best groups; every other expert's
selection score becomes -inf, so top-k can only pick inside them. Groups are config groups
(``MoEConfig.num_groups``, contiguous), nodes or ranks (device-limited routing under expert
parallelism, built from the placement table by ``GroupMap.from_owner``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import MoEConfig


@dataclasses.dataclass
class GroupMap:
    """Members of every group: ``member_GM[g, m]`` is an expert index, or E for padding."""

    member_GM: torch.Tensor
    num_experts: int

    @classmethod
    def from_owner(cls, owner_E: list[int], num_groups: int) -> "GroupMap":
        """Groups from the group index of every expert (each expert in exactly one group)."""
        E = len(owner_E)
        members = [[e for e in range(E) if owner_E[e] == g] for g in range(num_groups)]
        M = max(1, max(len(m) for m in members))
        rows = [m + [E] * (M - len(m)) for m in members]
        return cls(torch.tensor(rows, dtype=torch.int64), E)

    @classmethod
    def contiguous(cls, num_experts: int, num_groups: int) -> "GroupMap":
        size = num_experts // num_groups
        return cls.from_owner([e // size for e in range(num_experts)], num_groups)

    @property
    def num_groups(self) -> int:
        return self.member_GM.shape[0]

    def to(self, device: torch.device) -> "GroupMap":
        return GroupMap(self.member_GM.to(device), self.num_experts)


def group_scores(select_TE: torch.Tensor, groups: GroupMap, score_experts: int) -> torch.Tensor:
    """Score of every group for every token, ``[T, G]`` (see the module docstring)."""
    T = select_TE.shape[0]
    padded_TE1 = torch.cat([select_TE, select_TE.new_full((T, 1), float("-inf"))], dim=1)
    member_TGM = padded_TE1[:, groups.member_GM]
    j = min(score_experts, member_TGM.shape[-1])
    best_TGJ = member_TGM.topk(j, dim=-1).values
    finite_TGJ = torch.isfinite(best_TGJ)
    score_TG = torch.where(finite_TGJ, best_TGJ, 0.0).sum(-1)
    return torch.where(finite_TGJ.any(-1), score_TG, float("-inf"))


def limit_to_groups(
    select_TE: torch.Tensor, groups: GroupMap, top_groups: int, score_experts: int
) -> torch.Tensor:
    """``select_TE`` with -inf outside each token's ``top_groups`` best groups."""
    if top_groups >= groups.num_groups:
        return select_TE
    score_TG = group_scores(select_TE, groups, score_experts)
    chosen_TG = torch.zeros_like(score_TG, dtype=torch.bool)
    chosen_TG.scatter_(1, score_TG.topk(top_groups, dim=-1).indices, True)
    T = select_TE.shape[0]
    allowed_TE1 = torch.zeros(T, groups.num_experts + 1, dtype=torch.bool, device=select_TE.device)
    member_TGM = groups.member_GM.expand(T, -1, -1)
    allowed_TE1.scatter_(1, member_TGM.reshape(T, -1), chosen_TG.unsqueeze(-1).expand_as(member_TGM).reshape(T, -1))
    return select_TE.masked_fill(~allowed_TE1[:, :-1], float("-inf"))


def device_limits(slot_expert_WS: np.ndarray, ranks_per_node: int | None, cfg: MoEConfig) -> list[tuple[GroupMap, int]]:
    """Node and rank groups of ``cfg.max_nodes_per_token`` / ``max_ranks_per_token`` from a
    placement (``slot_expert_WS[r, s]``: expert in slot s of rank r, -1 empty).

    An expert's rank is the rank that holds it; tables with replicas are refused (the dispatcher
    splits an expert's rows over its replicas by quota, not by the ranks a token chose). Nodes
    need ``ranks_per_node`` (None: the node limit is not applied).
    """
    E = cfg.num_experts
    held_E = np.bincount(slot_expert_WS[slot_expert_WS >= 0], minlength=E)
    if (held_E != 1).any():
        raise ValueError(
            "MoEConfig.max_ranks_per_token / max_nodes_per_token need a placement with one replica per expert; "
            f"this table holds experts {np.nonzero(held_E != 1)[0].tolist()} {held_E[held_E != 1].tolist()} times"
        )
    W = slot_expert_WS.shape[0]
    owner_E = [0] * E
    for r, s in zip(*np.nonzero(slot_expert_WS >= 0)):
        owner_E[int(slot_expert_WS[r, s])] = int(r)
    limits = []
    if cfg.max_nodes_per_token is not None and ranks_per_node is not None:
        nodes = -(-W // ranks_per_node)
        limits.append((GroupMap.from_owner([r // ranks_per_node for r in owner_E], nodes), cfg.max_nodes_per_token))
    if cfg.max_ranks_per_token is not None:
        limits.append((GroupMap.from_owner(owner_E, W), cfg.max_ranks_per_token))
    for groups, top in limits:
        sizes = sorted(n for n in (groups.member_GM < E).sum(1).tolist() if n)  # empty groups are never chosen
        if top < len(sizes) and sum(sizes[:top]) < cfg.top_k:
            raise ValueError(
                f"device-limited routing: {top} of the ranks/nodes can hold fewer than top_k={cfg.top_k} experts"
            )
    return limits
