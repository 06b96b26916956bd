"""Expert parallelism against the one-device layer.

Single-process tests cover the config, the host layout, the online choices and a local EP layer
with replicas. Multi-process tests run on 2 and 4 CPU processes with gloo: one spawn per world
size runs every case (sharing the process group); each case trains 3 SGD steps and compares
outputs, input gradients and all parameters with a single-process MoELayer given the same global
batch and weights (float64: 1e-10 relative; float32: 1e-5).

With capacity_factor the capacity is computed from each rank's own tokens, so the single-process
equivalent is one MoELayer applied to each rank's batch separately, losses averaged over ranks.

Also: the once-per-rank exchange simulated without communication and its counters checked
against a count from the routing; the bounded dispatch (no overflow: equivalence; overflow:
the documented drop rule; fullgraph compile); and the failure modes of issue 17 (config
mismatch per field, a rank one step ahead, a skipped forward, a rank raising mid-step, a rank
that never comes), each ending with an error on every rank.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from flexmoe import MoEConfig, MoELayer
from flexmoe.parallel import EPGroup, ParallelConfig, all_to_all_v
from flexmoe.runtime import (
    apply_placement,
    expert_parameter_names,
    expert_parameters,
    sync_expert_gradients,
    sync_gradients,
    sync_router_loads,
)
from flexmoe.parallel.agreement import AgreementError
from flexmoe.parallel.symmetric import compact_blocks, expand_blocks, symmetric_all_to_all_available
from flexmoe.parallel.dispatch import expand_pairs, known_counts, pairs_per_rank, route_pairs, row_replicas
from flexmoe.plan import make_dispatch_plan
from flexmoe.parallel.tuning import PipelineTuner, RowBytes, choose_memory_strategy, kept_bytes
from flexmoe.placement import PlacementTable
from flexmoe.placement.split import split_tokens
from helpers import spawn_ranks

F64_TOL, F32_TOL = 1e-10, 1e-5
SPAWN_TIMEOUT_S = 420


def _config(**overrides) -> MoEConfig:
    base = dict(d_model=8, d_ff=6, num_experts=8, top_k=2, num_shared_experts=1, z_loss_coef=1e-2)
    base.update(overrides)
    return MoEConfig(**base)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    scale = want.detach().abs().max().double().clamp_min(1e-300)
    return float((got.detach().double() - want.detach().double()).abs().max() / scale)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = _rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(pipeline_degree=0), "pipeline_degree"),
        (dict(pipeline_degree="fast"), "pipeline_degree"),
        (dict(pipeline_degree=True), "pipeline_degree"),
        (dict(pipeline_candidates=()), "pipeline_candidates"),
        (dict(pipeline_candidates=(1, 0)), "pipeline_candidates"),
        (dict(memory="offload"), "memory"),
        (dict(memory_budget_bytes=-1), "memory_budget_bytes"),
        (dict(free_memory_fraction=0.0), "free_memory_fraction"),
        (dict(free_memory_fraction=1.5), "free_memory_fraction"),
        (dict(all_to_all="ring"), "all_to_all"),
        (dict(dispatch="fast"), "dispatch"),
        (dict(dispatch="bounded"), "rows_per_rank_pair"),
        (dict(rows_per_rank_pair=0), "rows_per_rank_pair"),
        (dict(dispatch="bounded", rows_per_rank_pair=4, pipeline_degree=2), "pipeline_degree"),
        (dict(dispatch="bounded", rows_per_rank_pair=4, memory="both"), "memory"),
        (dict(bounded_transport="nvlink"), "bounded_transport"),
        (dict(local_first=1), "local_first"),
        (dict(timeout_s=0), "timeout_s"),
        (dict(timeout_s=float("inf")), "timeout_s"),
    ],
)
def test_parallel_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"ParallelConfig.{field}"):
        ParallelConfig(**kwargs)


def _random_table(rng, E, W, S) -> PlacementTable:
    """Every expert at least once, some twice or three times, random shares."""
    slots = list(range(E)) + list(rng.integers(0, E, size=W * S - E))
    slots = np.array(slots + [-1] * (W * S - len(slots)))
    slots[E:] = np.where(rng.random(W * S - E) < 0.3, -1, slots[E:])
    rng.shuffle(slots)
    slot_expert = slots.reshape(W, S)
    share = np.zeros((W, S))
    for e in range(E):
        mask = slot_expert == e
        raw = rng.random(mask.sum()) + 0.05
        share[mask] = raw / raw.sum()
    return PlacementTable(E, slot_expert, share)


def _random_routing(rng, T, K, E):
    """Distinct experts per token, about one pair in six dropped."""
    expert_TK = np.array([rng.choice(E, size=K, replace=False) for _ in range(T)], dtype=np.int64).reshape(T, K)
    keep_TK = rng.random((T, K)) > 1 / 6
    return torch.as_tensor(expert_TK), torch.as_tensor(keep_TK)


@pytest.mark.parametrize("seed", range(8))
def test_pairs_carry_every_kept_pair_once_and_each_token_once_per_rank(seed):
    """Simulate the once-per-rank exchange with the routes of all ranks, no communication."""
    rng = np.random.default_rng(seed)
    E, W = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    S = -(-E // W) + int(rng.integers(0, 3))
    K = int(rng.integers(1, min(E, 4) + 1))
    n = int(rng.integers(1, 5))
    table = _random_table(rng, E, W, S)
    tokens = [int(rng.integers(0, 7)) for _ in range(W)]
    tokens[int(rng.integers(0, W))] = 0
    cpu = torch.device("cpu")
    plans, routing = [], []
    for T in tokens:
        expert_TK, keep_TK = _random_routing(rng, T, K, E)
        routing.append((expert_TK, keep_TK))
        plans.append(make_dispatch_plan(expert_TK, torch.ones(T, K), keep_TK, E))
    counts_WE = np.stack([p.counts_E.numpy() for p in plans])
    send_WWS = split_tokens(table, counts_WE)
    routes = []
    for r, plan in enumerate(plans):
        replica_N = row_replicas(table, send_WWS, counts_WE[r], r, plan.num_rows, cpu)
        routes.append(route_pairs(replica_N, plan.pair_row_TK, W, S, n, r))
    everyone = np.stack([route.counts_nWC.numpy() for route in routes])
    # Every expert on one rank (the static table): the pair counts are known before the split.
    static = PlacementTable.static(E, W, S)
    static_send_WWS = split_tokens(static, counts_WE)
    rank_E = torch.tensor([static.replicas(e)[0][0] for e in range(E)])
    one_chunk = [route_pairs(row_replicas(static, static_send_WWS, counts_WE[r], r, p.num_rows, cpu), p.pair_row_TK,
                             W, S, 1, r).counts_nWC.numpy() for r, p in enumerate(plans)]
    pairs_WW = np.stack([pairs_per_rank(rank_E, p.offsets_E, p.pair_row_TK, W).numpy() for p in plans])
    assert (known_counts(pairs_WW, static_send_WWS) == np.stack(one_chunk)).all(), "pair counts before the split"
    for route in routes:
        route.finish(everyone)
    delivered, pairs_seen = [], []
    for c in range(n):
        outbox = []
        for src, route in enumerate(routes):
            part = route.send_slice(c)
            token_P, slot_PK = route.token_P[part], route.slot_PK[part]
            bounds = np.cumsum([0] + route.split_WW(c)[src].tolist())
            outbox.append([(token_P[bounds[d]:bounds[d + 1]], slot_PK[bounds[d]:bounds[d + 1]]) for d in range(W)])
        for dst, route in enumerate(routes):
            assert (route.split_WW(c) == routes[0].split_WW(c)).all(), "ranks agree on the splits"
            src_P = torch.cat([torch.full((len(outbox[src][dst][0]),), src) for src in range(W)])
            token_P = torch.cat([outbox[src][dst][0] for src in range(W)])
            slot_PK = torch.cat([outbox[src][dst][1] for src in range(W)])
            pairs_seen += [(int(s), int(t), dst) for s, t in zip(src_P, token_P)]
            rows_S = route.recv_rows_S(c)
            row_key_R = expand_pairs(slot_PK, int(rows_S.sum()))
            offsets_S = route.offsets_nS(cpu)[c]
            assert offsets_S.tolist() == np.cumsum(rows_S).tolist()
            ends = [0] + offsets_S.tolist()
            for s in range(S):
                for key in row_key_R[ends[s]:ends[s + 1]].tolist():
                    p, k = divmod(key, K)
                    src, t = int(src_P[p]), int(token_P[p])
                    assert int(slot_PK[p, k]) == s
                    assert table.slot_expert_WS[dst, s] == int(routing[src][0][t, k]), "a row reached another expert"
                    delivered.append((src, t, k, dst, s))
    kept = sorted((src, t, k) for src, (_, keep) in enumerate(routing) for t, k in zip(*np.nonzero(keep.numpy())))
    assert sorted((src, t, k) for src, t, k, _, _ in delivered) == kept, "every kept pair exactly once"
    assert len(pairs_seen) == len(set(pairs_seen)), "a token goes once to each rank"
    assert sorted(pairs_seen) == sorted({(src, t, d) for src, t, _, d, _ in delivered}), "and only where it has rows"
    per_replica = np.zeros((W, W, S), dtype=np.int64)
    for src, _, _, d, s in delivered:
        per_replica[src, d, s] += 1
    assert (per_replica == send_WWS).all(), "the split is placement.split's"


@pytest.mark.parametrize("seed", range(4))
def test_symmetric_exchange_layout_matches_the_block_all_to_all(seed):
    """The symmetric-memory transport's packing, with all_to_all_vdev simulated: compacting the
    used rows, sending them with device splits and expanding them on arrival gives every rank
    the blocks the equal-split all-to-all gives, unused rows set to the fill."""
    rng = np.random.default_rng(seed)
    W, C, Q = int(rng.integers(1, 5)), int(rng.integers(1, 6)), 3
    used_WW = torch.as_tensor(rng.integers(0, C + 1, size=(W, W)))  # [src, dst]
    blocks = [torch.randn(W * C, Q, dtype=torch.float64) for _ in range(W)]
    dense = [compact_blocks(blocks[s], used_WW[s], C) for s in range(W)]
    for d in range(W):
        # all_to_all_vdev: rank d receives each source's rows for d, in source order.
        starts = [int(used_WW[s, :d].sum()) for s in range(W)]
        arrived = torch.cat([dense[s][starts[s]:starts[s] + int(used_WW[s, d])] for s in range(W)])
        recv = torch.cat([arrived, arrived.new_zeros((W * C - arrived.shape[0], Q))])
        got = expand_blocks(recv, used_WW[:, d], C, fill=-1.0)
        want = torch.full((W * C, Q), -1.0, dtype=torch.float64)
        for s in range(W):
            n = int(used_WW[s, d])
            want[s * C:s * C + n] = blocks[s][d * C:d * C + n]
        assert torch.equal(got, want)
    assert not symmetric_all_to_all_available(torch.device("cpu")), "CPU tensors use the all-to-all fallback"


def test_pipeline_tuner_keeps_the_fastest_degree_per_load_level():
    tuner = PipelineTuner((1, 2, 4))
    level = PipelineTuner.level(np.array([[3, 9], [0, 1]]))
    assert level == 4
    seen = []
    for fake_ns in ([30, 31], [20, 25], [22, 21]):
        degree, trial = tuner.choose(level)
        assert trial
        seen.append(degree)
        tuner.record(level, degree, 0.0)
        row = tuner.shared_row()
        tuner.absorb(np.array([[row[0], row[1], fake_ns[0]], [row[0], row[1], fake_ns[1]]]))
    assert seen == [1, 2, 4]
    assert tuner.choose(level) == (4, False), "slowest rank decides: 31, 25, 22 ns"
    assert tuner.choose(level + 1) == (1, True), "a new level is tuned afresh"


def test_memory_choice():
    row = RowBytes(input=64, hidden=144, weight=8)
    kept = kept_bytes(recv_rows=100, tokens=40, row=row)
    assert kept == {"keep": 21600, "recompute": 7200, "recommunicate": 17760, "both": 3360}
    assert choose_memory_strategy(kept, 10**9, None, None) == "keep"
    assert choose_memory_strategy(kept, 10000, 1e-3, 1e-4) == "recompute", "only recompute and both fit"
    assert choose_memory_strategy(kept, 20000, 1e-3, 1e-4) == "recommunicate", "cheaper than recompute"
    assert choose_memory_strategy(kept, 20000, None, None) == "both", "no timings yet: least memory"
    assert choose_memory_strategy(kept, 0, 1e-3, 1e-4) == "both", "nothing fits: least memory"


@pytest.mark.parametrize("memory", ["keep", "recompute", "recommunicate", "both", "auto"])
def test_local_layer_with_replicas_matches_one_device_layer(memory):
    """One process (no torch.distributed): a table with replicas on the same rank."""
    cfg = _config(num_experts=4, capacity_factor=1.5)
    table = PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    torch.manual_seed(0)
    ref = MoELayer(cfg).double()
    for degree in (1, 2, 5):
        torch.manual_seed(0)
        ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree=degree, memory=memory)).double()
        assert ep.experts.gate_up_proj.shape[0] == 7 and ep.experts.size == 1 and ep.experts.ep_group.group is None
        for k, v in ref.state_dict().items():
            assert torch.equal(ep.state_dict()[k], v), f"{k}: the EP layer starts from the same weights"
        x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
        grads = _local_grads_match(ref, ep, table, x)
        assert grads[2][5].abs().max() == 0, "the empty slot gets a zero gradient"
        report = ep.experts.memory_report
        assert report.kept_bytes + report.saved_bytes == report.by_strategy["keep"]


def _local_grads_match(ref, ep, table, x) -> tuple[torch.Tensor, ...]:
    """Output, input, router and (replicas summed) expert gradients of ``ep`` against ``ref``;
    returns ``ep``'s gradients (input, then its parameters)."""
    y_ref = ref(x)
    grads_ref = torch.autograd.grad((y_ref * y_ref.detach().sin()).sum(), [x, *ref.parameters()])
    y = ep(x)
    grads = torch.autograd.grad((y * y.detach().sin()).sum(), [x, *ep.parameters()])
    _check("output", y, y_ref, F64_TOL)
    for i, name in ((0, "input grad"), (1, "router grad")):
        _check(name, grads[i], grads_ref[i], F64_TOL)
    for i, name in ((2, "gate_up_proj"), (3, "down_proj")):
        logical = torch.zeros_like(grads_ref[i])
        for s, e in enumerate(table.slot_expert_WS[0]):
            if e >= 0:
                logical[e] += grads[i][s]
        _check(f"{name} grad (replicas summed)", logical, grads_ref[i], F64_TOL)
    return grads


