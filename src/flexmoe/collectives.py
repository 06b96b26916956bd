"""Collectives that never leave a tensor's last reference to torch's communication threads.

gloo runs each collective on a worker thread, which drops its reference to the finished work
just after waking the caller. When that is the last reference to a tensor Python has seen, the
worker needs the GIL to free it; once the interpreter has begun to exit it cannot take the GIL,
CPython ends the thread from inside C++ and the process aborts ("terminate called without an
active exception", exit status -6) although the script finished. Right after a gloo all-reduce
returns, the worker still holds its tensor about 30% of the time (2 processes, 2 cores), so a
script whose last collective comes just before its end dies now and then, more often under load.
While Python still holds the tensor, the worker lets go of it without the GIL (measured: it
does so while the caller holds the GIL in a 20 ms C call).

So every flexmoe collective on CPU tensors hands its tensors to ``settle``: those the worker has
already let go of (most) are done; the others are kept alive, in this module's one process-wide
list, until a later flexmoe collective finds them released, or, at the latest, until an
``atexit`` hook (which runs before the interpreter starts to exit) has waited for them (at most
``EXIT_WAIT_S``). The
worker is then never a tensor's last owner, and no collective waits for it. (This list is the
only process-wide state in flexmoe: it belongs to gloo's threads, which are process-wide too.)
On CUDA tensors nothing is kept: NCCL frees its works once the device has finished them.

``run`` is the building block (start, wait, release, settle); the rest are the collectives
flexmoe uses, including object collectives over pickled bytes (torch's own free their tensors
wherever the worker happens to be).
"""

from __future__ import annotations

import atexit
import datetime
import pickle
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

# At exit, how long to wait for the workers: a runnable worker gets a CPU well within it; a
# tensor still held after it is held by something else (e.g. a graph that is still alive).
EXIT_WAIT_S = 0.25
_NAP_S = 20e-6
_MAX_KEPT = 256  # past this many collectives, the oldest kept tensors have surely been let go
# Tensors of finished collectives that gloo's worker still held, with their owner counts before
# the collective: kept alive here so that the worker never drops their last reference.
_unsettled: list[tuple[list[torch.Tensor], list[int]]] = []


def use_counts(tensors: Sequence[torch.Tensor]) -> list[int] | None:
    """How many owners each tensor has now (None when none is on the CPU: nothing to settle)."""
    if not any(t.device.type == "cpu" for t in tensors):
        return None
    return [t._use_count() for t in tensors]


def settle(tensors: Sequence[torch.Tensor], counts: list[int] | None) -> None:
    """After a finished collective: keep ``tensors`` alive until none has more owners than
    ``counts`` (``use_counts`` before the collective started), i.e. until gloo's worker has let go
    of them. Returns at once: kept tensors are checked again by later calls and at exit."""
    if counts is None:
        return
    _sweep()
    if _held(tensors, counts):
        if not _unsettled:
            atexit.unregister(_settle_at_exit)
            atexit.register(_settle_at_exit)
        _unsettled.append((list(tensors), list(counts)))
        del _unsettled[:-_MAX_KEPT]


def unsettled() -> int:
    """How many finished collectives' tensors are still kept (after dropping the let-go ones)."""
    _sweep()
    return len(_unsettled)


def _held(tensors: Sequence[torch.Tensor], counts: list[int]) -> bool:
    return any(t._use_count() > c for t, c in zip(tensors, counts))


def _sweep() -> None:
    _unsettled[:] = [entry for entry in _unsettled if _held(*entry)]


def _settle_at_exit() -> None:
    """Give gloo's workers up to ``EXIT_WAIT_S`` to let go of every kept tensor (napping: the GIL is
    free meanwhile); what still holds one after that is not a worker."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while unsettled() and time.monotonic() < deadline:
        time.sleep(_NAP_S)


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


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, wait=None) -> None:
    """``dist.all_reduce`` in place, settled (``wait`` as in ``run``)."""
    run(lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), [tensor], wait)


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group=None, wait=None) -> None:
    """``dist.all_gather`` into ``parts``, settled (``wait`` as in ``run``)."""
    run(lambda: dist.all_gather(parts, tensor, group=group, async_op=True), [*parts, tensor], wait)


def gathered(tensor: torch.Tensor, group=None, wait=None) -> torch.Tensor:
    """``[W, *tensor.shape]``: ``tensor`` from every rank of ``group``, in rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    all_gather(parts, tensor, group, wait)
    return torch.stack(parts)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> None:
    """``dist.broadcast`` in place from global rank ``src``, settled."""
    run(lambda: dist.broadcast(tensor, src=src, group=group, async_op=True), [tensor])


def group_device(group) -> torch.device:
    """Where a group's collectives take their tensors: the current CUDA device under NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj`` in rank order (two settled all-gathers: sizes, then bytes)."""
    device = group_device(group)
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
    device = group_device(group)
    mine = dist.get_rank() == src
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device) if mine else None
    size = torch.tensor([data.numel() if mine else 0], dtype=torch.int64, device=device)
    broadcast(size, src, group)
    if not mine:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    broadcast(data, src, group)
    return obj if mine else pickle.loads(data.cpu().numpy().tobytes())
