"""``flexmoe train`` faults: changed options on resume, divergence, full disk, kills during a
checkpoint, corrupt checkpoint files. Every error is exit status 2 and one line saying what to do,
with no traceback, and leaves the run folder as it was (or, where a write failed, as it was before)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexmoe.train.checkpoint as ckpt_mod
import flexmoe.train.loop as loop_mod
from flexmoe.train.checkpoint import list_checkpoints, read_checkpoint
from flexmoe.train.metrics import MetricsLog, last_per_step, read_metrics
from test_train import TINY, corpus, snapshot, train  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr: exactly one ``flexmoe train: error:`` line holding every needle."""
    err = capsys.readouterr().err
    assert err.startswith("flexmoe train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """A run of 6 steps stopped after step 4: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "6", "--checkpoint-every", "2",
                 "--eval-every", "2", "--keep-checkpoints", "3", "--stop-at", "4") == 0
    return run_dir


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of ``base_run``."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def rewrite_manifest(folder: Path) -> None:
    """Make manifest.json match the (tampered) files, so the damage is past the checksum."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ---- options on --resume -----------------------------------------------------------------------
def test_resume_refuses_changed_options_naming_both_values(run, capsys):
    before = snapshot(run)
    assert train("--run-dir", run, "--resume", "--lr", "0.01", "--steps", "8", "--quiet") == 2
    one_line_error(capsys, "--lr 0.003 -> 0.01", "--steps 6 -> 8", "--override steps,lr")
    assert train("--run-dir", run, "--resume", "--lr", "0.01", "--override", "steps", "--quiet") == 2
    one_line_error(capsys, "--lr 0.003 -> 0.01", "--override lr")
    assert snapshot(run) == before


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "1"], "--top-k cannot change (run 2, given 1)"),
    (["--seq-len", "64"], "--seq-len cannot change (run 32, given 64)"),
    (["--tokenizer", "bpe"], "--tokenizer cannot change (run 'byte', given 'bpe')"),
    (["--top-k", "1", "--override", "top-k"], "--override top-k: --top-k cannot change on a resume"),
    (["--seed", "3", "--override", "seed,lr"], "--seed cannot change on a resume"),
    (["--override", "nonsense"], "'nonsense' is not an option"),
])
def test_resume_refuses_model_and_data_changes_even_with_override(run, capsys, args, needle):
    before = snapshot(run)
    assert train("--run-dir", run, "--resume", *args, "--quiet") == 2
    one_line_error(capsys, needle)
    assert snapshot(run) == before


def test_override_allows_a_change_and_records_it(run, capsys):
    assert train("--run-dir", run, "--resume", "--lr", "0.01", "--min-lr", "0.001", "--steps", "8",
                 "--override", "lr,min_lr,--steps", "--quiet") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 0.01 and config["train"]["steps"] == 8 and config["preset"] == "tiny"
    [entry] = config["resumes"]
    assert entry["step"] == 4 and entry["checkpoint"].endswith("step_0000004")
    assert entry["changed"] == {"lr": [0.003, 0.01], "min-lr": [0.0003, 0.001], "steps": [6, 8]}
    _, _, state = read_checkpoint(run / "checkpoints" / "step_0000008")
    assert state["train_config"]["lr"] == 0.01
    lrs = {r["step"]: r["lr"] for r in last_per_step(read_metrics(run), "train")}
    assert sorted(lrs) == list(range(1, 9)) and max(lrs[s] for s in (5, 6, 7, 8)) > 0.003
    # A later resume with no change adds a record of its own, and the first one stays.
    assert train("--run-dir", run, "--resume", "--steps", "10", "--override", "steps", "--quiet") == 0
    resumes = json.loads((run / "config.json").read_text())["resumes"]
    assert resumes[0] == entry and resumes[1]["changed"] == {"steps": [8, 10]}


def test_resuming_a_finished_run_is_refused_and_keeps_its_summary(corpus, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "done"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "2", "--eval-every", "2") == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    assert train("--run-dir", run_dir, "--resume", "--quiet") == 2
    one_line_error(capsys, "finished at step 2", "--override steps")
    assert snapshot(run_dir) == before
    # Killed after its last checkpoint but before its summary record: the resume writes that record.
    records = read_metrics(run_dir)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    assert train("--run-dir", run_dir, "--resume", "--quiet") == 0
    assert read_metrics(run_dir) == records[:-1] + [{**records[-1], "elapsed_s": read_metrics(run_dir)[-1]["elapsed_s"]}]


def test_override_without_resume_is_an_error(corpus, tmp_path, capsys):  # noqa: F811
    assert train("--run-dir", tmp_path / "new", "--data", corpus, *TINY, "--override", "lr") == 2
    one_line_error(capsys, "--override only applies with --resume")
    assert not (tmp_path / "new").exists()


# ---- divergence --------------------------------------------------------------------------------
def poison_loss(monkeypatch, steps: set[int]) -> None:
    """The loss of these (1-based) steps is NaN, as a diverging model's would be."""
    forward = loop_mod.Trainer._forward_loss

    def nan_at(self, x_BS, y_BS):
        loss = forward(self, x_BS, y_BS)
        return loss * float("nan") if self.model.training and self.step + 1 in steps else loss
    monkeypatch.setattr(loop_mod.Trainer, "_forward_loss", nan_at)


