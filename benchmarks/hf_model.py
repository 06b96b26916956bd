"""A HuggingFace Qwen3-MoE-shaped model trained with flexmoe vs HF's own experts implementations.

One process, one model, the same inputs: forward + backward of the whole model (4 layers, hidden 2048,
128 experts, top-8, moe_intermediate_size 768, small vocabulary so the MoE layers dominate) and of one
MoE block alone, for experts implementations "flexmoe", "grouped_mm" and "eager". Prints milliseconds,
ratios to flexmoe, and how far each one's logits, loss and gradients are from the reference
implementation ("eager" when timed, else the first of --impls that is not flexmoe); exits 1 when they
disagree.

GPU (bf16):  python benchmarks/hf_model.py
CPU smoke:   python benchmarks/hf_model.py --tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import flexmoe.integrations.hf  # noqa: F401  (registers the "flexmoe" experts implementation)

IMPLS = ("flexmoe", "grouped_mm", "eager")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU in float32 (smoke check)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (batch*seq tokens per step)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10, help="timed steps per implementation (eager: a fifth)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated experts implementations")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd flexmoe and grouped_mm")
    p.add_argument("--tol", type=float, default=None, help="max relative error (default 5e-2 bf16, 1e-4 fp32)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.layers, args.vocab = 2, 16, 2, 128
        args.iters, args.warmup = 2, 1
    return args


def model_config(args: argparse.Namespace) -> Qwen3MoeConfig:
    if args.tiny:
        shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    else:  # Qwen3-30B-A3B's MoE layer
        shape = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
    return Qwen3MoeConfig(**shape, num_hidden_layers=args.layers, vocab_size=args.vocab, norm_topk_prob=True,
                          max_position_embeddings=max(args.seq, 64), attn_implementation="sdpa",
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)


class Timer:
    """Milliseconds of one call, synchronising the device around it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def measure(fn, timer: Timer, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(max(iters, 1)))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    torch.manual_seed(0)
    cfg = model_config(args)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    block = model.model.layers[0].mlp
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    x_block = torch.randn(args.batch * args.seq, cfg.hidden_size, generator=gen).to(device, dtype)
    timer = Timer(device)
    T = args.batch * args.seq
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"torch {torch.__version__}, transformers {sys.modules['transformers'].__version__}")
    print(f"Qwen3-MoE-shaped: {cfg.num_hidden_layers} layers, D={cfg.hidden_size}, E={cfg.num_experts}, "
          f"k={cfg.num_experts_per_tok}, F={cfg.moe_intermediate_size}, vocab={cfg.vocab_size}, tokens={T}")

    def model_step(net):
        def step():
            model.zero_grad(set_to_none=True)
            net(input_ids=ids, labels=ids).loss.backward()
        return step

    def block_step(net):
        def step():
            block.zero_grad(set_to_none=True)
            net(x_block.view(args.batch, args.seq, -1)).float().square().mean().backward()
        return step

    rows, outputs = [], {}
    for impl in impls:
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        experts = block.experts
        outputs[impl] = dict(logits=out.logits.detach(), loss=out.loss.detach(),
                             gate_up_grad=experts.gate_up_proj.grad.clone(), down_grad=experts.down_proj.grad.clone(),
                             router_grad=block.gate.weight.grad.clone(),
                             embed_grad=model.model.embed_tokens.weight.grad.clone())
        del out
        iters = args.iters if impl != "eager" else max(1, args.iters // 5)
        warmup = args.warmup if impl != "eager" else 1
        rows.append((impl, measure(model_step(model), timer, warmup, iters),
                     measure(block_step(block), timer, warmup, iters)))
        if args.compile and impl != "eager":
            torch._dynamo.reset()
            rows.append((f"{impl} compiled", measure(model_step(torch.compile(model)), timer, warmup + 2, iters),
                         measure(block_step(torch.compile(block)), timer, warmup + 2, iters)))
            torch._dynamo.reset()

    print_table(rows)
    return 0 if check_agreement(outputs, impls, tol) else 1


def print_table(rows) -> None:
    base = {name: (m, b) for name, m, b in rows}.get("flexmoe")
    print(f"\n{'implementation':<22}{'model fwd+bwd ms':>18}{'x flexmoe':>11}"
          f"{'MoE block fwd+bwd ms':>23}{'x flexmoe':>11}")
    for name, model_ms, block_ms in rows:
        rm = f"{model_ms / base[0]:.2f}" if base else "-"
        rb = f"{block_ms / base[1]:.2f}" if base else "-"
        print(f"{name:<22}{model_ms:>18.2f}{rm:>11}{block_ms:>23.2f}{rb:>11}")
    print("(x flexmoe = this implementation's time / flexmoe's: above 1 means flexmoe is faster)")


def check_agreement(outputs: dict, impls: list[str], tol: float) -> bool:
    ref = "eager" if "eager" in impls else next((i for i in impls if i != "flexmoe"), None)
    if ref is None:
        return True
    print(f"\nrelative error (2-norm) against {ref!r}, tolerance {tol:g}:")
    ok = True
    for impl in impls:
        if impl == ref:
            continue
        errs = {key: rel_err(outputs[impl][key], outputs[ref][key]) for key in outputs[ref]}
        good = all(e <= tol for e in errs.values())
        ok &= good
        print(f"  {impl:<12}" + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()) + ("  OK" if good else "  MISMATCH"))
    return ok


if __name__ == "__main__":
    sys.exit(main())
