"""The fused expert kernels (kernels="fused", Triton interpreted on CPU) against float64 references."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flexmoe
from test_compile import check_compiled_matches_eager
from flexmoe.ops.checks import check_finite
from flexmoe.ops import permute, unpermute_sum
from flexmoe.ops.epilogue_experts import epilogue_ffn
from flexmoe.ops.fused_experts import fused_expert_ffn
from flexmoe.ops.fused_gemm import row_blocks
from flexmoe.plan import make_dispatch_plan
from test_layer import check_against_reference, random_config


def _act(h, kind):
    if kind == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    return F.gelu(h) if kind == "gelu" else F.relu(h)


def _loop_reference(x, w_gu, w_down, expert_TK, weight_TK, keep_TK, activation):
    """``y[t] = sum_k w[t, k] * FFN_e(x[t])`` over kept pairs, one token and slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for k in range(expert_TK.shape[1]):
            if keep_TK[t, k]:
                e = expert_TK[t, k]
                y = y + weight_TK[t, k] * (w_down[e] @ _act(w_gu[e] @ x[t], activation))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize(
    "case", ["skewed", "all_on_one_expert", "empty_experts", "one_token", "top_k_is_E", "drops", "odd_widths",
             "deep_widths"]
)
@pytest.mark.parametrize("path", ["fused", "hybrid", "epilogue"])
def test_fused_op_and_gradients_match_float64_loop(case, path):
    """Forward and the gradients of x, both weights and the routing weights, with many rows per
    expert (several row blocks, several weight-gradient blocks meeting by atomic adds), for the
    fused op (fused or hybrid backward) and the epilogue op on grouped rows."""
    cases = ["skewed", "all_on_one_expert", "empty_experts", "one_token", "top_k_is_E", "drops", "odd_widths",
             "deep_widths"]
    torch.manual_seed(cases.index(case))
    T, K, E, D, Fd = 40, 2, 4, 16, 24
    activation = ["swiglu", "gelu", "relu"][cases.index(case) % 3]
    if case == "odd_widths":
        D, Fd, activation = 24, 40, "swiglu"
    elif case == "deep_widths":  # several depth steps: D with a ragged last step, F and 2F whole ones
        D, Fd, activation = 72, 32, "swiglu"
    elif case == "one_token":
        T = 1
    elif case == "top_k_is_E":
        K = E
    elif case == "empty_experts":
        E = 9
    expert_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if case == "skewed":
        expert_TK[: 3 * T // 4, 0] = 1
    if case == "all_on_one_expert":
        K, expert_TK = 1, torch.full((T, 1), 2)
    if case == "empty_experts":
        expert_TK = expert_TK % 3
        expert_TK[:, 1] = torch.where(expert_TK[:, 0] == expert_TK[:, 1], (expert_TK[:, 1] + 1) % 3, expert_TK[:, 1])
    keep_TK = torch.rand(T, K) < 0.7 if case == "drops" else None
    H = 2 * Fd if activation == "swiglu" else Fd
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_gu = (0.3 * torch.randn(E, H, D, dtype=torch.float64)).requires_grad_(True)
    w_down = (0.3 * torch.randn(E, D, Fd, dtype=torch.float64)).requires_grad_(True)
    weight_TK = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    plan = make_dispatch_plan(expert_TK, weight_TK, keep_TK, E)
    if path == "epilogue":
        x_ND = permute(x, plan.row_token_N, plan.pair_row_TK, True)
        y_ND = epilogue_ffn(x_ND, w_gu, w_down, plan.offsets_E, plan.row_weight_N, activation)
        y = unpermute_sum(y_ND, plan.pair_row_TK, plan.row_token_N, True)
    else:
        y = fused_expert_ffn(x, w_gu, w_down, plan.offsets_E, plan.row_token_N, plan.pair_row_TK, plan.row_weight_N,
                             activation, path == "hybrid")
    probe = torch.randn(T, D, dtype=torch.float64)
    grads = torch.autograd.grad((y * probe).sum(), [x, w_gu, w_down, weight_TK])

    keep = torch.ones(T, K, dtype=torch.bool) if keep_TK is None else keep_TK
    y_ref = _loop_reference(x, w_gu, w_down, expert_TK, weight_TK, keep, activation)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x, w_gu, w_down, weight_TK])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, g, g_ref in zip(["x", "gate_up", "down", "routing weight"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    if case == "empty_experts":
        assert (plan.counts_E == 0).sum() == E - 3
        assert grads[1][3:].abs().max() == 0 and grads[2][3:].abs().max() == 0


@pytest.mark.parametrize("kernels", ["fused", "hybrid", "epilogue"])
@pytest.mark.parametrize("seed", range(6))
def test_fused_layer_matches_reference_on_random_configs(seed, kernels):
    """The whole layer with kernels="fused" / "hybrid" (gelu / relu / swiglu, capacity, shared
    experts), float64 and float32, against tests/reference.py."""
    rng = random.Random(300 + seed)
    torch.manual_seed(seed)
    dtype = torch.float64 if seed % 2 == 0 else torch.float32
    cfg = random_config(rng, kernels=kernels, d_model=rng.choice([8, 24]), d_ff=rng.choice([8, 40]))
    layer = flexmoe.MoELayer(cfg).to(dtype)
    x = torch.randn(rng.randint(1, 12), cfg.d_model, dtype=dtype)
    check_against_reference(layer, x, tol=1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("kernels", ["fused", "hybrid", "epilogue"])
def test_fused_layer_capacity_drops_match_reference(kernels):
    torch.manual_seed(5)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, capacity_factor=0.5, init_std=1.0, kernels=kernels)
    layer = flexmoe.MoELayer(cfg).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    check_against_reference(layer, x, tol=1e-10)
    assert layer.last_counts.sum() == 4 * cfg.capacity(20)


@pytest.mark.parametrize("kernels", ["fused", "hybrid", "epilogue"])
def test_fused_layer_no_tokens(kernels):
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=4, kernels=kernels)).double()
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 8) and layer.experts.gate_up_proj.grad.abs().sum() == 0


