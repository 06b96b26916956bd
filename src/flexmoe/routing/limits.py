"""Group-limited routing: each token picks its experts among its few best groups of experts.

Legend: T tokens, E experts, G groups, M members of the largest group.

A group's score for a token is the sum of its ``score_experts`` best finite selection scores
(DeepSeek-V3: 2; 1 = the max, DeepSeek-V2); a group with no finite score (all masked by an
earlier limit) scores -inf. The token keeps the ``top_groups`` best groups; every other expert's
selection score becomes -inf, so top-k can only pick inside them. Groups are config groups
(``MoEConfig.num_groups``, contiguous), nodes or ranks (device-limited routing under expert
parallelism, built from the placement table by ``device_limits``). A replicated expert belongs
to the group of every rank holding a replica; it stays allowed if any of them is chosen, and
``pick_replicas`` then sends the pair to a replica on a chosen rank.
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
    # Every expert in exactly one group, groups of M consecutive experts in order (config groups,
    # ranks of a static table): scores and masks are views of [T, G, M], no gather or scatter.
    blocks: bool = False

    @classmethod
    def from_members(cls, members: list[list[int]], num_experts: int) -> "GroupMap":
        """Groups from their member lists (an expert may be in several groups)."""
        M = max(1, max(len(m) for m in members))
        rows = [list(m) + [num_experts] * (M - len(m)) for m in members]
        blocks = [e for m in rows for e in m] == list(range(num_experts))
        return cls(torch.tensor(rows, dtype=torch.int64), num_experts, blocks)

    @classmethod
    def from_owner(cls, owner_E: list[int], num_groups: int) -> "GroupMap":
        """Groups from the group index of every expert (each expert in exactly one group)."""
        E = len(owner_E)
        return cls.from_members([[e for e in range(E) if owner_E[e] == g] for g in range(num_groups)], E)

    @classmethod
    def contiguous(cls, num_experts: int, num_groups: int) -> "GroupMap":
        size = num_experts // num_groups
        return cls.from_owner([e // size for e in range(num_experts)], num_groups)

    @property
    def num_groups(self) -> int:
        return self.member_GM.shape[0]

    def to(self, device: torch.device) -> "GroupMap":
        return GroupMap(self.member_GM.to(device), self.num_experts, self.blocks)


def group_scores(select_TE: torch.Tensor, groups: GroupMap, score_experts: int) -> torch.Tensor:
    """Score of every group for every token, ``[T, G]`` (see the module docstring)."""
    T = select_TE.shape[0]
    if groups.blocks:
        member_TGM = select_TE.view(T, *groups.member_GM.shape)
    else:
        padded_TE1 = torch.cat([select_TE, select_TE.new_full((T, 1), float("-inf"))], dim=1)
        member_TGM = padded_TE1[:, groups.member_GM]
    j = min(score_experts, member_TGM.shape[-1])
    best_TGJ = _best(member_TGM, j)
    finite_TGJ = torch.isfinite(best_TGJ)
    score_TG = torch.where(finite_TGJ, best_TGJ, 0.0).sum(-1)
    return torch.where(finite_TGJ.any(-1), score_TG, float("-inf"))


def _best(x_TGM: torch.Tensor, j: int) -> torch.Tensor:
    """The ``j`` largest of every row, in descending order (``topk(j).values``); j <= 2 as max
    reductions, which on a GPU are several times faster than top-k over short rows."""
    if j > 2:
        return x_TGM.topk(j, dim=-1).values
    first, at = x_TGM.max(dim=-1, keepdim=True)
    if j == 1:
        return first
    second = x_TGM.scatter(-1, at, float("-inf")).amax(dim=-1, keepdim=True)
    return torch.cat([first, second], dim=-1)


def choose_groups(
    select_TE: torch.Tensor, groups: GroupMap, top_groups: int, score_experts: int,
    eligible_TG: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token's ``top_groups`` best groups, a bool ``[T, G]`` mask; only groups with a finite
    score, and only ``eligible_TG`` ones when given (ranks of the chosen nodes)."""
    score_TG = group_scores(select_TE, groups, score_experts)
    if eligible_TG is not None:
        score_TG = score_TG.masked_fill(~eligible_TG, float("-inf"))
    chosen_TG = torch.zeros_like(score_TG, dtype=torch.bool)
    chosen_TG.scatter_(1, score_TG.topk(min(top_groups, groups.num_groups), dim=-1).indices, True)
    return chosen_TG & torch.isfinite(score_TG)


def mask_to_groups(select_TE: torch.Tensor, groups: GroupMap, chosen_TG: torch.Tensor) -> torch.Tensor:
    """``select_TE`` with -inf on the experts in none of the token's chosen groups."""
    T = select_TE.shape[0]
    G, M = groups.member_GM.shape
    if groups.blocks:
        return select_TE.view(T, G, M).masked_fill(~chosen_TG.unsqueeze(-1), float("-inf")).view(T, G * M)
    member_TN = groups.member_GM.expand(T, G, M).reshape(T, G * M)
    hits_TE1 = torch.zeros(T, groups.num_experts + 1, dtype=torch.int32, device=select_TE.device)
    hits_TE1.scatter_add_(1, member_TN, chosen_TG.unsqueeze(-1).expand(T, G, M).reshape(T, G * M).to(torch.int32))
    return select_TE.masked_fill(hits_TE1[:, :-1] == 0, float("-inf"))


