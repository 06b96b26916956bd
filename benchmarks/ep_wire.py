"""Rows and bytes per token on the wire of the EP dispatch, counted from real routing (CPU).

Simulates the W ranks of one EP group in one process: each rank routes its own batch with the
same router, and every rank's once-per-rank route (``flexmoe.parallel.dispatch``) is built from
the all-ranks counts exactly as the layer builds it. Counts only: no communication, no timing.
"per expert" is the previous dispatch (one row per (token, expert) pair, row = token + fp32
weight, 8-byte aligned); "per rank" is the current one (one row per (token, rank) pair, row =
token + K int32 slot ids + K fp32 weights, 16-byte aligned). "remote" leaves out rows a rank
sends to itself.

    python benchmarks/ep_wire.py                  # Qwen3-30B-A3B-like: D=2048, E=128, top-8, bf16
    python benchmarks/ep_wire.py --shape 1024,64,4 --tokens 512
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import flexmoe
from flexmoe.parallel.dispatch import route_pairs, row_replicas
from flexmoe.parallel.stage import dispatch_packer
from flexmoe.placement import PlacementTable
from flexmoe.placement.split import split_tokens
from flexmoe.plan import make_dispatch_plan


def count(layer: flexmoe.MoELayer, batches: list[torch.Tensor]) -> dict[str, int]:
    """Rows each way of both dispatches, summed over the simulated ranks."""
    cfg, W = layer.config, len(batches)
    table = PlacementTable.static(cfg.num_experts, W)
    with torch.no_grad():
        plans = []
        for x in batches:
            r = layer.router(x)
            plans.append(make_dispatch_plan(r.expert_TK, r.weight_TK, r.keep_TK, r.num_experts))
    counts_WE = np.stack([p.counts_E.numpy() for p in plans])
    send_WWS = split_tokens(table, counts_WE)
    routes = []
    for rank, plan in enumerate(plans):
        replica_N = row_replicas(table, send_WWS, counts_WE[rank], rank, plan.num_rows, torch.device("cpu"))
        routes.append(route_pairs(replica_N, plan.pair_row_TK, W, table.slots_per_rank, 1, rank))
    everyone = np.stack([route.counts_nWC.numpy() for route in routes])
    for route in routes:
        route.finish(everyone)
    pairs_WW = routes[0].pairs_nWW.sum(axis=0)
    rows_WW = send_WWS.sum(axis=2)
    return {
        "tokens": sum(x.shape[0] for x in batches),
        "expert rows": int(rows_WW.sum()),
        "expert rows remote": int(rows_WW.sum() - np.trace(rows_WW)),
        "pairs": int(pairs_WW.sum()),
        "pairs remote": int(pairs_WW.sum() - np.trace(pairs_WW)),
    }


def skew_router_(layer: flexmoe.MoELayer, skew: float) -> None:
    """Make expert popularity about Zipf(skew): feature 0 of the input is set to 1 and the
    router's column 0 carries -skew * log(popularity rank)."""
    E = layer.config.num_experts
    with torch.no_grad():
        popularity_rank = torch.randperm(E, generator=torch.Generator().manual_seed(0)) + 1
        layer.router.weight[:, 0] = -skew * torch.log(popularity_rank.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,128,8", help="D,E,k")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--zipf", type=float, default=1.2)
    args = parser.parse_args()
    D, E, K = (int(v) for v in args.shape.split(","))
    cfg = flexmoe.MoEConfig(d_model=D, d_ff=64, num_experts=E, top_k=K, kernels="torch")
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(cfg)
    old_row = -(-(D * 2 + 4) // 8) * 8  # token + fp32 weight, 8-byte aligned (the previous packer)
    new_row = dispatch_packer(torch.bfloat16, D, torch.float32, K).row_bytes
    back_row = D * 2
    print(f"D={D} E={E} top-{K}, {args.tokens} tokens per rank, bf16 tokens, fp32 weights; "
          f"dispatch row {old_row} B per expert -> {new_row} B per rank; return row {back_row} B")
    header = ["routing", "ranks", "rows/token per expert", "rows/token per rank", "remote per expert",
              "remote per rank", "remote KiB/token both ways, per expert", "per rank", "remote bytes saved"]
    rows = []
    for routing, skew in (("uniform (random router)", 0.0), (f"zipf({args.zipf})", args.zipf)):
        if skew:
            skew_router_(layer, skew)
        for W in (int(w) for w in args.ranks.split(",")):
            gen = torch.Generator().manual_seed(W)
            batches = [torch.randn(args.tokens, D, generator=gen) for _ in range(W)]
            if skew:
                for x in batches:
                    x[:, 0] = 1.0
            c = count(layer, batches)
            T = c["tokens"]
            old_bytes = c["expert rows remote"] * (old_row + back_row) / T
            new_bytes = c["pairs remote"] * (new_row + back_row) / T
            rows.append([routing, W, c["expert rows"] / T, c["pairs"] / T, c["expert rows remote"] / T,
                         c["pairs remote"] / T, old_bytes / 1024, new_bytes / 1024,
                         f"{100 * (1 - new_bytes / old_bytes):.0f}%" if old_bytes else "-"])
    cells = [header] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
