"""Expert similarity metrics against a plain float64 per-pair, per-expert loop."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from flexmoe import MoEConfig, MoELayer
from flexmoe.train.similarity import expert_similarity, mean_pairwise_cosine, output_cosine, weight_cosine


def _direct_mean_cos(rows):
    pairs = list(itertools.combinations(range(len(rows)), 2))
    return sum(float(F.cosine_similarity(rows[a].double().flatten(), rows[b].double().flatten(), dim=0))
               for a, b in pairs) / len(pairs)


def _expert_out(layer, e, x):
    gu, dn = layer.experts.gate_up_proj[e].double(), layer.experts.down_proj[e].double()
    gate, up = (x.double() @ gu.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ dn.T


def test_weight_and_output_cosine_match_direct_loops():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=6, d_ff=5, num_experts=5, top_k=2)
    layer = MoELayer(cfg)
    with torch.no_grad():  # make experts 0 and 1 alike so the mean is not ~0
        for p in layer.experts.parameters():
            p[1] = p[0] + 0.1 * p[1]
    E = cfg.num_experts
    want_w = _direct_mean_cos([torch.cat([layer.experts.gate_up_proj[e].flatten(), layer.experts.down_proj[e].flatten()])
                               for e in range(E)])
    assert abs(weight_cosine(layer) - want_w) < 1e-6
    x = torch.randn(7, 6)
    want_o = _direct_mean_cos([_expert_out(layer, e, x) for e in range(E)])
    assert abs(output_cosine(layer, x) - want_o) < 1e-6
    one = torch.randn(1, 6)  # one token
    assert abs(output_cosine(layer, one) - _direct_mean_cos([_expert_out(layer, e, one) for e in range(E)])) < 1e-6


def test_identical_experts_are_fully_similar():
    layer = MoELayer(MoEConfig(d_model=4, d_ff=3, num_experts=3, top_k=1))
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))
    assert abs(weight_cosine(layer) - 1.0) < 1e-6
    assert abs(output_cosine(layer, torch.randn(5, 4)) - 1.0) < 1e-6
    assert mean_pairwise_cosine(torch.randn(1, 4)) == 1.0


def test_expert_similarity_on_a_model_restores_mode_and_rng():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), MoELayer(MoEConfig(d_model=4, d_ff=3, num_experts=3, top_k=1)))
    model.train()
    tokens = torch.randint(0, 10, (2, 5))
    state = torch.get_rng_state()
    out = expert_similarity(model, tokens)
    assert model.training and torch.equal(state, torch.get_rng_state())
    assert set(out) == {"expert_weight_cos", "expert_output_cos", "expert_weight_cos_per_layer",
                        "expert_output_cos_per_layer"}
    assert -1 <= out["expert_output_cos"] <= 1 and len(out["expert_weight_cos_per_layer"]) == 1
