"""The peers' routing options (issue 12) against the float64 per-token reference (tests/reference.py).

Legend: T tokens, D model width, E experts, K chosen experts per token.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import flexmoe
from reference import exact_capacity, reference_routing
from test_layer import check_against_reference, random_config, rel


def random_options(rng: random.Random, cfg: flexmoe.MoEConfig) -> dict:
    """Random values of the routing options that fit ``cfg``."""
    E, k = cfg.num_experts, cfg.top_k
    divisors = [g for g in range(1, E + 1) if E % g == 0]
    G = rng.choice(divisors)
    top_groups = None
    if G > 1:
        fits = [m for m in range(1, G + 1) if m * (E // G) >= k]
        top_groups = rng.choice(fits + [None])
    return dict(
        num_groups=G,
        top_groups=top_groups,
        group_score_experts=rng.choice([1, 2]) if E // G >= 2 else 1,
        routed_scaling_factor=rng.choice([1.0, 2.5]),
        capacity_priority=rng.choice(["prob", "weight", "position"]),
        aux_loss_experts=rng.choice(["selected", "unbiased"]),
        aux_loss_scope=rng.choice(["batch", "sequence"]),
        router_bias=rng.random() < 0.5,
        expert_biases=rng.random() < 0.5,
        activation=rng.choice([cfg.activation, "swiglu_clamped"]),
        swiglu_limit=rng.choice([0.5, 7.0]),
        shared_d_ff=rng.choice([None, 5]) if cfg.num_shared_experts else None,
    )


def randomise_biases(layer: flexmoe.MoELayer, rng: random.Random) -> None:
    """Nonzero router/expert biases, and a balancing bias loaded the way a checkpoint is."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    if rng.random() < 0.6:
        state = layer.state_dict()
        state["router.expert_bias"] = torch.randn(layer.config.num_experts) * 0.2
        layer.load_state_dict(state)


