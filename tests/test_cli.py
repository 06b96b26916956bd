"""What a new user hits on the command line: one-line errors (exit status 2, no traceback, no file
touched), simulate on a one-rank trace, help texts, and a ``flexmoe --help`` that imports no torch."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexmoe.cli import build_parser, main
from flexmoe.sim import RoutingTrace

SMALL_COST = ["--d-model", "64", "--d-ff", "32"]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(capsys, root: Path, argv: list[str], match: str) -> str:
    """Run ``flexmoe argv``: exit status 2, one stderr line naming the command and ``match``, no
    traceback, nothing on stdout, and no file under ``root`` created, changed or removed."""
    before = files_under(root)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flexmoe {argv[0]}: error: ") and match in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert files_under(root) == before
    return lines[0]


@pytest.fixture
def one_rank_trace(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    popularity_E = np.array([8.0, 4, 2, 1, 1, 1, 0.5, 0.5])
    counts_TLWE = rng.poisson(40 * popularity_E, size=(12, 2, 1, 8))
    counts_TLWE[3, 1, 0] = 0  # a step of one layer with no tokens at all
    counts_TLWE[4, 0, 0, 1:] = 0  # all tokens on one expert
    path = tmp_path / "trace.jsonl"
    RoutingTrace(counts_TLWE, np.arange(12)).save(path)
    return path


# ----- flexmoe simulate -----

def test_simulate_missing_file(tmp_path, capsys):
    assert_one_line_error(capsys, tmp_path, ["simulate", str(tmp_path / "nope.jsonl")], "does not exist")


@pytest.mark.parametrize("content, match", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00binary", "not a flexmoe trace"),
    (b"step,layer,counts\n0,0,1\n", "not a flexmoe trace"),
    (b"[1, 2, 3]\n", "not a flexmoe trace"),
    (b'{"flexmoe_trace": 1, "world_size": 1, "num_experts": "eight", "num_layers": 1}\n', "num_experts"),
    (b'{"flexmoe_trace": 1, "world_size": 1, "num_experts": 2, "num_layers": 1}\n{"step": 0}\n'
     b'{"step": 1, "layer": 0, "counts": [[1, 2]]}\n', "line 2"),
    (b'{"flexmoe_trace": 1, "world_size": 1, "num_experts": 2, "num_layers": 1}\n'
     b'{"step": 0, "layer": 0, "counts": [[1, 2, 3]]}\n{"step": 1, "layer": 0, "counts": [[1, 2]]}\n', "1 x 2"),
    (b'{"flexmoe_trace": 1, "world_size": 1, "num_experts": 2, "num_layers": 1}\n'
     b'{"step": 0, "layer": 0, "counts": [["a", 2]]}\n{"step": 1, "layer": 0, "counts": [[1, 2]]}\n', "integers"),
    (b"", "not a flexmoe trace"),
], ids=["binary", "csv", "json-list", "bad-header", "record-fields", "record-shape", "record-values", "empty"])
def test_simulate_file_that_is_not_a_trace(tmp_path, capsys, content, match):
    (tmp_path / "bad.jsonl").write_bytes(content)
    assert_one_line_error(capsys, tmp_path, ["simulate", str(tmp_path / "bad.jsonl"), "--json",
                                             str(tmp_path / "s.json")], match)


def test_simulate_trace_without_a_complete_step(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"flexmoe_trace": 1, "world_size": 1, "num_experts": 2, "num_layers": 2}\n'
                                      '{"step": 0, "layer": 0, "counts": [[1, 2]]}\n')
    assert_one_line_error(capsys, tmp_path, ["simulate", str(tmp_path / "t.jsonl")], "no complete step")


@pytest.mark.parametrize("planners", ["static,bogus", "greedy, Greedy", ","])
def test_simulate_unknown_planner(one_rank_trace, capsys, planners):
    line = assert_one_line_error(capsys, one_rank_trace.parent, ["simulate", str(one_rank_trace), "--planners",
                                                                 planners, "--json", "s.json"], "planner")
    assert "choose from static, shadow, eplb" in line


@pytest.mark.parametrize("argv, match", [
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--slots-per-rank", "1", "--world-size", "2"], "slots"),
])
def test_simulate_bad_numbers(one_rank_trace, capsys, argv, match):
    assert_one_line_error(capsys, one_rank_trace.parent, ["simulate", str(one_rank_trace), *argv, *SMALL_COST], match)


def test_simulate_world_size_that_fits_no_split(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    RoutingTrace(np.ones((2, 1, 2, 4)), np.arange(2)).save(path)
    assert_one_line_error(capsys, tmp_path, ["simulate", str(path), "--world-size", "3"],
                          "must divide the trace's 2 ranks or be a multiple")


def test_simulate_bad_synthetic_config(tmp_path, capsys):
    assert_one_line_error(capsys, tmp_path, ["simulate", "--synthetic", str(tmp_path / "t.jsonl"),
                                             "--num-experts", "4", "--top-k", "5"], "top_k")


def test_simulate_plot_without_matplotlib_fails_before_the_run(one_rank_trace, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert_one_line_error(capsys, one_rank_trace.parent,
                          ["simulate", str(one_rank_trace), "--world-size", "4", "--plot", "p.png",
                           "--json", str(one_rank_trace.parent / "s.json"), *SMALL_COST],
                          "pip install 'flexmoe[train]'")


def test_simulate_writes_json_before_plotting(one_rank_trace, capsys):
    summary = one_rank_trace.parent / "s.json"
    bad_png = one_rank_trace.parent / "missing-folder" / "p.png"
    assert main(["simulate", str(one_rank_trace), "--planners", "static,greedy", "--world-size", "2",
                 "--json", str(summary), "--plot", str(bad_png), *SMALL_COST]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert [r["planner"] for r in json.loads(summary.read_text())] == ["static", "greedy"]


def test_simulate_one_rank_trace_says_everything_is_even(one_rank_trace, capsys):
    assert main(["simulate", str(one_rank_trace), "--planners", "static,greedy", *SMALL_COST]) == 0
    out = capsys.readouterr().out
    assert "with 1 rank every planner has rank balance 1.00 and runs at 1.00x" in out
    assert "pass --world-size W" in out
    assert "| rank balance mean |" in out


def test_simulate_one_rank_trace_over_virtual_ranks(one_rank_trace, capsys, tmp_path):
    summary = tmp_path / "s.json"
    assert main(["simulate", str(one_rank_trace), "--planners", "static,oracle", "--world-size", "4",
                 "--json", str(summary), *SMALL_COST]) == 0
    out = capsys.readouterr().out
    assert "4 ranks" in out and "dealt round-robin to 4 virtual ranks" in out
    static, oracle = json.loads(summary.read_text())
    # 8 experts over 4 ranks with one hot expert: static EP is uneven, and replicas even it out
    assert static["balance_mean"] > 1.3
    assert oracle["balance_mean"] < static["balance_mean"]


@pytest.mark.parametrize("argv, policy", [
    (["--interval", "2", "--warmup", "1", "--no-guard"], dict(interval=2, warmup=1, guard=False)),
    (["--interval", "3", "--predictor", "window_max", "--predictor-window", "4", "--guard-gain", "0.1"],
     dict(interval=3, predictor=dict(kind="window_max", window=4), guard_gain=0.1)),
    (["--interval", "2", "--predictor", "ema", "--predictor-decay", "0.5", "--bytes-budget", "1e6"],
     dict(interval=2, predictor=dict(kind="ema", decay=0.5), bytes_budget=1e6)),
    (["--interval", "2", "--drift-gate", "0"], dict(interval=2, drift_gate=0.0)),
    (["--interval", "3", "--shed-window", "1"], dict(interval=3, shed_window=1)),
], ids=["no-guard", "window-max", "ema-budget", "drift-gate", "shed"])
def test_simulate_policy_flags_replay_that_replan_policy(one_rank_trace, tmp_path, capsys, argv, policy):
    from flexmoe.placement import CostModel, PredictorConfig, ReplanPolicy, make_planner
    from flexmoe.sim import read_trace, simulate
    from flexmoe.sim.trace import deal_to_ranks

    summary = tmp_path / "s.json"
    assert main(["simulate", str(one_rank_trace), "--planners", "static,greedy,eplb", "--world-size", "4",
                 "--json", str(summary), *argv, *SMALL_COST]) == 0
    out = capsys.readouterr().out
    assert "re-plan every" in out
    if "predictor" in policy:
        policy["predictor"] = PredictorConfig(**policy["predictor"])
    trace = read_trace(one_rank_trace)
    trace = RoutingTrace(deal_to_ranks(trace.counts_TLWE, 4), trace.steps_T, trace.meta)
    cost = CostModel.from_shape(64, 32, flops=764e12, mem_bw=3.0e12, a2a_bw=350e9)
    planners = [make_planner(n) for n in ("static", "greedy", "eplb")]
    want = [r.summary() for r in simulate(trace, planners, cost, 4, 4, ReplanPolicy(**policy))]
    default = [r.summary() for r in simulate(trace, planners, cost, 4, 4)]
    assert json.loads(summary.read_text()) == pytest.approx(want)
    assert want != default  # the flags change the replay, so ignoring them would fail here
    if "shed_window" in policy:  # the shed reached the policy (on this short trace it drops nothing)
        assert f"shedding on the last {policy['shed_window']} steps" in out


@pytest.mark.parametrize("argv, match", [
    (["--interval", "0"], "--interval must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--predictor", "trend", "--predictor-window", "0"], "PredictorConfig.window"),
    (["--guard-gain", "1.5"], "guard_gain"),
    (["--bytes-budget", "-1"], "bytes_budget"),
    (["--drift-gate", "1"], "drift_gate"),
    (["--shed-window", "0"], "shed_window"),
])
def test_simulate_bad_policy_flags(one_rank_trace, capsys, argv, match):
    assert_one_line_error(capsys, one_rank_trace.parent, ["simulate", str(one_rank_trace), "--json", "s.json",
                                                          *argv, *SMALL_COST], match)


def test_deal_to_ranks_matches_dealing_rows_one_by_one():
    from flexmoe.sim.trace import deal_to_ranks

    rng = np.random.default_rng(1)
    for W, k in ((1, 8), (2, 3), (3, 1), (1, 5)):
        counts_TLWE = rng.integers(0, 9, size=(3, 2, W, 6))
        counts_TLWE[0, 0, 0] = 0
        counts_TLWE[1, 1, 0, 1:] = 0
        dealt_TLWE = deal_to_ranks(counts_TLWE, W * k)
        for t, layer, w in np.ndindex(3, 2, W):
            rows = np.repeat(np.arange(6), counts_TLWE[t, layer, w])  # the rank's rows, ordered by expert
            for j in range(k):
                want_E = np.bincount(rows[j::k], minlength=6)
                np.testing.assert_array_equal(dealt_TLWE[t, layer, w * k + j], want_E)
    with pytest.raises(ValueError, match="multiple"):
        deal_to_ranks(np.ones((1, 1, 2, 3)), 3)


# ----- flexmoe train -----

@pytest.mark.parametrize("device", ["foo", "cuda:x", "cpu:1", "meta"])
def test_train_bad_device(tmp_path, capsys, device):
    assert_one_line_error(capsys, tmp_path, ["train", "--device", device, "--run-dir", str(tmp_path / "run")],
                          "TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_device_without_cuda(tmp_path, capsys):
    assert_one_line_error(capsys, tmp_path, ["train", "--device", "cuda", "--run-dir", str(tmp_path / "run")],
                          "CUDA is not available")


# ----- flexmoe plot -----

def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 5.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_one_line_error(capsys, tmp_path, ["plot", str(tmp_path)], "pip install 'flexmoe[train]'")


# ----- help -----

def _options(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.option_strings[-1] if a.option_strings else a.dest: a for a in sub._actions
            if not isinstance(a, argparse._HelpAction)}


@pytest.mark.parametrize("command", ["train", "simulate", "plot"])
def test_every_help_entry_says_what_it_means_and_its_default(command):
    for flag, action in _options(build_parser([command]), command).items():
        text = action.help or ""
        assert len(text.split()) >= 3 and not re.match(r"\w+Config\.\w+", text), (flag, text)
        flag_like = isinstance(action, (argparse._StoreTrueAction,)) or not action.option_strings
        assert flag_like or "default" in text, (flag, text)


def test_train_help_comes_from_the_config_docs():
    options = _options(build_parser(["train"]), "train")
    assert options["--dts-top-k"].help != options["--top-k"].help
    assert "sparse" in options["--dts-top-k"].help and "--top-k" in options["--dts-top-k"].help
    assert "peak learning rate" in options["--lr"].help and "tiny: 0.003" in options["--lr"].help
    assert "bfloat16 autocast" in options["--precision"].help


def test_top_level_help_imports_no_torch():
    code = ("import sys\nfrom flexmoe.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'flexmoe.train.cli', 'flexmoe.sim.cli') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "simulate" in out.stdout and "plot" in out.stdout
    assert "heavy: []" in out.stdout