def poison_grad(monkeypatch, step: int) -> None:
    """A finite loss but an inf gradient in one weight at (1-based) ``step``."""
    from flexmoe.runtime import MoERuntime

    sync = MoERuntime.after_backward
    calls = []

    def inf_grad(self):
        sync(self)
        calls.append(1)
        if len(calls) == step:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    monkeypatch.setattr(MoERuntime, "after_backward", inf_grad)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_nonfinite_step_stops_naming_it_and_no_checkpoint_is_written(corpus, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                                      poison):
    if poison == "loss":
        poison_loss(monkeypatch, {5})
    else:
        poison_grad(monkeypatch, 5)
    run_dir = tmp_path / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "8", "--checkpoint-every", "2",
                 "--keep-checkpoints", "1", "--eval-every", "8") == 2
    one_line_error(capsys, "step 5: ", "loss is non-finite" if poison == "loss" else "gradients are non-finite",
                   "newest checkpoint, step_0000004", "--override lr")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert read_metrics(run_dir)[-1]["stopped"].startswith("step 5: ")
    monkeypatch.undo()
    assert train("--run-dir", run_dir, "--resume", "--quiet") == 0
    assert read_metrics(run_dir)[-1]["finished"]


def test_a_real_divergence_keeps_only_finite_checkpoints(corpus, tmp_path, capsys):  # noqa: F811
    """--lr 50 without clipping: NaN after some 20 steps; the old code then pruned every finite checkpoint."""
    run_dir = tmp_path / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "60", "--checkpoint-every", "5",
                 "--eval-every", "60", "--lr", "50", "--min-lr", "0", "--grad-clip", "0") == 2
    one_line_error(capsys, "non-finite", "training stopped before the update")
    kept = list_checkpoints(run_dir)
    assert kept and all(read_checkpoint(p) for p in kept)  # read_checkpoint refuses non-finite values


def test_skip_mode_drops_the_update_and_trains_on(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    poison_loss(monkeypatch, {4, 6})
    run_dir = tmp_path / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "7", "--checkpoint-every", "1",
                 "--keep-checkpoints", "10", "--eval-every", "7", "--on-nonfinite", "skip") == 0
    err = capsys.readouterr().err
    assert "step 4: the loss is non-finite" in err and "step skipped" in err
    records = {r["step"]: r for r in last_per_step(read_metrics(run_dir), "train")}
    assert sorted(records) == list(range(1, 8)) and [s for s in records if "skipped" in records[s]] == [4, 6]
    assert read_metrics(run_dir)[-1]["skipped_steps"] == 2
    w3, _, s3 = read_checkpoint(run_dir / "checkpoints" / "step_0000003")
    w4, _, s4 = read_checkpoint(run_dir / "checkpoints" / "step_0000004")
    w5, _, _ = read_checkpoint(run_dir / "checkpoints" / "step_0000005")
    assert all(torch.equal(w3[k], w4[k]) for k in w3)  # the skipped step changed no weight
    assert any(not torch.equal(w4[k], w5[k]) for k in w4)  # the next one trained
    assert s4["data"] != s3["data"] and s4["step"] == 4


