"""flexmoe as a HuggingFace transformers experts backend: same logits, loss and gradients as HF's
"eager" per-expert loop, for tiny random configs of every covered model.

Legend: T tokens, K experts per token, E experts, D model width, F expert hidden width.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF backend needs transformers (pip install flexmoe[hf])")

import flexmoe.integrations.hf as fhf  # noqa: E402
from flexmoe.integrations.hf import experts as fhf_experts  # noqa: E402

VOCAB = 64
RTOL = 1e-5  # float32: ||flexmoe - eager|| <= RTOL * ||eager||, per tensor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _common(num_experts: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                attn_implementation="eager", eos_token_id=None, bos_token_id=None, pad_token_id=None)


def build(model: str, num_experts: int, dtype=torch.float32, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of family ``model`` with every parameter and buffer drawn afresh."""
    t = transformers
    c = {**_common(num_experts), **overrides}
    if model == "mixtral":
        cfg = t.MixtralConfig(**c, intermediate_size=24, num_local_experts=num_experts)
        cls = t.MixtralForCausalLM
    elif model == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**c, intermediate_size=40, moe_intermediate_size=24,
                               shared_expert_intermediate_size=40, num_experts=num_experts)
        cls = t.Qwen2MoeForCausalLM
    elif model == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**c, head_dim=8, intermediate_size=40, moe_intermediate_size=24, num_experts=num_experts)
        cls = t.Qwen3MoeForCausalLM
    elif model == "olmoe":
        cfg = t.OlmoeConfig(**c, intermediate_size=24, num_experts=num_experts)
        cls = t.OlmoeForCausalLM
    elif model == "deepseek_v3":
        cfg = t.DeepseekV3Config(**{**c, "num_key_value_heads": 4}, intermediate_size=40, moe_intermediate_size=24,
                                 n_routed_experts=num_experts, n_group=4, topk_group=2, n_shared_experts=1,
                                 first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=8,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        cls = t.DeepseekV3ForCausalLM
    elif model == "gpt_oss":
        cfg = t.GptOssConfig(**c, head_dim=8, intermediate_size=24, num_local_experts=num_experts, sliding_window=4)
        cls = t.GptOssForCausalLM
    elif model == "dbrx":
        cfg = t.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                           attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
                           attn_implementation="eager",
                           ffn_config={"ffn_hidden_size": 24, "moe_num_experts": num_experts, "moe_top_k": 2})
        cls = t.DbrxForCausalLM
    else:
        raise ValueError(model)
    torch.manual_seed(zlib.crc32(model.encode()) + seed)
    net = cls(cfg).to(dtype)
    with torch.no_grad():
        for name, p in list(net.named_parameters()) + list(net.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if "norm" in name and p.dim() == 1:
                p.normal_(1.0, 0.1)
            else:
                router_like = "router" in name or ("gate" in name and p.dim() == 2)
                p.normal_(0.0, 0.3 if router_like else 0.1)
    return net


def run(net: nn.Module, ids: torch.Tensor):
    """Logits, loss and every parameter gradient of one training step."""
    net.zero_grad(set_to_none=True)
    out = net(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL):
    """Relative error in the 2-norm of the whole tensor (float32 summation order differs between
    the implementations; a per-entry bound would be decided by entries that cancel to near zero)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = torch.linalg.vector_norm(got - want), torch.linalg.vector_norm(want)
    assert err <= rtol * scale, f"{what}: error norm {err:.3e} vs reference norm {scale:.3e}"


def assert_same_step(got, want, rtol: float = RTOL):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, want
    assert_close_rel(logits, ref_logits, "logits", rtol)
    assert_close_rel(loss, ref_loss, "loss", rtol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], f"grad of {name}", rtol)


@pytest.fixture
def dispatch_count(monkeypatch):
    """How often flexmoe's dispatch plan was built (one per MoE layer and forward)."""
    calls = []
    real = fhf_experts.make_dispatch_plan

    def counting(expert_TK, *args):
        calls.append(expert_TK.shape)
        return real(expert_TK, *args)

    monkeypatch.setattr(fhf_experts, "make_dispatch_plan", counting)
    return calls


INTERFACE_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("model", INTERFACE_MODELS)
@pytest.mark.parametrize("num_experts, shape", [(8, (2, 9)), (32, (1, 3))], ids=["busy", "mostly-empty"])
def test_set_experts_implementation_matches_eager(model, num_experts, shape, dispatch_count):
    net = build(model, num_experts)
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))
    net.set_experts_implementation("eager")
    want = run(net, ids)
    assert not dispatch_count
    net.set_experts_implementation("flexmoe")
    assert net.config._experts_implementation == "flexmoe"
    got = run(net, ids)
    assert len(dispatch_count) == 2  # one per MoE layer
    assert_same_step(got, want)
    if num_experts == 32:  # at most 6 of 32 experts get tokens: the rest must have exact zero gradients
        for layer in range(2):
            grad_E = got[2][f"model.layers.{layer}.mlp.experts.down_proj"].flatten(1).abs().sum(1)
            assert (grad_E == 0).sum() >= 26


