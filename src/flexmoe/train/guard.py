"""Divergence guard: find a training step whose loss or gradients are not finite, on any rank.

The check rides on the all-reduce that averages the step's losses over the ranks (one more
number in the same tensor), so every rank reaches the same verdict at no extra collective, and
it runs before gradient clipping and the optimizer step: a non-finite step never touches the
weights. What happens then (``TrainConfig.on_nonfinite``) is the training loop's business.
The same tensor carries the main rank's "a file write failed" flag (the metrics and the trace
are written there alone), so every rank stops at the same point with the main rank's error.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import collectives
from .distributed import DistInfo


# With on_nonfinite="skip", this many non-finite steps in a row mean the weights themselves
# have diverged (every further batch would be skipped too): training stops as with "stop".
MAX_SKIPS_IN_A_ROW = 10


class DivergenceError(RuntimeError):
    """Training stopped at a step whose loss or gradients were not finite (nothing was updated)."""


@dataclasses.dataclass
class StepVerdict:
    """What every rank learns from the step's loss all-reduce."""

    lm: float
    aux: float
    nonfinite: str | None  # why the step is non-finite on some rank; None when it is not
    write_failed: bool  # the main rank failed to write a file of the run (metrics, trace)


def reduce_losses(lm_loss: torch.Tensor, aux_loss, model: nn.Module, info: DistInfo,
                  write_failed: bool = False) -> StepVerdict:
    """The LM and auxiliary losses averaged over the ranks, whether the step is non-finite on
    some rank, and whether the main rank reported a failed file write (``write_failed`` there).
    Collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad_grads = (torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().sum().to(lm_loss)
                 if grads else torch.zeros((), device=lm_loss.device))
    failed = torch.tensor(float(write_failed and info.is_main), device=lm_loss.device)
    values = torch.stack([lm_loss.float(), torch.as_tensor(aux_loss).float().to(lm_loss.device), bad_grads.float(),
                          failed])
    if info.world_size > 1:
        collectives.all_reduce(values, group=info.group)
        values[:2] /= info.world_size
    lm, aux, bad, failed = (float(v) for v in values.tolist())
    return StepVerdict(lm, aux, _nonfinite(lm, aux, bad, model), bool(failed))


def _nonfinite(lm: float, aux: float, bad: float, model: nn.Module) -> str | None:
    if not (math.isfinite(lm) and math.isfinite(aux)):
        return f"the loss is non-finite (lm {lm}, aux {aux})"
    if bad:
        names = [n for n, p in model.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        where = f" (here: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""
        return f"gradients are non-finite{where}"
    return None
