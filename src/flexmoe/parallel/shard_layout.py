"""The sharded-expert layout every adaptive method runs from, and each method's exchange plan.

Legend: W ranks, E experts, G expert groups, m = W / G ranks per group (the shard degree),
Eg = E / G experts per group, F expert width, H = 2 (gated) or 1, D model width, r the spread.

Ranks g*m .. g*m+m-1 form group g and serve experts g*Eg .. g*Eg+Eg-1. Every expert of the
group is cut along F into m shards; group rank j holds shard j (columns j*F/m .. (j+1)*F/m of
``down_proj`` and the same rows of the gate and of the up half of ``gate_up_proj``):
``gate_up [Eg, H*F/m, D]`` (gate rows of the shard, then up rows) and ``down [Eg, D, F/m]``.
Each rank holds 1/W of all expert parameters, whatever the method. Methods (parameters never
move between steps; within a step they are gathered and the gathered copies dropped):

* r = 0, data parallel: all-gather every shard of every expert (each rank then holds all E
  experts whole), run the local tokens; backward reduce-scatters the gradients to the shards.
* 1 <= r, r | m: group rank j belongs to slice q = j // (m/r) of its group and gathers the m/r
  shards of that slice from its slice mates (width F/r). A token of source rank s that chose
  experts of group g goes once (with its experts and weights there) to the r ranks
  g*m + q*(m/r) + s % (m/r), q = 0..r-1: each computes its slice for those experts and sends
  back one weighted sum; the source adds up what comes back. r = 1 is expert parallelism (the m ranks of a group
  are replicas of its experts, each serving the sources s with s % m == j); r = m is sharded
  experts (no parameter gathering at all). With m = 1 both are classic expert parallelism.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .adaptive_config import AdaptiveConfig

DP = 0


def default_shard_degree(world: int, num_experts: int) -> int:
    """The smallest m: W / m expert groups, each of E / (W / m) experts."""
    return world // math.gcd(world, num_experts)


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Who holds which shard (see the module docstring)."""

    world: int
    num_experts: int
    shard_degree: int
    d_ff: int
    gated: bool

    @classmethod
    def build(cls, world: int, num_experts: int, d_ff: int, gated: bool, shard_degree: int | None) -> "ShardLayout":
        m = default_shard_degree(world, num_experts) if shard_degree is None else shard_degree
        if world % m:
            raise ValueError(f"AdaptiveConfig.shard_degree={m} must divide the expert group size {world}")
        if num_experts % (world // m):
            raise ValueError(
                f"AdaptiveConfig.shard_degree={m}: the {world // m} expert groups must divide num_experts={num_experts}"
            )
        if d_ff % m:
            raise ValueError(f"AdaptiveConfig.shard_degree={m} must divide d_ff={d_ff} (experts are cut along d_ff)")
        return cls(world, num_experts, m, d_ff, gated)

    @property
    def groups(self) -> int:
        return self.world // self.shard_degree

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.groups

    @property
    def halves(self) -> int:
        return 2 if self.gated else 1

    @property
    def spreads(self) -> tuple[int, ...]:
        """Every r the layout offers besides data parallelism: the divisors of m."""
        m = self.shard_degree
        return tuple(r for r in range(1, m + 1) if m % r == 0)

    def method_code(self, method) -> int:
        """0 for "dp", r for "ep" (1), "sharded" (m) or an int r; ValueError if not offered."""
        code = {"dp": DP, "ep": 1, "sharded": self.shard_degree}.get(method, method)
        if code != DP and code not in self.spreads:
            raise ValueError(
                f"AdaptiveConfig: method r={method!r} is not offered by the layout with shard_degree m="
                f"{self.shard_degree} (r must divide m: {self.spreads}, or 'dp')"
            )
        return code

    def candidate_codes(self, config: AdaptiveConfig) -> tuple[int, ...]:
        if config.candidates is None:
            return (DP,) + self.spreads
        return tuple(dict.fromkeys(self.method_code(c) for c in config.candidates))

    def group_of(self, rank: int) -> tuple[int, int]:
        """(group, index j of the rank within its group)."""
        return divmod(rank, self.shard_degree)

    def gather_members(self, rank: int, code: int) -> list[int]:
        """Ranks whose shards this rank gathers for method ``code`` (itself included), in rank
        order; every member gathers from the same list."""
        if code == DP:
            return list(range(self.world))
        g, j = self.group_of(rank)
        width = self.shard_degree // code
        first = g * self.shard_degree + (j // width) * width
        return list(range(first, first + width))

    def dispatch(self, counts_WE: np.ndarray, pairs_WG: np.ndarray, rank: int, code: int) -> "DispatchSplits":
        """Host plan of method ``code`` >= 1 for ``rank``, from every rank's (token, expert) rows
        per expert and (token, group) pairs per expert group: a token travels once to each of
        the r ranks serving a group it chose, however many of the group's experts it chose."""
        W, m = self.world, self.shard_degree
        width = m // code
        start_G = np.concatenate([[0], np.cumsum(pairs_WG[rank])[:-1]])
        dst = np.arange(W)
        dst_group, dst_j = dst // m, dst % m
        to_dst = (dst_j % width) == (rank % width)
        send_W = np.where(to_dst, pairs_WG[rank][dst_group], 0)
        g, j = self.group_of(rank)
        src_ok = (np.arange(W) % width) == (j % width)
        recv_W = np.where(src_ok, pairs_WG[:, g], 0)
        counts_WGE = counts_WE.reshape(W, self.groups, self.experts_per_group)
        return DispatchSplits(
            send_W=send_W,
            recv_W=recv_W,
            send_start=start_G[dst_group[to_dst]],
            send_len=pairs_WG[rank][dst_group[to_dst]],
            rows_E=counts_WGE[src_ok, g].sum(axis=0),
        )


@dataclasses.dataclass(frozen=True)
class DispatchSplits:
    """One rank's exchange for a method r >= 1.

    send_W / recv_W: (token, group) pairs sent to / received from each rank. send_start /
    send_len: the blocks of this rank's pairs (ordered by group, then token) making up the send
    buffer, in destination order (a group's block goes to each of its r destinations).
    rows_E: (token, expert) rows this rank computes per local expert.
    """

    send_W: np.ndarray
    recv_W: np.ndarray
    send_start: np.ndarray
    send_len: np.ndarray
    rows_E: np.ndarray