def limit_to_groups(
    select_TE: torch.Tensor, groups: GroupMap, top_groups: int, score_experts: int
) -> torch.Tensor:
    """``select_TE`` with -inf outside each token's ``top_groups`` best groups."""
    if top_groups >= groups.num_groups:
        return select_TE
    return mask_to_groups(select_TE, groups, choose_groups(select_TE, groups, top_groups, score_experts))


def pick_replicas(expert_TK: torch.Tensor, chosen_TW: torch.Tensor, slot_WE: torch.Tensor, rank: int) -> torch.Tensor:
    """Global slot (``rank * S + slot``) each pair is sent to: a replica of its expert on one of
    its token's chosen ranks, this rank's own when it is one of them, else the lowest such rank.

    slot_WE[r, e]: global slot of the first replica of e on rank r, -1 when r holds none.
    """
    slot_TKW = slot_WE.t()[expert_TK]
    ok_TKW = (slot_TKW >= 0) & chosen_TW.unsqueeze(1)
    W = slot_WE.shape[0]
    preference_W = torch.arange(W, 0, -1, device=expert_TK.device)
    preference_W[rank] = W + 1
    best_TK = torch.where(ok_TKW, preference_W, 0).argmax(-1, keepdim=True)
    return slot_TKW.gather(-1, best_TK).squeeze(-1)


@dataclasses.dataclass
class DeviceLimits:
    """Device- / node-limited routing on one placement.

    nodes, ranks: (groups, how many a token keeps) of the node and rank limits, or None.
    node_W: node of every rank (the rank limit only picks ranks of the chosen nodes).
    slot_WE: the replica map when experts are replicated (see ``pick_replicas``); rank: this rank.
    """

    nodes: tuple[GroupMap, int] | None
    ranks: tuple[GroupMap, int] | None
    node_W: torch.Tensor
    slot_WE: torch.Tensor | None = None
    rank: int = 0

    def to(self, device: torch.device) -> "DeviceLimits":
        move = lambda stage: None if stage is None else (stage[0].to(device), stage[1])  # noqa: E731
        return DeviceLimits(move(self.nodes), move(self.ranks), self.node_W.to(device),
                            None if self.slot_WE is None else self.slot_WE.to(device), self.rank)

    def limit(self, select_TE: torch.Tensor, score_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``select_TE`` masked to the chosen nodes, then the chosen ranks of those nodes, and the
        ranks a token may send to, ``[T, W]`` bool."""
        T, W = select_TE.shape[0], self.node_W.shape[0]
        allowed_TW = torch.ones(T, W, dtype=torch.bool, device=select_TE.device)
        if self.nodes is not None:
            groups, top = self.nodes
            node_TN = choose_groups(select_TE, groups, top, score_experts)
            select_TE = mask_to_groups(select_TE, groups, node_TN)
            allowed_TW = node_TN[:, self.node_W]
        if self.ranks is not None:
            groups, top = self.ranks
            allowed_TW = choose_groups(select_TE, groups, top, score_experts, allowed_TW)
            select_TE = mask_to_groups(select_TE, groups, allowed_TW)
        return select_TE, allowed_TW


def device_limits(
    slot_expert_WS: np.ndarray, ranks_per_node: int | None, cfg: MoEConfig, rank: int = 0
) -> DeviceLimits:
    """Node and rank groups of ``cfg.max_nodes_per_token`` / ``max_ranks_per_token`` from a
    placement (``slot_expert_WS[r, s]``: expert in slot s of rank r, -1 empty).

    A rank's group is the experts it holds, a node's those of its ranks. With replicas an expert
    is in several groups and each pair goes to a replica on one of its token's allowed ranks
    (``pick_replicas``), not by the table's shares. Nodes need ``ranks_per_node`` (None: the node
    limit is not applied).
    """
    E = cfg.num_experts
    W, S = slot_expert_WS.shape
    held_E = np.bincount(slot_expert_WS[slot_expert_WS >= 0], minlength=E)
    members = [sorted({int(e) for e in slot_expert_WS[r] if e >= 0}) for r in range(W)]
    per_node = W if ranks_per_node is None else ranks_per_node
    node_W = torch.arange(W) // per_node
    nodes = ranks = None
    if cfg.max_nodes_per_token is not None and ranks_per_node is not None:
        count = -(-W // per_node)
        node_members = [sorted({e for r in range(W) if r // per_node == n for e in members[r]}) for n in range(count)]
        nodes = (GroupMap.from_members(node_members, E), cfg.max_nodes_per_token)
    if cfg.max_ranks_per_token is not None:
        ranks = (GroupMap.from_members(members, E), cfg.max_ranks_per_token)
    for groups, top in [stage for stage in (nodes, ranks) if stage is not None]:
        sizes = sorted(n for n in (groups.member_GM < E).sum(1).tolist() if n)  # empty groups are never chosen
        if top < len(sizes) and sum(sizes[:top]) < cfg.top_k:
            raise ValueError(
                f"device-limited routing: {top} of the ranks/nodes can hold fewer than top_k={cfg.top_k} experts"
            )
    slot_WE = None
    if (held_E > 1).any() and (nodes is not None or ranks is not None):
        slot_WE = torch.full((W, E), -1, dtype=torch.int64)
        for r in range(W):
            for s in reversed(range(S)):
                if slot_expert_WS[r, s] >= 0:
                    slot_WE[r, slot_expert_WS[r, s]] = r * S + s
    return DeviceLimits(nodes, ranks, node_W, slot_WE, rank)
