"""Routing options that span ranks, on 4 gloo processes (2 "nodes" x 2 ranks): device- and
node-limited routing under expert parallelism, and the global-batch balance loss.

Legend: W ranks, T tokens per rank, E experts, K chosen experts per token.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from flexmoe import EPGroup, MoEConfig, MoELayer, PlacementTable
from flexmoe.parallel import ParallelConfig
from helpers import spawn_ranks
from host_syncs import HostSyncs
from reference import owner_groups, reference_moe, reference_routing

WORLD = 4
SPAWN_TIMEOUT_S = 240
BASE = MoEConfig(d_model=8, d_ff=6, num_experts=8, top_k=2, router="sigmoid", kernels="torch", init_std=0.5)


def remote_copies(expert_TK: torch.Tensor, owner_E: list[int], rank: int) -> int:
    """Distinct (token, remote rank) pairs: the rows a dispatcher that sends each token once per
    destination rank puts on the wire (routing-side count)."""
    owner = torch.tensor(owner_E)[expert_TK]
    return sum(len(set(row.tolist()) - {rank}) for row in owner)


def _tokens(rank: int, T: int = 24) -> torch.Tensor:
    return torch.randn(T, 8, generator=torch.Generator().manual_seed(50 + rank), dtype=torch.float64)


def case_rank_limited(rank: int, nodes: EPGroup) -> None:
    """max_ranks_per_token=1: every token's experts sit on one rank; EP output = reference."""
    owner_E = [e // 2 for e in range(8)]
    copies = {}
    for limit in (None, 1):
        cfg = dataclasses.replace(BASE, max_ranks_per_token=limit)
        torch.manual_seed(7)
        local = MoELayer(cfg).double()
        torch.manual_seed(7)
        ep = MoELayer(cfg, ep_group=EPGroup.create()).double()
        x = _tokens(rank)
        y = ep(x)
        stages = [] if limit is None else [(owner_groups(owner_E), limit)]
        y_ref, _, _, _ = reference_moe(copy.deepcopy(local), x, device_stages=stages)
        assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-10
        expert_TK = ep.router(x).expert_TK
        if limit == 1:
            assert all(len({owner_E[e] for e in row.tolist()}) == 1 for row in expert_TK)
        copies[limit] = remote_copies(expert_TK, owner_E, rank)
        sent = ep.experts.last_exchange  # the dispatcher's own count of what it put on the wire
        assert sent.dispatch_rows - sent.local_rows == copies[limit], (sent, copies)
    assert copies[1] <= 24 and copies[1] < copies[None], copies


def case_node_limited(rank: int, nodes: EPGroup) -> None:
    """max_nodes_per_token=1 on 2 nodes, with a permuted placement: experts of one node per token."""
    slot_expert = [[5, 0], [3, 6], [1, 7], [2, 4]]
    table = PlacementTable(8, slot_expert, [[1.0, 1.0]] * 4)
    owner_E = [0] * 8
    for r, slots in enumerate(slot_expert):
        for e in slots:
            owner_E[e] = r
    cfg = dataclasses.replace(BASE, max_nodes_per_token=1, top_k=3)
    torch.manual_seed(8)
    local = MoELayer(cfg).double()
    torch.manual_seed(8)
    ep = MoELayer(cfg, ep_group=nodes, placement=table).double()
    x = _tokens(rank)
    y = ep(x)
    y_ref, _, _, _ = reference_moe(copy.deepcopy(local), x, device_stages=[(owner_groups([owner_E[e] // 2 for e in range(8)]), 1)])
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-10
    node_TK = torch.tensor([owner_E[e] // 2 for e in range(8)])[ep.router(x).expert_TK]
    assert (node_TK == node_TK[:, :1]).all()


def case_rank_limited_with_replicas(rank: int, nodes: EPGroup) -> None:
    """Replicated experts 0 and 3: a replicated expert counts on every rank holding it, and each
    pair is computed in a replica on its token's chosen rank. Output and input gradient = reference."""
    slot_expert = [[0, 1], [2, 3], [4, 5], [0, 3]]
    table = PlacementTable(6, slot_expert, [[0.5, 1.0], [1.0, 0.5], [1.0, 1.0], [0.5, 0.5]])
    cfg = dataclasses.replace(BASE, num_experts=6, max_ranks_per_token=1)
    torch.manual_seed(10)
    local = MoELayer(cfg).double()
    torch.manual_seed(10)
    ep = MoELayer(cfg, ep_group=EPGroup.create(), placement=table).double()
    x = _tokens(rank).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = ep(x)
    y_ref, _, counts_ref, _ = reference_moe(copy.deepcopy(local), x_ref, device_stages=[(slot_expert, 1)])
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-10
    assert torch.equal(ep.last_counts, counts_ref)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    assert ((x.grad - x_ref.grad).norm() / x_ref.grad.norm()).item() < 1e-10
    routing = ep.router(x.detach())
    dest_TK = routing.slot_TK // 2
    assert (dest_TK == dest_TK[:, :1]).all(), "every token's pairs go to one rank"
    for t in range(x.shape[0]):  # and that rank holds each of its experts
        for e, r in zip(routing.expert_TK[t].tolist(), dest_TK[t].tolist()):
            assert e in slot_expert[r]
    sent = ep.experts.last_exchange
    assert sent.dispatch_rows - sent.local_rows == int((dest_TK[:, 0] != rank).sum()), sent
    # Two chunks: the pair counts take their own all-gather (not the one riding with the counts).
    ep2 = MoELayer(cfg, ep_group=EPGroup.create(), placement=table, parallel=ParallelConfig(pipeline_degree=2))
    ep2.double().load_state_dict(local.state_dict())
    y2 = ep2(x.detach())
    assert ep2.experts.last_pipeline_degree == 2
    assert ((y2 - y_ref).norm() / y_ref.norm()).item() < 1e-10
    assert torch.equal(ep2.last_counts, counts_ref)
    with pytest.raises(ValueError, match="bounded"):
        bounded = ParallelConfig(dispatch="bounded", rows_per_rank_pair=64)
        MoELayer(cfg, ep_group=EPGroup.create(), placement=table, parallel=bounded).double()(x.detach())
    # Node- and rank-limited together (nodes {0, 1} and {2, 3}; expert 0 lives in both nodes).
    cfg2 = dataclasses.replace(cfg, max_nodes_per_token=1, max_ranks_per_token=2)
    torch.manual_seed(11)
    local = MoELayer(cfg2).double()
    torch.manual_seed(11)
    ep = MoELayer(cfg2, ep_group=nodes, placement=table).double()
    x = _tokens(rank)
    node_groups = [[0, 1, 2, 3], [0, 3, 4, 5]]
    stages = [(node_groups, 1), (slot_expert, 2, [0, 0, 1, 1])]
    y_ref, _, _, _ = reference_moe(copy.deepcopy(local), x, device_stages=stages)
    assert ((ep(x) - y_ref).norm() / y_ref.norm()).item() < 1e-10
    node_TK = ep.router(x).slot_TK // 2 // 2
    assert (node_TK == node_TK[:, :1]).all(), "every token's pairs go to one node"


def case_limited_with_a_rank_without_tokens(rank: int, nodes: EPGroup) -> None:
    """Rank 1 routes no tokens; every rank still takes part and the others match the reference."""
    cfg = dataclasses.replace(BASE, max_ranks_per_token=1, max_nodes_per_token=1)
    torch.manual_seed(12)
    local = MoELayer(cfg).double()
    torch.manual_seed(12)
    ep = MoELayer(cfg, ep_group=nodes).double()
    x = _tokens(rank, [6, 0, 1, 3][rank])
    y = ep(x)
    assert y.shape == x.shape
    if x.shape[0]:
        owner_E = [e // 2 for e in range(8)]
        stages = [(owner_groups([r // 2 for r in owner_E]), 1), (owner_groups(owner_E), 1, [0, 0, 1, 1])]
        y_ref, _, _, _ = reference_moe(copy.deepcopy(local), x, device_stages=stages)
        assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-10


def case_global_balance_loss(rank: int, nodes: EPGroup) -> None:
    """Load fractions from the counts of all ranks (rank 3 has no tokens); P from this rank."""
    cfg = dataclasses.replace(BASE, aux_loss_coef=0.1, aux_loss_scope="global")
    torch.manual_seed(9)
    layer = MoELayer(cfg).double()
    T = [24, 5, 1, 0][rank]
    xs = [_tokens(r, [24, 5, 1, 0][r]) for r in range(WORLD)]
    ref = copy.deepcopy(layer)
    layer(xs[rank])
    # f over all ranks' tokens, from the reference choice of every rank.
    f = torch.zeros(8, dtype=torch.float64)
    chosen = [row for x in xs for row in reference_routing(x, layer.router.weight.double(), cfg)[2]]
    for row in chosen:
        for e in row:
            f[e] += 1.0 / (len(chosen) * cfg.top_k)
    _, aux_ref, _, _ = reference_moe(ref, xs[rank], global_f=f)
    assert abs(layer.aux_loss.item() - aux_ref.item()) <= 1e-12, (layer.aux_loss.item(), aux_ref.item())
    batch = MoELayer(dataclasses.replace(cfg, aux_loss_scope="batch")).double()
    batch.load_state_dict(layer.state_dict())
    with HostSyncs() as batch_syncs:
        batch(xs[rank])
    if T:
        assert abs(batch.aux_loss.item() - layer.aux_loss.item()) > 1e-9
    # Later forwards: the same loss, one all-reduce and no host read beyond the batch loss's
    # (the expert-count check ran once; H200: its host reads cost 1.13x per step).
    first = layer.aux_loss.clone()
    with HostSyncs() as syncs:
        layer(xs[rank])
    assert torch.equal(layer.aux_loss, first)
    assert dict(syncs.calls) == dict(batch_syncs.calls), (dict(syncs.calls), dict(batch_syncs.calls))


def case_global_loss_names_disagreeing_ranks(rank: int, nodes: EPGroup) -> None:
    cfg = dataclasses.replace(BASE, num_experts=8 if rank else 4, aux_loss_coef=0.1, aux_loss_scope="global")
    layer = MoELayer(cfg).double()
    with pytest.raises(ValueError, match="disagree on num_experts"):
        layer(_tokens(rank, 3))
    with pytest.raises(ValueError, match="disagree on num_experts"):  # a failed check is not remembered
        layer(_tokens(rank, 3))


CASES = {
    "rank_limited": case_rank_limited,
    "node_limited": case_node_limited,
    "rank_limited_with_replicas": case_rank_limited_with_replicas,
    "limited_with_a_rank_without_tokens": case_limited_with_a_rank_without_tokens,
    "global_balance_loss": case_global_balance_loss,
    "global_loss_names_disagreeing_ranks": case_global_loss_names_disagreeing_ranks,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    nodes = EPGroup.create(ranks_per_node=2)
    results = {}
    for name, case in CASES.items():
        try:
            case(rank, nodes)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("routing_dist"))
    return spawn_ranks(WORLD, out_dir, SPAWN_TIMEOUT_S, _worker, lambda r, port: (r, port, out_dir))


@pytest.mark.parametrize("case", list(CASES))
def test_routing_across_ranks(results, case):
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(results) if res.get(case) != "ok"]
    assert not failures, "\n".join(failures)
