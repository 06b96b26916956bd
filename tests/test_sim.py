"""Routing traces (record, append, read), the synthetic generator, the simulator and `flexmoe simulate`.

Legend: T steps, L layers, W ranks, E experts.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import numpy as np
import pytest

from flexmoe.cli import main
from flexmoe.placement import CostModel, PlacementTable, make_planner
from flexmoe.sim import RoutingTrace, SyntheticTraceConfig, TraceRecorder, generate_trace, read_trace, simulate
from flexmoe.sim.simulator import format_table, merge_ranks
from flexmoe.sim.trace import TraceError
from flexmoe.sim.synthetic import inclusion_probabilities

COST = CostModel.from_shape(64, 32, flops=1e12, mem_bw=1e11, a2a_bw=1e10)


def test_trace_roundtrip_append_and_truncation(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.jsonl"
    counts = rng.integers(0, 50, size=(5, 2, 3, 4))
    with TraceRecorder(path, 3, 4, 2, meta={"run": "x"}) as rec:
        for t in range(3):
            for layer in range(2):
                rec.record(10 + t, layer, counts[t, layer])
    with TraceRecorder(path, 3, 4, 2) as rec:
        for t in range(3, 5):
            for layer in range(2):
                rec.record(10 + t, layer, counts[t, layer])
    trace = read_trace(path)
    np.testing.assert_array_equal(trace.counts_TLWE, counts)
    np.testing.assert_array_equal(trace.steps_T, np.arange(10, 15))
    assert trace.meta == {"run": "x"}

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 15, "layer": 0, "counts": counts[0, 0].tolist()}) + "\n")
        f.write('{"step": 15, "layer": 1, "coun')
    trace = read_trace(path)
    assert trace.num_steps == 5
    with TraceRecorder(path, 3, 4, 2) as rec:
        rec.record(15, 1, counts[1, 1])
    trace = read_trace(path)
    assert trace.num_steps == 6
    np.testing.assert_array_equal(trace.counts_TLWE[5], np.stack([counts[0, 0], counts[1, 1]]))


def test_gzipped_traces_read_like_plain_ones(tmp_path):
    """Committed traces are compressed: read_trace (and so `flexmoe simulate --trace`) takes them."""
    counts = np.random.default_rng(1).integers(0, 50, size=(4, 2, 3, 4))
    path = tmp_path / "t.jsonl"
    with TraceRecorder(path, 3, 4, 2) as rec:
        for t in range(4):
            for layer in range(2):
                rec.record(t, layer, counts[t, layer])
    packed = tmp_path / "t.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(read_trace(packed).counts_TLWE, counts)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(path.read_bytes())  # not gzip data
    with pytest.raises(TraceError, match="not a flexmoe trace"):
        read_trace(broken)


def test_trace_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    with TraceRecorder(path, 2, 3, 1) as rec:
        with pytest.raises(ValueError, match="counts_WE"):
            rec.record(0, 0, np.zeros((3, 3)))
        with pytest.raises(ValueError, match="layer"):
            rec.record(0, 1, np.zeros((2, 3)))
        with pytest.raises(ValueError, match="non-negative integers"):
            rec.record(0, 0, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="num_experts"):
        TraceRecorder(path, 2, 4, 1)
    with pytest.raises(ValueError, match="world_size"):
        TraceRecorder(tmp_path / "u.jsonl", 0, 4, 1)
    (tmp_path / "bad.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a flexmoe trace"):
        read_trace(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="4-d"):
        RoutingTrace(np.zeros((2, 3)), np.arange(2))


def test_save_and_read_synthetic(tmp_path):
    trace = generate_trace(SyntheticTraceConfig(num_steps=4, num_layers=2, world_size=2, num_experts=6,
                                                tokens_per_rank=64, top_k=2))
    trace.save(tmp_path / "s.jsonl")
    again = read_trace(tmp_path / "s.jsonl")
    np.testing.assert_array_equal(again.counts_TLWE, trace.counts_TLWE)
    assert again.meta["synthetic"]["num_experts"] == 6


def test_inclusion_probabilities():
    rng = np.random.default_rng(1)
    for _ in range(100):
        E = int(rng.integers(1, 40))
        k = int(rng.integers(1, E + 1))
        p = rng.random(E) ** rng.uniform(0, 6) + 1e-12
        pi = inclusion_probabilities(p / p.sum(), k)
        assert pi.sum() == pytest.approx(k)
        assert (pi <= 1 + 1e-12).all() and (pi >= 0).all()
        order = np.argsort(p)
        assert (np.diff(pi[order]) >= -1e-12).all()
        uncapped = pi < 1 - 1e-12
        if uncapped.sum() > 1:
            ratio = pi[uncapped] / p[uncapped]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    np.testing.assert_allclose(inclusion_probabilities(np.full(8, 1 / 8), 2), 0.25)


def test_synthetic_trace_properties():
    config = SyntheticTraceConfig(num_steps=200, num_layers=2, world_size=4, num_experts=32,
                                  tokens_per_rank=1024, top_k=4, alpha=1.0, drift=0.01, seed=3)
    a, b = generate_trace(config), generate_trace(config)
    np.testing.assert_array_equal(a.counts_TLWE, b.counts_TLWE)
    assert a.counts_TLWE.shape == (200, 2, 4, 32)
    assert (a.counts_TLWE <= 1024).all()
    per_rank = a.counts_TLWE.sum(-1)
    assert abs(per_rank.mean() / (1024 * 4) - 1) < 0.01
    load = a.counts_TLWE.sum(2).astype(float)
    shares = np.sort(load / load.sum(-1, keepdims=True), axis=-1)[..., ::-1].mean((0, 1))
    assert shares[0] > 5 * shares[-1]
    assert (np.argmax(load[:, 0], -1) != np.argmax(load[0, 0])).any()
    uniform = generate_trace(dataclasses.replace(config, alpha=0.0, step_noise=0.0, rank_skew=0.0))
    u_load = uniform.counts_TLWE.sum((0, 2)).astype(float)
    assert u_load.max() / u_load.mean() < 1.05
    with pytest.raises(ValueError, match="top_k"):
        SyntheticTraceConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="drift"):
        SyntheticTraceConfig(drift=2.0)


def test_simulator_bookkeeping():
    trace = generate_trace(SyntheticTraceConfig(num_steps=40, num_layers=2, world_size=4, num_experts=16,
                                                tokens_per_rank=2048, top_k=2, seed=4))
    names = ["static", "shadow", "eplb", "proportional", "greedy", "oracle"]
    results = simulate(trace, [make_planner(n) for n in names], COST, slots_per_rank=6)
    by = {r.name: r for r in results}
    static = by["static"]
    assert static.replans == 0 and static.bytes_moved == 0 and static.share_updates == 0
    for r in results:
        assert r.balance_TL.shape == (40, 2) and r.time_T.shape == (40,)
        np.testing.assert_allclose(r.time_T, r.compute_T + r.a2a_T + r.sync_T + r.move_T)
        assert (r.balance_TL >= 1 - 1e-12).all()
    assert by["oracle"].balance_TL.mean() < static.balance_TL.mean()
    assert by["greedy"].time_T.mean() < static.time_T.mean()
    table = format_table(results)
    assert table.count("\n") == len(results) + 1 and "| greedy |" in table

    table0 = PlacementTable.static(16, 4, 6)
    expected = sum(COST.step_time(table0, trace.counts_TLWE[0, layer]).total for layer in range(2))
    assert static.time_T[0] == pytest.approx(expected)


def test_on_step_sees_the_tables_each_step_is_charged_with():
    """The hook gets every step's tables and true counts: their modelled compute is the result's."""
    trace = generate_trace(SyntheticTraceConfig(num_steps=30, num_layers=2, world_size=4, num_experts=16,
                                                tokens_per_rank=2048, top_k=2, seed=5))
    seen = []
    results = simulate(trace, [make_planner("static"), make_planner("greedy")], COST, slots_per_rank=6,
                       on_step=lambda name, t, tables, counts: seen.append((name, t, tables, counts.copy())))
    assert [(n, t) for n, t, _, _ in seen] == [(n, t) for n in ("static", "greedy") for t in range(30)]
    for r in results:
        mine = [(tables, counts) for n, _, tables, counts in seen if n == r.name]
        compute_T = [sum(COST.step_time(tb, c).compute for tb, c in zip(tables, counts)) for tables, counts in mine]
        np.testing.assert_allclose(compute_T, r.compute_T)
        assert all(np.array_equal(c, trace.counts_TLWE[t]) for t, (_, c) in enumerate(mine))
    greedy_tables = [tables for n, _, tables, _ in seen if n == "greedy"]
    assert any(not np.array_equal(tb[0].slot_expert_WS, greedy_tables[0][0].slot_expert_WS) for tb in greedy_tables)


def test_merge_ranks():
    counts = np.arange(2 * 1 * 4 * 3).reshape(2, 1, 4, 3)
    merged = merge_ranks(counts, 2)
    np.testing.assert_array_equal(merged[:, :, 0], counts[:, :, 0] + counts[:, :, 1])
    with pytest.raises(ValueError, match="divide"):
        merge_ranks(counts, 3)


def test_cli_generate_simulate_and_plot(tmp_path, capsys):
    trace_path, png, summary = tmp_path / "t.jsonl", tmp_path / "b.png", tmp_path / "s.json"
    common = ["--num-steps", "30", "--trace-world-size", "4", "--num-experts", "8", "--tokens-per-rank", "256",
              "--top-k", "2", "--d-model", "64", "--d-ff", "32"]
    assert main(["simulate", str(trace_path), "--synthetic", "--generate-only", *common]) == 0
    assert read_trace(trace_path).num_steps == 30
    assert main(["simulate", str(trace_path), "--planners", "static,greedy,oracle", "--world-size", "2",
                 "--plot", str(png), "--json", str(summary), "--d-model", "64", "--d-ff", "32"]) == 0
    out = capsys.readouterr().out
    assert "| static |" in out and "| greedy |" in out and "| oracle |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(summary.read_text())
    assert [r["planner"] for r in rows] == ["static", "greedy", "oracle"]
    assert main(["simulate", "--synthetic", "--planners", "static", "--steps", "5", *common]) == 0
    assert main(["simulate"]) == 2
    assert math.isfinite(rows[1]["step_ms"])


def test_cli_cost_flags_reach_the_cost_model(monkeypatch, capsys):
    """--sync-overlap and --fixed-split build the cost model the simulation runs with; an
    out-of-range overlap is a one-line error (exit 2)."""
    from flexmoe.sim import cli as sim_cli

    seen = []
    real = sim_cli._cost
    common = ["--synthetic", "--planners", "static", "--steps", "3", "--num-steps", "5", "--trace-world-size", "2",
              "--num-experts", "4", "--tokens-per-rank", "64", "--top-k", "2", "--d-model", "16", "--d-ff", "8"]
    monkeypatch.setattr(sim_cli, "_cost", lambda args: seen.append(real(args)) or seen[-1])
    assert main(["simulate", *common]) == 0
    assert main(["simulate", *common, "--sync-overlap", "0.5", "--fixed-split"]) == 0
    assert (seen[0].sync_overlap, seen[0].adaptive_split) == (0.0, True)
    assert (seen[1].sync_overlap, seen[1].adaptive_split) == (0.5, False)
    capsys.readouterr()
    assert main(["simulate", *common, "--sync-overlap", "1.5"]) == 2
    assert "sync_overlap must be in [0, 1]" in capsys.readouterr().err
