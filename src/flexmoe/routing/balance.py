"""Load-balancing loss variants beyond the layer's batch (``MoEConfig.aux_loss_scope``).

Legend: T tokens, E experts, K chosen experts per token, B sequences, S tokens per sequence.
Every variant is ``E * sum_e f_e * P_e`` (the Switch-Transformer loss) with f_e the fraction of
counted (token, slot) pairs on expert e (no gradient) and P_e the mean normalised router score
of e; they differ in which tokens f and P are taken over:

- sequence (DeepSeek-V3 sequence-wise loss): per sequence, then the mean over sequences;
- global (Qwen3 global-batch balancing, Megatron ``global_aux_loss``): f from the counts summed
  over a data-parallel process group, P over this rank's tokens (averaging the loss over the
  ranks, as data-parallel gradient averaging does, gives the global P when ranks hold equal
  token counts);
- pooled (HF ``load_balancing_loss_func``): f and P over the tokens of all layers together,
  and ``top_k`` times larger (HF counts token fractions per slot and sums over slots).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import collectives
from ..config import MoEConfig
from .base import Routing, expert_counts, load_balancing_loss, router_z_loss


def normalised_probs(probs_TE: torch.Tensor) -> torch.Tensor:
    """Router scores normalised to sum to one per token (softmax probabilities are already)."""
    return probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def sequence_balance_loss(routing: Routing, seq_len: int) -> torch.Tensor:
    """Mean over the ``T / seq_len`` sequences of each sequence's Switch loss."""
    probs_TE = routing.probs_TE
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    if T % seq_len:
        raise ValueError(f"{T} tokens do not split into sequences of {seq_len}")
    B, K = T // seq_len, routing.expert_TK.shape[1]
    expert_BN = routing.counted_expert_TK.reshape(B, seq_len * K)
    counts_BE = torch.zeros(B, E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_BE.scatter_add_(1, expert_BN, torch.ones_like(expert_BN, dtype=probs_TE.dtype))
    p_BE = normalised_probs(probs_TE).view(B, seq_len, E).mean(1)
    return E * (counts_BE / (seq_len * K) * p_BE).sum(-1).mean()


class ExpertCountAgreement:
    """The process groups whose ranks agreed on a layer's ``num_experts`` (one per layer).

    ``global_balance_loss`` sums counts of size ``num_experts`` over a group, so the ranks must
    agree on it before the sum. A layer's expert count never changes (its config is frozen), so
    each group is checked once, on its first forward: later forwards pay one all-reduce and no
    host synchronisation.
    """

    def __init__(self) -> None:
        self._groups: list[dist.ProcessGroup] = []

    def __reduce__(self):
        """Copies and pickles start unchecked (process groups do not copy)."""
        return (ExpertCountAgreement, ())

    def check(self, num_experts: int, group: dist.ProcessGroup | None, device: torch.device) -> None:
        """Raise ValueError on every rank of ``group`` when they disagree on ``num_experts``
        (a collective on the first call per group; nothing afterwards)."""
        resolved = dist.group.WORLD if group is None else group
        if any(g is resolved for g in self._groups):
            return
        E = num_experts
        check_2 = torch.tensor([E, -E], dtype=torch.int64, device=device)
        collectives.all_reduce(check_2, op=dist.ReduceOp.MAX, group=group)
        high, low = check_2.tolist()
        if high != E or -low != E:
            raise ValueError(
                f"aux_loss_scope='global': ranks disagree on num_experts (this rank {E}, range {-low}..{high})"
            )
        self._groups.append(resolved)


def global_balance_loss(
    routing: Routing, group: dist.ProcessGroup | None, agreement: ExpertCountAgreement | None = None
) -> torch.Tensor:
    """Switch loss with the load fractions counted over every rank of ``group``.

    Collective: every rank of ``group`` calls it in the same forward (ranks without tokens too).
    The expert count is checked across ranks first, so a mismatch raises instead of hanging
    (once per group with the layer's ``agreement``; every call without one).
    ``group=None`` is the default group, or this process alone when torch.distributed is not
    initialised (the loss is then the batch loss).
    """
    probs_TE = routing.probs_TE
    T, E = probs_TE.shape
    device = probs_TE.device
    counts_E = expert_counts(routing.counted_expert_TK, None, E)
    counts_E1 = torch.cat([counts_E, counts_E.new_full((1,), routing.expert_TK.numel())])  # no host-to-device copy
    if group is not None or (dist.is_available() and dist.is_initialized()):
        (agreement or ExpertCountAgreement()).check(E, group, device)
        collectives.all_reduce(counts_E1, group=group)
    if T == 0:  # otherwise the summed pair count includes this rank's T * K > 0
        return probs_TE.sum() * 0.0
    f_E = counts_E1[:E].to(probs_TE.dtype) / counts_E1[-1].to(probs_TE.dtype)
    return E * torch.sum(f_E * normalised_probs(probs_TE).mean(0))


@dataclasses.dataclass
class BalanceStats:
    """One layer's share of a pooled balance loss: counted pairs per expert (no gradient), the
    sum over tokens of the normalised scores (differentiable) and the token count."""

    counts_E: torch.Tensor
    prob_sum_E: torch.Tensor
    num_tokens: int

    @classmethod
    def of(cls, routing: Routing) -> "BalanceStats":
        E = routing.num_experts
        counts_E = expert_counts(routing.counted_expert_TK, None, E).to(routing.probs_TE.dtype)
        return cls(counts_E, normalised_probs(routing.probs_TE).sum(0), routing.probs_TE.shape[0])


def pooled_balance_loss(stats: list[BalanceStats]) -> torch.Tensor:
    """HF's loss over the tokens of all layers: ``E * sum_e (c_e / N) * (s_e / N)``, where c_e
    counts the pairs on e and s_e sums e's scores over all N tokens of all layers (= ``top_k``
    times the Switch loss of the pooled tokens)."""
    sizes = {s.counts_E.shape[0] for s in stats}
    if len(sizes) != 1:
        raise ValueError(f"aux_loss_scope='pooled' needs the same num_experts in every layer, got {sorted(sizes)}")
    E = sizes.pop()
    device = stats[0].prob_sum_E.device
    N = sum(s.num_tokens for s in stats)
    counts_E = sum(s.counts_E.to(device) for s in stats)
    prob_sum_E = sum(s.prob_sum_E.to(device) for s in stats)
    if N == 0:
        return prob_sum_E.sum() * 0.0
    return E * torch.sum(counts_E / N * (prob_sum_E / N))


def router_loss(
    routing: Routing, config: MoEConfig, seq_len: int, group: dist.ProcessGroup | None = None,
    agreement: ExpertCountAgreement | None = None,
) -> torch.Tensor:
    """A layer's aux loss: ``aux_loss_coef`` x the balance loss of ``config.aux_loss_scope`` +
    ``z_loss_coef`` x z-loss (zero when neither is configured).

    ``seq_len``: tokens per sequence ("sequence" scope); ``group``: the data-parallel group
    whose counts the "global" scope sums (a collective then; ``agreement``: the layer's record
    of the groups that agreed on its expert count). The "pooled" scope adds nothing
    here: ``flexmoe.aux_loss(model)`` computes it from every layer's ``BalanceStats``. A router
    with its own balance loss (the DTS gate) keeps it in every scope.
    """
    loss = routing.logits_TE.new_zeros(())
    scope = config.aux_loss_scope
    if config.aux_loss_coef and scope != "pooled":
        if scope == "sequence" and routing.balance_loss is None:
            balance = sequence_balance_loss(routing, seq_len)
        elif scope == "global" and routing.balance_loss is None:
            balance = global_balance_loss(routing, group, agreement)
        else:
            balance = load_balancing_loss(routing)
        loss = loss + config.aux_loss_coef * balance
    if config.z_loss_coef:
        loss = loss + config.z_loss_coef * router_z_loss(routing)
    return loss