def test_float64_matches_eager_loop():
    """In float64 HF's eager loop is an exact oracle: flexmoe must agree to rounding."""
    for model in ("mixtral", "gpt_oss"):
        net = build(model, 8, dtype=torch.float64)
        ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
        net.set_experts_implementation("eager")
        want = run(net, ids)
        net.set_experts_implementation("flexmoe")
        assert_same_step(run(net, ids), want, rtol=1e-12)


def test_config_and_from_pretrained_select_flexmoe(tmp_path, dispatch_count):
    net = build("qwen3_moe", 8)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    net.set_experts_implementation("eager")
    want = run(net, ids)
    net.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="flexmoe",
                                                               attn_implementation="eager")
    assert loaded.config._experts_implementation == "flexmoe"
    assert_same_step(run(loaded, ids), want)
    assert len(dispatch_count) == 2
    assert build("qwen3_moe", 8, experts_implementation="flexmoe").config._experts_implementation == "flexmoe"


def test_weights_are_not_copied():
    net = build("gpt_oss", 8)
    block = fhf.expert_blocks(net)[0][1]
    layout = fhf.experts_layout(block)
    assert layout.up_EHD.data_ptr() == block.gate_up_proj.data_ptr()
    assert layout.down_EDF.data_ptr() == block.down_proj.data_ptr()
    assert layout.up_bias_EH is block.gate_up_proj_bias and layout.down_bias_ED is block.down_proj_bias
    assert layout.act_fn is not None  # GPT-OSS's clamped, interleaved SwiGLU runs through its own _apply_gate
    mix = fhf.experts_layout(fhf.expert_blocks(build("mixtral", 8))[0][1])
    assert mix.act_fn is None and mix.up_bias_EH is None  # plain SwiGLU: flexmoe's fused op


def _no_flexmoe_models():
    """(name, config class, config kwargs, model class) of tiny models flexmoe's experts interface cannot serve."""
    t = transformers
    attn = dict(vocab_size=VOCAB, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return [
        ("dense-llama", t.LlamaConfig, dict(attn, hidden_size=16, intermediate_size=32), t.LlamaForCausalLM,
         "no MoE experts module"),
        ("jetmoe", t.JetMoeConfig, dict(attn, hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                                        kv_channels=8, num_local_experts=4, num_experts_per_tok=2),
         t.JetMoeForCausalLM, "JetMoeParallelExperts"),
        ("switch", t.SwitchTransformersConfig, dict(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=2,
                                                    num_decoder_layers=2, num_heads=2, num_experts=4,
                                                    num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
         t.SwitchTransformersForConditionalGeneration, "SwitchTransformersExperts"),
        ("llama4", t.Llama4TextConfig, dict(attn, hidden_size=16, intermediate_size=8, intermediate_size_mlp=16,
                                            head_dim=8, num_local_experts=4), t.Llama4ForCausalLM,
         "Llama4TextExperts"),
    ]


@pytest.mark.parametrize("case", _no_flexmoe_models(), ids=lambda c: c[0])
def test_choosing_flexmoe_where_it_would_never_run_raises(case):
    _, config_cls, kwargs, model_cls, match = case
    with pytest.raises(fhf.UnsupportedBlockError, match=match):
        model_cls(config_cls(**kwargs, experts_implementation="flexmoe"))
    net = model_cls(config_cls(**kwargs))
    before = net.config._experts_implementation
    with pytest.raises(fhf.UnsupportedBlockError, match=match):
        net.set_experts_implementation("flexmoe")
    assert net.config._experts_implementation == before
    with pytest.raises(fhf.UnsupportedBlockError, match="no MoE experts" if "no MoE" in match else match):
        fhf.patch(net)


def test_choosing_flexmoe_for_a_composite_model_is_no_error_for_its_vision_tower(dispatch_count):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=1, temporal_patch_size=1, num_position_embeddings=16, deepstack_visual_indexes=[0])
    net = transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, experts_implementation="flexmoe"))
    assert net.model.visual.config._experts_implementation == "flexmoe"  # the tower without experts was checked
    net(input_ids=torch.randint(0, VOCAB, (1, 4)))
    assert len(dispatch_count) == 1  # and the text model's experts run through flexmoe