@pytest.mark.parametrize("strategy", ["keep", "recompute", "recommunicate", "both"])
def test_local_rows_follow_the_memory_strategy_chosen_after_them(strategy, monkeypatch):
    """memory="auto": the local rows run before the strategy is chosen (it needs every rank's
    counts), keeping their graph without its input; then they keep what the chosen strategy
    keeps. Experts 1 and 2 are local rows, 0 and 3 (replicated) exchanged."""
    import flexmoe.parallel.expert_parallel as expert_parallel

    monkeypatch.setattr(expert_parallel, "choose_memory_strategy", lambda *args: strategy)
    cfg = _config(num_experts=4)
    table = PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    torch.manual_seed(0)
    ref = MoELayer(cfg).double()
    for degree in (1, 3):
        torch.manual_seed(0)
        ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree=degree, memory="auto")).double()
        ep.experts._rates = (1e-9, 1e9)  # skip the profiling forward (degree 1, strategy "keep")
        x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
        _local_grads_match(ref, ep, table, x)
        assert ep.experts.memory_report.strategy == strategy
        stats = ep.experts.last_exchange
        counts = ep.experts.last_counts_WE[0]
        assert stats.local_first_rows == counts[1] + counts[2] and stats.expert_rows == counts.sum()


@pytest.mark.parametrize("kernels", ["auto", "per_expert"])
def test_world_size_one_permuted_table_is_the_one_device_ffn_over_its_slots(kernels):
    """World size 1, every expert in one slot but out of order, a spare slot: the plan is
    regrouped by slot on the device (expert blocks moved, rows in order) and the one-device FFN
    runs over the slots, bitwise the one-device layer in forward and backward, with capacity
    drops; local_first=False sends every row through the (self-)exchange instead, to 1e-10."""
    cfg = _config(capacity_factor=1.0, kernels=kernels)
    slots = np.array([[5, 2, -1, 7, 0, 1, 6, 3, 4]])
    table = PlacementTable(8, slots, (slots >= 0).astype(float))
    torch.manual_seed(4)
    ref = MoELayer(cfg).double()
    x = torch.randn(13, 8, dtype=torch.float64)
    y_ref = ref(x)
    y_ref.pow(2).sum().backward()
    for local_first in (True, False):
        torch.manual_seed(4)
        ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree=2, local_first=local_first)).double()
        y = ep(x)
        y.pow(2).sum().backward()
        grads = [(ref.router.weight.grad, ep.router.weight.grad)]
        for name in ("gate_up_proj", "down_proj"):
            want = getattr(ref.experts, name).grad
            got = getattr(ep.experts, name).grad
            grads.append((want, torch.stack([got[s] for s in np.argsort(np.where(slots[0] >= 0, slots[0], 99))[:8]])))
            assert got[2].abs().max() == 0, "the spare slot gets no gradient"
        if local_first:
            assert torch.equal(y, y_ref) and all(torch.equal(g, w) for w, g in grads)
            assert ep.experts.last_exchange is None, "the one-device FFN ran"
        else:
            _check("output", y, y_ref, F64_TOL)
            for want, got in grads:
                _check("grad", got, want, F64_TOL)
            assert ep.experts.last_exchange.local_first_rows == 0


