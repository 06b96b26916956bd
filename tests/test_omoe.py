"""OMoE against a direct float64 implementation of the paper's update, and EP == one device.

The direct version (``direct_projection``) builds OWM's projector ``P = I - A (A^T A + alpha I)^-1 A^T``
as an explicit N x N matrix per expert, A the other experts' flattened weights, and applies it to
the AdamW update. The gloo test (2 processes, a placement with replicas and an empty slot, and a
rank with no tokens) checks that expert parallelism gives the update of one device.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexmoe import MoEConfig, MoELayer
from flexmoe.runtime import sync_gradients
from flexmoe.optim import OMoE, OMoEConfig
from flexmoe.placement import PlacementTable
from helpers import free_port

TOL = 1e-10


def _cfg(**kw) -> MoEConfig:
    base = dict(d_model=4, d_ff=3, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def direct_projection(before_EN: torch.Tensor, after_EN: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_e + P_e (w_e' - w_e), P_e = I - A (A^T A + alpha I)^+ A^T, A = [w_j for j != e] as columns."""
    E, N = before_EN.shape
    out = torch.empty_like(after_EN)
    for e in range(E):
        A = torch.stack([before_EN[j] for j in range(E) if j != e], dim=1)  # N x (E-1)
        P = torch.eye(N, dtype=torch.float64) - A @ torch.linalg.pinv(A.T @ A + alpha * torch.eye(E - 1, dtype=torch.float64)) @ A.T
        out[e] = before_EN[e] + P @ (after_EN[e] - before_EN[e])
    return out