def test_choosing_flexmoe_for_dbrx_points_to_patch():
    with pytest.raises(fhf.UnsupportedBlockError, match=r"DbrxExperts.*patch\(model\)"):
        build("dbrx", 4).set_experts_implementation("flexmoe")
    fhf.register()  # idempotent: the checks are not stacked twice
    assert not hasattr(transformers.PreTrainedModel.post_init._flexmoe_original, "_flexmoe_original")


# ----- patch(): blocks outside the experts interface, and kernel choice -----

def test_patch_runs_dbrx_which_has_no_experts_interface(dispatch_count):
    net = build("dbrx", 8)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    want = run(net, ids)
    names = fhf.patch(net)
    assert names == ["transformer.blocks.0.ffn.experts", "transformer.blocks.1.ffn.experts"]
    got = run(net, ids)
    assert len(dispatch_count) == 2
    assert_same_step(got, want)
    assert fhf.unpatch(net) == names
    dispatch_count.clear()
    assert_same_step(run(net, ids), want)
    assert not dispatch_count


def test_patch_overrides_the_configured_implementation(dispatch_count):
    net = build("olmoe", 16)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    net.set_experts_implementation("eager")
    want = run(net, ids)
    fhf.patch(net, kernels="torch")
    assert_same_step(run(net, ids), want)
    assert len(dispatch_count) == 2
    with pytest.raises(ValueError, match="kernels"):
        fhf.patch(net, kernels="cuda")


def test_unsupported_blocks_raise_naming_the_block():
    llama4 = transformers.Llama4TextConfig(hidden_size=16, intermediate_size=8, num_local_experts=4)
    holder = nn.Module()
    holder.experts = transformers.models.llama4.modeling_llama4.Llama4TextExperts(llama4)
    with pytest.raises(fhf.UnsupportedBlockError, match=r"Llama4TextExperts at 'experts'.*top_k_index"):
        fhf.patch(holder)

    class OldStyleMoeBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(fhf.UnsupportedBlockError, match="OldStyleMoeBlock.*ModuleList"):
        fhf.patch(nn.Sequential(OldStyleMoeBlock()))
    with pytest.raises(ValueError, match="no MoE experts"):
        fhf.patch(nn.Linear(3, 3))

    net = build("mixtral", 4)
    block = fhf.expert_blocks(net)[0][1]
    block.gate_up_proj = nn.Parameter(torch.zeros(4, 7, 32))
    with pytest.raises(fhf.UnsupportedBlockError, match="MixtralExperts.*gate_up_proj has shape"):
        net.set_experts_implementation("flexmoe")
        net(input_ids=torch.zeros(1, 2, dtype=torch.long))


# ----- experts-module variants against a float64 per-token loop -----

def reference_experts(block: nn.Module, x_TD, index_TK, weight_TK):
    """``sum_k w * post_norm(down(act(up(x) + b)) + b)`` token by token, skipping ids >= E."""
    E = block.num_experts
    y_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(index_TK.shape[1]):
            e = int(index_TK[t, k])
            if e >= E:
                continue
            h = (block.gate_up_proj if block.has_gate else block.up_proj)[e] @ x_TD[t]
            if block.has_bias:
                h = h + (block.gate_up_proj_bias if block.has_gate else block.up_proj_bias)[e]
            a = block._apply_gate(h) if block.has_gate else block.act_fn(h)
            y = block.down_proj[e] @ a
            if block.has_bias:
                y = y + block.down_proj_bias[e]
            if getattr(block, "has_post_expert_norm", False):
                y = block.post_expert_norm(y)
            y_TD[t] = y_TD[t] + weight_TK[t, k] * y
    return y_TD


