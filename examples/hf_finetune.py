"""Fine-tune a small HuggingFace MoE model whose experts run on flexmoe.

The model is built from a config written here (nothing is downloaded) and trained for a few steps on
a synthetic next-token task (each sequence counts up by a random stride), so the loss visibly drops.
Importing ``flexmoe.integrations.hf`` registers the experts implementation "flexmoe"; the config
selects it, exactly as ``from_pretrained(..., experts_implementation="flexmoe")`` would.

    python examples/hf_finetune.py                      # Qwen3-MoE, CUDA if available (bf16), else CPU
    python examples/hf_finetune.py --model mixtral --steps 50
"""

from __future__ import annotations

import argparse

import torch
import transformers

import flexmoe
import flexmoe.integrations.hf  # noqa: F401  (registers "flexmoe")

SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_model(family: str, vocab: int) -> transformers.PreTrainedModel:
    common = dict(**SHAPE, vocab_size=vocab, num_experts_per_tok=2, experts_implementation="flexmoe",
                  output_router_logits=True, router_aux_loss_coef=0.01)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, head_dim=32, intermediate_size=256,
                                             moe_intermediate_size=64, num_experts=16)
    elif family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=8)
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=64, num_experts=16)
    else:
        raise ValueError(f"unknown --model {family!r}")
    return transformers.AutoModelForCausalLM.from_config(config)


def counting_batch(batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences ``start, start + stride, start + 2*stride, ...`` modulo the vocabulary."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    stride = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + stride * torch.arange(seq)) % vocab


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3_moe", choices=["qwen3_moe", "mixtral", "olmoe"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, args.vocab).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"experts implementation {model.config._experts_implementation!r}, {next(model.parameters()).dtype}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    moe = flexmoe.MoERuntime(model)  # HF computes its router aux loss in out.loss; the runtime syncs gradients
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(1, args.steps + 1):
        ids = counting_batch(args.batch, args.seq, args.vocab, gen).to(device)
        moe.before_forward(step - 1)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        moe.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe.after_optimizer_step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {out.loss.item():.4f}  (router aux loss {out.aux_loss.item():.4f})")


if __name__ == "__main__":
    main()