class _WgradCalls(TorchDispatchMode):
    """Records the (rows, out width, in width) of every expert weight-gradient GEMM."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.flexmoe.grouped_mm_loop_wgrad.default:
            grad_NO, x_NI = args[0], args[1]
            self.calls.append((grad_NO.shape[0], grad_NO.shape[1], x_NI.shape[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("memory", ["keep", "recompute", "recommunicate", "both"])
def test_chunked_backward_computes_each_weight_gradient_once(memory):
    """A pipeline of 4 chunks: one weight-gradient GEMM per expert weight over the rows of all
    chunks (it used to be one full-size gradient per chunk, added up), and the same gradients
    as one chunk."""
    cfg = _config(num_experts=4)
    table = PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    x = torch.randn(13, 8, dtype=torch.float64)
    grads = {}
    for degree in (1, 4):
        torch.manual_seed(0)
        ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree=degree, memory=memory)).double()
        y = ep(x)
        recorder = _WgradCalls()
        with recorder:
            (y * y.detach().cos()).sum().backward()
        rows = ep.experts.last_exchange.expert_rows
        assert ep.experts.last_pipeline_degree == degree and rows > 0
        assert sorted(recorder.calls) == sorted([(rows, 12, 8), (rows, 8, 6)]), recorder.calls
        grads[degree] = [p.grad.clone() for p in ep.experts.parameters()]
    for got, want in zip(grads[4], grads[1]):
        _check("weight grad, 4 chunks against 1", got, want, F64_TOL)


def test_local_and_exchanged_weight_gradients_are_summed_when_rows_outnumber_weights():
    """Degree 1 with local rows (experts 1, 2) and exchanged rows (replicated 0, 3): with many
    rows, one wgrad GEMM per part and per weight, summed, instead of copying every row into
    slot-major buffers; with few rows (test above) the copy and one GEMM. Same gradients."""
    cfg = _config(num_experts=4)
    table = PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    torch.manual_seed(0)
    ref = MoELayer(cfg).double()
    torch.manual_seed(0)
    ep = MoELayer(cfg, placement=table).double()
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    recorder = _WgradCalls()
    with recorder:
        _local_grads_match(ref, ep, table, x)
    stats = ep.experts.last_exchange
    local, exchanged = stats.local_first_rows, stats.expert_rows - stats.local_first_rows
    assert local > 0 and exchanged > 0
    one_device = [(128, 12, 8), (128, 8, 6)]  # the reference layer's, in the same recording
    assert sorted(recorder.calls) == sorted(one_device + [(local, 12, 8), (local, 8, 6), (exchanged, 12, 8),
                                                          (exchanged, 8, 6)])


def test_pipeline_tuner_trial_of_a_training_forward_counts_its_backward(monkeypatch):
    """pipeline_degree="auto": a trial's time (what picks the degree) is the stage's forward plus
    its backward, recorded when the backward ends (it used to be the forward alone). A fake
    clock ticking 1 s per reading: forward 1 s + backward 1 s."""
    import flexmoe.parallel.expert_parallel as ep_module

    ticks = iter(range(1000))
    monkeypatch.setattr(ep_module, "synchronized_time", lambda device: float(next(ticks)))
    cfg = _config(num_experts=4)
    table = PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    torch.manual_seed(0)
    ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree="auto")).double()
    ep.experts._rates = (1e-9, 1e9)  # skip the profiling forward
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    y = ep(x)
    tuner = ep.experts.tuner
    assert tuner._pending is None, "nothing recorded before the backward"
    y.pow(2).sum().backward()
    level, degree, ns = tuner._pending
    assert degree == ep.experts.last_pipeline_degree and ns == 2_000_000_000
    with torch.no_grad():  # a forward without a graph: timed alone, at once
        ep(x)
    assert tuner._pending is not None and tuner._pending[2] == 1_000_000_000


@pytest.mark.parametrize("local_first, degree, memory", [(False, 1, "keep"), (False, 4, "both"), (True, 2, "recompute")])
def test_training_steps_through_the_exchange_free_their_graphs(local_first, degree, memory):
    """Nothing of a step's expert graph outlives its backward: the deferred weight-gradient rows
    once closed a cycle through autograd's C++ nodes (node -> holder -> rows -> graph -> node)
    that Python's collector cannot free, leaking every kept graph (135 GB on an H200 run)."""
    import gc

    from flexmoe.ops.grouped_gemm import WgradRows

    cfg = _config(num_experts=4)
    table = PlacementTable(4, np.array([[3, 1, 2, 0, 3, -1, 0]]), np.array([[0.5, 1, 1, 0.4, 0.5, 0, 0.6]]))
    ep = MoELayer(cfg, placement=table, parallel=ParallelConfig(pipeline_degree=degree, memory=memory,
                                                                local_first=local_first)).double()
    x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        ep(x).pow(2).sum().backward()
    gc.collect()
    assert sum(isinstance(o, WgradRows) for o in gc.get_objects()) == 0