def make_experts(has_gate: bool, has_bias: bool, act: str, post_norm: bool, E=6, D=12, F=5):
    @transformers.integrations.use_experts_implementation(has_bias=has_bias)
    class ToyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            H = 2 * F if has_gate else F
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(E, H, D, dtype=torch.float64) * 0.3))
            self.down_proj = nn.Parameter(torch.randn(E, D, F, dtype=torch.float64) * 0.3)
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, H, dtype=torch.float64)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D, dtype=torch.float64))
            self.act_fn = transformers.activations.ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the flexmoe implementation must be dispatched")

    config = transformers.PretrainedConfig(experts_implementation="flexmoe")
    block = ToyExperts(config)
    block.has_gate = has_gate  # set by hand: older transformers lack these decorator flags
    if post_norm:
        block.has_post_expert_norm = True
        block.post_expert_norm = nn.LayerNorm(D, dtype=torch.float64)
        with torch.no_grad():
            block.post_expert_norm.weight.normal_(1.0, 0.2)
            block.post_expert_norm.bias.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize("has_gate, has_bias, act, post_norm", [
    (True, False, "gelu", False),     # gated, non-SiLU: act(gate) * up in plain torch
    (False, True, "relu", False),     # not gated (up_proj), biases
    (True, True, "silu", True),       # fused SwiGLU, biases, post-expert norm (weight applied after it)
    (False, False, "gelu", True),
])
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_experts_variants_match_float64_loop(has_gate, has_bias, act, post_norm, expert_parallel):
    torch.manual_seed(6)
    block = make_experts(has_gate, has_bias, act, post_norm)
    block._is_expert_parallel = expert_parallel
    T, K, E = 7, 3, block.num_experts
    x_TD = torch.randn(T, 12, dtype=torch.float64, requires_grad=True)
    index_TK = torch.stack([torch.randperm(E + 2 if expert_parallel else E)[:K] for _ in range(T)])
    weight_TK = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    if expert_parallel:  # ids >= E are other ranks' experts: HF gives them weight 0
        weight_TK.data.masked_fill_(index_TK >= E, 0.0)
    y = block(x_TD, index_TK, weight_TK)
    (y * torch.cos(y)).sum().backward()
    got = [y.detach(), x_TD.grad, weight_TK.grad] + [p.grad for p in block.parameters()]
    for t in [x_TD, weight_TK, *block.parameters()]:
        t.grad = None
    y_ref = reference_experts(block, x_TD, index_TK, weight_TK)
    (y_ref * torch.cos(y_ref)).sum().backward()
    want = [y_ref.detach(), x_TD.grad, weight_TK.grad] + [p.grad for p in block.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_captures_the_experts():
    torch._dynamo.reset()
    block = make_experts(True, True, "silu", False)
    x_TD = torch.randn(9, 12, dtype=torch.float64)
    index_TK = torch.stack([torch.randperm(block.num_experts)[:2] for _ in range(9)])
    weight_TK = torch.rand(9, 2, dtype=torch.float64)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x_TD, index_TK, weight_TK), block(x_TD, index_TK, weight_TK),
                               rtol=1e-12, atol=1e-12)


# ----- Triton kernels (interpreter) and the optional dependency, in fresh processes -----

def _python(code: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(__file__))


def test_triton_kernels_under_interpreter_match_eager():
    pytest.importorskip("triton", reason="the Triton path needs triton (pip install flexmoe[triton])")
    proc = _python("""
        import torch, test_hf
        for model in ("qwen3_moe", "gpt_oss"):
            net = test_hf.build(model, 8)
            ids = torch.randint(0, test_hf.VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
            net.set_experts_implementation("eager")
            want = test_hf.run(net, ids)
            test_hf.fhf.patch(net, kernels="triton")
            test_hf.assert_same_step(test_hf.run(net, ids), want)
        print("OK")
    """, env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_flexmoe_works_without_transformers():
    proc = _python("""
        import sys
        sys.modules["transformers"] = None  # import transformers now raises ImportError
        import torch, flexmoe
        layer = flexmoe.MoELayer(flexmoe.MoEConfig(d_model=8, d_ff=4, num_experts=4, kernels="torch"))
        layer(torch.randn(3, 8)).sum().backward()
        import flexmoe.integrations
        try:
            import flexmoe.integrations.hf
        except ImportError as err:
            print("ERR", err)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERR flexmoe.integrations.hf needs HuggingFace transformers" in proc.stdout
    assert "pip install 'flexmoe[hf]'" in proc.stdout
