"""Divergence guard: find a training step whose loss or gradients are not finite, on any rank.

The check rides on the all-reduce that averages the step's losses over the ranks (one more
number in the same tensor), so every rank reaches the same verdict at no extra collective, and
it runs before gradient clipping and the optimizer step: a non-finite step never touches the
weights. What happens then (``TrainConfig.on_nonfinite``) is the training loop's business.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistInfo


# With on_nonfinite="skip", this many non-finite steps in a row mean the weights themselves
# have diverged (every further batch would be skipped too): training stops as with "stop".
MAX_SKIPS_IN_A_ROW = 10


class DivergenceError(RuntimeError):
    """Training stopped at a step whose loss or gradients were not finite (nothing was updated)."""


def reduce_losses(lm_loss: torch.Tensor, aux_loss, model: nn.Module, info: DistInfo) -> tuple[float, float, str | None]:
    """The LM and auxiliary losses averaged over the ranks, and why the step is non-finite on
    some rank (None when the losses and every gradient are finite everywhere). Collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad_grads = (torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().sum().to(lm_loss)
                 if grads else torch.zeros((), device=lm_loss.device))
    values = torch.stack([lm_loss.float(), torch.as_tensor(aux_loss).float().to(lm_loss.device), bad_grads.float()])
    if info.world_size > 1:
        dist.all_reduce(values, group=info.group)
        values[:2] /= info.world_size
    lm, aux, bad = (float(v) for v in values.tolist())
    if not (math.isfinite(lm) and math.isfinite(aux)):
        return lm, aux, f"the loss is non-finite (lm {lm}, aux {aux})"
    if bad:
        names = [n for n, p in model.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        where = f" (here: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""
        return lm, aux, f"gradients are non-finite{where}"
    return lm, aux, None