@pytest.mark.parametrize("kernels", ["fused", "hybrid", "epilogue"])
def test_fused_compiles_fullgraph_and_matches_eager(kernels):
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = flexmoe.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.01, num_shared_experts=1, kernels=kernels)
    check_compiled_matches_eager(cfg)


def test_per_expert_gemms_match_reference():
    torch.manual_seed(2)
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=3, top_k=2, kernels="per_expert", init_std=0.5)
    check_against_reference(flexmoe.MoELayer(cfg).double(), torch.randn(9, 8, dtype=torch.float64), tol=1e-10)


@pytest.mark.parametrize("block", [1, 3, 16])
def test_row_blocks_cover_each_expert_row_once_within_block_size(block):
    counts_E = torch.tensor([0, 50, 1, 0, 7, 16])
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    N = int(counts_E.sum()) + 5  # five dropped rows after the kept ones
    expert_Q, first_Q, end_Q = row_blocks(offsets_E, N, block)
    owner = torch.full((N,), -1)
    for e, a, b in zip(expert_Q.tolist(), first_Q.tolist(), end_Q.tolist()):
        assert 0 <= b - a <= block
        if b > a:
            assert (owner[a:b] == -1).all()
            owner[a:b] = e
    assert torch.equal(owner[: N - 5], torch.repeat_interleave(torch.arange(6), counts_E))
    assert (owner[N - 5:] == -1).all()


def test_finiteness_check_raises_on_cpu_and_asserts_on_device():
    bad = torch.tensor([1.0, float("inf")])
    check_finite(torch.ones(3), "bad")
    check_finite(torch.ones(3), "bad", device_assert=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_finite(bad, "NaN or Inf")
    # The device-assert branch (what GPUs run); on CPU tensors torch raises it at once.
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        check_finite(bad, "NaN or Inf", device_assert=True)


def test_fused_needs_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, kernels="fused"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(3, 8))


def test_cuda_graph_layer_refuses_cpu_and_unsupported_configs():
    layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, kernels="fused"))
    with pytest.raises(RuntimeError, match="CUDA"):
        flexmoe.cuda_graph_layer(layer, torch.randn(3, 8))
    with pytest.raises(TypeError, match="MoELayer"):
        flexmoe.cuda_graph_layer(torch.nn.Linear(8, 8), torch.randn(3, 8))
    for field, value, match in [("aux_loss_coef", 0.01, "aux_loss_coef"), ("router", "dts", "dts"),
                                ("kernels", "per_expert", "per_expert")]:
        cfg = flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, **{field: value})
        with pytest.raises(ValueError, match=match):
            flexmoe.cuda_graph_layer(flexmoe.MoELayer(cfg), torch.randn(3, 8))



