"""Helpers shared by the test modules (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, out_dir: str, timeout_s: float, target, make_args) -> list[dict]:
    """Spawn ``world`` processes ``target(*make_args(rank, port))`` that each write
    ``out_dir/rank{r}.json``, and return every rank's dict; a rank that wrote nothing (crashed,
    hung past ``timeout_s``) fails the calling test."""
    import json
    import os

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=make_args(r, port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if not os.path.exists(path):
            pytest.fail(f"rank {r} of {world} wrote no results (crashed or timed out after {timeout_s} s)")
        with open(path) as f:
            results.append(json.load(f))
    return results


def run_cases_in_processes(world: int, module: str, out_dir: str, timeout_s: float) -> list[dict]:
    """``spawn_ranks`` of ``module.run_cases(rank, world, port)`` (a dict case name -> "ok" or a
    traceback) on ``world`` gloo processes."""
    return spawn_ranks(world, out_dir, timeout_s, _case_worker, lambda r, port: (module, r, world, port, out_dir))


def _case_worker(module: str, rank: int, world: int, port: int, out_dir: str) -> None:
    import importlib
    import json
    import os

    results = importlib.import_module(module).run_cases(rank, world, port)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def starve_gloo_threads() -> None:
    """Pin every thread of this process to one CPU and give gloo's threads the lowest priority, so
    that after a collective the calling thread runs ahead of gloo's worker (what load on the
    machine does by chance): a worker that still holds a finished collective's tensors is then
    caught right away. Call it after ``init_process_group`` (gloo's threads exist by then)."""
    import os

    cpu = min(os.sched_getaffinity(0))
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            os.sched_setaffinity(tid, {cpu})
            with open(f"/proc/self/task/{tid}/comm") as f:
                if "gloo" in f.read():
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:  # a thread that ended meanwhile, or a machine that refuses (no stress then)
            pass


def run_case_table(cases: dict, rank: int, world: int, port: int, timeout_s: float = 90, after_init=None) -> dict:
    """Initialise a gloo group of ``world`` processes, call ``after_init()`` if given, run every
    ``case(rank, world)`` of ``cases`` and return case name -> "ok" or its traceback."""
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if after_init is not None:
        after_init()
    results = {}
    for name, case in cases.items():
        try:
            case(rank, world)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()
    dist.destroy_process_group()
    return results