def test_local_layer_with_one_chunk_is_bitwise_the_one_device_layer():
    cfg = _config()
    torch.manual_seed(3)
    ref = MoELayer(cfg)
    torch.manual_seed(3)
    ep = MoELayer(cfg, placement=PlacementTable.static(8, 1))
    x = torch.randn(2, 9, 8)
    assert torch.equal(ep(x), ref(x))


@pytest.mark.parametrize("degree, memory", [(1, "keep"), (4, "both")])
def test_world_size_one_is_the_one_device_layer(degree, memory):
    """No packing, regrouping or exchange: forward and backward bitwise those of MoELayer."""
    cfg = _config(capacity_factor=1.0)
    torch.manual_seed(4)
    ref = MoELayer(cfg)
    torch.manual_seed(4)
    ep = MoELayer(cfg, placement=PlacementTable.static(8, 1), parallel=ParallelConfig(pipeline_degree=degree, memory=memory))
    x = torch.randn(13, 8)
    for layer in (ref, ep):
        layer(x).pow(2).sum().backward()
    assert torch.equal(ep(x), ref(x))
    for (name, p), q in zip(ref.named_parameters(), ep.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert ep.experts.last_exchange is None and ep.experts.memory_report is None, "the one-device path ran"


def test_layer_rejects_inconsistent_placement_arguments():
    cfg = _config()
    with pytest.raises(ValueError, match="slots_per_rank"):
        MoELayer(cfg, placement=PlacementTable.static(8, 1), slots_per_rank=9)
    with pytest.raises(ValueError, match="experts"):
        MoELayer(cfg, placement=PlacementTable.static(4, 1))
    with pytest.raises(ValueError, match="ranks"):
        MoELayer(cfg, placement=PlacementTable.static(8, 2))
    with pytest.raises(TypeError, match="ParallelConfig"):
        MoELayer(cfg, placement=PlacementTable.static(8, 1), parallel={"memory": "keep"})
    with pytest.raises(ValueError, match="hierarchical"):
        MoELayer(cfg, placement=PlacementTable.static(8, 1), parallel=ParallelConfig(all_to_all="hierarchical"))
    layer = MoELayer(cfg, placement=PlacementTable.static(8, 1))
    with pytest.raises(ValueError, match="slots per rank"):
        layer.experts.set_placement(PlacementTable.static(8, 1, slots_per_rank=9))
    with pytest.raises(TypeError, match="expert-parallel"):
        apply_placement(MoELayer(cfg), PlacementTable.static(8, 1))


# ----------------------------------------------------------------------------------------------
# Several processes: one spawn per world size runs every case of that size.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What the cases of one spawned process share."""

    rank: int
    world: int
    nodes: EPGroup | None = None  # world as 2 "nodes" x 2 ranks (4 processes)
    pair: dist.ProcessGroup | None = None  # ranks {0, 1} or {2, 3}
    across: dist.ProcessGroup | None = None  # ranks {0, 2} or {1, 3}


def _train_and_compare(
    env: Env,
    cfg: MoEConfig,
    make_ep,
    tokens: list[int],
    *,
    dtype=torch.float64,
    tol=F64_TOL,
    per_rank_reference=False,
    bias=None,
    steps=3,
    expert_dp_group=None,
    wrap=None,
    sync=None,
):
    """Train the EP layer and a one-device MoELayer (built from the same seed) side by side.

    wrap: puts the EP layer in DDP / FSDP2; sync: the gradient synchronisation to call after
    backward (default ``sync_gradients``). Rank r's loss is ``W * sum(y_r * g_r) / N`` plus its router loss (scaled so that averaging
    the ranks' gradients gives the gradient of the reference loss); N is the global token count.
    """
    W, rank = env.world, env.rank
    torch.manual_seed(1234)
    ref = MoELayer(cfg).to(dtype)
    torch.manual_seed(1234)
    ep = make_ep(cfg).to(dtype)
    if bias is not None:
        for layer in (ref, ep):
            layer.router.expert_bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    ep_state = ep.state_dict()
    assert list(ep_state) == list(ref.state_dict()), "logical state-dict keys"
    for k, v in ref.state_dict().items():
        assert torch.equal(ep_state[k], v), f"{k}: an EP layer built from a seed equals the one-device layer"
    model = ep if wrap is None else wrap(ep)
    sync = sync or (lambda layer: sync_gradients(layer, expert_dp_group=expert_dp_group))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    opt_ep = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    N = sum(tokens)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        X = [torch.randn(t, cfg.d_model, generator=gen, dtype=torch.float64).to(dtype) for t in tokens]
        G = [torch.randn(t, cfg.d_model, generator=gen, dtype=torch.float64).to(dtype) for t in tokens]
        x_ref = [x.clone().requires_grad_() for x in X]
        if per_rank_reference:
            ys, loss = [], 0.0
            for x, g in zip(x_ref, G):
                ys.append(ref(x))
                loss = loss + (ys[-1] * g).sum() / N + ref.aux_loss / W
        else:
            Y = ref(torch.cat(x_ref))
            ys = Y.split(tokens)
            loss = (Y * torch.cat(G)).sum() / N + ref.aux_loss
        loss.backward()
        x = X[rank].clone().requires_grad_()
        y = model(x)
        aux_scale = 1.0 if per_rank_reference else W * tokens[rank] / N
        (W * (y * G[rank]).sum() / N + ep.aux_loss * aux_scale).backward()
        sync(ep)
        _check(f"step {step} output", y, ys[rank], tol)
        _check(f"step {step} input grad", x.grad / W, x_ref[rank].grad, tol)
        for opt in (opt_ref, opt_ep):
            opt.step()
            opt.zero_grad()
    ep_state = ep.state_dict()
    for k, v in ref.state_dict().items():
        got = ep_state[k].full_tensor() if isinstance(ep_state[k], DTensor) else ep_state[k]
        _check(f"{k} after {steps} steps", got, v, tol)
    return ep


def _ep(group=None, **kwargs):
    """A factory of EP layers over ``group`` (default: the world)."""
    parallel = kwargs.pop("parallel", None)
    return lambda cfg: MoELayer(cfg, ep_group=group or dist.group.WORLD, parallel=parallel, **kwargs)


def _gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# -- cases for 2 processes (E = 8, 4 slots each) -----------------------------------------------


def _case_degree(degree, memory):
    def case(env):
        _train_and_compare(env, _config(), _ep(parallel=ParallelConfig(pipeline_degree=degree, memory=memory)), [7, 5])
    return case


def case_memory_auto(env):
    for budget, expected in ((10**12, "keep"), (0, "both")):
        parallel = ParallelConfig(pipeline_degree=2, memory="auto", memory_budget_bytes=budget)
        ep = _train_and_compare(env, _config(), _ep(parallel=parallel), [7, 5])
        assert ep.experts.memory_report.strategy == expected
    parallel = ParallelConfig(memory="auto")
    ep = _train_and_compare(env, _config(), _ep(parallel=parallel), [7, 5])
    assert len(set(_gathered(ep.experts.memory_report.strategy))) == 1, "ranks agree"


def case_pipeline_auto(env):
    parallel = ParallelConfig(pipeline_degree="auto", pipeline_candidates=(1, 3))
    ep = _train_and_compare(env, _config(), _ep(parallel=parallel), [7, 5], steps=6)
    tuner = ep.experts.tuner
    choices = _gathered((sorted(tuner.best.items()), ep.experts.last_pipeline_degree))
    assert all(c == choices[0] for c in choices), f"ranks disagree: {choices}"


def case_capacity_per_rank_reference(env):
    cfg = _config(capacity_factor=1.0, aux_loss_coef=1e-2)
    ep = _train_and_compare(env, cfg, _ep(parallel=ParallelConfig(pipeline_degree=2)), [6, 6], per_rank_reference=True)
    assert int(ep.last_counts.sum()) < 6 * cfg.top_k, "capacity dropped pairs"


def case_all_tokens_to_one_rank(env):
    bias = [5.0, 5.0] + [0.0] * 6  # experts 0 and 1 live on rank 0: rank 1 receives nothing
    cfg = _config(bias_update_rate=1e-3)
    ep = _train_and_compare(env, cfg, _ep(parallel=ParallelConfig(pipeline_degree=3, memory="recommunicate")),
                            [6, 4], bias=bias)
    assert ep.experts.last_counts_WE[:, 2:].sum() == 0, "every token went to rank 0"
    if env.rank == 1:
        assert ep.experts.memory_report.by_strategy["keep"] == 0, "rank 1 received no rows"


def case_rank_without_tokens(env):
    _train_and_compare(env, _config(), _ep(parallel=ParallelConfig(pipeline_degree=2, memory="both")), [9, 0])


def _replica_table_2() -> PlacementTable:
    slot_expert = np.array([[0, 1, 2, 3, 5], [4, 5, 6, 7, 0]])
    share = np.array([[0.3, 1, 1, 1, 0.45], [1, 0.55, 1, 1, 0.7]])
    return PlacementTable(8, slot_expert, share)


def _case_replicas(degree, memory):
    def case(env):
        bias = [2.0, 0, 0, 0, 0, 2.0, 0, 0]  # make the replicated experts hot
        cfg = _config(bias_update_rate=1e-3)
        parallel = ParallelConfig(pipeline_degree=degree, memory=memory)
        _train_and_compare(env, cfg, _ep(placement=_replica_table_2(), parallel=parallel), [8, 6], bias=bias)
    return case


def case_float32(env):
    cfg = _config()
    _train_and_compare(env, cfg, _ep(parallel=ParallelConfig(pipeline_degree=2)), [7, 5], dtype=torch.float32, tol=F32_TOL)


def case_mismatch_is_reported_on_every_rank(env):
    cfg = _config()
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).double()
    if env.rank == 1:
        layer.experts.placement.version += 1
    with pytest.raises(RuntimeError, match="disagree on placement version"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).to(torch.float64 if env.rank == 0 else torch.float32)
    with pytest.raises(RuntimeError, match="disagree on dtype"):
        layer(torch.randn(3, 8).to(layer.experts.gate_up_proj.dtype))
    layer = MoELayer(cfg, ep_group=dist.group.WORLD)
    with pytest.raises(RuntimeError, match="disagree on backward expected"):
        with torch.set_grad_enabled(env.rank == 0):
            layer(torch.randn(3, 8))
    layer(torch.randn(2, 8)).sum().backward()  # the group still works afterwards


