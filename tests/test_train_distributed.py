"""``flexmoe train`` on 2 gloo processes: expert parallelism with the placement scheduler equals one
process on the same global batch, resumes exactly, and its checkpoint resumes on one process."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sysconfig
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from flexmoe.cli import main
from flexmoe.train.metrics import last_per_step, read_metrics
from helpers import free_port

MODEL = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--num-experts", "4",
         "--seq-len", "32", "--eval-batches", "2", "--warmup-steps", "3", "--quiet", "--threads", "1",
         "--aux-loss-coef", "0", "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4",
         "--omoe", "--omoe-accumulate-steps", "1", "--omoe-orthogonal-steps", "2"]  # OMoE gathers across ranks
EP = ["--expert-parallel", "--spare-slots", "1", "--placement-interval", "2", "--batch-size", "4"]




def _fixed_cost_model(d_model, d_ff, **kwargs):
    """Placement plans depend on a cost model measured by timing; two fresh runs would measure
    different constants (and could plan different token shares). Fix them, so the uninterrupted and
    the resumed run plan alike; a resumed run reuses the constants saved in its checkpoint anyway."""
    from flexmoe.placement import CostModel

    return CostModel.from_shape(d_model, d_ff, flops=1e11, mem_bw=1e10, a2a_bw=1e9)


def _worker(rank: int, world: int, port: int, runs: list[list[str]]) -> None:
    import flexmoe.runtime.scheduler

    flexmoe.runtime.scheduler.measure_cost_model = _fixed_cost_model
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for argv in runs:
            assert main(argv) == 0, argv
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, runs: list, timeout_s: float = 400, worker=_worker) -> None:
    """Run ``worker(rank, world, port, runs)`` on ``world`` gloo processes; fail if they take too long."""
    ctx = mp.start_processes(worker, args=(world, free_port(), runs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed training did not finish in {timeout_s} s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in last_per_step(read_metrics(run_dir), "train")}


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "glob.py", "shlex.py", "textwrap.py"):
        (data / name).write_bytes((stdlib / name).read_bytes())
    common = ["train", "--data", str(data), *MODEL, *EP]
    spawn(2, [
        [*common, "--run-dir", str(root / "full")],
        [*common, "--run-dir", str(root / "split"), "--stop-at", "4"],
        ["train", "--run-dir", str(root / "split"), "--resume", "--quiet", "--threads", "1"],
    ])
    return root, data


def test_expert_parallel_with_placement_equals_one_process(ep_runs):
    root, data = ep_runs
    assert main(["train", "--data", str(data), *MODEL, "--batch-size", "8", "--run-dir", str(root / "single")]) == 0
    ep, single = train_losses(root / "full"), train_losses(root / "single")
    assert sorted(ep) == list(range(1, 9))
    for step in ep:
        assert abs(ep[step] - single[step]) < 2e-5 * abs(single[step]), (step, ep[step], single[step])
    moves = [r for r in read_metrics(root / "full") if r.get("kind") == "train" and "placement" in r]
    assert len(moves) == 4 and any(r["placement"]["bytes_moved"] for r in moves)
    ep_val, single_val = (last_per_step(read_metrics(root / name), "val") for name in ("full", "single"))
    for a, b in zip(ep_val, single_val, strict=True):  # similarity metrics gather the experts from their ranks
        for key in ("expert_weight_cos", "expert_output_cos"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)


def test_expert_parallel_resume_is_exact(ep_runs):
    root, _ = ep_runs
    assert train_losses(root / "split") == train_losses(root / "full")


OVERRIDE = "batch-size,expert-parallel,placement-interval"  # what one process changes of the 2-rank run


def test_two_rank_checkpoint_resumes_on_one_process(ep_runs, tmp_path):
    root, _ = ep_runs
    assert main(["train", "--resume", str(root / "full" / "checkpoints" / "step_0000004"),
                 "--run-dir", str(tmp_path / "one"), "--batch-size", "8", "--expert-parallel",
                 "--placement-interval", "0", "--override", OVERRIDE, "--quiet", "--threads", "1"]) == 2  # EP needs several processes
    assert main(["train", "--resume", str(root / "full" / "checkpoints" / "step_0000004"),
                 "--run-dir", str(tmp_path / "one"), "--batch-size", "8", "--no-expert-parallel",
                 "--placement-interval", "0", "--override", OVERRIDE, "--quiet", "--threads", "1"]) == 0
    one, ep = train_losses(tmp_path / "one"), train_losses(root / "full")
    assert sorted(one) == [5, 6, 7, 8]
    for step in one:
        assert abs(one[step] - ep[step]) < 2e-5 * abs(ep[step]), (step, one[step], ep[step])


# ---- a file write that fails on the main rank only (issue 17) ------------------------------------
SMALL = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "16", "--num-experts", "4",
         "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--warmup-steps", "1", "--quiet",
         "--threads", "1", "--steps", "6", "--eval-every", "4", "--checkpoint-every", "4"]
# where rank 0's write fails: a train record, a val record, the final summary, opening metrics.jsonl,
# the routing trace's record of step 2
WRITE_FAILURES = {"train": ("train", 2), "val": ("val", 4), "summary": ("summary", 6), "open": ("open", 0),
                  "trace": ("trace", 2)}


def _join_gloo(rank: int, world: int, port: int) -> None:
    """This spawned process as ``rank`` of a gloo group, as torchrun would set it up (60 s timeout)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _record_errors_of_execute(into: dict) -> None:
    """Make ``session.execute`` (in this process) keep what it raises in ``into["error"]``."""
    import flexmoe.train.session as session

    execute = session.execute

    def recording_execute(prep):
        try:
            return execute(prep)
        except Exception as err:
            into["error"] = f"{type(err).__name__}: {err}"
            raise

    session.execute = recording_execute


