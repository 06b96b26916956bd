"""Adaptive parallelism (sharded experts; dp / ep / sharded / mixes chosen per step) against the
one-device layer.

Single-process tests cover the config, the layout (a simulated exchange delivers every row to one
holder of each slice of its expert) and refusals. Multi-process tests run on 2 and 4 CPU
processes with gloo (one spawn per world size runs every case): each case trains 3 SGD steps and
compares outputs, input gradients and all parameters with a one-device MoELayer given the same
global batch and weights (float64: 1e-10 relative), for every method, for runs that switch method
between steps, for "auto", with E < W, a rank without tokens and all tokens on one expert.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist

from flexmoe import AdaptiveConfig, MoEConfig, MoELayer, PlacementTable
from flexmoe.parallel.agreement import AgreementError
from flexmoe.parallel.adaptive_cost import method_cost
from flexmoe.parallel.shard_layout import DP, ShardLayout, default_shard_degree
from flexmoe.runtime import expert_parameters, sync_gradients
from flexmoe.train import checkpoint as ckpt
from helpers import run_case_table, run_cases_in_processes

F64_TOL = 1e-10
SPAWN_TIMEOUT_S = 300


def _config(**overrides) -> MoEConfig:
    base = dict(d_model=8, d_ff=8, num_experts=2, top_k=2, num_shared_experts=1, z_loss_coef=1e-2)
    base.update(overrides)
    return MoEConfig(**base)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = F64_TOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.detach().abs().max().double().clamp_min(1e-300) if want.numel() else 1.0
    err = float((got.detach().double() - want.detach().double()).abs().max() / scale) if want.numel() else 0.0
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="fast"), "method"),
        (dict(method=0), "method"),
        (dict(method=True), "method"),
        (dict(shard_degree=0), "shard_degree"),
        (dict(candidates=()), "candidates"),
        (dict(candidates=("auto",)), "candidates"),
        (dict(trials=0), "trials"),
        (dict(timeout_s=0), "timeout_s"),
    ],
)
def test_adaptive_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"AdaptiveConfig.{field}"):
        AdaptiveConfig(**kwargs)


def test_layout_rejects_what_it_cannot_shard():
    with pytest.raises(ValueError, match="shard_degree=3 must divide the expert group size 4"):
        ShardLayout.build(4, 8, 12, True, 3)
    with pytest.raises(ValueError, match="must divide d_ff=5"):
        ShardLayout.build(4, 2, 5, True, None)
    with pytest.raises(ValueError, match="expert groups must divide num_experts=3"):
        ShardLayout.build(4, 3, 8, True, 1)
    with pytest.raises(ValueError, match="r=3 is not offered"):
        ShardLayout.build(4, 2, 8, True, None).method_code(3)
    assert [default_shard_degree(w, e) for w, e in ((16, 8), (4, 2), (4, 8), (4, 3), (8, 128))] == [2, 2, 1, 4, 1]


@pytest.mark.parametrize("W, E, m", [(4, 2, 2), (4, 8, 4), (8, 2, 8), (6, 4, 3), (2, 8, 1), (4, 1, 4), (4, 8, 2)])
def test_simulated_exchange_gives_every_row_each_slice_once(W, E, m):
    """Every rank's plan, no communication: a token travels once to each rank it reaches, and
    each of its (token, expert) rows is computed, for each shard of the expert's width, by
    exactly one rank holding that shard after its gather; the cost model counts this traffic."""
    lay = ShardLayout.build(W, E, 24, True, m)
    G, Eg, K = lay.groups, lay.experts_per_group, min(E, 2)
    rng = np.random.default_rng(W * 100 + E)
    tokens = [int(t) for t in rng.integers(0, 6, size=W)]
    tokens[0] = 0
    expert_of = [np.stack([rng.permutation(E)[:K] for _ in range(t)]) if t else np.zeros((0, K), int) for t in tokens]
    counts_WE = np.stack([np.bincount(e.reshape(-1), minlength=E) for e in expert_of])
    # This rank's pairs: (group, token) in group-then-token order, as the layer orders them.
    pairs = [sorted({(int(e) // Eg, t) for t, row in enumerate(ex) for e in row}) for ex in expert_of]
    pairs_WG = np.stack([np.bincount([g for g, _ in p], minlength=G) for p in pairs])
    for code in lay.spreads:
        plans = [lay.dispatch(counts_WE, pairs_WG, r, code) for r in range(W)]
        assert (np.stack([p.send_W for p in plans]).T == np.stack([p.recv_W for p in plans])).all()
        inbox = [[] for _ in range(W)]
        for s, p in enumerate(plans):
            index = np.concatenate([np.arange(a, a + n) for a, n in zip(p.send_start, p.send_len)] + [[]]).astype(int)
            bounds = np.cumsum([0] + p.send_W.tolist())
            for d in range(W):
                inbox[d] += [(s,) + pairs[s][i] for i in index[bounds[d]:bounds[d + 1]]]
        covered = {}  # (src, token, expert) -> shards computed for it
        for d, p in enumerate(plans):
            g_d, _ = lay.group_of(d)
            held = [lay.group_of(r)[1] for r in lay.gather_members(d, code)]
            rows_E = np.zeros(Eg, dtype=int)
            for s, g, t in inbox[d]:
                assert g == g_d, "a pair reached a rank of another group"
                for e in expert_of[s][t]:
                    if e // Eg == g:
                        covered.setdefault((s, t, int(e)), []).extend(held)
                        rows_E[e % Eg] += 1
            assert (rows_E == p.rows_E).all(), "rows per local expert"
            assert len(set(inbox[d])) == len(inbox[d]), "a token reaches a rank at most once"
        for s in range(W):
            for t, row in enumerate(expert_of[s]):
                for e in row:
                    shards = sorted(covered[(s, t, int(e))])
                    assert shards == list(range(m)), f"r={code}: row ({s}, {t}, {e}) covers shards {shards}"
        remote = [sum(src != d for src, _, _ in inbox[d]) + sum(src == d for d2 in range(W) if d2 != d
                                                                 for src, _, _ in inbox[d2]) for d in range(W)]
        recv = [sum(src != d for src, _, _ in inbox[d]) for d in range(W)]
        cost = method_cost(lay, counts_WE, pairs_WG, code, d_model=3, top_k=K, elem_bytes=8)
        assert cost.token_bytes == max(n * (2 * 3 + K) * 8 + r * K * 4 for n, r in zip(remote, recv))
        assert cost.param_bytes == 2 * (m // code - 1) * Eg * 3 * (24 // m) * 3 * 8
    assert lay.gather_members(0, DP) == list(range(W))
    dp = method_cost(lay, counts_WE, pairs_WG, DP, d_model=3, top_k=K, elem_bytes=8)
    assert (dp.param_bytes, dp.token_bytes) == (2 * (W - 1) * Eg * 3 * (24 // m) * 3 * 8, 0)


def test_method_tuner_times_candidates_in_rounds_per_level_then_keeps_the_fastest():
    from flexmoe.parallel.adaptive import CACHED, RESOLVE, TRIAL, MethodTuner
    from flexmoe.parallel.groups import EPGroup

    tuner = MethodTuner((0, 1, 2), trials=2)
    level = MethodTuner.level(np.array([[3, 9], [0, 1]]))
    assert level == 4
    # Round 1 (cold: dp looks slowest), round 2: each candidate keeps its best time.
    for code, seconds in ((0, 9.0), (1, 1.5), (2, 2.0), (0, 1.0), (1, 1.2), (2, 2.5)):
        assert tuner.choose(level) == (code, TRIAL)
        tuner.record(level, code, seconds)
    assert tuner.choose(level) == (-1, RESOLVE)
    assert tuner.resolve(level, EPGroup.local(), 1.0, torch.device("cpu")) == 0
    assert tuner.choose(level) == (0, CACHED)
    assert tuner.choose(level + 1) == (0, TRIAL), "a new load level is timed afresh"
    assert MethodTuner((2,)).choose(level) == (2, CACHED), "one candidate: nothing to time"


def test_training_trial_clock_counts_forward_and_the_stage_backward_only():
    """Mocked clock: the forward's time plus the stage's backward (from the output's gradient to
    the last input gradient), not the work after the stage (forward or backward); gradients pass
    unchanged; no backward, no record."""
    from flexmoe.parallel.tuning import TrainingTrialClock

    times, recorded = iter([10.0, 13.0]), []
    clock = TrainingTrialClock(lambda: next(times), recorded.append)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    x_in, w_in = clock.wrap_inputs(x, w)
    y = clock.wrap_output(x_in @ w_in, 2.5)
    assert recorded == []
    (y.sin().sum() * 3).backward()  # the backward of the work after the stage runs before the first read
    assert recorded == [2.5 + 3.0]
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    ((x_ref @ w_ref).sin().sum() * 3).backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(w.grad, w_ref.grad)
    unused = TrainingTrialClock(lambda: 0.0, recorded.append)
    unused.wrap_output(unused.wrap_inputs(x)[0] * 2, 1.0)
    assert recorded == [5.5], "a forward whose backward never runs records nothing"


def test_one_process_methods_equal_the_one_device_layer():
    cfg = _config(num_experts=4)
    torch.manual_seed(0)
    ref = MoELayer(cfg).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref.sin().sum(), list(ref.parameters()))
    for method in ("dp", "ep", "sharded", "auto"):
        torch.manual_seed(0)
        layer = MoELayer(cfg, parallel=AdaptiveConfig(method=method)).double()
        y = layer(x)
        grads = torch.autograd.grad(y.sin().sum(), list(layer.parameters()))
        _check(f"{method} output", y, y_ref)
        for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
            _check(f"{method} grad {i}", g, g_ref)


def test_placement_with_adaptive_is_refused():
    cfg = _config(num_experts=4)
    with pytest.raises(ValueError, match="AdaptiveConfig.*does not compose with placement="):
        MoELayer(cfg, placement=PlacementTable.static(4, 1), parallel=AdaptiveConfig())
    with pytest.raises(ValueError, match="slots_per_rank"):
        MoELayer(cfg, slots_per_rank=4, parallel=AdaptiveConfig())


# ----------------------------------------------------------------------------------------------
# Several processes: one spawn per world size runs every case of that size.
# ----------------------------------------------------------------------------------------------


def _train(cfg, make_layer, rank: int, world: int, tokens: list[int], steps: int = 3, before_step=None, bias=None,
           dtype=torch.float64, tol=F64_TOL, expert_dp_group=None):
    """Train the adaptive layer and a one-device MoELayer side by side (same seed, same global
    batch); rank r's loss is ``W * sum(y_r * g_r) / N`` plus its scaled router loss. Returns the
    adaptive layer after ``steps`` SGD (momentum) steps, checked step by step. expert_dp_group:
    the ranks holding the same shards in other expert groups (handed to sync_gradients)."""
    torch.manual_seed(1234)
    ref = MoELayer(cfg).to(dtype)
    torch.manual_seed(1234)
    layer = make_layer(cfg).to(dtype)
    if bias is not None:
        for m in (ref, layer):
            m.router.expert_bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    for k, v in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v), f"{k}: a layer built from a seed equals the one-device layer"
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    opt = torch.optim.SGD(layer.parameters(), lr=0.3, momentum=0.9)
    N = sum(tokens)
    for step in range(steps):
        if before_step is not None:
            before_step(layer, step)
        gen = torch.Generator().manual_seed(100 + step)
        X = [torch.randn(t, cfg.d_model, generator=gen, dtype=torch.float64).to(dtype) for t in tokens]
        G = [torch.randn(t, cfg.d_model, generator=gen, dtype=torch.float64).to(dtype) for t in tokens]
        x_ref = [x.clone().requires_grad_() for x in X]
        Y = ref(torch.cat(x_ref))
        ((Y * torch.cat(G)).sum() / N + ref.aux_loss).backward()
        x = X[rank].clone().requires_grad_()
        y = layer(x)
        (world * (y * G[rank]).sum() / N + layer.aux_loss * world * tokens[rank] / N).backward()
        sync_gradients(layer, expert_dp_group=expert_dp_group)
        _check(f"step {step} output", y, Y.split(tokens)[rank], tol)
        _check(f"step {step} input grad", x.grad / world, x_ref[rank].grad, tol)
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
    state = layer.state_dict()
    for k, v in ref.state_dict().items():
        _check(f"{k} after {steps} steps", state[k], v, tol)
    return layer


def _adaptive(group=None, **kwargs):
    return lambda cfg: MoELayer(cfg, ep_group=group or dist.group.WORLD, parallel=AdaptiveConfig(**kwargs))


def _gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _case_methods(cfg_kwargs, shard_degree=None, tokens=None):
    """Every method the layout offers, fixed; then one run switching method every step; the
    switching run ends with the parameters of a run that never switched."""
    def case(rank, world):
        cfg = _config(**cfg_kwargs)
        toks = tokens or [7, 5, 3, 6][:world]
        layout = ShardLayout.build(world, cfg.num_experts, cfg.d_ff, True, shard_degree)
        methods = {layout.method_code(m): m for m in ["dp", "ep", "sharded"] + list(layout.spreads)}
        for code, method in methods.items():
            layer = _train(cfg, _adaptive(method=method, shard_degree=shard_degree), rank, world, toks)
            assert layer.experts.last_method == code
        cycle = ["dp", "sharded", "ep", "dp", 1]
        switching = _train(cfg, _adaptive(method="dp", shard_degree=shard_degree), rank, world, toks, steps=5,
                           before_step=lambda layer, step: layer.experts.set_method(cycle[step]))
        fixed = _train(cfg, _adaptive(method="ep", shard_degree=shard_degree), rank, world, toks, steps=5)
        for k, v in fixed.state_dict().items():
            _check(f"{k}: switching run vs fixed run", switching.state_dict()[k], v)
    return case


def case_auto_agrees_across_ranks(rank, world):
    cfg = _config()
    layer = _train(cfg, _adaptive(method="auto", trials=1), rank, world, [7, 5, 3, 6][:world], steps=6)
    tuner = layer.experts.tuner
    choices = _gathered((sorted(tuner.best.items()), layer.experts.last_method))
    assert all(c == choices[0] for c in choices), f"ranks disagree: {choices}"
    assert tuner.best, "a winner was kept"
    assert set(c for times in tuner.trial_s.values() for c in times) <= set(tuner.candidates)


class _Logged(torch.autograd.Function):
    """Identity that logs ``name`` in ``events`` when its gradient passes."""

    @staticmethod
    def forward(ctx, x, events, name):
        ctx.events, ctx.name = events, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(ctx.name)
        return grad, None, None


def case_trials_time_forward_and_backward(rank, world):
    """A trial of a training forward ends when the stage's backward ends: the clock is read
    before and after the forward, then when the output's gradient arrives and after the expert
    backward, and the tuner gets forward + backward without the gap between them (mocked clock
    1, 2, 4, 8: 1 + 4). A forward without a graph is timed alone, as before."""
    import flexmoe.parallel.sharded as sharded

    events, clock = [], iter([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    ffn = sharded.expert_ffn

    def logged_ffn(x_ND, *args, **kwargs):
        y_ND = ffn(_Logged.apply(x_ND, events, "expert input grad"), *args, **kwargs)
        events.append("expert forward")
        return _Logged.apply(y_ND, events, "expert output grad")

    def fake_time(device):
        events.append("clock")
        return next(clock)

    cfg = _config()
    layer = _adaptive(method="auto", trials=1)(cfg).double()
    record = layer.experts.tuner.record
    layer.experts.tuner.record = lambda level, code, s: (events.append(f"record {s:g}"), record(level, code, s))
    saved = sharded.expert_ffn, sharded.synchronized_time
    sharded.expert_ffn, sharded.synchronized_time = logged_ffn, fake_time
    try:
        x = torch.randn(6, cfg.d_model, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        events.append("loss backward")
        y.square().sum().backward()
        with torch.no_grad():
            layer(x)  # the next candidate's trial, forward only
    finally:
        sharded.expert_ffn, sharded.synchronized_time = saved
    assert events == ["clock", "expert forward", "clock", "loss backward", "clock", "expert output grad",
                      "expert input grad", "clock", "record 5",
                      "clock", "expert forward", "clock", "record 16"], events


def case_rank_without_tokens_and_one_hot_expert(rank, world):
    cfg = _config(num_experts=4, top_k=1, bias_update_rate=1e-3)
    bias = [6.0, 0.0, 0.0, 0.0]  # every token to expert 0: the other groups receive nothing
    toks = [0, 9, 4, 1][:world]
    for method in ("dp", "ep", "sharded"):
        layer = _train(cfg, _adaptive(method=method, shard_degree=world), rank, world, toks, bias=bias)
        assert layer.experts.last_counts_WE[:, 1:].sum() == 0, "all tokens went to expert 0"


def case_one_token(rank, world):
    cfg = _config(num_experts=4, top_k=1)
    for method in ("dp", "sharded"):
        _train(cfg, _adaptive(method=method, shard_degree=2), rank, world, [1] + [0] * (world - 1))


def case_float32(rank, world):
    cfg = _config(num_experts=4)
    for method in ("dp", "ep", "sharded"):
        _train(cfg, _adaptive(method=method, shard_degree=2), rank, world, [7, 5], dtype=torch.float32, tol=1e-5)


def case_expert_groups_smaller_than_the_world(rank, world):
    """Two adaptive expert groups of 2 ranks ({0, 1}, {2, 3}), data parallel between them: shard
    gradients are summed over the ranks holding the same shards ({0, 2}, {1, 3})."""
    pairs = dist.new_group([0, 1]), dist.new_group([2, 3])
    across = dist.new_group([0, 2]), dist.new_group([1, 3])
    cfg = _config(num_experts=2)
    for method in ("dp", "sharded"):
        _train(cfg, _adaptive(pairs[rank // 2], method=method, shard_degree=2), rank, world, [7, 5, 3, 6],
               expert_dp_group=across[rank % 2])


def case_disagreement_is_reported_on_every_rank(rank, world):
    cfg = _config()
    layer = MoELayer(cfg, ep_group=dist.group.WORLD, parallel=AdaptiveConfig(method="dp")).double()
    if rank == 1:
        layer.experts.set_method("ep")
    with pytest.raises(AgreementError, match="disagree on fixed method"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    layer.experts.set_method("ep")
    layer.experts.forward_steps = 0
    layer(torch.randn(2, 8, dtype=torch.float64)).sum().backward()  # the group still works afterwards
    # Rank 0 goes into the backward while rank 1 runs another forward: both raise, nobody hangs.
    y = layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(AgreementError, match="different points"):
        if rank == 0:
            y.sum().backward()
        else:
            layer(torch.randn(2, 8, dtype=torch.float64))


def case_checkpoint_across_world_sizes_and_methods(rank, world):
    """Saved by 4 ranks (m = 2), loaded by 2 ranks with m = 2 and another method, by one device,
    by an expert-parallel layer, and back by 4 ranks with m = 4; one-device outputs are the
    reference."""
    cfg = _config(num_experts=2)
    torch.manual_seed(7)
    four = MoELayer(cfg, ep_group=dist.group.WORLD, parallel=AdaptiveConfig(method="sharded")).double()
    with torch.no_grad():
        for p in four.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rank), dtype=p.dtype) * 0.01)
    state = four.state_dict()
    one = MoELayer(cfg).double()
    one.load_state_dict(state)
    pair = dist.new_group([0, 1]), dist.new_group([2, 3])
    two = MoELayer(cfg, ep_group=pair[rank // 2], parallel=AdaptiveConfig(method="dp", shard_degree=2)).double()
    two.load_state_dict(state)
    back = MoELayer(cfg, ep_group=dist.group.WORLD, parallel=AdaptiveConfig(method=2, shard_degree=4)).double()
    back.load_state_dict(one.state_dict())
    ep = MoELayer(cfg, ep_group=dist.group.WORLD).double()  # expert parallelism with placement slots
    ep.load_state_dict(state)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + rank))
    want = one(x)
    for name, layer in (("saved", four), ("2 ranks", two), ("4 ranks, m=4", back), ("EP layer", ep)):
        _check(f"{name} output", layer(x), want)
    for k, v in one.state_dict().items():
        _check(f"{k} round trip", back.state_dict()[k], v)
    # Optimizer state (momentum) goes logical and back like the weights (flexmoe train's resume).
    opt = torch.optim.SGD(four.parameters(), lr=0.1, momentum=0.9)
    four(x).square().sum().backward()
    opt.step()
    saved = ckpt.optimizer_state_by_name(four, opt)
    mine = {k: v["momentum_buffer"].clone() for k, v in saved["state"].items()}
    logical = ckpt.optimizer_state_to_logical(four, saved)
    assert logical["state"]["experts.gate_up_proj"]["momentum_buffer"].shape == (2, 16, 8)
    restored = ckpt.optimizer_state_to_slots(four, logical)
    for k, v in mine.items():
        assert torch.equal(restored["state"][k]["momentum_buffer"], v), f"{k}: optimizer state round trip"
    assert {id(p) for p in expert_parameters(back)} == {id(back.experts.gate_up_proj), id(back.experts.down_proj)}


CASES = {
    2: {
        "methods_E8_whole_experts": _case_methods(dict(num_experts=8)),
        "methods_E1_lt_W": _case_methods(dict(num_experts=1, top_k=1)),
        "methods_E4_m2_one_group": _case_methods(dict(num_experts=4), shard_degree=2),
        "auto_agrees": case_auto_agrees_across_ranks,
        "trials_time_forward_and_backward": case_trials_time_forward_and_backward,
        "rank_without_tokens_one_hot_expert": case_rank_without_tokens_and_one_hot_expert,
        "one_token": case_one_token,
        "disagreement": case_disagreement_is_reported_on_every_rank,
        "float32": case_float32,
    },
    4: {
        "methods_E2_lt_W": _case_methods(dict(num_experts=2)),
        "methods_E4_m4_with_mix_r2": _case_methods(dict(num_experts=4, top_k=2), shard_degree=4),
        "auto_agrees": case_auto_agrees_across_ranks,
        "rank_without_tokens_one_hot_expert": case_rank_without_tokens_and_one_hot_expert,
        "checkpoint_4_2_1_4": case_checkpoint_across_world_sizes_and_methods,
        "expert_groups_smaller_than_world": case_expert_groups_smaller_than_the_world,
    },
}


def run_cases(rank: int, world: int, port: int) -> dict:
    """Entry point of every spawned process (helpers.run_cases_in_processes)."""
    return run_case_table(CASES[world], rank, world, port, 90)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_cases_in_processes(world, "test_adaptive", str(tmp_path_factory.mktemp(f"ad{world}")),
                                                  SPAWN_TIMEOUT_S)
        return cache[world]

    return get


@pytest.mark.parametrize("world, case", [(w, name) for w in (2, 4) for name in CASES[w]])
def test_adaptive(spawned, world, case):
    for rank, results in enumerate(spawned(world)):
        assert results[case] == "ok", f"rank {rank} of {world}:\n{results[case]}"
