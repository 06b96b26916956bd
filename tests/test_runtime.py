"""MoERuntime does, in order, exactly the low-level calls of a training step; the cost model
prices the moves the migration runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexmoe
from flexmoe.placement import CostModel, PlacementTable, diff_placement
from flexmoe.runtime import MoERuntime, set_gate_step, sync_gradients, update_router_bias


def _model(router: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = dict(bias_update_rate=0.01) if router == "softmax" else dict(dts=flexmoe.DTSGateConfig(anneal_steps=2))
    cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2, router=router, aux_loss_coef=0.01,
                            kernels="torch", **extra)
    return torch.nn.Sequential(flexmoe.MoELayer(cfg), torch.nn.Linear(8, 8), flexmoe.MoELayer(cfg))


def _train(model, steps, runtime: bool) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    moe = MoERuntime(model)
    torch.manual_seed(1)
    for step in range(steps):
        x = torch.randn(5, 8)
        if runtime:
            moe.before_forward(step)
            loss = model(x).square().mean() + moe.aux_loss()
            loss.backward()
            moe.after_backward()
            optimizer.step()
            moe.after_optimizer_step()
        else:
            set_gate_step(model, step)
            loss = model(x).square().mean() + flexmoe.aux_loss(model)
            loss.backward()
            sync_gradients(model)
            optimizer.step()
            update_router_bias(model)
        optimizer.zero_grad()
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("router", ["softmax", "dts"])
def test_runtime_is_bitwise_the_manual_step(router):
    by_runtime = _train(_model(router), 4, runtime=True)
    by_hand = _train(_model(router), 4, runtime=False)
    fresh = [t.clone() for t in _model(router).state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(by_runtime, by_hand))
    assert not all(torch.equal(a, b) for a, b in zip(by_runtime, fresh)), "training changed the weights"
    if router == "softmax":
        bias = [t for t, k in zip(by_runtime, _model(router).state_dict()) if k.endswith("expert_bias")]
        assert bias and any(b.abs().sum() > 0 for b in bias), "the bias moved"


def test_runtime_validates_its_arguments():
    with pytest.raises(TypeError, match="MoERuntime.model"):
        MoERuntime("model")
    with pytest.raises(TypeError, match="MoERuntime.placement"):
        MoERuntime(_model("softmax"), placement=object())


def test_cost_model_prices_the_moves_the_migration_runs():
    """Two new replicas of expert 0, two old holders: the migration spreads the sends over both
    holders, so the modelled move time is one move per sender (the cost model used to send both
    from the lowest holder, pricing twice the time)."""
    def table(rows, version):
        se = np.array([[e, -1] for e in rows])
        return PlacementTable(1, se, (se >= 0) / (se >= 0).sum(), version)

    old, new = table([0, 0, -1, -1], 0), table([0, 0, 0, 0], 1)
    cost = CostModel(c_tok=1e-9, bytes_per_token=1, a2a_bw=1e9, grad_bytes=1, move_bytes=1e6)
    assert cost.moves(old, new) == list(diff_placement(old, new).transfers)
    assert {m.src[0] for m in cost.moves(old, new)} == {0, 1}
    assert cost.move_time(old, new) == pytest.approx(1e6 / 1e9)


def test_runtime_with_async_placement_is_the_manual_step():
    """MoERuntime.after_optimizer_step posts the re-plan's moves; the next forward lands them;
    the result is bitwise the manual loop with blocking moves."""
    from flexmoe.placement import ReplanPolicy, expand_replica, shrink_replica

    class Alternate:  # replicate expert 0 into the free slot, then drop it again
        def plan(self, table, counts_WE, cost_model):
            if table.num_replicas_E()[0] == 1:
                return expand_replica(table, 0, (0, 4))
            return shrink_replica(table, (0, 4))

    def run(runtime: bool):
        torch.manual_seed(0)
        cfg = flexmoe.MoEConfig(d_model=8, d_ff=6, num_experts=4, top_k=2, kernels="torch")
        se = np.array([[0, 1, 2, 3, -1]])
        model = torch.nn.Sequential(flexmoe.MoELayer(cfg, placement=PlacementTable(4, se, (se >= 0) * 1.0)))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        sched = flexmoe.PlacementScheduler(model, optimizer, Alternate(), "cm", async_moves=runtime,
                                           policy=ReplanPolicy(interval=1, guard=False))
        moe, pending = MoERuntime(model, placement=sched), []
        torch.manual_seed(1)
        for step in range(4):
            loss = model(torch.randn(6, 8)).square().mean()
            loss.backward()
            (moe.after_backward if runtime else lambda: sync_gradients(model))()
            optimizer.step()
            optimizer.zero_grad()
            (moe.after_optimizer_step if runtime else sched.step)()
            pending.append(sched.pending)
        sched.finish_moves()
        return [t.detach().clone() for t in model.state_dict().values()], pending, sched.tables[0].version

    by_runtime, pending, version = run(True)
    by_hand, pending_by_hand, version_by_hand = run(False)
    assert pending == [(0,)] * 4 and pending_by_hand == [()] * 4
    assert version == version_by_hand == 4
    assert all(torch.equal(a, b) for a, b in zip(by_runtime, by_hand))