def case_ddp_with_expert_parameters_ignored(env):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def wrap(layer):
        DDP._set_params_and_buffers_to_ignore_for_model(layer, expert_parameter_names(layer))
        return DDP(layer)

    _train_and_compare(env, _config(), _ep(), [5, 7], wrap=wrap, sync=sync_expert_gradients)


def case_fsdp2_with_expert_parameters_ignored(env):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def wrap(layer):
        mesh = init_device_mesh("cpu", (env.world,))
        return fully_shard(layer, mesh=mesh, ignored_params=set(expert_parameters(layer)))

    _train_and_compare(env, _config(), _ep(), [5, 7], wrap=wrap, sync=sync_expert_gradients)


def case_all_to_all_v_is_differentiable(env):
    gen = torch.Generator().manual_seed(env.rank)
    splits = torch.randint(0, 4, (env.world, env.world), generator=torch.Generator().manual_seed(0))
    send, recv = splits[env.rank].tolist(), splits[:, env.rank].tolist()
    x = torch.randn(sum(send), 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = all_to_all_v(x, send, recv)
    everyone = _gathered(x.detach())
    expected = torch.cat([everyone[src][sum(splits[src, :env.rank]):sum(splits[src, :env.rank + 1])]
                          for src in range(env.world)])
    assert torch.equal(y, expected)
    y.backward(torch.arange(y.numel(), dtype=torch.float64).view_as(y))
    grads = _gathered(torch.arange(y.numel(), dtype=torch.float64).view_as(y))
    back = torch.cat([grads[dst][sum(splits[:env.rank, dst]):sum(splits[:env.rank + 1, dst])]
                      for dst in range(env.world)])
    assert torch.equal(x.grad, back)


def case_router_loads_are_summed(env):
    layer = MoELayer(_config(bias_update_rate=1e-2), ep_group=dist.group.WORLD)
    layer(torch.randn(4 + 3 * env.rank, 8))
    mine = layer.router.pending_load_E.clone()
    total = sum(_gathered(mine))
    sync_router_loads(layer)
    assert torch.equal(layer.router.pending_load_E, total)


def case_top_4_replicas_degree_3(env):
    """Several rows of one token on one rank: a pair expands to them and sums them."""
    cfg = _config(top_k=4, bias_update_rate=1e-3)
    parallel = ParallelConfig(pipeline_degree=3, memory="recompute")
    _train_and_compare(env, cfg, _ep(placement=_replica_table_2(), parallel=parallel), [9, 4],
                       bias=[2.0, 0, 0, 0, 0, 2.0, 0, 0])


# -- local rows first: rows of experts whose only replica is on this rank are computed before the
# counts all-gather is read, and only the other rows go through the exchange.


def _expected_local_rows(layer) -> int:
    """This rank's rows of the experts whose only replica it holds, from the last counts."""
    table, rank = layer.experts.placement, layer.experts.rank
    replicas_E = table.num_replicas_E()
    held_here = [int(e) for e in table.slot_expert_WS[rank] if e >= 0 and replicas_E[e] == 1]
    return int(layer.experts.last_counts_WE[rank, held_here].sum())


def _permuted_table_2() -> PlacementTable:
    """Every expert on one rank, spread out of order (the local rows are not one run of the plan)."""
    return PlacementTable(8, np.array([[6, 1, 3, 0], [7, 4, 2, 5]]), np.ones((2, 4)))


def _case_local_first(table, degree, memory, tokens=(8, 6), budget=None, chosen=None, **cfg_overrides):
    def case(env):
        cfg = _config(**cfg_overrides)
        parallel = ParallelConfig(pipeline_degree=degree, memory=memory, memory_budget_bytes=budget)
        ep = _train_and_compare(env, cfg, _ep(placement=table(), parallel=parallel), list(tokens))
        stats = ep.experts.last_exchange
        assert stats.local_first_rows == _expected_local_rows(ep), stats
        assert stats.local_fraction == (stats.local_first_rows / stats.routed_rows if stats.routed_rows else 1.0)
        if tokens[env.rank]:
            assert 0 < stats.local_first_rows < stats.routed_rows, stats
        if chosen is not None:
            assert ep.experts.memory_report.strategy == chosen
    return case


def case_exchange_every_row(env):
    """local_first=False: every row goes through the exchange, a token's own rank included (the
    static table at degree 1, pair counts in the counts all-gather; replicas at degree 2)."""
    for table, degree in ((None, 1), (_replica_table_2(), 2)):
        parallel = ParallelConfig(pipeline_degree=degree, local_first=False)
        ep = _train_and_compare(env, _config(), _ep(placement=table, parallel=parallel), [7, 5])
        stats = ep.experts.last_exchange
        assert stats.local_first_rows == 0 and stats.local_fraction == 0.0 and stats.local_rows > 0, stats


def case_local_first_all_tokens_on_one_expert(env):
    """Top-1, every token on expert 0 (rank 0): rank 0's rows are all local, rank 1's all exchanged."""
    cfg = _config(top_k=1, bias_update_rate=1e-3)
    ep = _train_and_compare(env, cfg, _ep(parallel=ParallelConfig(pipeline_degree=2, memory="both")), [7, 5],
                            bias=[9.0] + [0.0] * 7)
    stats = ep.experts.last_exchange
    assert stats.routed_rows == [7, 5][env.rank]
    assert stats.local_fraction == [1.0, 0.0][env.rank], stats
    assert stats.expert_rows == [12, 0][env.rank], stats


def case_local_rows_computed_before_the_counts_are_read(env):
    """The order of events of a forward: the local rows' expert GEMMs run, then the host reads
    the counts all-gather, then the exchanged rows run (it used to read the counts first and
    compute every row after the exchange). Every token picks experts 0 (rank 0) and 4 (rank 1):
    half of each rank's rows are local."""
    cfg = _config(bias_update_rate=1e-3)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).double()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([5.0, 0, 0, 0, 5.0, 0, 0, 0]))
    x = torch.randn(6, 8, dtype=torch.float64)
    _step(layer, x)  # a layer's first forward compares its envelope on its own first
    events = []
    real = dist.all_gather

    class Recorded:
        def __init__(self, work):
            self.work = work

        def wait(self, *args, **kwargs):
            events.append("counts read")
            return self.work.wait(*args, **kwargs)

    def recording(*args, **kwargs):
        work = real(*args, **kwargs)
        return Recorded(work) if kwargs.get("async_op") else work

    hook = layer.experts.register_forward_hook(lambda module, args, out: events.append(f"experts, {args[0].shape[0]} rows"))
    dist.all_gather = recording
    try:
        layer(x)
    finally:
        dist.all_gather = real
        hook.remove()
    assert events == ["experts, 6 rows", "counts read", "experts, 6 rows"], events
    stats = layer.experts.last_exchange
    assert (stats.local_first_rows, stats.expert_rows, stats.routed_rows) == (6, 12, 12), stats
    assert stats.local_fraction == 0.5
    assert (stats.dispatch_rows, stats.local_rows) == (12, 6), "each token: one pair to itself, one to the other rank"


