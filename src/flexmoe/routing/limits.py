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

import torch


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
