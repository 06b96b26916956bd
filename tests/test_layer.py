"""MoELayer against the float64 per-expert-loop reference (tests/reference.py)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

import flexmoe
from reference import reference_moe, reference_routing


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_reference(layer: flexmoe.MoELayer, x: torch.Tensor, tol: float, **ref_kwargs) -> None:
    """Forward, aux loss, counts, input gradient and every parameter gradient
    (``ref_kwargs`` go to ``reference_moe``)."""
    ref_layer = copy.deepcopy(layer).double()
    x = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().double().clone().requires_grad_(True)
    probe = torch.randn(x.shape, dtype=torch.float64)

    y = layer(x)
    ((y.double() * probe).sum() + layer.aux_loss.double()).backward()
    y_ref, aux_ref, counts_ref, _ = reference_moe(ref_layer, x_ref, **ref_kwargs)
    ((y_ref * probe).sum() + aux_ref).backward()

    assert y.shape == x.shape
    assert rel(y, y_ref) <= tol, rel(y, y_ref)
    assert abs(layer.aux_loss.item() - aux_ref.item()) <= tol * max(1.0, abs(aux_ref.item()))
    assert torch.equal(layer.last_counts.cpu(), counts_ref)
    assert (x.grad.double() - x_ref.grad).norm() <= tol * max(x_ref.grad.norm().item(), 1e-2)
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or p.grad.norm() == 0, name
            continue
        # Gradients that vanish in exact arithmetic (e.g. router with top_k = E) only hold rounding.
        err = (p.grad.double() - p_ref.grad).norm().item()
        assert err <= tol * max(p_ref.grad.norm().item(), 1e-2), (name, err, p_ref.grad.norm().item())


def random_config(rng: random.Random, **overrides) -> flexmoe.MoEConfig:
    E = rng.randint(1, 9)
    fields = dict(
        d_model=rng.choice([4, 8, 12]),
        d_ff=rng.choice([3, 8, 10]),
        num_experts=E,
        top_k=rng.randint(1, E),
        activation=rng.choice(["swiglu", "gelu", "relu"]),
        router=rng.choice(["softmax", "sigmoid"]),
        norm_topk_prob=rng.random() < 0.5,
        capacity_factor=rng.choice([None, None, 0.5, 1.0, 1.5]),
        aux_loss_coef=rng.choice([0.0, 0.01, 0.3]),
        z_loss_coef=rng.choice([0.0, 0.001]),
        num_shared_experts=rng.choice([0, 0, 1, 2]),
        init_std=0.5,
    )
    fields["shared_expert_gate"] = fields["num_shared_experts"] > 0 and rng.random() < 0.5
    fields.update(overrides)
    return flexmoe.MoEConfig(**fields)


@pytest.mark.parametrize("seed", range(24))
def test_random_configs_match_float64_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cfg = random_config(rng, kernels="torch")
    layer = flexmoe.MoELayer(cfg).double()
    shape = rng.choice([(1, cfg.d_model), (7, cfg.d_model), (2, 5, cfg.d_model)])
    check_against_reference(layer, torch.randn(shape, dtype=torch.float64), tol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_triton_kernels_match_reference(seed):
    """The Triton path (interpreted on CPU) in float64 and float32."""
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    dtype = torch.float64 if seed % 2 == 0 else torch.float32
    cfg = random_config(rng, kernels="triton")
    layer = flexmoe.MoELayer(cfg).to(dtype)
    x = torch.randn(rng.randint(1, 9), cfg.d_model, dtype=dtype)
    check_against_reference(layer, x, tol=1e-10 if dtype == torch.float64 else 2e-5)


def test_triton_permute_zeroes_exactly_the_unowned_rows(monkeypatch):
    """The Triton permute writes every owned row and zeroes the rows no pair maps to (dropped pairs
    in the middle of the buffer and at its end, several zeroing programs, several column steps),
    whatever the fresh buffer held: it is poisoned with NaN here."""
    from flexmoe.ops import triton_kernels as tk

    torch.manual_seed(3)
    T, K, D = 70, 2, 300
    x = torch.randn(T, D, dtype=torch.float64)
    row_token = torch.arange(T * K) // K
    row_token[[0, 5, 63, 64, 65, 100]] = -1
    row_token[-9:] = -1
    pair_row = torch.full((T, K), -1, dtype=torch.int64)
    owned = (row_token >= 0).nonzero().squeeze(1)
    pair_row.view(-1)[owned] = owned  # row i holds pair i
    real_empty = torch.empty
    monkeypatch.setattr(tk.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    out = tk.scatter_rows(x, pair_row, row_token)
    want = torch.where((row_token >= 0)[:, None], x[row_token.clamp_min(0)], torch.zeros(()))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("kernels", ["torch", "triton", "fused"])
@pytest.mark.parametrize(
    "case",
    ["top_k_equals_num_experts", "one_expert", "empty_experts", "all_to_one_expert", "single_token", "no_tokens"],
)
def test_awkward_cases(case, kernels):
    torch.manual_seed(0)
    E, T, k = 6, 10, 2
    if case == "top_k_equals_num_experts":
        k = E
    elif case == "one_expert":
        E, k = 1, 1
    elif case == "empty_experts":
        E, T = 16, 2
    elif case == "single_token":
        T = 1
    elif case == "no_tokens":
        T = 0
    elif case == "all_to_one_expert":
        k = 1
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=E, top_k=k, aux_loss_coef=0.1, kernels=kernels, init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(T, 8, dtype=torch.float64)
    if case == "all_to_one_expert":
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[3, 0] = 50.0
        x[:, 0] = x[:, 0].abs() + 1.0
    if case == "no_tokens":
        y = layer(x.requires_grad_(True))
        assert y.shape == (0, 8)
        y.sum().backward()
        assert layer.last_counts.sum() == 0
        return
    check_against_reference(layer, x, tol=1e-10)
    if case == "empty_experts":
        assert (layer.last_counts == 0).any()
    if case == "all_to_one_expert":
        assert layer.last_counts[3] == T and layer.last_counts.sum() == T


def test_capacity_drops_exactly_the_lowest_scoring_pairs():
    torch.manual_seed(3)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=0.5, init_std=1.0)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    routing = layer.router(x)
    _, probs, chosen, _, keep_ref, _ = reference_routing(x, layer.router.weight.double(), cfg)
    assert routing.keep_TK is not None
    for t in range(20):
        got = {int(routing.expert_TK[t, k]) for k in range(2) if routing.keep_TK[t, k]}
        want = {chosen[t][k] for k in range(2) if keep_ref[t][k]}
        assert got == want, t
    assert routing.keep_TK.sum() == 4 * cfg.capacity(20)
    check_against_reference(layer, x, tol=1e-10)


def test_bias_balancing_moves_load_to_underused_experts():
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=1, bias_update_rate=0.02, init_std=0.3)
    layer = flexmoe.MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight[0] += 0.5
    x = torch.randn(256, 8, dtype=torch.float64).abs()

    def imbalance() -> float:
        with torch.no_grad():
            layer(x)
        counts = layer.last_counts.double()
        return (counts.max() / counts.mean()).item()

    start = imbalance()
    layer.router.pending_load_E.zero_()
    for _ in range(60):
        with torch.no_grad():
            layer(x)
        flexmoe.runtime.update_router_bias(layer)
    assert start > 2.0
    assert imbalance() < 0.6 * start
    assert layer.router.expert_bias[0] < 0
    layer.router.pending_load_E.zero_()
    check_against_reference(layer, x[:16], tol=1e-10)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(1)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=5, top_k=2, bias_update_rate=0.1, norm_topk_prob=False)
    layer = flexmoe.MoELayer(cfg).double()
    layer.router.expert_bias.copy_(torch.tensor([1.0, 0, 0, 0, 0]))
    routing = layer.router(torch.randn(6, 8, dtype=torch.float64))
    assert (routing.expert_TK == 0).any(dim=1).all()
    assert torch.equal(routing.weight_TK, routing.probs_TE.gather(1, routing.expert_TK))


def test_aux_loss_sums_over_model_layers():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, aux_loss_coef=0.1, z_loss_coef=0.01)
    model = torch.nn.Sequential(flexmoe.MoELayer(cfg), torch.nn.Linear(8, 8), flexmoe.MoELayer(cfg))
    model(torch.randn(5, 8))
    total = flexmoe.aux_loss(model)
    assert torch.allclose(total, model[0].aux_loss + model[2].aux_loss)
    assert total.requires_grad
    assert flexmoe.aux_loss(torch.nn.Linear(2, 2)).item() == 0.0
    plain = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4))
    plain(torch.randn(3, 8))
    assert plain.aux_loss.item() == 0.0


def test_parameter_layout_follows_transformers_v5():
    gated = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=16, d_ff=24, num_experts=4))
    assert gated.router.weight.shape == (4, 16)
    assert gated.experts.gate_up_proj.shape == (4, 48, 16)
    assert gated.experts.down_proj.shape == (4, 16, 24)
    plain = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=16, d_ff=24, num_experts=4, activation="gelu"))
    assert plain.experts.gate_up_proj.shape == (4, 24, 16)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_model", 0, "d_model"),
        ("d_ff", 2.5, "d_ff"),
        ("num_experts", -1, "num_experts"),
        ("top_k", 9, "top_k"),
        ("activation", "tanh", "activation"),
        ("router", "argmax", "router"),
        ("capacity_factor", 0.0, "capacity_factor"),
        ("capacity_factor", float("nan"), "capacity_factor"),
        ("aux_loss_coef", -0.1, "aux_loss_coef"),
        ("z_loss_coef", "x", "z_loss_coef"),
        ("bias_update_rate", -1.0, "bias_update_rate"),
        ("num_shared_experts", -2, "num_shared_experts"),
        ("shared_expert_gate", True, "shared_expert_gate"),
        ("norm_topk_prob", 1, "norm_topk_prob"),
        ("router_dtype", torch.int32, "router_dtype"),
        ("kernels", "cuda", "kernels"),
        ("init_std", 0.0, "init_std"),
    ],
)
def test_bad_config_values_name_the_field(field, value, match):
    fields = dict(d_model=8, d_ff=4, num_experts=8, top_k=2)
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        flexmoe.MoEConfig(**fields)


def test_bad_inputs_raise_clear_errors():
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(bad)
    with pytest.raises(TypeError, match="MoEConfig"):
        flexmoe.MoELayer({"d_model": 8})


def test_integer_and_meta_inputs_say_what_is_wrong():
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4))
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(TypeError, match="must be a floating-point tensor") as err:
            layer(torch.ones(3, 8, dtype=dtype))
        assert "layer.to" not in str(err.value)
    with pytest.raises(ValueError, match="meta device"):
        layer(torch.empty(3, 8, device="meta"))
    with torch.device("meta"):
        meta_layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4))
    with pytest.raises(ValueError, match="meta device"):
        meta_layer(torch.empty(3, 8, device="meta"))


def test_config_is_frozen_after_validation():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, router="dts")
    layer = flexmoe.MoELayer(cfg)
    for field, value in (("top_k", 0), ("kernels", "bogus"), ("num_experts", 2)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(layer.config, field, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.config.dts.top_k = 99
    assert layer.config.top_k == 2 and layer.config.kernels == "auto"
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(cfg, top_k=0)
    assert dataclasses.replace(cfg, top_k=1).top_k == 1


def test_bfloat16_path_runs_and_is_close():
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, init_std=0.2)
    layer = flexmoe.MoELayer(cfg)
    x = torch.randn(16, 32)
    ref, _, _, _ = reference_moe(copy.deepcopy(layer).double(), x.double())
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert rel(y, ref) < 2e-2


def test_autocast_runs_experts_in_low_precision_with_float32_parameters():
    torch.manual_seed(0)
    cfg = flexmoe.MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, num_shared_experts=1, init_std=0.2)
    layer = flexmoe.MoELayer(cfg)
    x = torch.randn(16, 32, requires_grad=True)
    ref, _, _, _ = reference_moe(copy.deepcopy(layer).double(), x.detach().double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 2e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert x.grad.dtype == torch.float32