_MISMATCHES = [("num_experts", 6), ("top_k", 3), ("d_ff", 4), ("activation", "gelu"), ("router", "sigmoid"),
               ("capacity_factor", 2.0), ("norm_topk_prob", False)]


def case_config_mismatch_names_the_field(env):
    """Issue 17: every field is checked before the counts exchange (num_experts used to SIGABRT
    gloo; the others went undetected), and the error names it with both values on every rank."""
    x = torch.randn(4, 8, dtype=torch.float64)
    for field, value in _MISMATCHES:
        default = getattr(_config(), field)
        cfg = _config(**{field: value}) if env.rank == 1 else _config()
        layer = MoELayer(cfg, ep_group=dist.group.WORLD).double()
        shown = re.escape(f"config.{field} (rank 0: {default!r}, rank 1: {value!r})")
        with pytest.raises(AgreementError, match=shown):
            layer(x)
    cfg = _config(d_ff=4) if env.rank == 1 else _config()
    with pytest.raises(AgreementError, match=re.escape("config.d_ff (rank 0: 6, rank 1: 4)")):
        MoELayer(cfg, ep_group=dist.group.WORLD).state_dict()
    layer = MoELayer(_config(), ep_group=dist.group.WORLD).double()
    layer(x).sum().backward()  # the group still works afterwards


def _step(layer, x):
    layer(x).sum().backward()
    sync_gradients(layer)


def case_rank_that_catches_an_error_and_moves_on(env):
    """Rank 1's bad batch raises; it goes on to its next batch while rank 0 is on the previous one."""
    layer = MoELayer(_config(), ep_group=dist.group.WORLD).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    _step(layer, x)
    if env.rank == 1:
        with pytest.raises(ValueError, match="NaN"):
            layer(torch.full((3, 8), float("nan"), dtype=torch.float64))
    with pytest.raises(AgreementError, match="different forward steps.*per rank: \\[2, 3\\]"):
        layer(x)


def case_rank_that_skips_a_forward_but_syncs_gradients(env):
    layer = MoELayer(_config(), ep_group=dist.group.WORLD).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    _step(layer, x)
    with pytest.raises(AgreementError, match="rank 0: the forward of an EP layer.*rank 1: flexmoe.runtime.sync_gradients"):
        if env.rank == 0:
            _step(layer, x)
        else:
            sync_gradients(layer)


def case_rank_that_raises_between_forward_and_backward(env):
    layer = MoELayer(_config(), ep_group=dist.group.WORLD).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    y = layer(x)
    with pytest.raises(AgreementError, match="rank 0: the backward of an EP layer.*rank 1: the forward"):
        if env.rank == 0:
            y.sum().backward()
        else:
            layer(x)  # rank 1's loss failed; it went on to its next batch


def case_rank_that_raises_and_stays_alive(env):
    """The others end with an error after ParallelConfig.timeout_s, not the process group's timeout."""
    group = dist.new_group([0, 1])  # its own group: the abandoned collective stays on it
    layer = MoELayer(_config(), ep_group=group, parallel=ParallelConfig(timeout_s=2.0)).double()
    if env.rank == 0:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="forward of an EP layer waited 2 s"):
            layer(torch.randn(5, 8, dtype=torch.float64))
        assert time.monotonic() - start < 30
    else:
        time.sleep(4)  # raised somewhere, stays alive, calls nothing
    dist.barrier()


def case_forward_checks_agreement_in_its_counts_all_gather(env):
    """After a layer's first check, an exact forward is ONE all-gather (envelope + counts), a
    backward one (its check), and a rank that changed something since is still caught there."""
    layer = MoELayer(_config(), ep_group=dist.group.WORLD).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    _step(layer, x)
    calls = []
    real = dist.all_gather

    def counting(*args, **kwargs):
        calls.append(args[1].numel())
        return real(*args, **kwargs)

    dist.all_gather = counting
    try:
        y = layer(x)
        assert len(calls) == 1, f"forward all-gathers: {calls}"
        y.sum().backward()
        assert len(calls) == 2, f"forward + backward all-gathers: {calls}"
    finally:
        dist.all_gather = real
    if env.rank == 1:
        layer.experts.placement.version += 1
    with pytest.raises(AgreementError, match=re.escape("placement version (rank 0: 0, rank 1: 1)")):
        layer(x)


def _bounded(rows: int) -> ParallelConfig:
    return ParallelConfig(dispatch="bounded", rows_per_rank_pair=rows)


