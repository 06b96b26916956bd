"""Device-limited routing: token copies sent to other ranks, with and without the limit.

Counts, for every source rank of a static expert-parallel layout, the distinct (token, remote
rank) pairs of the routing: what a dispatcher that sends each token once per destination rank
puts on the wire (flexmoe's dispatcher today sends one row per (token, expert) pair, k per
token, whatever the limit). Random router weights and inputs, one process, CPU or GPU.

    python benchmarks/device_limits.py [--tokens 4096 --experts 256 --top-k 8 --ranks 8]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

import flexmoe
from flexmoe.placement import PlacementTable
from flexmoe.routing.limits import device_limits


def remote_copies(expert_TK: torch.Tensor, owner_E: torch.Tensor, rank: int) -> float:
    """Mean over tokens of the number of other ranks the token's experts live on."""
    W = int(owner_E.max()) + 1
    hit_TW = torch.zeros(expert_TK.shape[0], W, dtype=torch.bool)
    hit_TW.scatter_(1, owner_E[expert_TK], True)
    hit_TW[:, rank] = False
    return hit_TW.sum(1).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    W, E = args.ranks, args.experts
    table = PlacementTable.static(E, W)
    rank_S, _ = np.nonzero(table.slot_expert_WS >= 0)
    owner_E = torch.empty(E, dtype=torch.int64)
    owner_E[torch.from_numpy(table.slot_expert_WS[table.slot_expert_WS >= 0])] = torch.from_numpy(rank_S)
    base = flexmoe.MoEConfig(d_model=args.d_model, d_ff=8, num_experts=E, top_k=args.top_k, router="sigmoid",
                             init_std=args.d_model ** -0.5)
    layer = flexmoe.MoELayer(base)
    x = torch.randn(args.tokens, args.d_model)
    print(f"T={args.tokens} per rank, E={E}, k={args.top_k}, W={W} ranks; remote token copies per token, mean over ranks")
    print(f"{'max_ranks_per_token':>20}{'copies/token':>14}{'vs unlimited':>14}")
    baseline = None
    for limit in [None] + [m for m in (1, 2, 4) if m < W]:
        cfg = dataclasses.replace(base, max_ranks_per_token=limit)
        copies = []
        for rank in range(W):
            layer.router.config = cfg
            layer.router.device_limits = None
            if limit is not None:
                layer.router.set_device_limits(device_limits(table.slot_expert_WS, None, cfg, rank))
            with torch.no_grad():
                copies.append(remote_copies(layer.router(x).expert_TK, owner_E, rank))
        mean = sum(copies) / W
        baseline = mean if baseline is None else baseline
        print(f"{str(limit):>20}{mean:>14.3f}{mean / baseline:>14.2f}")


if __name__ == "__main__":
    main()