@pytest.mark.parametrize("seed", range(30))
def test_random_routing_options_match_float64_reference(seed):
    rng = random.Random(1000 + seed)
    torch.manual_seed(seed)
    base = random_config(rng, kernels="torch")
    cfg = dataclasses.replace(base, **random_options(rng, base))
    layer = flexmoe.MoELayer(cfg).double()
    randomise_biases(layer, rng)
    shape = rng.choice([(1, cfg.d_model), (7, cfg.d_model), (2, 5, cfg.d_model), (3, 1, cfg.d_model)])
    check_against_reference(layer, torch.randn(shape, dtype=torch.float64), tol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_routing_options_under_triton_kernels(seed):
    rng = random.Random(2000 + seed)
    torch.manual_seed(seed)
    base = random_config(rng, kernels="triton")
    cfg = dataclasses.replace(base, **random_options(rng, base))
    layer = flexmoe.MoELayer(cfg).double()
    randomise_biases(layer, rng)
    check_against_reference(layer, torch.randn(6, cfg.d_model, dtype=torch.float64), tol=1e-10)


def deepseek_like(**overrides) -> flexmoe.MoEConfig:
    fields = dict(d_model=8, d_ff=6, num_experts=8, top_k=2, router="sigmoid", num_groups=4, top_groups=2,
                  routed_scaling_factor=2.5, kernels="torch", init_std=0.5)
    fields.update(overrides)
    return flexmoe.MoEConfig(**fields)


def test_group_limited_routing_picks_only_inside_the_best_groups():
    """DeepSeek-V3: group score = sum of the group's top-2 biased scores; k experts from the best groups."""
    torch.manual_seed(0)
    cfg = deepseek_like()
    layer = flexmoe.MoELayer(cfg).double()
    layer.router.set_expert_bias(torch.randn(8) * 0.3)
    x = torch.randn(40, 8, dtype=torch.float64)
    routing = layer.router(x)
    select = (routing.probs_TE + layer.router.expert_bias.double()).detach()
    group_score = select.view(40, 4, 2).sum(-1)  # groups of 2: the top-2 sum is the sum
    best = group_score.topk(2, dim=-1).indices
    for t in range(40):
        allowed = {int(g) * 2 + i for g in best[t] for i in range(2)}
        assert set(routing.expert_TK[t].tolist()) <= allowed
    unlimited = flexmoe.MoELayer(dataclasses.replace(cfg, top_groups=None)).double()
    unlimited.load_state_dict(layer.state_dict())
    assert not torch.equal(unlimited.router(x).expert_TK.sort(1).values, routing.expert_TK.sort(1).values)
    check_against_reference(layer, x, tol=1e-10)


def test_groups_with_no_chosen_expert():
    """top_k = 1 with three groups kept: two kept groups contribute nothing, and k = 1 renormalised
    gives weight = routed_scaling_factor exactly."""
    torch.manual_seed(1)
    cfg = deepseek_like(top_k=1, top_groups=3, norm_topk_prob=True, num_shared_experts=1)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    routing = layer.router(x)
    assert torch.allclose(routing.weight_TK, torch.full_like(routing.weight_TK, 2.5), rtol=0, atol=1e-15)
    check_against_reference(layer, x, tol=1e-10)


def test_group_score_from_the_max_of_each_group():
    torch.manual_seed(2)
    cfg = deepseek_like(num_experts=12, num_groups=3, top_groups=1, group_score_experts=1, router="softmax")
    layer = flexmoe.MoELayer(cfg).double()
    check_against_reference(layer, torch.randn(9, 8, dtype=torch.float64), tol=1e-10)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_loaded_bias_is_applied_with_rate_zero(router):
    """A loaded e_score_correction_bias changes the choice even when bias_update_rate = 0 (frozen)."""
    torch.manual_seed(3)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=6, top_k=2, router=router, kernels="torch", init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    before = layer.router(x).expert_TK.sort(1).values
    state = layer.state_dict()
    state["router.expert_bias"] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    layer.load_state_dict(state)
    after = layer.router(x).expert_TK
    assert (after == 5).any(1).all()
    assert not torch.equal(before, after.sort(1).values)
    check_against_reference(layer, x, tol=1e-10)
    layer.train()
    layer.router.update_bias()
    assert layer.router.expert_bias[5] == 1.0  # rate 0: frozen


def test_router_state_stays_float32_under_bfloat16():
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=2, top_k=1, bias_update_rate=1e-3)
    layer = flexmoe.MoELayer(cfg).bfloat16()
    router = layer.router
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and router.pending_load_E.dtype == torch.float32
    router.set_expert_bias(torch.tensor([0.6, 0.6]))
    router.train()
    for _ in range(20):
        router.record_load(torch.tensor([1, 3]))
        router.update_bias()
    assert abs(router.expert_bias[0].item() - 0.62) < 1e-6
    for _ in range(300):
        router.record_load(torch.tensor([3, 1]))
    assert router.pending_load_E.tolist() == [900.0, 300.0]
    layer.double()
    assert router.expert_bias.dtype == torch.float32


@pytest.mark.parametrize("cf, T, k, E, want", [
    (1.1, 25, 2, 5, 11), (1.1, 50, 1, 5, 11), (1.1, 100, 2, 2, 110), (1.1, 90, 4, 4, 99), (1.0, 7, 2, 4, 4),
    (0.5, 8, 1, 4, 1), (2.0, 3, 1, 3, 2),
])
def test_capacity_is_exact_at_integers(cf, T, k, E, want):
    cfg = flexmoe.MoEConfig(d_model=4, d_ff=4, num_experts=E, top_k=k, capacity_factor=cf)
    assert cfg.capacity(T) == want == exact_capacity(cfg, T)
    if cf == 1.1:  # the shapes where floating point is one too high
        assert math.ceil(cf * T * k / E) == want + 1


@pytest.mark.parametrize("priority", ["prob", "weight", "position"])
def test_capacity_priority_keeps_the_right_pairs(priority):
    torch.manual_seed(4)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=0.5, kernels="torch",
                            capacity_priority=priority, init_std=1.0)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(24, 8, dtype=torch.float64)
    routing = layer.router(x)
    *_, keep_ref, _ = reference_routing(x, layer.router.weight.double(), cfg)
    assert routing.keep_TK.tolist() == keep_ref
    check_against_reference(layer, x, tol=1e-10)


