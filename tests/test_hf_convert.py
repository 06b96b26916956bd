"""HF MoE blocks loaded into a plain flexmoe.MoELayer match the HF block in float64.

The MoELayer's forward runs no HF code: the HF block only provides the weights and the expected
output. Tiny random configs from tests/test_hf.py's ``build`` (every parameter and buffer drawn
afresh, so DeepSeek-V3's e_score_correction_bias is nonzero).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the HF conversion test needs transformers")

from flexmoe.integrations.hf.convert import moe_config_from_hf, moe_layer_from_hf  # noqa: E402
from test_hf import build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model, num_experts", [
    ("deepseek_v3", 8), ("qwen3_moe", 6), ("gpt_oss", 5), ("qwen2_moe", 6), ("mixtral", 4), ("olmoe", 6),
])
def test_hf_block_loads_into_moelayer_and_matches_in_float64(model, num_experts):
    net = build(model, num_experts, dtype=torch.float64)
    net.set_experts_implementation("eager")  # HF's per-expert loop: the float64 oracle
    block = net.model.layers[0].mlp
    layer = moe_layer_from_hf(net.config, block.state_dict(), kernels="torch")
    assert not any(type(m).__module__.startswith("transformers") for m in layer.modules())
    x = torch.randn(3, 7, net.config.hidden_size, dtype=torch.float64, requires_grad=True)
    out = block(x)
    want = out[0] if isinstance(out, tuple) else out
    got = layer(x)
    # HF's routers compute their scores in float32 whatever the model dtype (GPT-OSS's excepted), so
    # the choice must be identical and the output agree to float32 rounding of the weights.
    tol = 1e-12 if model == "gpt_oss" else 1e-6
    hf_router = block.router if model == "gpt_oss" else block.gate
    hf_experts = hf_router(x.reshape(-1, x.shape[-1]))[2]
    ours = layer.router(x.reshape(-1, x.shape[-1])).expert_TK
    assert torch.equal(hf_experts.sort(-1).values, ours.sort(-1).values)
    assert ((got - want).norm() / want.norm()).item() < tol
    probe = torch.randn_like(want)
    (g_want,) = torch.autograd.grad((want * probe).sum(), x)
    (g_got,) = torch.autograd.grad((got * probe).sum(), x)
    assert ((g_got - g_want).norm() / g_want.norm()).item() < tol


def test_deepseek_v3_options_are_carried_over():
    net = build("deepseek_v3", 8, dtype=torch.float64)
    cfg = moe_config_from_hf(net.config)
    assert (cfg.router, cfg.num_groups, cfg.top_groups, cfg.group_score_experts) == ("sigmoid", 4, 2, 2)
    assert cfg.routed_scaling_factor == net.config.routed_scaling_factor
    layer = moe_layer_from_hf(net.config, net.model.layers[0].mlp.state_dict())
    bias = net.model.layers[0].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0 and torch.equal(layer.router.expert_bias, bias.float())
    assert cfg.bias_update_rate == 0 and layer.router.applies_bias  # loaded bias, frozen


def test_unknown_model_type_is_refused():
    class Cfg:
        model_type = "llama"

    with pytest.raises(ValueError, match="llama"):
        moe_config_from_hf(Cfg())