def test_skip_mode_stops_when_every_step_is_nonfinite(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    poison_loss(monkeypatch, set(range(3, 100)))
    run_dir = tmp_path / "run"
    assert train("--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "20", "--checkpoint-every", "100",
                 "--eval-every", "100", "--on-nonfinite", "skip", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flexmoe train: error: step 12: ") and "10 non-finite steps in a row" in err[-1]
    assert list_checkpoints(run_dir) == []


def test_resume_from_a_nonfinite_checkpoint_is_refused(run, capsys):
    folder = run / "checkpoints" / "step_0000004"
    weights = load_file(str(folder / "model.safetensors"))
    weights["tok_emb.weight"][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    rewrite_manifest(folder)
    before = snapshot(run)
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    one_line_error(capsys, "step_0000004 holds non-finite values (tok_emb.weight)",
                   "the older checkpoint", "step_0000002 is intact: continue from it with --resume")
    assert snapshot(run) == before


# ---- checkpoint writes -------------------------------------------------------------------------
def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "latest"])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(run, capsys, monkeypatch, where):
    if where == "weights":
        monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    else:
        write = ckpt_mod._atomic_write_text
        monkeypatch.setattr(ckpt_mod, "_atomic_write_text",
                            lambda path, text: full_disk() if path.name == "latest" else write(path, text))
    old = {p.name: snapshot(p) for p in list_checkpoints(run)}
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    one_line_error(capsys, "cannot write checkpoint", "No space left on device",
                   "the newest checkpoint is still step_0000004", "then --resume")
    assert {p.name: snapshot(p) for p in list_checkpoints(run) if p.name in old} == old
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert train("--run-dir", run, "--resume", "--quiet") == 0
    assert read_metrics(run)[-1]["finished"] and (run / "checkpoints" / "step_0000006").is_dir()


def test_full_disk_while_writing_metrics_is_one_line(run, capsys, monkeypatch):
    def full_at_step_6(self, record):
        if record.get("step") == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        write(self, record)
    write = MetricsLog.write
    monkeypatch.setattr(MetricsLog, "write", full_at_step_6)
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    one_line_error(capsys, f"cannot write {run / 'metrics.jsonl'}: No space left on device",
                   "the newest checkpoint is still step_0000004")


def test_leftover_temporary_files_are_removed_at_the_next_start(run, capsys):
    root = run / "checkpoints"
    (root / ".tmp-step_0000006-4242").mkdir()
    (root / ".tmp-step_0000006-4242" / "model.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp-4242").write_text("step_0000006\n")
    (run / ".metrics.jsonl.tmp-4242").write_text("{")
    assert train("--run-dir", run, "--resume", "--quiet") == 0
    assert not [p for p in run.rglob(".*")]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except or finally of flexmoe's catches it)."""


def test_a_kill_during_the_first_checkpoint_does_not_strand_the_run(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(ckpt_mod, "save_file", killed)
    run_dir = tmp_path / "run"
    args = ["--run-dir", run_dir, "--data", corpus, *TINY, "--steps", "4", "--checkpoint-every", "2",
            "--eval-every", "2"]
    with pytest.raises(Killed):
        train(*args)
    monkeypatch.undo()
    assert (run_dir / "metrics.jsonl").exists() and list_checkpoints(run_dir) == []
    capsys.readouterr()
    before = snapshot(run_dir)
    assert train("--run-dir", run_dir, "--resume", "--quiet") == 2
    one_line_error(capsys, "holds no complete checkpoint", "without --resume")
    assert snapshot(run_dir) == before
    assert train(*args) == 0  # a fresh start over the stranded folder
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]
    assert not [p for p in run_dir.rglob(".*")]


def test_checkpoint_files_have_the_mode_of_every_other_file(run):
    folder = run / "checkpoints" / "step_0000004"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (*folder.iterdir(), run / "config.json")}
    assert len(set(modes.values())) == 1, modes


# ---- corrupt checkpoint files ------------------------------------------------------------------
def damage(folder: Path, how: str) -> str:
    """Damage one file of a checkpoint folder; returns the name of that file."""
    if how == "manifest_wrong_type":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["state.pt"] = "abc"
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return "manifest.json"
    if how == "manifest_not_an_object":
        (folder / "manifest.json").write_text("[1, 2]")
        return "manifest.json"
    if how == "weights_truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        rewrite_manifest(folder)
        return "model.safetensors"
    state = torch.load(folder / "state.pt", weights_only=True)
    if how == "state_without_optimizer":
        del state["optimizer"]
    elif how == "step_not_numeric":
        state["step"] = "four"
    elif how == "scheduler_empty":
        state["scheduler"] = {}
    torch.save(state, folder / "state.pt")
    rewrite_manifest(folder)
    return "state.pt"