def _failing_write_worker(rank: int, world: int, port: int, runs: list) -> None:
    """Each run: rank 0's metrics write fails once where the run says (ENOSPC); every rank
    records main()'s return code and the error execute() raised, as JSON next to the run."""
    import errno

    from flexmoe.sim.trace import TraceRecorder
    from flexmoe.train.metrics import MetricsLog

    _join_gloo(rank, world, port)
    write, init, trace = MetricsLog.write, MetricsLog.__init__, TraceRecorder.record
    fail = {}
    _record_errors_of_execute(fail)

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def failing_write(self, record):
        if (record.get("kind"), record.get("step")) == fail.get("at"):
            full_disk(self.path)
        write(self, record)

    def failing_init(self, run_dir, enabled=True):
        if enabled and fail.get("at") == ("open", 0):
            full_disk(Path(run_dir) / "metrics.jsonl")
        init(self, run_dir, enabled)

    def failing_trace(self, step, layer, counts_WE):
        if fail.get("at") == ("trace", step + 1):  # the trace counts steps from 0
            full_disk(self.path)
        trace(self, step, layer, counts_WE)

    MetricsLog.write, MetricsLog.__init__ = failing_write, failing_init
    TraceRecorder.record = failing_trace
    try:
        for argv, at, out in runs:
            fail.clear()
            if rank == 0:
                fail["at"] = tuple(at)
            code = main(argv)
            Path(f"{out}.rank{rank}.json").write_text(json.dumps({"code": code, "error": fail.get("error")}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def small_corpus(root: Path) -> Path:
    """A data folder of three small standard-library files."""
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "fnmatch.py"):
        (data / name).write_bytes((stdlib / name).read_bytes())
    return data


@pytest.fixture(scope="module")
def failed_write_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed_writes")
    data = small_corpus(root)
    runs = [(["train", "--data", str(data), *SMALL, "--run-dir", str(root / case)], at, str(root / case))
            for case, at in WRITE_FAILURES.items()]
    spawn(2, runs, timeout_s=300, worker=_failing_write_worker)  # a rank left waiting fails it here
    return root


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_write_failing_on_rank_0_stops_every_rank_with_its_error(failed_write_runs, case):
    root = failed_write_runs
    results = [json.loads(Path(f"{root / case}.rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [2, 2], results
    error = results[0]["error"]
    assert error == results[1]["error"], results
    written = root / case / ("routing_trace.jsonl" if case == "trace" else "metrics.jsonl")
    assert error.startswith(f"CheckpointWriteError: rank 0: cannot write {written}: No space left"), error
    assert "\n" not in error
    checkpoints = sorted(p.name for p in (root / case / "checkpoints").glob("step_*"))
    # a failed record stops the run before the next update or checkpoint; the summary comes last
    assert checkpoints == {"summary": ["step_0000004", "step_0000006"]}.get(case, [])
    expect_kept = "the newest checkpoint is still step_0000006" if case == "summary" else "no earlier checkpoint exists"
    assert expect_kept in error, error


# ---- real faults of rank 0's own output: a full disk under a partial write, the Rust writers of
# safetensors and tokenizers (their I/O errors are not OSErrors), rank 0's terminal gone, a bug ----
@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes per file fail (EFBIG, "File too large") in this process: a disk
    that fills up, with the short write a real one gives."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def _inject(case: str, stack: contextlib.ExitStack) -> None:
    """Rank 0's fault of ``case``, undone when ``stack`` closes (after the run)."""
    import errno

    import flexmoe.train.checkpoint as ckpt_mod
    from flexmoe.sim.trace import TraceRecorder
    from flexmoe.train.metrics import MetricsLog
    from flexmoe.train.tokenizer import BPETokenizer

    def patch(owner, name, make):
        real = getattr(owner, name)
        setattr(owner, name, make(real))
        stack.callback(setattr, owner, name, real)

    if case == "metrics_partial":  # the disk fills up 10 bytes into step 2's record and stays full
        def write(real):
            def limited(self, record):
                if (record.get("kind"), record.get("step")) == ("train", 2):
                    stack.enter_context(_file_size_limit(self.path.stat().st_size + 10))
                real(self, record)
            return limited
        patch(MetricsLog, "write", write)
    elif case in ("checkpoint_weights", "tokenizer"):  # the disk is full while safetensors / tokenizers write
        calls = []

        def full_during(real):
            def limited(*args, **kwargs):
                calls.append(1)
                with _file_size_limit(100) if case == "tokenizer" or len(calls) == 2 else contextlib.nullcontext():
                    return real(*args, **kwargs)
            return limited
        patch(*((ckpt_mod, "save_file") if case == "checkpoint_weights" else (BPETokenizer, "save")), full_during)
    elif case == "stderr":  # rank 0's terminal is a pipe whose reader has gone
        read_end, write_end = os.pipe()
        os.close(read_end)
        saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        stack.callback(os.close, saved)
        stack.callback(os.dup2, saved, 2)
    elif case == "trace_bug":  # not an OSError: a bug in a write only rank 0 makes
        def record(real):
            def failing(self, step, layer, counts_WE):
                if step == 1:
                    raise RuntimeError("injected bug")
                real(self, step, layer, counts_WE)
            return failing
        patch(TraceRecorder, "record", record)
    elif case == "trace_close":  # the write error a network file system defers to close()
        def close(real):
            def failing(self):
                real(self)
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.path))
            return failing
        patch(TraceRecorder, "close", close)


def _real_fault_worker(rank: int, world: int, port: int, runs: list) -> None:
    """Each run with rank 0's fault injected; every rank records main()'s return code and what
    escaped it or what execute() raised, as JSON next to the run."""
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit fails, not kills
    _join_gloo(rank, world, port)
    seen = {}
    _record_errors_of_execute(seen)
    try:
        for argv, case, out in runs:
            seen.clear()
            with contextlib.ExitStack() as stack:
                if rank == 0:
                    _inject(case, stack)
                try:
                    code = main(argv)
                except Exception as err:  # the old code: rank 0 raised alone, the others timed out
                    code, seen["error"] = f"raised {type(err).__name__}", f"{type(err).__name__}: {err}"
            Path(f"{out}.rank{rank}.json").write_text(json.dumps({"code": code, "error": seen.get("error")}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


REAL_FAULTS = ("metrics_partial", "checkpoint_weights", "tokenizer", "stderr", "trace_bug", "trace_close")


@pytest.fixture(scope="module")
def real_fault_runs(tmp_path_factory) -> dict[str, tuple[Path, list, str | None]]:
    """Case -> its run folder on 2 gloo ranks, every rank's return code, and the error both ranks
    got (the same on both)."""
    root = tmp_path_factory.mktemp("real_faults")
    data = small_corpus(root)
    runs = []
    for case in REAL_FAULTS:
        argv = ["train", "--data", str(data), *SMALL, "--run-dir", str(root / case)]
        if case == "tokenizer":
            argv += ["--tokenizer", "bpe", "--bpe-vocab-size", "300"]
        if case == "stderr":
            argv.remove("--quiet")  # the progress bar and the start and summary lines go to stderr
        runs.append((argv, case, str(root / case)))
    spawn(2, runs, timeout_s=300, worker=_real_fault_worker)  # a rank left waiting fails it here
    outcomes = {}
    for case in REAL_FAULTS:
        results = [json.loads(Path(f"{root / case}.rank{r}.json").read_text()) for r in range(2)]
        outcomes[case] = (root / case, [r["code"] for r in results], [r["error"] for r in results])
    return outcomes


def real_fault_run(outcomes: dict, case: str) -> tuple[Path, list, str | None]:
    run, codes, errors = outcomes[case]
    assert errors[0] == errors[1], errors
    return run, codes, errors[0]


def test_a_full_disk_mid_record_on_rank_0_stops_every_rank_and_leaves_whole_records(real_fault_runs):
    run, codes, error = real_fault_run(real_fault_runs, "metrics_partial")
    assert codes == [2, 2]
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n"), text[-80:]
    records = [json.loads(line) for line in text.splitlines()]  # every line whole: no partial record
    assert [(r["kind"], r["step"]) for r in records] == [("val", 0), ("train", 1)]
    assert error.startswith(f"CheckpointWriteError: rank 0: cannot write {run / 'metrics.jsonl'}: File too large"), error
    assert not list((run / "checkpoints").glob("*"))


def test_a_full_disk_in_safetensors_on_rank_0_stops_every_rank_and_keeps_the_checkpoint(real_fault_runs):
    from flexmoe.train.checkpoint import list_checkpoints, read_checkpoint

    run, codes, error = real_fault_run(real_fault_runs, "checkpoint_weights")
    assert codes == [2, 2]
    assert error == (f"CheckpointWriteError: rank 0: cannot write checkpoint {run / 'checkpoints' / 'step_0000006'}: "
                     "File too large; the newest checkpoint is still step_0000004 (free space or fix the folder, "
                     "then --resume)"), error
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    read_checkpoint(run / "checkpoints" / "step_0000004")  # verifies its checksums
    assert read_metrics(run)[-1]["stopped"] == error.removeprefix("CheckpointWriteError: ")


def test_a_full_disk_in_the_tokenizer_on_rank_0_stops_every_rank(real_fault_runs):
    run, codes, error = real_fault_run(real_fault_runs, "tokenizer")
    assert codes == [2, 2]
    assert error.startswith(f"CheckpointWriteError: rank 0: cannot write {run / 'tokenizer.json'}: File too large"), error
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_rank_0_trains_on_when_its_terminal_is_gone(real_fault_runs):
    run, codes, error = real_fault_run(real_fault_runs, "stderr")
    assert (codes, error) == ([0, 0], None)
    summary = read_metrics(run)[-1]
    assert summary["kind"] == "summary" and summary["finished"], summary


def test_a_bug_in_a_write_of_rank_0_stops_every_rank_naming_it(real_fault_runs):
    run, codes, error = real_fault_run(real_fault_runs, "trace_bug")
    assert codes == [2, 2]
    assert error.startswith(f"CheckpointWriteError: rank 0: cannot write {run / 'routing_trace.jsonl'}: "
                            "RuntimeError: injected bug; no earlier checkpoint exists"), error


def test_a_failed_close_on_rank_0_after_the_last_step_stops_every_rank(real_fault_runs):
    run, codes, error = real_fault_run(real_fault_runs, "trace_close")
    assert codes == [2, 2]
    assert error == (f"CheckpointWriteError: rank 0: cannot write {run / 'routing_trace.jsonl'}: Input/output error; "
                     "the newest checkpoint is still step_0000006 (free space or fix the folder, then --resume)"), error