def case_bounded_without_overflow(env):
    """Buffers as large as the most tokens of a rank: nothing can overflow; replicas, a rank
    with no tokens, and the bounded split of replicated experts (each rank cuts its own rows)."""
    bias = [2.0, 0, 0, 0, 0, 2.0, 0, 0]
    cfg = _config(top_k=3, bias_update_rate=1e-3)
    ep = _train_and_compare(env, cfg, _ep(placement=_replica_table_2(), parallel=_bounded(9)), [9, 4], bias=bias)
    assert int(ep.experts.last_bounded.dropped_pairs_W.sum()) == 0
    _train_and_compare(env, _config(), _ep(parallel=_bounded(7)), [7, 0])


def case_bounded_overflow_follows_the_rule(env):
    """C = 3 pair rows per rank pair: per destination rank, the first 3 tokens (in token order)
    that have experts there keep them; the others' experts on that rank contribute zero."""
    torch.manual_seed(7)
    ref = MoELayer(_config()).double()
    torch.manual_seed(7)
    layer = MoELayer(_config(), ep_group=dist.group.WORLD, parallel=_bounded(3)).double()
    x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(env.rank), requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    routing = ref.router(x_ref)
    rank_of = layer.experts.placement.slot_expert_WS
    rank_of_expert = {int(e): r for r, row in enumerate(rank_of) for e in row if e >= 0}
    seen, dropped = [0, 0], [0, 0]
    want = ref.shared_experts(x_ref)
    rows = []
    for t in range(x.shape[0]):
        experts = [int(e) for e in routing.expert_TK[t]]
        keep_rank = {}
        for d in sorted({rank_of_expert[e] for e in experts}):
            keep_rank[d] = seen[d] < 3
            seen[d] += 1
            dropped[d] += not keep_rank[d]
        out = 0
        for k, e in enumerate(experts):
            if keep_rank[rank_of_expert[e]]:
                h = x_ref[t] @ ref.experts.gate_up_proj[e].t()
                gate, up = h.chunk(2)
                out = out + routing.weight_TK[t, k] * ((torch.nn.functional.silu(gate) * up) @ ref.experts.down_proj[e].t())
        rows.append(out if torch.is_tensor(out) else torch.zeros(8, dtype=torch.float64))
    want = want + torch.stack(rows)
    _check("output", y, want, F64_TOL)
    g = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + env.rank))
    (y * g).sum().backward()
    (want * g).sum().backward()
    _check("input grad", x.grad, x_ref.grad, F64_TOL)
    assert layer.experts.last_bounded.dropped_pairs_W.tolist() == dropped
    assert sum(dropped) > 0, "the case overflows"


