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
         "--aux-loss-coef", "0", "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4"]
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


def spawn(world: int, runs: list[list[str]], timeout_s: float = 400) -> None:
    ctx = mp.start_processes(_worker, args=(world, free_port(), runs), nprocs=world, join=False,
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


def test_expert_parallel_resume_is_exact(ep_runs):
    root, _ = ep_runs
    assert train_losses(root / "split") == train_losses(root / "full")


def test_two_rank_checkpoint_resumes_on_one_process(ep_runs, tmp_path):
    root, _ = ep_runs
    assert main(["train", "--resume", str(root / "full" / "checkpoints" / "step_0000004"),
                 "--run-dir", str(tmp_path / "one"), "--batch-size", "8", "--expert-parallel",
                 "--placement-interval", "0", "--quiet", "--threads", "1"]) == 2  # EP needs several processes
    assert main(["train", "--resume", str(root / "full" / "checkpoints" / "step_0000004"),
                 "--run-dir", str(tmp_path / "one"), "--batch-size", "8", "--no-expert-parallel",
                 "--placement-interval", "0", "--quiet", "--threads", "1"]) == 0
    one, ep = train_losses(tmp_path / "one"), train_losses(root / "full")
    assert sorted(one) == [5, 6, 7, 8]
    for step in one:
        assert abs(one[step] - ep[step]) < 2e-5 * abs(ep[step]), (step, one[step], ep[step])
