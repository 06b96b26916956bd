"""ShardedExperts: the expert stage of an adaptive MoE layer (Tutel's adaptive parallelism).

Legend: W ranks, E experts, Eg experts per group, m shard degree, Fm = F / m shard width,
H = 2 (gated) or 1, D width, T local tokens, N local expert-grouped rows, K experts per token,
P this rank's (token, group) pairs, R pairs received, r spread (0 = dp).
Every rank keeps its shards ``gate_up_proj [Eg, H*Fm, D]`` and ``down_proj [Eg, D, Fm]`` for
good (layout in shard_layout.py); each forward runs one method on them, chosen per load level
(adaptive.py) or fixed. Gathered weights live for one step only and their gradients flow back to
the shards through the reverse exchange, so every method gives the same gradients.
``state_dict()`` holds the logical ``[E, ...]`` experts of a one-device layer (collective).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import MoEConfig
from ..experts import GroupedExperts, expert_ffn
from ..ops import permute, unpermute_sum
from ..plan import DispatchPlan
from .adaptive import RESOLVE, TRIAL, MethodTuner
from .adaptive_config import AdaptiveConfig
from .agreement import BACKWARD, FORWARD, STATE, all_gather_ints, check_envelope
from .comm import all_to_all_v, index_from_ranges
from .groups import EPGroup
from .shard_layout import DP, ShardLayout
from .tuning import BeforeBackward, TrainingTrialClock, synchronized_time

_PER_RANK_FIELDS = ("timeout_s",)


class ShardedExperts(nn.Module):
    """Expert shards of one MoE layer over an expert group, run by any adaptive method.

    Attributes a user may read: ep_group (EPGroup), layout (ShardLayout), tuner (MethodTuner),
    last_method (code of the last forward's method: 0 = dp, r >= 1), last_counts_WE,
    forward_steps.
    """

    def __init__(self, config: MoEConfig, ep_group: EPGroup | dist.ProcessGroup | None, adaptive: AdaptiveConfig):
        super().__init__()
        if not isinstance(adaptive, AdaptiveConfig):
            raise TypeError(f"expected an AdaptiveConfig, got {type(adaptive).__name__}")
        ep = EPGroup.wrap(ep_group)
        self.config, self.ep_group, self.adaptive = config, ep, adaptive
        self.layout = ShardLayout.build(ep.size, config.num_experts, config.d_ff, config.is_gated,
                                        adaptive.shard_degree)
        self.candidates = self.layout.candidate_codes(adaptive)
        self._fixed = None if adaptive.method == "auto" else self.layout.method_code(adaptive.method)
        # All experts are initialised as on one device, then this rank keeps its shards, so a
        # layer built from one seed equals the one-device layer built from it.
        whole = GroupedExperts(config)
        self.gate_up_proj = nn.Parameter(self._shard_gate_up(whole.gate_up_proj.detach()).clone())
        self.down_proj = nn.Parameter(self._shard_down(whole.down_proj.detach()).clone())
        self.tuner = MethodTuner(self.candidates, adaptive.trials)
        self.last_method: int | None = None
        self.last_counts_WE: np.ndarray | None = None
        self.forward_steps = 0

    @property
    def rank(self) -> int:
        return self.ep_group.rank

    @property
    def size(self) -> int:
        return self.ep_group.size

    def set_method(self, method) -> None:
        """Run every later forward with ``method`` ("dp", "ep", "sharded", an int r), or go back
        to choosing online with "auto". Every rank must make the same call (checked)."""
        if method == "auto":
            self._fixed = None
        else:
            self._fixed = self.layout.method_code(method)

    def begin_forward(self) -> None:
        """Count a forward call of the layer (checked across ranks before any exchange)."""
        self.forward_steps += 1

    # ---- forward ------------------------------------------------------------------------------

    @torch.compiler.disable
    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, use_triton: bool) -> torch.Tensor:
        """Combined expert outputs of the local tokens under this step's method."""
        build_graph = torch.is_grad_enabled() and (
            x_TD.requires_grad or plan.row_weight_N.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        fields = self._fields(x_TD.dtype, plan.row_weight_N.dtype, build_graph)
        timeout = self.adaptive.timeout_s
        check_envelope(self.ep_group, FORWARD, self.forward_steps, fields, timeout, x_TD.device)
        pairs = _TokenGroups.of(plan, self.layout)
        counts_WE, pairs_WG = self._all_gather_counts(plan.counts_E, pairs.pairs_G)
        level = MethodTuner.level(counts_WE)
        phase = None
        if self._fixed is not None:
            code = self._fixed
        else:
            code, phase = self.tuner.choose(level)
            if phase == RESOLVE:
                code = self.tuner.resolve(level, self.ep_group, timeout, x_TD.device)
        start = synchronized_time(x_TD.device) if phase == TRIAL else 0.0
        weights = (self.gate_up_proj, self.down_proj)
        clock = None
        if phase == TRIAL and build_graph:  # a training forward: its backward belongs to the trial's time too
            clock = TrainingTrialClock(lambda: synchronized_time(x_TD.device),
                                       lambda seconds: self.tuner.record(level, code, seconds))
            x_TD, *weights = clock.wrap_inputs(x_TD, *weights)
        if code == DP:
            gate_up, down = self._gathered(DP, *weights)
            x_ND = permute(x_TD, plan.row_token_N, plan.pair_row_TK, use_triton)
            y_ND = expert_ffn(x_ND, gate_up, down, plan.offsets_E, plan.row_weight_N, self.config.activation,
                              use_triton, swiglu_alpha=self.config.swiglu_alpha, swiglu_limit=self.config.swiglu_limit)
            y_TD = unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, use_triton)
        else:
            y_TD = self._spread(x_TD, pairs, counts_WE, pairs_WG, code, use_triton, *weights)
        if clock is not None:
            y_TD = clock.wrap_output(y_TD, synchronized_time(x_TD.device) - start)
        elif phase == TRIAL:
            self.tuner.record(level, code, synchronized_time(x_TD.device) - start)
        if build_graph and self.size > 1:
            step = self.forward_steps
            y_TD = BeforeBackward.apply(
                y_TD, lambda: check_envelope(self.ep_group, BACKWARD, step, fields, timeout, x_TD.device))
        self.last_method, self.last_counts_WE = code, counts_WE
        return y_TD

    def _spread(self, x_TD, pairs: "_TokenGroups", counts_WE, pairs_WG, code: int, use_triton: bool,
                gate_up_shard: torch.Tensor, down_shard: torch.Tensor) -> torch.Tensor:
        """Method r >= 1: each (token, group) pair to r ranks, each computes its slice F / r of
        the pair's experts and returns their weighted sum; the source adds up the partials."""
        device, dtype = x_TD.device, x_TD.dtype
        T, D = x_TD.shape
        K = pairs.local_PK.shape[1]
        splits = self.layout.dispatch(counts_WE, pairs_WG, self.rank, code)
        gate_up, down = self._gathered(code, gate_up_shard, down_shard)
        send_index = index_from_ranges(splits.send_start, splits.send_len, device)
        token_S = pairs.token_P.index_select(0, send_index)
        payload = torch.cat([x_TD.index_select(0, token_S), pairs.weight_PK.index_select(0, send_index).to(dtype)], 1)
        received = self._exchange(payload, splits.send_W, splits.recv_W)
        local_RK = self._exchange(pairs.local_PK.index_select(0, send_index), splits.send_W, splits.recv_W)
        x_RD, weight_RK = received[:, :D], received[:, D:]
        # Expand the received pairs to (pair, k) rows grouped by local expert.
        R = local_RK.shape[0]
        flat = local_RK.reshape(-1).to(torch.int64)
        past_end = self.layout.experts_per_group * R * K
        key = torch.where(flat >= 0, flat * (R * K) + torch.arange(R * K, device=device), past_end)
        row_key = torch.sort(key).indices[:int(splits.rows_E.sum())]
        row_pair = row_key // K
        offsets = torch.from_numpy(np.cumsum(splits.rows_E).astype(np.int32)).to(device)
        out_rows = expert_ffn(x_RD.index_select(0, row_pair), gate_up, down, offsets,
                              weight_RK.reshape(-1).index_select(0, row_key), self.config.activation, use_triton,
                              swiglu_alpha=self.config.swiglu_alpha, swiglu_limit=self.config.swiglu_limit)
        out_RD = x_RD.new_zeros((R, D)).index_add(0, row_pair, out_rows)
        back = self._exchange(out_RD, splits.recv_W, splits.send_W)
        return x_TD.new_zeros((T, D)).index_add(0, token_S, back)

    # ---- parameters: shards <-> gathered <-> logical -------------------------------------------

    def _gathered(self, code: int, gate_up_shard: torch.Tensor, down_shard: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights this rank computes with under ``code``: all experts whole (dp) or its slice
        of its group's experts (r >= 1), gathered from the shards (this rank's parameters, or
        views of them; differentiable)."""
        members = self.layout.gather_members(self.rank, code)
        if len(members) == 1:
            return gate_up_shard, down_shard
        Eg = self.layout.experts_per_group
        rows = torch.cat([gate_up_shard.reshape(Eg, -1), down_shard.reshape(Eg, -1)], dim=1)
        send_W = np.zeros(self.size, dtype=np.int64)
        send_W[members] = Eg
        received = self._exchange(rows.repeat(len(members), 1), send_W, send_W)
        split = self.gate_up_proj[0].numel()
        groups = self.layout.groups if code == DP else 1
        width = len(members) // groups
        return (_join_gate_up(received[:, :split], groups, width, self.gate_up_proj.shape, self.layout.halves),
                _join_down(received[:, split:], groups, width, self.down_proj.shape))

    def _shard_gate_up(self, logical_EHD: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        g, j = lay.group_of(self.rank)
        Fm, D = lay.d_ff // lay.shard_degree, logical_EHD.shape[-1]
        view = logical_EHD.reshape(lay.groups, lay.experts_per_group, lay.halves, lay.shard_degree, Fm, D)
        return view[g, :, :, j].reshape(lay.experts_per_group, lay.halves * Fm, D)

    def _shard_down(self, logical_EDF: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        g, j = lay.group_of(self.rank)
        Fm, D = lay.d_ff // lay.shard_degree, logical_EDF.shape[1]
        return logical_EDF.reshape(lay.groups, lay.experts_per_group, D, lay.shard_degree, Fm)[g, :, :, j]

    def logical(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """The logical ``[E, ...]`` view of a tensor shaped like parameter ``name``'s shard (the
        parameter itself, or its optimizer state): collective over the group, no gradient."""
        gate_up = name == "gate_up_proj"
        if self.size == 1:
            return shard.detach().clone()
        members = self.layout.gather_members(self.rank, DP)
        send_W = np.full(self.size, shard.shape[0], dtype=np.int64)
        with torch.no_grad():
            received = self._exchange(shard.detach().repeat((len(members),) + (1,) * (shard.dim() - 1)), send_W, send_W)
        if gate_up:
            return _join_gate_up(received, self.layout.groups, self.layout.shard_degree, shard.shape, self.layout.halves)
        return _join_down(received, self.layout.groups, self.layout.shard_degree, shard.shape)

    def logical_shape(self, name: str) -> tuple[int, int, int]:
        """Shape of parameter ``name`` in the logical (one-device) view."""
        cfg = self.config
        if name == "gate_up_proj":
            return (cfg.num_experts, self.layout.halves * cfg.d_ff, cfg.d_model)
        return (cfg.num_experts, cfg.d_model, cfg.d_ff)

    def shard(self, name: str, logical: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a logical ``[E, ...]`` tensor shaped like parameter ``name``."""
        return (self._shard_gate_up if name == "gate_up_proj" else self._shard_down)(logical).contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Every expert whole, in logical order ``[E, ...]`` (collective over the group)."""
        dtype = self.gate_up_proj.dtype
        fields = self._fields(dtype, dtype, False)
        check_envelope(self.ep_group, STATE, self.forward_steps, fields, self.adaptive.timeout_s,
                       self.gate_up_proj.device)
        for name, param in self.named_parameters(recurse=False):
            destination[prefix + name] = self.logical(name, param)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Take the logical view (from any world size and method, or a one-device layer) and keep
        this rank's shards."""
        for name in ("gate_up_proj", "down_proj"):
            key, shape = prefix + name, self.logical_shape(name)
            if key not in state_dict:
                continue
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(f"{key}: an adaptive MoE layer loads the logical view {shape} (any world size), "
                                  f"got {tuple(value.shape)}")
                continue
            state_dict[key] = self.shard(name, value.to(getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- communication --------------------------------------------------------------------------

    def _exchange(self, rows: torch.Tensor, send_W: np.ndarray, recv_W: np.ndarray) -> torch.Tensor:
        if self.size == 1:
            return rows
        return all_to_all_v(rows, send_W.tolist(), recv_W.tolist(), self.ep_group.group)

    def _all_gather_counts(self, counts_E: torch.Tensor, pairs_G: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's rows per expert ``[W, E]`` and (token, group) pairs per group ``[W, G]``."""
        mine = torch.cat([counts_E.detach().to(torch.int64), pairs_G.to(torch.int64)])
        if self.size == 1:
            everyone = mine.cpu().numpy()[None]
        else:
            everyone = all_gather_ints(self.ep_group, mine, self.adaptive.timeout_s,
                                       "the counts of an adaptive MoE layer's forward").cpu().numpy()
        E = counts_E.shape[0]
        return everyone[:, :E], everyone[:, E:]

    def _fields(self, dtype, weight_dtype, backward_expected: bool) -> dict[str, str]:
        """Everything the ranks must agree on before this layer's collectives."""
        fields = {f"config.{f.name}": repr(getattr(self.config, f.name)) for f in dataclasses.fields(self.config)}
        fields.update({f"adaptive.{f.name}": repr(getattr(self.adaptive, f.name)) for f in dataclasses.fields(self.adaptive)
                       if f.name not in _PER_RANK_FIELDS})
        fields.update({
            "fixed method": repr(self._fixed),
            "method tuner": self.tuner.state(),
            "dtype": str(dtype),
            "routing weight dtype": str(weight_dtype),
            "backward expected": str(backward_expected),
        })
        return fields


@dataclasses.dataclass
class _TokenGroups:
    """This rank's (token, expert group) pairs, ordered by group then token (P pairs).

    token_P: the local token. local_PK: for each of the token's K choices, its expert's index in
    the group (-1: another group, or dropped). weight_PK: the routing weights (0 where -1).
    pairs_G: pairs per group (device).
    """

    token_P: torch.Tensor
    local_PK: torch.Tensor
    weight_PK: torch.Tensor
    pairs_G: torch.Tensor

    @classmethod
    def of(cls, plan: DispatchPlan, layout: ShardLayout) -> "_TokenGroups":
        G, Eg = layout.groups, layout.experts_per_group
        row_TK = plan.pair_row_TK
        kept_TK = row_TK >= 0
        expert_TK = torch.searchsorted(plan.offsets_E.to(torch.int64), row_TK.clamp_min(0), right=True)
        group_TK = torch.where(kept_TK, expert_TK // Eg, -1)
        present_GT = (group_TK.unsqueeze(0) == torch.arange(G, device=row_TK.device).view(G, 1, 1)).any(dim=2)
        group_P, token_P = torch.nonzero(present_GT, as_tuple=True)
        mine_PK = group_TK.index_select(0, token_P) == group_P.unsqueeze(1)
        local_PK = torch.where(mine_PK, expert_TK.index_select(0, token_P) % Eg, -1).to(torch.int32)
        weight_TK = plan.row_weight_N.index_select(0, row_TK.clamp_min(0).reshape(-1)).view(row_TK.shape)
        weight_PK = torch.where(mine_PK, weight_TK.index_select(0, token_P), torch.zeros((), dtype=weight_TK.dtype,
                                                                                           device=weight_TK.device))
        return cls(token_P, local_PK, weight_PK, present_GT.sum(dim=1))


def _join_gate_up(rows: torch.Tensor, groups: int, width: int, shard_shape, halves: int) -> torch.Tensor:
    """Received shards (member-major) -> ``[groups * Eg, H * width * Fm, D]``."""
    Eg, HFm, D = shard_shape
    Fm = HFm // halves
    view = rows.reshape(groups, width, Eg, halves, Fm, D).permute(0, 2, 3, 1, 4, 5)
    return view.reshape(groups * Eg, halves * width * Fm, D)


def _join_down(rows: torch.Tensor, groups: int, width: int, shard_shape) -> torch.Tensor:
    """Received shards (member-major) -> ``[groups * Eg, D, width * Fm]``."""
    Eg, D, Fm = shard_shape
    return rows.reshape(groups, width, Eg, D, Fm).permute(0, 2, 3, 1, 4).reshape(groups * Eg, D, width * Fm)


