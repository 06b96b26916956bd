"""Several processes: who this process is, gradient synchronisation and clipping, seeds.

Legend: E logical experts, W ranks, S expert slots per rank.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from .. import collectives
from ..parallel import ParallelExperts


@dataclasses.dataclass
class DistInfo:
    """This process's place among the data-parallel ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main_rank_error(error: str | None, info: DistInfo) -> str | None:
    """The main rank's error message (None: it had none) on every rank. Collective with several
    ranks: the main rank writes the run's files alone, so a failed write reaches the others here,
    before they would wait for it in a collective it never joins."""
    if info.world_size > 1:
        error = collectives.broadcast_object(error if info.is_main else None, src=0, group=info.group)
        if error is not None:
            error = f"rank 0: {error}"
    return error


def shown(show, *args, **kwargs) -> bool:
    """``show(*args, **kwargs)``, terminal output of the main rank; False instead of an OSError
    when the terminal is gone (a broken pipe, a full disk under a redirected log, EIO after its
    session closed). Training goes on without it: output must never stop the main rank alone,
    the other ranks would wait for it in their next collective."""
    try:
        show(*args, **kwargs)
    except OSError:
        return False
    return True


def clip_gradients(model: nn.Module, max_norm: float, info: DistInfo) -> torch.Tensor:
    """Clip to a global gradient norm; returns the norm before clipping.

    With expert parallelism each logical expert counts once (its first replica) and the norm is
    summed over the ranks, so every rank applies the same factor and replicated weights stay equal.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    stages = [m for m in model.modules() if isinstance(m, ParallelExperts)]
    if not stages:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    expert_ids = {id(p) for stage in stages for p in stage.parameters()}
    dense_sq = sum((p.grad.float().square().sum() for p in params if id(p) not in expert_ids),
                   torch.zeros((), device=params[0].device))
    expert_sq = torch.zeros((), device=params[0].device)
    for stage in stages:
        flat = stage.placement.slot_expert_WS.reshape(-1)
        first = np.array([np.flatnonzero(flat == e)[0] for e in range(stage.placement.num_experts)])
        S = stage.placement.slots_per_rank
        mine = torch.as_tensor(first[(first // S) == stage.rank] % S, device=params[0].device)
        for p in stage.parameters():
            if p.grad is not None:
                expert_sq = expert_sq + p.grad.float()[mine].square().sum()
    if info.world_size > 1:
        collectives.all_reduce(expert_sq, group=info.group)
    total = (dense_sq + expert_sq).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.to(p.grad.dtype))
    return total


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of the training randomness (Gumbel noise) of one rank."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