def _batch(step: int, tokens: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return (torch.randn(tokens, d, generator=gen, dtype=torch.float64),
            torch.randn(tokens, d, generator=gen, dtype=torch.float64))


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("init", ["random", "identical", "one_token"])
def test_matches_direct_projection(alpha, init):
    """4 steps (accumulate 1, orthogonal 2): plain, projected, projected, plain."""
    torch.manual_seed(0)
    layer = MoELayer(_cfg()).double()
    if init == "identical":  # upcycled experts: the other experts span one direction
        with torch.no_grad():
            for p in layer.experts.parameters():
                p.copy_(p[:1].expand_as(p))
    ref = MoELayer(_cfg()).double()
    ref.load_state_dict(layer.state_dict())
    opt = _adamw(layer.parameters())
    omoe = OMoE(opt, layer, OMoEConfig(accumulate_steps=1, orthogonal_steps=2, alpha=alpha))
    opt_ref = _adamw(ref.parameters())
    tokens = 1 if init == "one_token" else 9  # one token: two experts get no gradient at all
    projected = []
    for step in range(4):
        x, g = _batch(step, tokens, 4)
        for m in (layer, ref):
            (m(x) * g).sum().backward()
        before = [p.detach().clone() for p in ref.experts.parameters()]
        opt.step()
        opt_ref.step()
        if step in (1, 2):
            with torch.no_grad():
                for p, old in zip(ref.experts.parameters(), before):
                    p.copy_(direct_projection(old.reshape(4, -1), p.reshape(4, -1), alpha).view_as(p))
        projected.append(omoe.last_projected)
        for o in (opt, opt_ref):
            o.zero_grad()
        for (name, a), b in zip(layer.state_dict().items(), ref.state_dict().values()):
            err = float((a - b).abs().max().double() / b.abs().max().double().clamp_min(1e-300))  # float32 router state: 1e-300 needs float64
            assert err < TOL, f"step {step} {name}: relative error {err:.3g}"
    assert projected == [False, True, True, False]
    assert omoe.state_dict() == {"steps": 4}


def test_projected_update_is_orthogonal_to_the_other_experts():
    torch.manual_seed(1)
    layer = MoELayer(_cfg(num_experts=5, d_ff=4)).double()
    opt = _adamw(layer.parameters())
    OMoE(opt, layer, OMoEConfig(accumulate_steps=0))
    x, g = _batch(0, 11, 4)
    (layer(x) * g).sum().backward()
    before = [p.detach().clone().reshape(5, -1) for p in layer.experts.parameters()]
    opt.step()
    for p, old in zip(layer.experts.parameters(), before):
        delta = p.detach().reshape(5, -1) - old
        inner = old @ delta.T  # [j, e]
        off_diag = inner[~torch.eye(5, dtype=torch.bool)]
        assert float(off_diag.abs().max()) < 1e-12 * float(delta.norm() * old.norm())
        assert float(delta.norm()) > 0, "the update is not simply removed"


def test_config_and_model_checks():
    for kwargs, field in ((dict(accumulate_steps=-1), "accumulate_steps"), (dict(orthogonal_steps=0), "orthogonal_steps"),
                          (dict(alpha=-1.0), "alpha"), (dict(alpha=True), "alpha")):
        with pytest.raises(ValueError, match=field):
            OMoEConfig(**kwargs)
    from flexmoe.train.config import TrainConfig

    for kwargs, field in ((dict(omoe_alpha=-1.0), "TrainConfig.omoe_alpha"),
                          (dict(omoe_orthogonal_steps=0), "TrainConfig.omoe_orthogonal_steps"),
                          (dict(omoe="yes"), "TrainConfig.omoe")):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**kwargs)
    layer = MoELayer(_cfg())
    with pytest.raises(ValueError, match="not in the optimizer"):
        OMoE(torch.optim.AdamW(layer.router.parameters()), layer)
    with pytest.raises(ValueError, match="MoE layer"):
        OMoE(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------ 2 gloo processes


def _replica_table() -> PlacementTable:
    """Expert 3 on both ranks, rank 1's last slot empty."""
    return PlacementTable(4, np.array([[0, 1, 3], [2, 3, -1]]), np.array([[1, 1, 0.4], [1, 0.6, 0]]))


def _ep_vs_one_device(rank: int, tokens: list[int]) -> float:
    W, N = len(tokens), sum(tokens)
    cfg = _cfg()
    torch.manual_seed(7)
    ref = MoELayer(cfg).double()
    torch.manual_seed(7)
    ep = MoELayer(cfg, ep_group=dist.group.WORLD, placement=_replica_table()).double()
    ep.load_state_dict(ref.state_dict())
    opts = [_adamw(m.parameters()) for m in (ref, ep)]
    for opt, model in zip(opts, (ref, ep)):
        OMoE(opt, model, OMoEConfig(accumulate_steps=1, orthogonal_steps=2))
    for step in range(4):
        X, G = zip(*[_batch(10 * step + r, t, cfg.d_model) for r, t in enumerate(tokens)])
        (ref(torch.cat(X)) * torch.cat(G)).sum().div(N).backward()
        (W * (ep(X[rank]) * G[rank]).sum() / N).backward()
        sync_gradients(ep)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    got, want = ep.state_dict(), ref.state_dict()
    return max(float((got[k] - v).abs().max() / v.abs().max()) for k, v in want.items())


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        out = {"tokens": _ep_vs_one_device(rank, [7, 5]), "rank_without_tokens": _ep_vs_one_device(rank, [9, 0])}
        layer = MoELayer(_cfg(), ep_group=dist.group.WORLD).double()
        opt = _adamw(layer.parameters())
        omoe = OMoE(opt, layer, OMoEConfig(accumulate_steps=0))
        omoe.steps = rank  # ranks out of step: named, not a hang
        try:
            opt.step()
            out["mismatch"] = "no error"
        except RuntimeError as err:
            out["mismatch"] = str(err)
        if rank == 0:
            with open(os.path.join(out_dir, "omoe.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_update_equals_one_device(tmp_path):
    ctx = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("OMoE gloo workers did not finish in 180 s")
    out = json.loads((tmp_path / "omoe.json").read_text())
    assert out["tokens"] < TOL, out
    assert out["rank_without_tokens"] < TOL, out
    assert "disagree on OMoE step" in out["mismatch"], out