def test_capacity_priorities_differ():
    torch.manual_seed(5)
    base = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=0.5, init_std=1.0)
    x = torch.randn(24, 8, dtype=torch.float64)
    layer = flexmoe.MoELayer(base).double()
    kept = {}
    for priority in ("prob", "weight", "position"):
        layer.router.config = dataclasses.replace(base, capacity_priority=priority)
        kept[priority] = layer.router(x).keep_TK
    assert not torch.equal(kept["prob"], kept["weight"]) and not torch.equal(kept["prob"], kept["position"])


def test_unbiased_aux_loss_counts_top_k_without_the_bias():
    torch.manual_seed(6)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=6, top_k=2, router="sigmoid", aux_loss_coef=0.1,
                            bias_update_rate=0.01, kernels="torch", init_std=0.5)
    x = torch.randn(30, 8, dtype=torch.float64)
    losses = {}
    for choice in ("selected", "unbiased"):
        layer = flexmoe.MoELayer(dataclasses.replace(cfg, aux_loss_experts=choice)).double()
        torch.manual_seed(7)
        layer.load_state_dict({**layer.state_dict(), "router.expert_bias": torch.linspace(-1, 1, 6)})
        check_against_reference(layer, x, tol=1e-10)
        layer(x)
        losses[choice] = layer.aux_loss.item()
    assert losses["selected"] != losses["unbiased"]


def test_sequence_aux_loss_is_per_sequence():
    torch.manual_seed(8)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, aux_loss_coef=0.3,
                            aux_loss_scope="sequence", kernels="torch", init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    check_against_reference(layer, x, tol=1e-10)
    layer(x)
    per_seq = layer.aux_loss.item()
    layer(x.reshape(15, 8))  # one sequence of 15 tokens
    assert abs(per_seq - layer.aux_loss.item()) > 1e-6


def test_router_jitter_only_in_training_and_only_on_the_router_input():
    torch.manual_seed(9)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, router_jitter=0.3, kernels="torch",
                            aux_loss_coef=0.1, init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double().train()
    x = torch.randn(10, 8, dtype=torch.float64)
    torch.manual_seed(11)
    torch.randn(x.shape, dtype=torch.float64)  # check_against_reference draws its probe first
    noise = torch.empty_like(x).uniform_(0.7, 1.3)
    torch.manual_seed(11)
    check_against_reference(layer, x, tol=1e-10, noise=noise)
    layer.eval()
    layer.aux_loss = torch.zeros(())  # drop the graph of the last forward before the copy
    layer.zero_grad(set_to_none=True)
    check_against_reference(layer, x, tol=1e-10)