def test_fused_kernels_compile_for_hopper_with_tensor_cores():
    """The CPU tests run the interpreter; this compiles each kernel for sm90 (no GPU needed) in a
    process without TRITON_INTERPRET, so GPU-only compile errors show up in CI."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 10, done.stdout


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_tma_weight_loads_match_pointer_loads(activation):
    """The Hopper path (weight tiles through TMA descriptors; interpreted here) against the pointer
    path, for every kernel that reads weights: odd widths, a tile that runs past an expert's rows
    into the next expert's (masked) and past the last expert (zero-filled), an empty expert."""
    from flexmoe.ops import fused_gemm as fg

    torch.manual_seed(7)
    T, K, E, D, Fd = 37, 2, 3, 24, 40
    H = 2 * Fd if activation == "swiglu" else Fd
    x = torch.randn(T, D, dtype=torch.float64)
    w_gu, w_down = torch.randn(E, H, D, dtype=torch.float64), torch.randn(E, D, Fd, dtype=torch.float64)
    expert_TK = torch.stack([torch.randperm(2)[:K] for _ in range(T)]) * 2  # experts 0 and 2; 1 is empty
    plan = make_dispatch_plan(expert_TK, torch.rand(T, K, dtype=torch.float64), None, E)
    schedule = fg.Schedule(plan.offsets_E, plan.row_token_N.shape[0])
    n = int(plan.offsets_E[-1])
    scale = plan.row_weight_N.contiguous()
    runs = {}
    for tma in (False, True):
        h, a = fg.gate_up(x, plan.row_token_N, w_gu, scale, schedule, activation, tma=tma)
        y = fg.expert_mm(a, w_down, True, schedule, tma=tma)
        dh, dscale = fg.down_dgrad(x, plan.row_token_N, w_down, h, scale, schedule, activation, tma=tma)
        dx = fg.expert_mm(dh, w_gu, False, schedule, tma=tma)
        runs[tma] = [t[:n] for t in (h, a, y, dh, dscale, dx)]
    for name, got, want in zip(["h", "a", "y", "dh", "dscale", "dx"], runs[True], runs[False]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("per_sm", [0, 1], ids=["tile_grid", "persistent"])
@pytest.mark.parametrize("tma", [False, True])
def test_grouped_row_operands_match_gathered_loads(tma, per_sm):
    """gate_up, down dgrad and the expert GEMM on rows already grouped by expert (``row_token_N``
    None; with TMA the row tiles go through descriptors too) against the gathered loads of the
    one-program-per-tile grid: a row tile that runs into the next expert's rows and past the
    buffer's end, an empty expert; gate_up and dgrad also on the persistent grid (programs walk
    several tiles), gathered and on grouped rows."""
    from flexmoe.ops import fused_gemm as fg

    torch.manual_seed(8)
    T, K, E, D, Fd = 41, 2, 3, 24, 40
    x = torch.randn(T, D, dtype=torch.float64)
    dy = torch.randn(T, D, dtype=torch.float64)
    w_gu, w_down = torch.randn(E, 2 * Fd, D, dtype=torch.float64), torch.randn(E, D, Fd, dtype=torch.float64)
    expert_TK = torch.stack([torch.randperm(2)[:K] for _ in range(T)]) * 2  # experts 0 and 2; 1 is empty
    plan = make_dispatch_plan(expert_TK, torch.rand(T, K, dtype=torch.float64), None, E)
    schedule = fg.Schedule(plan.offsets_E, plan.row_token_N.shape[0])
    n = int(plan.offsets_E[-1])
    scale = plan.row_weight_N.contiguous()
    rows = plan.row_token_N.clamp_min(0)
    x_ND, dy_ND = x[rows].contiguous(), dy[rows].contiguous()
    h, a = fg.gate_up(x, plan.row_token_N, w_gu, scale, schedule, "swiglu", tma=False)
    h2, a2 = fg.gate_up(x_ND, None, w_gu, scale, schedule, "swiglu", tma=tma, per_sm=per_sm)
    h3, a3 = fg.gate_up(x, plan.row_token_N, w_gu, scale, schedule, "swiglu", tma=tma, per_sm=per_sm)
    dh, ds = fg.down_dgrad(dy, plan.row_token_N, w_down, h, scale, schedule, "swiglu", tma=False)
    dh2, ds2 = fg.down_dgrad(dy_ND, None, w_down, h, scale, schedule, "swiglu", tma=tma, per_sm=per_sm)
    dh3, ds3 = fg.down_dgrad(dy, plan.row_token_N, w_down, h, scale, schedule, "swiglu", tma=tma, per_sm=per_sm)
    dh4, ds4 = fg.down_dgrad(dy_ND, None, w_down, h, scale, schedule, "swiglu", tma=tma, per_sm=per_sm, h_tma=True)
    y = fg.expert_mm(a, w_down, True, schedule, tma=False)
    y2 = fg.expert_mm(a, w_down, True, schedule, tma=tma, rows_tma=True)
    for name, got, want in [("h", h2, h), ("a", a2, a), ("dh", dh2, dh), ("dscale", ds2, ds), ("y", y2, y),
                            ("h gathered", h3, h), ("a gathered", a3, a), ("dh gathered", dh3, dh), ("dscale gathered", ds3, ds),
                            ("dh, h through TMA", dh4, dh), ("dscale, h through TMA", ds4, ds)]:
        torch.testing.assert_close(got[:n], want[:n], rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    want_h = torch.cat([x_ND[plan.offsets_E[e - 1] if e else 0:plan.offsets_E[e]] @ w_gu[e].t() for e in range(E)])
    torch.testing.assert_close(h2[:n], want_h, rtol=1e-12, atol=1e-12)


def test_auto_runs_fused_paths_only_where_measured():
    """"fused" / "hybrid" run as asked; "auto" and the others never take them off sm90 CUDA bf16."""
    from flexmoe.ops._backend import fused_path

    x = torch.randn(3, 8)
    assert fused_path("fused", x, 2048, 768, 128, 8) == "fused"
    assert fused_path("hybrid", x, 2048, 768, 128, 8) == "hybrid"
    for kernels in ("auto", "triton", "torch", "per_expert"):
        assert fused_path(kernels, x, 2048, 768, 128, 8) is None
        assert fused_path(kernels, x.bfloat16(), 2048, 768, 128, 8) is None
    with pytest.raises(ValueError, match="kernels"):
        flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, kernels="hybird")
