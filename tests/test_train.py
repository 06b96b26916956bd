"""``flexmoe train`` and ``flexmoe plot`` end to end on CPU: learning, exact resume, errors."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from flexmoe.cli import main
from flexmoe.sim.trace import read_trace
from flexmoe.train.checkpoint import list_checkpoints, read_checkpoint
from flexmoe.train.metrics import last_per_step, read_metrics
from flexmoe.train.session import summary_line

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--num-experts", "4",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "3", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small folder of real text: a few standard-library modules."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "this.py", "glob.py", "shlex.py",
                 "textwrap.py"):
        (root / name).write_bytes((stdlib / name).read_bytes())
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("plain text in a sub-folder\n" * 20)
    return root


def train(*args) -> int:
    return main(["train", *map(str, args)])


def losses(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    out = {("train", r["step"]): r["loss"] for r in last_per_step(records, "train")}
    out.update({("val", r["step"]): r["val_loss"] for r in last_per_step(records, "val")})
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory) -> Path:
    """A small model trained on the default corpus (the standard library)."""
    run_dir = tmp_path_factory.mktemp("runs") / "stdlib"
    args = [a for a in TINY if a != "--quiet"]
    rc = train("--run-dir", run_dir, *args, "--seq-len", "64", "--batch-size", "8", "--steps", "60",
               "--eval-every", "30", "--checkpoint-every", "30", "--quiet")
    assert rc == 0
    return run_dir


def test_training_on_the_standard_library_learns(stdlib_run, capsys):
    records = read_metrics(stdlib_run)
    val = last_per_step(records, "val")
    train_loss = [r["lm_loss"] for r in last_per_step(records, "train")]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0, val
    assert sum(train_loss[-10:]) / 10 < sum(train_loss[:10]) / 10 - 1.0
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["finished"] and summary["step"] == 60
    losses = [r["loss"] for r in last_per_step(records, "train")]
    assert summary["train_loss_window"] == 10
    assert summary["train_loss_first"] == pytest.approx(sum(losses[:10]) / 10)
    assert summary["train_loss_last"] == pytest.approx(sum(losses[-10:]) / 10)
    assert "(means of the first / last 10 steps)" in summary_line({**summary, "run_dir": str(stdlib_run)})
    config = json.loads((stdlib_run / "config.json").read_text())
    assert config["corpus"]["train_files"] > 500 and config["corpus"]["val_files"] > 10
    trace = read_trace(stdlib_run / "routing_trace.jsonl")
    assert trace.counts_TLWE.shape == (60, 2, 1, 4)
    assert (trace.counts_TLWE.sum(axis=-1) == 8 * 64 * 2).all()  # every token goes to top-2 experts
    assert all(r["experts_per_token"] == 2.0 for r in last_per_step(records, "train"))
    assert all(-1 <= r["expert_weight_cos"] <= 1 and len(r["expert_output_cos_per_layer"]) == 2 for r in val)
    assert [p.name for p in list_checkpoints(stdlib_run)] == ["step_0000030", "step_0000060"]


def test_plot_writes_pngs(stdlib_run, capsys):
    assert main(["plot", str(stdlib_run)]) == 0
    for name in ("loss.png", "balance.png", "expert_load.png", "similarity.png", "active_experts.png"):
        png = stdlib_run / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    assert main(["plot", str(stdlib_run / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_simulate_replays_the_runs_one_rank_trace_over_virtual_ranks(stdlib_run, capsys, tmp_path):
    trace = str(stdlib_run / "routing_trace.jsonl")
    small = ["--planners", "static,oracle", "--d-model", "64", "--d-ff", "32"]
    assert main(["simulate", trace, *small]) == 0
    assert "pass --world-size W" in capsys.readouterr().out
    summary = tmp_path / "s.json"
    assert main(["simulate", trace, "--world-size", "2", "--json", str(summary), *small]) == 0
    assert "dealt round-robin to 2 virtual ranks" in capsys.readouterr().out
    static, _ = json.loads(summary.read_text())
    assert static["planner"] == "static" and static["balance_mean"] > 1.0  # 2 ranks of 2 experts: uneven


@pytest.mark.parametrize("router", ["softmax", "dts", "omoe"])
def test_kill_and_resume_equals_uninterrupted(corpus, tmp_path, router):
    """Stop after step 7 (as a kill after the checkpoint would), resume to 14: identical losses."""
    gate = {"softmax": ["--router", "softmax", "--bias-update-rate", "0.01", "--z-loss-coef", "0.001"],
            "dts": ["--router", "dts", "--dts-anneal-steps", "8", "--dts-sparse-step", "10", "--dts-tau-min", "0.2"],
            "omoe": ["--omoe", "--omoe-accumulate-steps", "2", "--omoe-orthogonal-steps", "3"]}[router]
    common = ["--data", corpus, *TINY, *gate, "--steps", "14", "--eval-every", "5"]
    assert train("--run-dir", tmp_path / "full", *common, "--checkpoint-every", "100") == 0
    assert train("--run-dir", tmp_path / "split", *common, "--checkpoint-every", "7", "--stop-at", "9") == 0
    # The run "died" after step 9; its last checkpoint is step 7. Resume continues from there.
    (tmp_path / "split" / "checkpoints" / "latest").write_text("step_0000007\n")
    assert train("--run-dir", tmp_path / "split", "--resume", "--quiet") == 0
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(full) == 14 + 4 and full == split  # bit-exact floats
    a, _, _ = read_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000014")
    b, _, _ = read_checkpoint(tmp_path / "split" / "checkpoints" / "step_0000014")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trace = read_trace(tmp_path / "split" / "routing_trace.jsonl")
    assert list(trace.steps_T) == list(range(14))
    assert (trace.counts_TLWE == read_trace(tmp_path / "full" / "routing_trace.jsonl").counts_TLWE).all()


@pytest.mark.parametrize("make", ["missing", "empty_folder", "empty_file", "blank_files"])
def test_bad_data_path_is_a_clear_error_and_writes_nothing(tmp_path, capsys, make):
    data = tmp_path / "data"
    if make == "empty_folder":
        data.mkdir()
    elif make == "empty_file":
        data.write_text("")
    elif make == "blank_files":
        data.mkdir()
        (data / "a.txt").write_text("\n\n  \n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert train("--run-dir", run_dir, "--data", data, *TINY, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "error" in err and str(data) in err and ("does not exist" in err or "no non-empty text" in err)
    assert snapshot(tmp_path) == before


@pytest.fixture
def finished_run(corpus, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "4", "--checkpoint-every", "2",
                 "--eval-every", "4", "--stop-at", "4") == 0
    return run_dir


@pytest.mark.parametrize("damage", ["state_bytes", "weights_truncated", "manifest_missing"])
def test_corrupt_checkpoint_is_a_clear_error_and_changes_nothing(finished_run, capsys, damage):
    ckpt = finished_run / "checkpoints" / "step_0000004"
    if damage == "state_bytes":
        data = bytearray((ckpt / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / "state.pt").write_bytes(bytes(data))
    elif damage == "weights_truncated":
        (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    else:
        (ckpt / "manifest.json").unlink()
    before = snapshot(finished_run)
    assert train("--run-dir", finished_run, "--resume", "--steps", "8", "--quiet") == 2
    err = capsys.readouterr().err
    assert "step_0000004" in err and ("corrupt" in err or "incomplete" in err)
    assert snapshot(finished_run) == before


def test_checkpoint_of_another_model_shape_is_a_clear_error(finished_run, corpus, tmp_path, capsys):
    before = snapshot(finished_run)
    assert train("--run-dir", finished_run, "--resume", "--num-experts", "8", "--steps", "8", "--quiet") == 2
    err = capsys.readouterr().err  # refused before any tensor is compared (a checkpoint's own shape: test_train_cli)
    assert "another model shape" in err and "--num-experts cannot change (run 4, given 8)" in err
    assert train("--run-dir", tmp_path / "moe", "--data", corpus, *TINY, "--steps", "2",
                 "--init-from-dense", finished_run) == 2
    assert "num_experts=4" in capsys.readouterr().err
    assert snapshot(finished_run) == before and not (tmp_path / "moe").exists()
    assert train("--run-dir", finished_run, "--data", corpus, *TINY, "--steps", "2") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_expert_diversify_from_a_dense_model(corpus, tmp_path, capsys):
    dense_args = [a if a != "4" or i != TINY.index("--num-experts") + 1 else "1" for i, a in enumerate(TINY)]
    dense = tmp_path / "dense"
    assert train("--run-dir", dense, "--data", corpus, *dense_args, "--steps", "3", "--eval-every", "3") == 0
    dense_w, _, _ = read_checkpoint(dense / "checkpoints" / "step_0000003")
    assert "blocks.0.ffn.gate_up_proj" in dense_w
    moe = tmp_path / "moe"
    assert train("--run-dir", moe, "--data", corpus, *TINY, "--steps", "1", "--eval-every", "1",
                 "--lr", "1e-9", "--min-lr", "0", "--init-from-dense", dense, "--diversify-noise", "0.05") == 0
    moe_w, _, _ = read_checkpoint(moe / "checkpoints" / "step_0000001")
    for block in (0, 1):
        for leaf in ("gate_up_proj", "down_proj"):
            w = dense_w[f"blocks.{block}.ffn.{leaf}"]
            experts = moe_w[f"blocks.{block}.ffn.experts.{leaf}"]
            assert experts.shape == (4, *w.shape)
            spread = (experts - w).std(dim=tuple(range(1, experts.dim()))) / w.std()
            assert ((spread > 0.04) & (spread < 0.06)).all(), spread
            assert not torch.equal(experts[0], experts[1])
    torch.testing.assert_close(moe_w["blocks.1.attn.qkv.weight"], dense_w["blocks.1.attn.qkv.weight"],
                               rtol=0, atol=1e-6)
    bad = tmp_path / "bad"
    assert train("--run-dir", bad, "--data", corpus, *TINY, "--d-model", "16", "--steps", "1",
                 "--init-from-dense", dense) == 2
    assert "another model shape" in capsys.readouterr().err and not bad.exists()
    assert train("--run-dir", bad, "--data", corpus, *TINY, "--steps", "1", "--init-from-dense", dense,
                 "--diversify-mask", "1.0") == 2
    assert "DiversifyConfig.mask" in capsys.readouterr().err and not bad.exists()
    for mode, flags in (("upcycle", ["--diversify-noise", "0"]),
                        ("mask", ["--diversify-noise", "0", "--diversify-mask", "0.3"])):
        run = tmp_path / mode
        assert train("--run-dir", run, "--data", corpus, *TINY, "--steps", "1", "--eval-every", "1", "--lr", "1e-9",
                     "--min-lr", "0", "--init-from-dense", dense, *flags) == 0
        spawned, _, _ = read_checkpoint(run / "checkpoints" / "step_0000001")
        w = dense_w["blocks.0.ffn.down_proj"]
        experts = spawned["blocks.0.ffn.experts.down_proj"]
        if mode == "upcycle":  # every expert a copy of the dense FFN (up to the 1e-9 learning rate)
            torch.testing.assert_close(experts, w.expand_as(experts), rtol=0, atol=1e-6)
        else:  # about 30 % of each expert zeroed, the rest copied, and differently per expert
            zeroed = (experts.abs() < 1e-6).float().mean(dim=(1, 2))
            assert ((zeroed > 0.25) & (zeroed < 0.35)).all(), zeroed
            kept = experts.abs() >= 1e-6
            torch.testing.assert_close(experts[kept], w.expand_as(experts)[kept], rtol=0, atol=1e-6)
            assert not torch.equal(kept[0], kept[1])


def test_bpe_tokenizer_trains_and_resumes(corpus, tmp_path):
    run_dir = tmp_path / "bpe"
    args = ["--data", corpus, *TINY, "--tokenizer", "bpe", "--bpe-vocab-size", "400", "--steps", "4",
            "--eval-every", "2", "--checkpoint-every", "2"]
    assert train("--run-dir", run_dir, *args, "--stop-at", "2") == 0
    tok = json.loads((run_dir / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 400
    assert train("--run-dir", run_dir, "--resume", "--quiet") == 0
    assert (run_dir / "tokens_cache.npz").exists()
    assert json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"] == 400
    assert read_metrics(run_dir)[-1]["finished"]


def test_whole_evomoe_path_in_one_command(corpus, tmp_path, capsys):
    """--dense-phase-steps: dense stage in RUN/dense, experts spawned from it, then the DTS gate."""
    run = tmp_path / "evo"
    args = ["--run-dir", run, "--data", corpus, *TINY, "--router", "dts", "--top-k", "1", "--dts-anneal-steps", "2",
            "--dts-sparse-step", "3", "--dts-sparse-gate", "gumbel_top1", "--dts-balance", "masked",
            "--diversify-noise", "0", "--diversify-mask", "0.3", "--eval-every", "2"]
    assert train(*args, "--steps", "4", "--dense-phase-steps", "3") == 0
    dense_w, _, _ = read_checkpoint(run / "dense" / "checkpoints" / "step_0000003")
    assert json.loads((run / "dense" / "config.json").read_text())["model"]["num_experts"] == 1
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["num_experts"] == 4 and config["router"] == "dts" and config["dts"]["sparse_gate"] == "gumbel_top1"
    train_records = last_per_step(read_metrics(run), "train")
    assert [r["experts_per_token"] for r in train_records][3] == 1.0  # Gumbel top-1 after the switch
    val = last_per_step(read_metrics(run), "val")
    # step 0 of the MoE stage: experts are masked copies of the dense FFN, so close to it
    assert val[0]["expert_weight_cos"] > 0.5
    assert val[0]["val_loss"] < last_per_step(read_metrics(run / "dense"), "val")[0]["val_loss"]
    assert train(*args, "--steps", "4", "--dense-phase-steps", "3", "--resume") == 2
    assert "does not take --resume" in capsys.readouterr().err


def test_evomoe_path_continues_a_stopped_dense_stage(corpus, tmp_path):
    """A dense stage that died after its checkpoint is resumed, not restarted, by the same command."""
    run = tmp_path / "evo"
    moe_args = ["--data", corpus, *TINY, "--router", "dts", "--dts-anneal-steps", "2", "--eval-every", "2"]
    dense_args = [a if a != "4" or i != TINY.index("--num-experts") + 1 else "1" for i, a in enumerate(TINY)]
    assert train("--run-dir", run / "dense", "--data", corpus, *dense_args, "--top-k", "1", "--router", "softmax",
                 "--eval-every", "2", "--steps", "4", "--stop-at", "2") == 0
    assert train("--run-dir", run, *moe_args, "--steps", "2", "--dense-phase-steps", "4") == 0
    dense = last_per_step(read_metrics(run / "dense"), "train")
    assert [r["step"] for r in dense] == [1, 2, 3, 4]
    assert read_metrics(run / "dense")[-1]["finished"]
    assert last_per_step(read_metrics(run), "train")[-1]["step"] == 2