@pytest.mark.parametrize("how", ["manifest_wrong_type", "manifest_not_an_object", "weights_truncated",
                                 "state_without_optimizer", "step_not_numeric", "scheduler_empty"])
def test_corrupt_checkpoint_file_is_named_with_the_older_intact_one(run, capsys, how):
    folder = run / "checkpoints" / "step_0000004"
    name = damage(folder, how)
    before = snapshot(run)
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    one_line_error(capsys, f"{folder / name}", "corrupt", f"the older checkpoint {run / 'checkpoints' / 'step_0000002'} "
                   f"is intact: continue from it with --resume {run / 'checkpoints' / 'step_0000002'}")
    assert snapshot(run) == before
    if how == "step_not_numeric":  # following the advice works, and rewrites the damaged step
        assert train("--resume", run / "checkpoints" / "step_0000002", "--quiet") == 0
        assert read_checkpoint(folder)[2]["step"] == 4 and read_metrics(run)[-1]["finished"]


@pytest.mark.parametrize("latest, needle", [("\x00garbage", "latest is corrupt"),
                                            ("step_0000009", "latest names 'step_0000009', which does not exist")])
def test_a_bad_latest_file_names_the_intact_checkpoint(run, capsys, latest, needle):
    (run / "checkpoints" / "latest").write_text(latest)
    before = snapshot(run)
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    newest = run / "checkpoints" / "step_0000004"
    one_line_error(capsys, needle, f"the checkpoint {newest} is intact: continue from it with --resume {newest}")
    assert snapshot(run) == before


def test_corrupt_checkpoint_without_an_older_one_says_so_plainly(run, capsys):
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    damage(run / "checkpoints" / "step_0000004", "state_without_optimizer")
    assert train("--run-dir", run, "--resume", "--quiet") == 2
    err = one_line_error(capsys, "state.pt is corrupt: its 'optimizer' entry is missing")
    assert "older checkpoint" not in err


# ---- several processes: every rank stops with the error, none waits ------------------------------
def _fault_worker(rank: int, world: int, port: int, job: tuple[Path, Path]) -> None:
    """Two expert-parallel runs on gloo: rank 1's loss turns NaN at step 3; then rank 0's disk is
    full at the second checkpoint. Each rank writes the exit codes it got to RANK.json."""
    import datetime
    import os

    import torch.distributed as dist

    from flexmoe.cli import main
    from test_train_distributed import EP, MODEL

    root, data = job
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    codes = {}
    try:
        args = ["train", "--data", str(data), *MODEL, *EP, "--checkpoint-every", "2"]
        forward = loop_mod.Trainer._forward_loss
        loop_mod.Trainer._forward_loss = lambda self, x, y: forward(self, x, y) * (
            float("nan") if rank == 1 and self.model.training and self.step == 2 else 1.0)
        codes["nan"] = main([*args, "--run-dir", str(root / "nan")])
        loop_mod.Trainer._forward_loss = forward
        if rank == 0:
            save, calls = ckpt_mod.save_file, []

            def second_write_fails(*a, **k):
                calls.append(1)
                return full_disk() if len(calls) == 2 else save(*a, **k)
            ckpt_mod.save_file = second_write_fails
        codes["disk"] = main([*args, "--run-dir", str(root / "disk")])
        dist.barrier()
    finally:
        (root / f"{rank}.json").write_text(json.dumps(codes))
        dist.destroy_process_group()


def test_every_rank_stops_on_a_nonfinite_step_or_a_failed_write(corpus, tmp_path):  # noqa: F811
    from test_train_distributed import spawn

    spawn(2, (tmp_path, corpus), timeout_s=200, worker=_fault_worker)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"nan": 2, "disk": 2}
    assert read_metrics(tmp_path / "nan")[-1]["stopped"].startswith("step 3: the loss is non-finite")
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["step_0000002"]
    assert read_metrics(tmp_path / "disk")[-1]["stopped"].startswith("rank 0: cannot write checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path / "disk")] == ["step_0000002"]
