"""torch.compile(fullgraph=True) captures the whole layer: no graph break, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import flexmoe


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_fullgraph_compile_matches_eager(kernels, capacity_factor):
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = flexmoe.MoEConfig(
        d_model=16, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001,
        capacity_factor=capacity_factor, num_shared_experts=1, kernels=kernels,
    )
    check_compiled_matches_eager(cfg)


def test_fullgraph_compile_with_the_peers_routing_options():
    """DeepSeek-V3 groups and scaling, GPT-OSS biases and clamped SwiGLU, weight drop priority,
    sequence balance loss: still one graph."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = flexmoe.MoEConfig(
        d_model=16, d_ff=8, num_experts=4, top_k=2, aux_loss_coef=0.01, capacity_factor=1.0, kernels="torch",
        router="sigmoid", num_groups=2, top_groups=1, routed_scaling_factor=2.5, capacity_priority="weight",
        aux_loss_scope="sequence", router_bias=True, expert_biases=True, activation="swiglu_clamped",
        num_shared_experts=1, shared_d_ff=5,
    )
    check_compiled_matches_eager(cfg)


def check_compiled_matches_eager(cfg: flexmoe.MoEConfig) -> None:
    eager = flexmoe.MoELayer(cfg).double()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        (ye.square().sum() + eager.aux_loss).backward()
        (yc.square().sum() + compiled_layer.aux_loss).backward()
        torch.testing.assert_close(yc, ye, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-12)
        for pe, pc in zip(eager.parameters(), compiled_layer.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled_layer.last_counts, eager.last_counts)