def case_bounded_compiles_fullgraph(env):
    """torch.compile(fullgraph=True, backend="aot_eager") captures the bounded EP layer (gloo)."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = MoELayer(_config(), ep_group=dist.group.WORLD, parallel=_bounded(6)).double()
    torch.manual_seed(3)
    twin = MoELayer(_config(), ep_group=dist.group.WORLD, parallel=_bounded(6)).double()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + env.rank))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye = eager(xe)
        ye.square().sum().backward()
        yc = compiled(xc)
        yc.square().sum().backward()
        _check(f"step {step} output", yc, ye, 1e-12)
        _check(f"step {step} input grad", xc.grad, xe.grad, 1e-12)
        for (name, pe), pc in zip(eager.named_parameters(), twin.parameters()):
            _check(f"step {step} {name} grad", pc.grad, pe.grad, 1e-12)


CASES_2 = {
    **{f"degree_{n}": _case_degree(n, "keep") for n in (1, 2, 4, 8)},
    **{f"{m}_degree_{n}": _case_degree(n, m) for m in ("recompute", "recommunicate", "both") for n in (1, 3)},
    "memory_auto": case_memory_auto,
    "pipeline_auto": case_pipeline_auto,
    "capacity_per_rank_reference": case_capacity_per_rank_reference,
    "all_tokens_to_one_rank": case_all_tokens_to_one_rank,
    "rank_without_tokens": case_rank_without_tokens,
    "replicas_keep_degree_2": _case_replicas(2, "keep"),
    "replicas_both_degree_3": _case_replicas(3, "both"),
    "float32": case_float32,
    "mismatch_is_reported_on_every_rank": case_mismatch_is_reported_on_every_rank,
    "ddp_with_expert_parameters_ignored": case_ddp_with_expert_parameters_ignored,
    "fsdp2_with_expert_parameters_ignored": case_fsdp2_with_expert_parameters_ignored,
    "all_to_all_v_is_differentiable": case_all_to_all_v_is_differentiable,
    "router_loads_are_summed": case_router_loads_are_summed,
    "top_4_replicas_degree_3": case_top_4_replicas_degree_3,
    "config_mismatch_names_the_field": case_config_mismatch_names_the_field,
    "rank_that_catches_an_error_and_moves_on": case_rank_that_catches_an_error_and_moves_on,
    "rank_that_skips_a_forward_but_syncs_gradients": case_rank_that_skips_a_forward_but_syncs_gradients,
    "rank_that_raises_between_forward_and_backward": case_rank_that_raises_between_forward_and_backward,
    "rank_that_raises_and_stays_alive": case_rank_that_raises_and_stays_alive,
    "forward_checks_agreement_in_its_counts_all_gather": case_forward_checks_agreement_in_its_counts_all_gather,
    "bounded_without_overflow": case_bounded_without_overflow,
    "bounded_overflow_follows_the_rule": case_bounded_overflow_follows_the_rule,
    "bounded_compiles_fullgraph": case_bounded_compiles_fullgraph,
    "local_first_permuted_degree_1_keep": _case_local_first(_permuted_table_2, 1, "keep"),
    "local_first_permuted_degree_2_recompute": _case_local_first(_permuted_table_2, 2, "recompute"),
    "local_first_replicas_degree_1_recommunicate": _case_local_first(_replica_table_2, 1, "recommunicate"),
    "local_first_replicas_auto_keep": _case_local_first(_replica_table_2, 2, "auto", budget=10**12, chosen="keep"),
    "local_first_replicas_auto_both": _case_local_first(_replica_table_2, 1, "auto", budget=0, chosen="both"),
    "local_first_all_tokens_on_one_expert": case_local_first_all_tokens_on_one_expert,
    "exchange_every_row": case_exchange_every_row,
    "local_rows_computed_before_the_counts_are_read": case_local_rows_computed_before_the_counts_are_read,
}


# -- cases for 4 processes ---------------------------------------------------------------------

TOKENS_4 = [5, 0, 7, 3]


def _case_all_to_all(kind, degree, memory):
    def case(env):
        group = env.nodes if kind == "hierarchical" else None
        parallel = ParallelConfig(pipeline_degree=degree, memory=memory, all_to_all=kind)
        _train_and_compare(env, _config(), _ep(group, parallel=parallel), TOKENS_4)
    return case


def case_non_divisible_experts(env):
    """E = 6 on 4 ranks: 2 slots per rank, rank 3 holds none (its slots stay empty)."""
    ep = _train_and_compare(env, _config(num_experts=6), _ep(parallel=ParallelConfig(pipeline_degree=2)), TOKENS_4)
    if env.rank == 3:
        assert (ep.experts.placement.slot_expert_WS[3] == -1).all()
        assert ep.experts.gate_up_proj.abs().max() == 0, "empty slots never change"


def case_replicas_hierarchical(env):
    slot_expert = np.array([[0, 1, 2], [2, 3, -1], [4, 5, 2], [6, 7, 0]])
    share = np.array([[0.8, 1, 0.2], [0.5, 1, 0], [1, 1, 0.3], [1, 1, 0.2]])
    table = PlacementTable(8, slot_expert, share)
    cfg = _config(bias_update_rate=1e-3)
    parallel = ParallelConfig(pipeline_degree=2, memory="recompute", all_to_all="hierarchical")
    _train_and_compare(env, cfg, _ep(env.nodes, placement=table, parallel=parallel), TOKENS_4,
                       bias=[1.0, 0, 3.0, 0, 0, 0, 0, 0])


def case_expert_data_parallel(env):
    """EP groups {0, 1} and {2, 3} hold all experts each; {0, 2} and {1, 3} sum their gradients."""
    ep = _train_and_compare(env, _config(), _ep(env.pair, parallel=ParallelConfig(pipeline_degree=2)), TOKENS_4,
                            expert_dp_group=env.across)
    assert ep.experts.size == 2 and ep.experts.rank == env.rank % 2


def case_expert_data_parallel_rejects_different_tables(env):
    """EP groups whose tables differ must not sum slot gradients: every rank gets a clear error."""
    cfg = _config()
    table = PlacementTable.static(cfg.num_experts, 2)
    if env.rank >= 2:
        table = PlacementTable(cfg.num_experts, table.slot_expert_WS[::-1].copy(), table.share_WS[::-1].copy())
    torch.manual_seed(0)
    layer = MoELayer(cfg, ep_group=env.pair, placement=table).double()
    layer(torch.randn(5, cfg.d_model, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="different placement tables"):
        sync_gradients(layer, expert_dp_group=env.across)


def case_checkpoint_4_2_1_4(env):
    cfg = _config(num_experts=6)
    torch.manual_seed(5)
    donor = MoELayer(cfg).double()
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(env.rank))
    four = MoELayer(cfg, ep_group=dist.group.WORLD).double()
    four.load_state_dict(donor.state_dict())
    y4 = four(x)
    two = MoELayer(cfg, ep_group=env.pair, parallel=ParallelConfig(pipeline_degree=2)).double()
    two.load_state_dict(four.state_dict())
    assert two.experts.gate_up_proj.shape[0] == 3
    one = MoELayer(cfg).double()
    one.load_state_dict(two.state_dict())
    table = PlacementTable(6, np.array([[5, 0], [1, 2], [3, 0], [4, -1]]), np.array([[1, 0.5], [1, 1], [1, 0.5], [1, 0]]))
    again = MoELayer(cfg, ep_group=dist.group.WORLD, placement=table).double()
    again.load_state_dict(one.state_dict())
    for name, layer in (("2 ranks", two), ("1 process", one), ("4 ranks, other placement", again)):
        _check(f"output on {name}", layer(x), y4, 1e-13)
    for k, v in donor.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), f"{k} survives 4 -> 2 -> 1 -> 4"
    with pytest.raises(RuntimeError, match="logical view"):
        four.load_state_dict({**donor.state_dict(), "experts.down_proj": torch.zeros(2, 8, 6)})


def case_local_first_hierarchical(env):
    """Local rows first with the hierarchical exchange, a permuted table with a replica, pipeline
    degree 2, rank 1 without tokens."""
    table = PlacementTable(8, np.array([[5, 0, 3], [6, 1, -1], [2, 7, -1], [4, 3, -1]]),
                           np.array([[1, 1, 0.4], [1, 1, 0], [1, 1, 0], [1, 0.6, 0]]))
    parallel = ParallelConfig(pipeline_degree=2, memory="both", all_to_all="hierarchical")
    ep = _train_and_compare(env, _config(), _ep(env.nodes, placement=table, parallel=parallel), TOKENS_4)
    stats = ep.experts.last_exchange
    assert stats.local_first_rows == _expected_local_rows(ep)
    if TOKENS_4[env.rank]:
        assert stats.local_first_rows > 0


def case_bounded_4(env):
    """Bounded buffers on 4 ranks, one without tokens, experts not divisible by ranks."""
    _train_and_compare(env, _config(num_experts=6), _ep(parallel=_bounded(7)), TOKENS_4)


def case_rows_sent_once_per_rank(env):
    """Top-8 of 16 experts over 4 ranks: rows on the wire are the distinct (token, rank) pairs,
    counted here from the routing, not the (token, expert) pairs."""
    cfg = _config(num_experts=16, top_k=8)
    layer = MoELayer(cfg, ep_group=dist.group.WORLD).double()
    tokens = [6, 0, 9, 4][env.rank]
    x = torch.randn(tokens, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(env.rank))
    layer(x)
    stats = layer.experts.last_exchange
    with torch.no_grad():
        expert_TK = layer.router(x).expert_TK
    rank_of_expert = {int(e): r for r, row in enumerate(layer.experts.placement.slot_expert_WS) for e in row if e >= 0}
    dests = [sorted({rank_of_expert[int(e)] for e in row}) for row in expert_TK]
    everyone = _gathered(dests)
    assert stats.routed_rows == tokens * 8
    assert stats.dispatch_rows == sum(len(d) for d in dests)
    assert stats.local_rows == sum(env.rank in d for d in dests)
    assert stats.combine_rows == sum(env.rank in d for rank_dests in everyone for d in rank_dests)
    experts_here = {e for e, r in rank_of_expert.items() if r == env.rank}
    all_rows = [row for rank_rows in _gathered(expert_TK.tolist()) for row in rank_rows]
    assert stats.expert_rows == sum(len(set(row) & experts_here) for row in all_rows)
    # A dispatch row: the float64 token, 8 int32 slot ids, 8 float64 routing weights (160 bytes,
    # a multiple of 16); the return row is the float64 sum of the pair's expert rows.
    assert stats.dispatch_bytes == stats.dispatch_rows * (8 * 8 + 8 * 4 + 8 * 8)
    assert stats.combine_bytes == stats.combine_rows * 8 * 8
    if tokens:
        assert stats.dispatch_rows < stats.routed_rows, "top-8 over 4 ranks: fewer pairs than (token, expert) rows"


CASES_4 = {
    "flat_degree_2": _case_all_to_all("flat", 2, "keep"),
    "hierarchical_degree_1_keep": _case_all_to_all("hierarchical", 1, "keep"),
    "hierarchical_degree_3_both": _case_all_to_all("hierarchical", 3, "both"),
    "non_divisible_experts": case_non_divisible_experts,
    "replicas_hierarchical": case_replicas_hierarchical,
    "expert_data_parallel": case_expert_data_parallel,
    "expert_data_parallel_rejects_different_tables": case_expert_data_parallel_rejects_different_tables,
    "checkpoint_4_2_1_4": case_checkpoint_4_2_1_4,
    "rows_sent_once_per_rank": case_rows_sent_once_per_rank,
    "bounded_4": case_bounded_4,
    "local_first_hierarchical_permuted_degree_2_both": case_local_first_hierarchical,
}
CASES = {2: CASES_2, 4: CASES_4}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    env = Env(rank, world)
    if world == 4:
        env.nodes = EPGroup.create(ranks_per_node=2)
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        across = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        env.pair, env.across = pairs[rank // 2], across[rank % 2]
    results = {}
    for name, case in CASES[world].items():
        try:
            case(env)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()




def _run_world(world: int, out_dir: str) -> list[dict]:
    return spawn_ranks(world, out_dir, SPAWN_TIMEOUT_S, _worker, lambda r, port: (r, world, port, out_dir))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _run_world(world, str(tmp_path_factory.mktemp(f"ep{world}")))
        return cache[world]

    return get


@pytest.mark.parametrize("world, case", [(w, name) for w in (2, 4) for name in CASES[w]])
def test_expert_parallel(spawned, world, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(spawned(world)) if res.get(case) != "ok"]
    assert not failures, "\n".join(failures)
