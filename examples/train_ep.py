"""Train a small MoE language model with expert parallelism.

    torchrun --nproc-per-node 2 examples/train_ep.py            # CPU (gloo) or one GPU per rank (NCCL)
    torchrun --nproc-per-node 4 examples/train_ep.py --ranks-per-node 2 --pipeline auto --memory auto

Every rank holds the router, attention and embeddings (replicated, gradients averaged) and
``ceil(E / W)`` of the experts of every MoE layer; tokens travel to their experts with an
all-to-all. The task is synthetic: sequences ``a, a+d, a+2d, ... (mod V)`` with a random start
and step per sequence, so the loss falls quickly once attention finds the step.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import flexmoe
from flexmoe.parallel import EPGroup, ParallelConfig


class Block(nn.Module):
    """Pre-norm causal self-attention, then a pre-norm MoE feed-forward block."""

    def __init__(self, d_model: int, n_heads: int, moe: flexmoe.MoELayer):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.moe = moe

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BSD = x_BSD + self.out(attn.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.moe(self.norm2(x_BSD))


class TinyMoELM(nn.Module):
    def __init__(self, args, ep_group: EPGroup, parallel: ParallelConfig):
        super().__init__()
        cfg = flexmoe.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                                aux_loss_coef=1e-2)
        self.embed = nn.Embedding(args.vocab, args.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(args.seq_len, args.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(args.d_model, args.heads, flexmoe.MoELayer(cfg, ep_group=ep_group, parallel=parallel))
            for _ in range(args.layers)
        )
        self.norm = nn.RMSNorm(args.d_model)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens_BS) + self.pos[: tokens_BS.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


def synthetic_batch(args, generator: torch.Generator, device) -> torch.Tensor:
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=generator)
    step = torch.randint(1, 8, (args.batch, 1), generator=generator)
    return ((start + step * torch.arange(args.seq_len + 1)) % args.vocab).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pipeline", default="1", help="pipeline degree: an int or 'auto'")
    parser.add_argument("--memory", default="keep", choices=["keep", "recompute", "recommunicate", "both", "auto"])
    parser.add_argument("--ranks-per-node", type=int, default=None, help="use hierarchical all-to-all")
    parser.add_argument("--save", default=None, help="write the (world-size-free) state dict here at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    ep_group = EPGroup.create(ranks_per_node=args.ranks_per_node)
    parallel = ParallelConfig(
        pipeline_degree=args.pipeline if args.pipeline == "auto" else int(args.pipeline),
        memory=args.memory,
        all_to_all="hierarchical" if args.ranks_per_node else "flat",
    )
    torch.manual_seed(0)  # same seed on every rank: replicated weights start equal
    model = TinyMoELM(args, ep_group, parallel).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    moe = flexmoe.MoERuntime(model)  # the MoE-specific work of every step
    data = torch.Generator().manual_seed(1000 + rank)  # every rank reads its own batches
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{world} ranks ({'NCCL' if cuda else 'gloo'}), {n_params} parameters on rank 0, {args.experts} experts "
              f"per layer, {model.blocks[0].moe.experts.num_experts} slots per rank; {parallel}")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        seq = synthetic_batch(args, data, device)
        moe.before_forward(step - 1)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), seq[:, 1:].reshape(-1))
        (loss + moe.aux_loss()).backward()
        moe.after_backward()  # dense gradients averaged, expert replica gradients summed
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe.after_optimizer_step()
        if step % 10 == 0 or step == args.steps:
            mean_loss = loss.detach().clone()
            flexmoe.collectives.all_reduce(mean_loss)  # dist.all_reduce that leaves gloo nothing at exit
            elapsed = time.perf_counter() - start
            moe = model.blocks[0].moe.experts
            report = moe.memory_report  # None at world size 1: the one-device expert FFN runs
            stage = ("one-device path" if report is None else
                     f"pipeline {moe.last_pipeline_degree}  memory {report.strategy} "
                     f"(saved {report.saved_bytes / 1024:.1f} KiB in layer 0)")
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / world:.3f}  "
                      f"{step * args.batch * args.seq_len * world / elapsed:8.0f} tokens/s  {stage}", flush=True)

    state = model.state_dict()  # collective: every rank gathers the logical experts
    if args.save and rank == 0:
        torch.save(state, args.save)
        print(f"saved {args.save}; it loads into any number of ranks, or into one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
