"""``flexmoe train`` on 2 gloo processes: expert parallelism with the placement scheduler equals one
process on the same global batch, resumes exactly, and its checkpoint resumes on one process."""

from __future__ import annotations

import datetime
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


def _failing_write_worker(rank: int, world: int, port: int, runs: list) -> None:
    """Each run: rank 0's metrics write fails once where the run says (ENOSPC); every rank
    records main()'s return code and the error execute() raised, as JSON next to the run."""
    import errno
    import json

    import flexmoe.train.session as session
    from flexmoe.sim.trace import TraceRecorder
    from flexmoe.train.metrics import MetricsLog

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    write, init, execute, trace = MetricsLog.write, MetricsLog.__init__, session.execute, TraceRecorder.record
    fail = {}

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

    def recording_execute(prep):
        try:
            return execute(prep)
        except Exception as err:
            fail["error"] = f"{type(err).__name__}: {err}"
            raise

    MetricsLog.write, MetricsLog.__init__, session.execute = failing_write, failing_init, recording_execute
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


@pytest.fixture(scope="module")
def failed_write_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed_writes")
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect.py", "colorsys.py", "fnmatch.py"):
        (data / name).write_bytes((stdlib / name).read_bytes())
    runs = [(["train", "--data", str(data), *SMALL, "--run-dir", str(root / case)], at, str(root / case))
            for case, at in WRITE_FAILURES.items()]
    spawn(2, runs, timeout_s=300, worker=_failing_write_worker)  # a rank left waiting fails it here
    return root


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_write_failing_on_rank_0_stops_every_rank_with_its_error(failed_write_runs, case):
    import json

    root = failed_write_runs
    results = [json.loads(Path(f"{root / case}.rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in results] == [2, 2], results
    error = results[0]["error"]
    assert error == results[1]["error"], results
    written = root / case / ("routing_trace.jsonl" if case == "trace" else "metrics.jsonl")
    assert error.startswith(f"CheckpointWriteError: cannot write {written}: No space left"), error
    assert "\n" not in error
    checkpoints = sorted(p.name for p in (root / case / "checkpoints").glob("step_*"))
    # a failed record stops the run before the next update or checkpoint; the summary comes last
    assert checkpoints == {"summary": ["step_0000004", "step_0000006"]}.get(case, [])
    expect_kept = "the newest checkpoint is still step_0000006" if case == "summary" else "no earlier checkpoint exists"
    assert expect_kept in error, error