def test_hf_pooled_aux_loss_matches_transformers():
    """aux_loss_scope="pooled": transformers' load_balancing_loss_func on the layers' logits."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(12)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=6, top_k=2, aux_loss_coef=0.02,
                            aux_loss_scope="pooled", z_loss_coef=0.0, kernels="torch", init_std=0.5)
    model = torch.nn.Sequential(flexmoe.MoELayer(cfg), torch.nn.Linear(8, 8), flexmoe.MoELayer(cfg)).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    logits = []
    for m in model:
        if isinstance(m, flexmoe.MoELayer):
            logits.append(m.router(x.reshape(-1, 8)).logits_TE)
        x = m(x)
    want = 0.02 * mixtral.load_balancing_loss_func(tuple(logits), 6, 2)
    got = flexmoe.aux_loss(model)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()  # HF accumulates in float32
    assert all(layer.aux_loss.item() == 0.0 for layer in flexmoe.moe_layers(model))


@pytest.mark.parametrize("with_scale", [False, True])
def test_add_expert_bias_matches_indexing_and_its_gradients(with_scale):
    """The expert-bias op against plain indexing in float64 (forward, and gradcheck of every
    input), with an empty expert, an expert holding one row and the rest on one expert; and its
    bf16 bias gradient accumulated in float32 (within bf16 rounding of the float64 sum)."""
    from flexmoe.ops.expert_bias import add_expert_bias

    rng = torch.Generator().manual_seed(5)
    row_expert = torch.tensor([0, 2, 2, 2, 2, 2, 3])  # expert 1 empty, expert 0 one row
    h = torch.randn(7, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, generator=rng, requires_grad=True)
    scale = torch.rand(7, dtype=torch.float64, generator=rng, requires_grad=True) if with_scale else None
    want = h + bias[row_expert] * (scale.unsqueeze(-1) if with_scale else 1)
    torch.testing.assert_close(add_expert_bias(h, bias, row_expert, scale), want, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda a, b, s: add_expert_bias(a, b, row_expert, s),
                                    (h, bias, scale) if with_scale else (h, bias, None))
    big = torch.zeros(4096, dtype=torch.long)
    g = torch.rand(4096, 3, dtype=torch.float64, generator=rng)
    b16 = torch.zeros(2, 3, dtype=torch.bfloat16, requires_grad=True)
    add_expert_bias(torch.zeros(4096, 3, dtype=torch.bfloat16), b16, big).backward(g.to(torch.bfloat16))
    torch.testing.assert_close(b16.grad[0].double(), g.to(torch.bfloat16).double().sum(0), rtol=1e-2, atol=0)
    assert b16.grad[1].abs().max() == 0


def test_expert_biases_and_clamped_swiglu():
    torch.manual_seed(13)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=5, num_experts=5, top_k=2, activation="swiglu_clamped", swiglu_limit=0.4,
                            expert_biases=True, router_bias=True, kernels="torch", init_std=0.8)
    layer = flexmoe.MoELayer(cfg).double()
    randomise_biases(layer, random.Random(0))
    x = torch.randn(9, 8, dtype=torch.float64)
    check_against_reference(layer, x, tol=1e-10)
    h = torch.einsum("ehd,td->teh", layer.experts.gate_up_proj.detach(), x)
    assert (h.abs() > 0.4).any()  # the clamp is active


def test_shared_expert_width_not_a_multiple_of_d_ff():
    torch.manual_seed(14)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, num_shared_experts=1, shared_d_ff=7,
                            shared_expert_gate=True, kernels="torch", init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double()
    assert layer.shared_experts.down_proj.shape == (8, 7)
    check_against_reference(layer, torch.randn(5, 8, dtype=torch.float64), tol=1e-10)


def test_default_config_output_is_unchanged_by_the_new_fields():
    """Explicit defaults of every new field give bit-identical outputs to the plain config."""
    torch.manual_seed(15)
    plain = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=6, top_k=2, capacity_factor=1.0, aux_loss_coef=0.1)
    explicit = dataclasses.replace(plain, num_groups=2, top_groups=None, routed_scaling_factor=1.0,
                                   capacity_priority="prob", aux_loss_experts="unbiased", router_jitter=0.0)
    a = flexmoe.MoELayer(plain)
    b = flexmoe.MoELayer(explicit)
    b.load_state_dict(a.state_dict())
    x = torch.randn(11, 8)
    assert torch.equal(a(x), b(x)) and torch.equal(a.aux_loss, b.aux_loss)


@pytest.mark.parametrize("field, value, match", [
    ("num_groups", 3, "num_groups"),
    ("top_groups", 5, "top_groups"),
    ("top_groups", 0, "top_groups"),
    ("group_score_experts", 0, "group_score_experts"),
    ("routed_scaling_factor", 0.0, "routed_scaling_factor"),
    ("router_jitter", 1.0, "router_jitter"),
    ("router_jitter", -0.1, "router_jitter"),
    ("capacity_priority", "random", "capacity_priority"),
    ("aux_loss_experts", "all", "aux_loss_experts"),
    ("aux_loss_scope", "epoch", "aux_loss_scope"),
    ("router_bias", 1, "router_bias"),
    ("expert_biases", "yes", "expert_biases"),
    ("max_ranks_per_token", 0, "max_ranks_per_token"),
    ("max_nodes_per_token", 1.5, "max_nodes_per_token"),
    ("shared_d_ff", 4, "shared_d_ff"),
    ("swiglu_limit", 0.0, "swiglu_limit"),
    ("swiglu_alpha", float("inf"), "swiglu_alpha"),
])
def test_bad_routing_options_name_the_field(field, value, match):
    fields = dict(d_model=8, d_ff=4, num_experts=8, top_k=2, num_groups=4)
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        flexmoe.MoEConfig(**fields)


@pytest.mark.parametrize("option", [dict(expert_biases=True), dict(activation="swiglu_clamped")])
def test_fused_kernels_refuse_expert_biases_and_clamped_swiglu(option):
    """The fused kernels have neither: refused when the config is built, naming both fields."""
    with pytest.raises(ValueError, match=r"kernels='fused' does not support " + next(iter(option))):
        flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, kernels="fused", **option)
    flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, kernels="triton", **option)


def test_top_groups_must_hold_top_k_experts():
    with pytest.raises(ValueError, match="top_groups"):
        flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=8, top_k=3, num_groups=4, top_groups=1)
    with pytest.raises(ValueError, match="router='dts'"):
        flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=8, router="dts", num_groups=4, top_groups=2)


def test_device_limits_from_a_placement():
    """Rank / node groups of the experts; limits whose smallest ranks hold fewer than top_k experts
    are refused; replicated experts belong to every rank holding them."""
    import numpy as np

    from flexmoe.routing.limits import device_limits, pick_replicas

    cfg = flexmoe.MoEConfig(d_model=4, d_ff=4, num_experts=6, top_k=2, max_ranks_per_token=1, max_nodes_per_token=1)
    table = np.array([[4, 0], [1, 5], [2, -1], [3, -1]])
    with pytest.raises(ValueError, match="fewer than top_k"):
        device_limits(table, 2, cfg)
    limits = device_limits(table, 2, dataclasses.replace(cfg, max_ranks_per_token=2))
    (nodes, n_top), (ranks, r_top) = limits.nodes, limits.ranks
    assert (n_top, r_top) == (1, 2) and limits.slot_WE is None and limits.node_W.tolist() == [0, 0, 1, 1]
    assert nodes.member_GM.tolist() == [[0, 1, 4, 5], [2, 3, 6, 6]]
    assert ranks.member_GM.tolist() == [[0, 4], [1, 5], [2, 6], [3, 6]]
    replicated = np.array([[0, 1], [2, 3], [4, 5], [0, 3]])
    limits = device_limits(replicated, None, dataclasses.replace(cfg, max_nodes_per_token=None, max_ranks_per_token=2),
                           rank=3)
    assert limits.nodes is None and limits.ranks[0].member_GM.tolist() == [[0, 1], [2, 3], [4, 5], [0, 3]]
    assert limits.slot_WE[:, 0].tolist() == [0, -1, -1, 6] and limits.slot_WE[:, 3].tolist() == [-1, 3, -1, 7]
    # Expert 0 on ranks {0, 3}: rank 3's own replica when rank 3 is chosen, else rank 0's.
    chosen_TW = torch.tensor([[True, False, False, True], [True, True, False, False]])
    slots = pick_replicas(torch.tensor([[0, 3], [0, 3]]), chosen_TW, limits.slot_WE, rank=3)
    assert slots.tolist() == [[6, 7], [0, 3]]
    # Without expert parallelism the fields change nothing.
    torch.manual_seed(0)
    plain = flexmoe.MoELayer(dataclasses.replace(cfg, max_nodes_per_token=None)).double()
    check_against_reference(plain, torch.randn(5, 4, dtype=torch.float64), tol=1e-10)


def test_slot_table_sends_rows_to_the_named_slot_and_counts_map_back():
    import numpy as np

    from flexmoe.parallel.expert_parallel import logical_counts, slot_table
    from flexmoe.placement.split import split_tokens

    table = flexmoe.PlacementTable(3, [[0, 1], [2, 0]], [[0.5, 1.0], [1.0, 0.5]])
    slots = slot_table(table)
    counts_WF = np.array([[3, 1, 0, 2], [0, 4, 5, 1]])  # rows per global slot, per source rank
    send_WWS = split_tokens(slots, counts_WF)
    assert send_WWS.reshape(2, 4).tolist() == counts_WF.tolist()
    assert logical_counts(table, counts_WF).tolist() == [[5, 1, 0], [1, 4, 5]]


def test_group_and_device_limits_with_no_tokens():
    """A rank (or batch) without tokens: the limits must not fail on empty inputs."""
    import numpy as np

    from flexmoe.routing.limits import device_limits

    cfg = deepseek_like(max_ranks_per_token=1, max_nodes_per_token=1, aux_loss_coef=0.1, aux_loss_scope="sequence")
    layer = flexmoe.MoELayer(cfg).double()
    layer.router.set_device_limits(device_limits(np.arange(8).reshape(4, 2), 2, cfg, rank=1))
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8) and layer.last_counts.sum() == 0
    (y.sum() + layer.aux_loss).backward()


def test_rank_limit_on_one_process_with_replicas_and_a_new_table():
    """One rank holding replicas: the slot-keyed dispatch runs locally (same output and gradients
    as the plain layer), and a new placement table is picked up on the next forward."""
    import numpy as np

    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, kernels="torch", max_ranks_per_token=1,
                            init_std=0.5)
    table = flexmoe.PlacementTable(4, np.array([[0, 1, 2, 3, 0, -1, 3]]), np.array([[0.4, 1, 1, 0.5, 0.6, 0, 0.5]]))
    torch.manual_seed(0)
    ref = flexmoe.MoELayer(cfg).double()
    torch.manual_seed(0)
    ep = flexmoe.MoELayer(cfg, placement=table).double()
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    y_ref, y = ref(x), ep(x)
    assert ep.router(x).slot_TK is not None and rel(y, y_ref) < 1e-12
    g_ref, g = (torch.autograd.grad(out.square().sum(), x)[0] for out in (y_ref, y))
    assert rel(g, g_ref) < 1e-12 and torch.equal(ep.last_counts, ref.last_counts)
    moved = table.copy()
    moved.version += 1
    ep.experts.set_placement(moved)
    assert rel(ep(x), y_ref) < 1e-12 and ep._limits_key[0] is ep.experts.placement


def test_global_balance_loss_in_one_process_is_the_batch_loss():
    torch.manual_seed(16)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=5, top_k=2, aux_loss_coef=0.2, aux_loss_scope="global",
                            kernels="torch", init_std=0.5)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(13, 8, dtype=torch.float64)
    f = torch.zeros(5, dtype=torch.float64)
    for row in reference_routing(x, layer.router.weight.double(), cfg)[2]:
        for e in row:
            f[e] += 1.0 / (13 * 2)
    check_against_reference(layer, x, tol=1e-10, global_f=f)


def test_group_maps_follow_the_router_to_its_device():
    """Measured on an H200: group-limited routing failed after ``.cuda()`` because the group map
    stayed on the CPU. A device move (here to "meta") must take the map along."""
    cfg = flexmoe.MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, num_groups=4, top_groups=2)
    layer = flexmoe.MoELayer(cfg).to("meta")
    assert layer.router.groups.member_GM.device.type == "meta"


# Every router option that should cost nothing (routing_options.py's "free" rows), and the capacity
# drops: a training step (forward, backward, bias update) reads nothing more back on the host than
# the default's (on CPU, the per-expert loop of kernels="torch" reads its counts; on CUDA the
# grouped GEMM does not). Measured on an H200: the one host read of the bias update
# (``load_E.sum() > 0``) cost 1.11x per step.
NO_SYNC_OPTIONS = [
    dict(router="sigmoid"), dict(num_groups=4, top_groups=2), dict(routed_scaling_factor=2.5),
    dict(bias_update_rate=1e-3), dict(router="sigmoid", bias_update_rate=1e-3),
    dict(router="sigmoid", num_groups=4, top_groups=2, bias_update_rate=1e-3, routed_scaling_factor=2.5),
    dict(router_bias=True), dict(router_jitter=0.01), dict(z_loss_coef=1e-3), dict(aux_loss_coef=0.01),
    dict(aux_loss_coef=0.01, aux_loss_experts="unbiased", bias_update_rate=1e-3),
    dict(aux_loss_coef=0.01, aux_loss_scope="sequence"), dict(aux_loss_coef=0.01, aux_loss_scope="pooled"),
    dict(capacity_factor=1.25), dict(capacity_factor=1.25, capacity_priority="position"), dict(expert_biases=True),
]


def training_step_syncs(**options) -> dict:
    """Host synchronisations of the second training step of a small layer with ``options``."""
    from host_syncs import HostSyncs
    from flexmoe.runtime import update_router_bias

    torch.manual_seed(21)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=8, top_k=2, kernels="torch", validate_inputs=False,
                            **options)
    layer = flexmoe.MoELayer(cfg).train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    for _ in range(2):  # the second step: anything done once per layer is behind us
        with HostSyncs() as syncs:
            loss = layer(x).square().sum() + flexmoe.aux_loss(layer)
            loss.backward()
            update_router_bias(layer)
    return dict(syncs.calls)


@pytest.mark.parametrize("options", NO_SYNC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_training_step_adds_no_host_sync(options):
    default = training_step_syncs()
    assert set(default) <= {"tolist"}, default  # the CPU expert loop only
    assert training_step_syncs(**options) == default


def test_host_sync_counter_sees_host_reads():
    """The counter is not blind: each kind of host read is counted."""
    from host_syncs import HostSyncs

    x = torch.arange(4.0)
    with HostSyncs() as syncs:
        bool(x.sum() > 0), x.tolist(), x.numpy(), x.nonzero(), x[0].item()
    assert dict(syncs.calls) == {"_local_scalar_dense": 2, "tolist": 1, "numpy": 1, "nonzero": 1}


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_bias_update_without_loads_keeps_the_bias(router):
    """The update decides on the device now: no recorded load still means no move, loads move it
    by ``rate * sign(mean - load)`` exactly."""
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=1, router=router, bias_update_rate=0.25)
    router_ = flexmoe.MoELayer(cfg).router.train()
    router_.set_expert_bias(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    router_.update_bias()
    assert router_.expert_bias.tolist() == [0.5, -0.25, 0.0, 1.0]
    router_.update_bias(torch.zeros(4))
    assert router_.expert_bias.tolist() == [0.5, -0.25, 0.0, 1.0]
    router_.record_load(torch.tensor([4, 0, 2, 2]))
    router_.update_bias()
    assert router_.expert_bias.tolist() == [0.25, 0.0, 0.0, 1.0]
    assert router_.pending_load_E.tolist() == [0.0] * 4


@pytest.mark.parametrize("score_experts", [1, 2, 3])
def test_contiguous_groups_fast_path_is_the_general_map(score_experts):
    """Config groups (consecutive blocks) take views and max reductions instead of the general
    member map's gather, top-k and scatter: bitwise the same masks, with ties, -inf entries and
    a group left with one finite score."""
    from flexmoe.routing.limits import GroupMap, limit_to_groups

    rng = torch.Generator().manual_seed(score_experts)
    select = torch.randn(64, 32, generator=rng).round(decimals=1)  # ties
    select[torch.rand(64, 32, generator=rng) < 0.3] = float("-inf")
    select[0, 4:8] = float("-inf")
    select[1, 8:12] = torch.tensor([float("-inf")] * 3 + [0.5])
    fast = GroupMap.contiguous(32, 8)
    general = GroupMap(fast.member_GM, 32, blocks=False)
    assert fast.blocks
    for top in (1, 3, 7):
        assert torch.equal(limit_to_groups(select, fast, top, score_experts),
                           limit_to_groups(select, general, top, score_experts))


@pytest.mark.parametrize("use_triton", [False, True])
def test_clamped_swiglu_op_matches_autograd_of_the_composite(use_triton):
    """The one-pass clamped SwiGLU x weight (Triton interpreted, or its torch fallback with a
    backward by hand) against autograd through the plain torch composite, float64: values on
    both sides of the clamps and exactly on them, rows past the valid count, one row, no rows."""
    from flexmoe.ops.activation import _row_mask, clamped_swiglu, clamped_swiglu_scaled

    alpha, limit = 1.702, 7.0
    for N in (0, 1, 9):
        g = torch.Generator().manual_seed(N)
        h = (torch.randn(N, 10, dtype=torch.float64, generator=g) * 6)
        if N > 1:
            h[0, :3] = limit  # gate exactly at the limit
            h[1, 5:7] = torch.tensor([limit, -limit], dtype=torch.float64)  # up on both bounds
        h.requires_grad_(True)
        scale = torch.rand(N, dtype=torch.float64, generator=g, requires_grad=True)
        valid = torch.tensor([max(N - 2, 0) if N > 1 else N])
        grad = torch.randn(N, 5, dtype=torch.float64, generator=g)
        ref = torch.where(_row_mask(N, valid), clamped_swiglu(h, alpha, limit) * scale.unsqueeze(-1), 0.0)
        want = torch.autograd.grad(ref, (h, scale), grad) if N else (torch.zeros_like(h), torch.zeros_like(scale))
        out = clamped_swiglu_scaled(h, scale, valid, alpha, limit, use_triton)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        got = torch.autograd.grad(out, (h, scale), grad) if N else want
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
