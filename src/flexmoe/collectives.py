"""Collectives that leave no tensor with torch's communication threads.

gloo runs each collective on a worker thread, which drops its reference to the finished work
just after waking the caller. When that is the last reference to a tensor Python has seen, the
worker needs the GIL to free it; once the interpreter has begun to exit it cannot take the GIL,
CPython ends the thread from inside C++ and the process aborts ("terminate called without an
active exception", exit status -6) although the script finished. Right after a gloo all-reduce
returns, the worker still holds its tensor about 30% of the time (2 processes, 2 cores), so a
script whose last collective comes just before its end dies now and then, more often under load.

Every flexmoe collective on CPU tensors therefore returns only once the worker has let go of its
tensors (``settle``; microseconds in practice): flexmoe's references are then the last ones and
the calling thread frees them. On CUDA nothing waits: NCCL frees its works once the device has
finished them, and waiting for that would synchronise the host.

``run`` is the building block (start, wait, release, settle); the rest are the collectives
flexmoe uses, including object collectives over pickled bytes (torch's own free their tensors
wherever the worker happens to be).
"""

from __future__ import annotations

import datetime
import pickle
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

SETTLE_LIMIT_S = 1.0  # a worker that still holds a tensor after this long is not finishing a collective
_NAP_S = 20e-6


def use_counts(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """How many owners each tensor has now (None when none is on the CPU: nothing to settle)."""
    if not any(t.device.type == "cpu" for t in tensors):
        return None
    return [t._use_count() for t in tensors]


def settle(tensors: Sequence[torch.Tensor], counts: list[int] | None) -> None:
    """Wait until no tensor has more owners than ``counts`` (``use_counts`` before the collective
    started), yielding the GIL to the worker that is about to drop them."""
    if counts is None:
        return
    deadline = None
    while any(t._use_count() > c for t, c in zip(tensors, counts)):
        now = time.monotonic()
        deadline = deadline or now + SETTLE_LIMIT_S
        if now > deadline:
            warnings.warn("flexmoe: a finished collective's tensors are still held elsewhere after "
                          f"{SETTLE_LIMIT_S:g} s; not waiting for them", RuntimeWarning, stacklevel=3)
            return
        time.sleep(_NAP_S)  # a real sleep: the GIL is free while it lasts (sleep(0) would keep it ~5 ms)


def run(start: Callable[[], dist.Work | None], tensors: Sequence[torch.Tensor],
        wait: Callable[[dist.Work], None] | None = None) -> None:
    """Start a collective (``start()`` calls it with ``async_op=True`` and returns the work),
    finish it with ``wait(work)`` (default ``work.wait()``), drop the work and settle ``tensors``
    (every tensor the collective reads or writes). ``start`` is a callable so that this function
    holds the only reference to the work."""
    counts = use_counts(tensors)
    work = start()
    if work is not None:
        (wait or dist.Work.wait)(work)
    del work
    settle(tensors, counts)


def timed_wait(timeout_s: float | None, message: Callable[[], str]) -> Callable[[dist.Work], None]:
    """A ``wait`` for ``run`` that raises ``TimeoutError(message())`` after ``timeout_s`` seconds
    (None: wait as long as the process group's own timeout)."""

    def wait(work: dist.Work) -> None:
        if timeout_s is None:
            work.wait()
            return
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as error:
            if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
                raise
            raise TimeoutError(message()) from error

    return wait


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    """``dist.all_reduce`` in place, settled."""
    run(lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), [tensor])


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
    """``dist.all_gather`` into ``parts``, settled."""
    run(lambda: dist.all_gather(parts, tensor, group=group, async_op=True), [*parts, tensor])


def broadcast(tensor: torch.Tensor, src: int, group=None) -> None:
    """``dist.broadcast`` in place from global rank ``src``, settled."""
    run(lambda: dist.broadcast(tensor, src=src, group=group, async_op=True), [tensor])


def object_device(group) -> torch.device:
    """Where a group's collectives take their tensors: the current CUDA device under NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj`` in rank order (two settled all-gathers: sizes, then bytes)."""
    device = object_device(group)
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    all_gather(sizes, size, group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world)]
    all_gather(parts, padded, group)
    return [pickle.loads(p[: int(s)].cpu().numpy().tobytes()) for p, s in zip(parts, sizes)]


def broadcast_object(obj, src: int, group=None):
    """Global rank ``src``'s picklable ``obj`` on every rank (two settled broadcasts)."""
    device = object_device(group)
    mine = dist.get_rank() == src
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device) if mine else None
    size = torch.tensor([data.numel() if mine else 0], dtype=torch.int64, device=device)
    broadcast(size, src, group)
    if not mine:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    broadcast(data, src, group)
    return obj if mine else pickle.loads(data.cpu().numpy().tobytes())
