"""The EvoMoE dense-to-sparse gate against a float64 per-token, per-expert loop reference."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

import flexmoe
from flexmoe.config import DTSGateConfig
from flexmoe.routing.dts import DTSRouter, gate_temperature, gate_temperature_tensor, set_gate_step
from reference import activation


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference_dts(layer, x, noise_TE):
    """Selection (list of sets), weights, output, balance loss, all by explicit loops, float64.

    noise_TE: the Gumbel noise the gate drew (None in eval mode or in the sparse phase).
    """
    cfg, dts = layer.config, layer.config.dts
    x_TD = x.reshape(-1, cfg.d_model).double()
    W = layer.router.weight.double()
    T, E = x_TD.shape[0], cfg.num_experts
    step = layer.router.step
    frac = min(step / dts.anneal_steps, 1.0)
    if dts.schedule == "linear":
        tau = dts.tau_max + (dts.tau_min - dts.tau_max) * frac
    else:
        tau = dts.tau_max * (dts.tau_min / dts.tau_max) ** frac
    sparse = step >= (dts.anneal_steps if dts.sparse_step is None else dts.sparse_step)
    top_k = dts.top_k or cfg.top_k
    logits = x_TD @ W.t()
    probs = torch.softmax(logits, -1)
    chosen = []
    for t in range(T):
        if sparse:
            order = sorted(range(E), key=lambda e: -float(probs[t, e].detach()))
            chosen.append(set(order[:top_k]))
            continue
        z = [float(logits[t, e].detach()) + (float(noise_TE[t, e]) if noise_TE is not None else 0.0) for e in range(E)]
        m = max(z)
        ez = [math.exp((v - m) / tau) for v in z]
        g = [v / sum(ez) for v in ez]
        sel = {e for e in range(E) if g[e] > dts.threshold}
        sel.add(max(range(E), key=lambda e: g[e]))
        chosen.append(sel)
    gu, dn = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    rows, weights = [], []
    for t in range(T):
        total = sum(probs[t, e] for e in chosen[t]) if cfg.norm_topk_prob else 1.0
        w_t = {e: probs[t, e] / total for e in chosen[t]}
        weights.append(w_t)
        y = torch.zeros(cfg.d_model, dtype=torch.float64)
        for e in sorted(chosen[t]):
            y = y + w_t[e] * (dn[e] @ activation(gu[e] @ x_TD[t], cfg.activation))
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros((0, cfg.d_model))
    if layer.shared_experts is not None:
        se = layer.shared_experts
        y_TD = y_TD + activation(x_TD @ se.gate_up_proj.double().t(), cfg.activation) @ se.down_proj.double().t()
    aux = x_TD.new_zeros(())
    if cfg.aux_loss_coef and T:
        balance = 0.0
        for e in range(E):
            mean_p = sum(probs[t, e] for t in range(T)) / T
            mean_mask = sum(1.0 for t in range(T) if e in chosen[t]) / T
            balance = balance + mean_p * mean_mask
        aux = aux + cfg.aux_loss_coef * E * balance
    if cfg.z_loss_coef and T:
        aux = aux + cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return y_TD.reshape(x.shape), aux, chosen, weights


def draw_noise(seed, T, E, dtype):
    torch.manual_seed(seed)
    exp_TE = torch.empty(T, E, dtype=dtype).exponential_()
    return -exp_TE.clamp_min(torch.finfo(dtype).tiny).log()


def check_dts(layer, x, seed, tol):
    """Forward, selection, aux loss, counts and every gradient against the reference."""
    ref_layer = copy.deepcopy(layer).double()
    T, E = x.reshape(-1, layer.config.d_model).shape[0], layer.config.num_experts
    router_dtype = torch.promote_types(layer.config.router_dtype, x.dtype)
    uses_noise = layer.training and not layer.router.is_sparse
    noise = draw_noise(seed, T, E, router_dtype) if uses_noise else None
    x = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().double().clone().requires_grad_(True)
    probe = torch.randn(x.shape, dtype=torch.float64)

    torch.manual_seed(seed)
    routing = layer.router(x.detach().reshape(-1, layer.config.d_model))
    torch.manual_seed(seed)
    y = layer(x)
    ((y.double() * probe).sum() + layer.aux_loss.double()).backward()
    y_ref, aux_ref, chosen, weights = reference_dts(ref_layer, x_ref, noise)
    ((y_ref * probe).sum() + aux_ref).backward()

    keep = routing.keep_TK if routing.keep_TK is not None else torch.ones_like(routing.expert_TK, dtype=torch.bool)
    for t in range(T):
        got = {int(routing.expert_TK[t, k]) for k in range(routing.expert_TK.shape[1]) if keep[t, k]}
        assert got == chosen[t], (t, got, chosen[t])
        for k in range(routing.expert_TK.shape[1]):
            if keep[t, k]:
                e = int(routing.expert_TK[t, k])
                assert abs(float(routing.weight_TK[t, k].detach()) - float(weights[t][e].detach())) <= tol
    counts = torch.zeros(E, dtype=torch.int64)
    for sel in chosen:
        for e in sel:
            counts[e] += 1
    assert torch.equal(layer.last_counts.cpu(), counts)
    assert rel(y, y_ref) <= tol, rel(y, y_ref)
    assert abs(layer.aux_loss.item() - aux_ref.item()) <= tol * max(1.0, abs(aux_ref.item()))
    assert (x.grad.double() - x_ref.grad).norm() <= tol * max(x_ref.grad.norm().item(), 1e-2)
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or p.grad.norm() == 0, name
            continue
        err = (p.grad.double() - p_ref.grad).norm().item()
        assert err <= tol * max(p_ref.grad.norm().item(), 1e-2), (name, err)
    return chosen


def dts_config(rng: random.Random, **overrides) -> flexmoe.MoEConfig:
    E = rng.randint(1, 9)
    fields = dict(
        d_model=rng.choice([4, 8]), d_ff=rng.choice([3, 8]), num_experts=E, top_k=rng.randint(1, E),
        activation=rng.choice(["swiglu", "gelu", "relu"]), router="dts",
        norm_topk_prob=rng.random() < 0.6, aux_loss_coef=rng.choice([0.0, 0.01, 0.3]),
        z_loss_coef=rng.choice([0.0, 0.001]), num_shared_experts=rng.choice([0, 1]), kernels="torch",
        init_std=rng.choice([0.3, 1.0]),
        dts=DTSGateConfig(
            tau_max=rng.choice([1.0, 2.0, 5.0]), tau_min=rng.choice([0.05, 0.3, 1.0]),
            anneal_steps=rng.randint(1, 50), schedule=rng.choice(["linear", "exponential"]),
            threshold=rng.choice([0.001, 0.05, 0.2]), sparse_step=rng.choice([None, 10, 100]),
            top_k=rng.choice([None, 1]),
        ),
    )
    if fields["dts"].tau_min > fields["dts"].tau_max:
        fields["dts"] = DTSGateConfig(**{**fields["dts"].__dict__, "tau_min": fields["dts"].tau_max})
    fields.update(overrides)
    return flexmoe.MoEConfig(**fields)


@pytest.mark.parametrize("seed", range(16))
def test_random_dts_configs_match_float64_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = dts_config(rng)
    layer = flexmoe.MoELayer(cfg).double()
    set_gate_step(layer, rng.choice([0, 3, 9, 10, 60, 200]))
    layer.train(rng.random() < 0.8)
    shape = rng.choice([(1, cfg.d_model), (9, cfg.d_model), (2, 5, cfg.d_model)])
    check_dts(layer, torch.randn(shape, dtype=torch.float64), seed=1000 + seed, tol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_float32_layer_matches_float64_reference(seed):
    rng = random.Random(50 + seed)
    torch.manual_seed(seed)
    cfg = dts_config(rng, aux_loss_coef=0.1)
    layer = flexmoe.MoELayer(cfg)
    set_gate_step(layer, rng.choice([0, 5]))
    check_dts(layer, torch.randn(11, cfg.d_model), seed=seed, tol=2e-5)


@pytest.mark.parametrize("case", ["single_token", "high_threshold", "skewed", "one_expert", "sparse_top1"])
def test_awkward_cases(case):
    torch.manual_seed(7)
    E, T = 6, 12
    dts = DTSGateConfig(anneal_steps=10, threshold=0.001)
    top_k = 2
    if case == "single_token":
        T = 1
    elif case == "high_threshold":
        dts = DTSGateConfig(anneal_steps=10, threshold=0.9)
    elif case == "one_expert":
        E, top_k = 1, 1
    elif case == "sparse_top1":
        dts = DTSGateConfig(anneal_steps=10, top_k=1)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=E, top_k=top_k, router="dts", aux_loss_coef=0.1,
                            kernels="torch", init_std=0.5, dts=dts)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(T, 8, dtype=torch.float64)
    if case == "skewed":
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[4, 0] = 40.0
        x[:, 0] = x[:, 0].abs() + 1.0
    set_gate_step(layer, 20 if case == "sparse_top1" else 2)
    chosen = check_dts(layer, x, seed=3, tol=1e-10)
    if case == "high_threshold":
        assert all(len(sel) >= 1 for sel in chosen)
    if case == "skewed":
        assert all(4 in sel for sel in chosen)
    if case == "sparse_top1":
        assert all(len(sel) == 1 for sel in chosen)


def test_no_tokens():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts", aux_loss_coef=0.1, kernels="torch")
    layer = flexmoe.MoELayer(cfg)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    assert y.shape == (0, 8) and layer.last_counts.sum() == 0 and layer.aux_loss.item() == 0.0


def test_dense_phase_dispatches_only_selected_pairs():
    """K = E slots with keep_TK masking; early on (hot tau) most pairs go, late on few."""
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=16, d_ff=8, num_experts=8, router="dts", kernels="torch", init_std=1.0,
                            dts=DTSGateConfig(tau_max=4.0, tau_min=0.05, anneal_steps=100, threshold=0.01))
    router = DTSRouter(cfg)
    x = torch.randn(64, 16)
    routing = router(x)
    assert routing.expert_TK.shape == (64, 8) and routing.keep_TK is not None
    hot = int(routing.keep_TK.sum())
    router.set_step(99)
    cold = int(router(x).keep_TK.sum())
    assert hot > cold >= 64
    router.set_step(100)
    routing = router(x)
    assert routing.keep_TK is None and routing.expert_TK.shape == (64, 2)


def test_noise_only_in_training_and_from_torch_rng():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=8, router="dts", kernels="torch", init_std=1.0,
                            dts=DTSGateConfig(tau_max=0.5, tau_min=0.5, threshold=0.05))
    router = DTSRouter(cfg)
    x = torch.randn(200, 8)
    router.eval()
    state = torch.get_rng_state()
    first = router(x).keep_TK
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(router(x).keep_TK, first)
    router.train()
    torch.manual_seed(5)
    a = router(x).keep_TK
    b = router(x).keep_TK
    torch.manual_seed(5)
    assert torch.equal(router(x).keep_TK, a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_annealing_schedules(schedule):
    dts = DTSGateConfig(tau_max=2.0, tau_min=0.25, anneal_steps=40, schedule=schedule)
    values = [gate_temperature(dts, s) for s in range(0, 60)]
    assert values[0] == 2.0 and values[40] == pytest.approx(0.25, abs=1e-15) and values[59] == values[40]
    assert all(a > b for a, b in zip(values[:40], values[1:41]))
    if schedule == "linear":
        assert values[20] == pytest.approx(1.125, abs=1e-15)
        assert values[10] - values[11] == pytest.approx(values[30] - values[31], abs=1e-12)
    else:
        assert values[20] == pytest.approx(math.sqrt(2.0 * 0.25), abs=1e-12)
        assert values[10] / values[11] == pytest.approx(values[30] / values[31], abs=1e-12)
    for s in (0, 7, 20, 39, 40, 55):
        assert float(gate_temperature_tensor(dts, torch.tensor(s))) == pytest.approx(values[s], rel=1e-12)


def test_sparse_switch_and_gate_step_persistence():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts",
                            dts=DTSGateConfig(anneal_steps=30, sparse_step=12))
    model = torch.nn.Sequential(flexmoe.MoELayer(cfg), flexmoe.MoELayer(cfg))
    set_gate_step(model, 11)
    assert all(not layer.router.is_sparse for layer in model)
    set_gate_step(model, 12)
    assert all(layer.router.is_sparse for layer in model)
    assert DTSRouter(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts",
                                       dts=DTSGateConfig(anneal_steps=30))).config.dts.dense_steps == 30
    state = model.state_dict()
    assert int(state["0.router.gate_step"]) == 12
    fresh = torch.nn.Sequential(flexmoe.MoELayer(cfg), flexmoe.MoELayer(cfg))
    fresh.load_state_dict(state)
    assert fresh[0].router.step == 12 and fresh[1].router.is_sparse
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="gate step"):
            set_gate_step(model, bad)
    flexmoe.update_router_bias(model)  # a no-op for the DTS gate, never an error


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dts=DTSGateConfig(top_k=5)), "dts.top_k"),
        (dict(capacity_factor=1.0), "capacity_factor"),
        (dict(bias_update_rate=0.1), "bias_update_rate"),
        (dict(dts={"tau_max": 2.0}), "MoEConfig.dts"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="cosine"), "DTSGateConfig.schedule"),
        (dict(tau_max=0.5, tau_min=1.0), "DTSGateConfig.tau_min"),
        (dict(threshold=1.0), "DTSGateConfig.threshold"),
        (dict(anneal_steps=0), "DTSGateConfig.anneal_steps"),
        (dict(tau_min=0.0), "DTSGateConfig.tau_min"),
        (dict(sparse_step=-1), "DTSGateConfig.sparse_step"),
        (dict(top_k=0), "DTSGateConfig.top_k"),
    ],
)
def test_gate_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DTSGateConfig(**kwargs)


def test_balance_loss_is_k_times_switch_loss_when_sparse():
    """With top-k selection mean_t(mask) = K * f_e, so the DTS loss is K times the Switch loss."""
    torch.manual_seed(1)
    kwargs = dict(d_model=8, d_ff=4, num_experts=6, top_k=2, aux_loss_coef=1.0, kernels="torch", init_std=1.0)
    topk = flexmoe.MoELayer(flexmoe.MoEConfig(**kwargs))
    dts = flexmoe.MoELayer(flexmoe.MoEConfig(**kwargs, router="dts", dts=DTSGateConfig(anneal_steps=1)))
    dts.load_state_dict(topk.state_dict(), strict=False)
    set_gate_step(dts, 1)
    x = torch.randn(30, 8)
    topk(x), dts(x)
    assert dts.aux_loss.item() == pytest.approx(2 * topk.aux_loss.item(), rel=1e-6)
    assert torch.equal(dts.last_counts, topk.last_counts)
    assert F.mse_loss(dts(x), topk(x)).item() < 1e-12


def test_fullgraph_compile_matches_eager_and_compiles_once_per_phase():
    """tau comes from the step buffer on the device, so annealing does not recompile; the switch
    to top-k does, once."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts", kernels="torch", aux_loss_coef=0.1,
                            init_std=0.5, dts=DTSGateConfig(anneal_steps=4, threshold=0.1))
    eager = flexmoe.MoELayer(cfg).double()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for step in range(6):
        set_gate_step(eager, step)
        set_gate_step(compiled_layer, step)
        x = torch.randn(7, 8, dtype=torch.float64)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.manual_seed(step)
        ye = eager(xe)
        torch.manual_seed(step)
        yc = compiled(xc)
        (ye.square().sum() + eager.aux_loss).backward()
        (yc.square().sum() + compiled_layer.aux_loss).backward()
        torch.testing.assert_close(yc, ye, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled_layer.router.weight.grad, eager.router.weight.grad, rtol=1e-12, atol=1e-12)
        assert torch.equal(compiled_layer.last_counts, eager.last_counts)
    assert counters["stats"]["unique_graphs"] == 2
