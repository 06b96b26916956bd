"""Agreement between the ranks of an EP group, and collectives that never wait forever.

Every flexmoe control point on an EP group (each EP layer's forward and backward,
``flexmoe.runtime.sync_gradients``, an EP layer's ``state_dict``, a re-plan of
``PlacementScheduler.step``) starts with one all-gather of a fixed-size *envelope*:
``[kind, step, digest]``. Its size never depends on the layer, so it pairs safely with whatever
flexmoe collective another rank is in. ``step`` counts the layer's forward calls (a call that
raised counts too) and ``digest`` hashes everything that shapes the exchange (the whole layer
config, ParallelConfig, dtypes, placement version and contents, grad mode). Only when the
envelopes differ do the ranks exchange the full fields (one object all-gather), so the error
names the field and every rank's value; every rank raises, before any collective whose sizes
depend on what differs.

After a layer's first check has passed (so its ranks agree on ``num_experts`` and with it the
size of every later check), the envelope travels at the front of a fixed-width all-gather that
also carries the forward's counts (``LayerAgreement``): one collective per forward for both,
read on the host before any collective whose sizes depend on them. Every control point of that
layer uses the same width afterwards (zeros past the envelope), so a rank in the forward and a
rank in ``sync_gradients`` still pair their all-gathers and both raise.

Each wait is bounded by ``ParallelConfig.timeout_s``: a rank that raised and stays alive, or
never comes, makes the others fail with a ``TimeoutError`` naming the control point. (gloo
bounds each wait itself; with NCCL the bound is the process group's own ``timeout=``.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import numpy as np
import torch
import torch.distributed as dist

from .. import collectives
from ..placement.table import table_digest
from .groups import EPGroup

FORWARD, BACKWARD, SYNC, STATE, REPLAN = 1, 2, 3, 4, 5
_KINDS = {FORWARD: "the forward of an EP layer", BACKWARD: "the backward of an EP layer",
          SYNC: "flexmoe.runtime.sync_gradients", STATE: "the state_dict of an EP layer",
          REPLAN: "a re-plan of PlacementScheduler.step"}
# ParallelConfig fields a rank may set differently (each rank's value is exchanged and combined).
_PER_RANK_FIELDS = ("memory_budget_bytes", "free_memory_fraction", "timeout_s")


class AgreementError(RuntimeError):
    """Ranks of an EP group disagree on something the exchange depends on."""


def exchange_fields(config, parallel, placement, dtype: torch.dtype, weight_dtype: torch.dtype,
                    backward_expected: bool) -> dict[str, str]:
    """Everything that shapes one EP forward's exchange, as printable values (cheap: it runs
    every forward; the placement table enters by its digest)."""
    fields = {f"config.{f.name}": repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    fields.update({f"parallel.{f.name}": repr(getattr(parallel, f.name)) for f in dataclasses.fields(parallel)
                   if f.name not in _PER_RANK_FIELDS})
    fields.update({
        "dtype": str(dtype),
        "routing weight dtype": str(weight_dtype),
        "placement version": str(placement.version),
        "placement table digest": str(table_digest(placement)),
        "backward expected": str(backward_expected),
    })
    return fields


def digest(fields: dict[str, str]) -> int:
    """A 62-bit digest of ``fields``, equal on ranks with equal fields."""
    h = hashlib.blake2b(digest_size=8)
    for key, value in fields.items():
        h.update(key.encode())
        h.update(b"\0")
        h.update(value.encode())
        h.update(b"\1")
    return int.from_bytes(h.digest(), "little") >> 2


def check_envelope(ep: EPGroup, kind: int, step: int, fields: dict[str, str], timeout_s: float,
                   device: torch.device) -> None:
    """Raise ``AgreementError`` on every rank unless all ranks are at the same control point
    (kind, step) with the same fields. One all-gather of three int64 when they agree."""
    if ep.size == 1:
        return
    mine = torch.tensor([kind, step, digest(fields)], dtype=torch.int64, device=device)
    everyone = all_gather_ints(ep, mine, timeout_s, _KINDS[kind]).cpu().numpy()
    _raise_unless_equal(ep, everyone, kind, step, fields)


def _raise_unless_equal(ep: EPGroup, envelopes_W3, kind: int, step: int, fields: dict[str, str]) -> None:
    if (envelopes_W3 == envelopes_W3[0]).all():
        return
    details = collectives.all_gather_object({"kind": kind, "step": step, "fields": fields}, group=ep.group)
    raise AgreementError(_describe(details, ep.rank))


class LayerAgreement:
    """The agreement checks of one EP layer, the forward's counts riding with them.

    The first check is ``check_envelope`` (three int64, the same for every layer); the payload,
    if any, follows in a second all-gather. Once one check has passed on every rank, each check
    is ONE all-gather of ``3 + payload_width`` int64: the envelope, then the payload (zeros when
    none). payload_width is fixed by the layer (its expert count), which that first check
    compared, so the widths agree.
    """

    def __init__(self, ep: EPGroup, payload_width: int):
        self.ep = ep
        self.payload_width = payload_width
        self.agreed = False

    def check(self, kind: int, step: int, fields: dict[str, str], timeout_s: float, device: torch.device,
              payload: torch.Tensor | None = None):
        """Raise ``AgreementError`` on every rank unless all agree; return every rank's payload
        (``int64 [W, payload_width]`` on the host) when one is given, else None."""
        return self.start(kind, step, fields, timeout_s, device, payload).wait()

    def start(self, kind: int, step: int, fields: dict[str, str], timeout_s: float, device: torch.device,
              payload: torch.Tensor | None = None) -> "PendingCheck":
        """``check`` with its all-gather started and not yet read: ``wait()`` compares the
        envelopes (raising like ``check``) and returns the payloads. Work that does not depend on
        the other ranks runs in between (the exact dispatch's local rows). A layer's very first
        check still compares its envelope before returning."""
        ep, width = self.ep, self.payload_width
        if payload is not None and payload.shape != (width,):
            raise ValueError(f"agreement payload of shape {tuple(payload.shape)}, the layer's is ({width},)")
        if ep.size == 1:
            return PendingCheck(payload.to(torch.int64).cpu().numpy()[None] if payload is not None else None)
        if not self.agreed:
            check_envelope(ep, kind, step, fields, timeout_s, device)
            self.agreed = True
            if payload is None:
                return PendingCheck(None)
            return PendingCheck(start_all_gather_ints(ep, payload.to(torch.int64), timeout_s, _KINDS[kind]))
        envelope = torch.tensor([kind, step, digest(fields)], dtype=torch.int64).to(device)
        body = payload.to(torch.int64) if payload is not None else torch.zeros(width, dtype=torch.int64, device=device)
        gathered = start_all_gather_ints(ep, torch.cat([envelope, body]), timeout_s, _KINDS[kind])
        return PendingCheck(gathered, (ep, kind, step, fields), payload is not None)


class PendingCheck:
    """An agreement check in flight (``LayerAgreement.start``); ``wait()`` finishes it."""

    def __init__(self, gathered, envelope_of=None, has_payload: bool = True):
        self._gathered, self._envelope_of, self._has_payload = gathered, envelope_of, has_payload

    def wait(self):
        gathered = self._gathered
        if gathered is None or isinstance(gathered, np.ndarray):
            return gathered
        everyone = gathered.wait()
        if self._envelope_of is None:
            return everyone
        ep, kind, step, fields = self._envelope_of
        _raise_unless_equal(ep, everyone[:, :3], kind, step, fields)
        return everyone[:, 3:] if self._has_payload else None


class PendingInts:
    """An int64 all-gather in flight; ``wait()`` gives ``[W, n]`` on the host. On CUDA the wait
    and the host copy run on a side stream, so the host waits for the collective only, not for
    kernels queued after it was started."""

    def __init__(self, ep: EPGroup, mine: torch.Tensor, timeout_s: float, what: str):
        self._parts = [torch.empty_like(mine) for _ in range(ep.size)]
        self._tensors = [*self._parts, mine]
        self._counts = collectives.use_counts(self._tensors)
        self._work = dist.all_gather(self._parts, mine, group=ep.group, async_op=True)
        self._timeout_s, self._what = timeout_s, what

    def wait(self) -> np.ndarray:
        device = self._parts[0].device
        side = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
        with side:
            wait(self._work, self._timeout_s, self._what)
            self._work = None
            collectives.settle(self._tensors, self._counts)
            return torch.stack(self._parts).cpu().numpy()


def start_all_gather_ints(ep: EPGroup, mine: torch.Tensor, timeout_s: float, what: str) -> PendingInts:
    """``all_gather_ints`` started asynchronously."""
    return PendingInts(ep, mine, timeout_s, what)


def all_gather_ints(ep: EPGroup, mine: torch.Tensor, timeout_s: float, what: str) -> torch.Tensor:
    """``[W, len(mine)]``: ``mine`` from every rank, waiting at most ``timeout_s``."""
    return collectives.gathered(mine, ep.group, bounded_wait(timeout_s, what))


def bounded_wait(timeout_s: float, what: str, among: str = "the EP group"):
    """A wait for ``collectives.run`` that raises ``TimeoutError`` naming ``what`` (and the group,
    ``among``) after ``timeout_s``."""
    return collectives.timed_wait(timeout_s, lambda: (
        f"flexmoe expert parallelism: {what} waited {timeout_s:g} s for the other ranks of {among} "
        "(ParallelConfig.timeout_s); a rank failed, skipped this step or runs different code"))


def wait(work, timeout_s: float, what: str) -> None:
    """Finish an async collective, or raise ``TimeoutError`` after ``timeout_s`` seconds (the
    caller settles its tensors: ``collectives.settle``)."""
    bounded_wait(timeout_s, what)(work)


def _describe(details: list[dict], rank: int) -> str:
    kinds = [d["kind"] for d in details]
    if len(set(kinds)) > 1:
        where = "; ".join(f"rank {r}: {_KINDS[k]} (forward step {d['step']})" for r, (k, d) in enumerate(zip(kinds, details)))
        return f"flexmoe expert parallelism: ranks of the EP group are at different points ({where})"
    steps = [d["step"] for d in details]
    if len(set(steps)) > 1:
        return ("flexmoe expert parallelism: ranks of the EP group are at different forward steps of this layer "
                f"(per rank: {steps}); a rank skipped a forward or caught an error and moved on")
    for name in details[0]["fields"]:
        values = [d["fields"].get(name) for d in details]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            return (f"flexmoe expert parallelism: ranks of the EP group disagree on {name} ({shown}); every rank "
                    "must run the same layer with the same placement table, config, dtype and grad mode")
    extra = sorted(set().union(*(d["fields"] for d in details)) - set(details[0]["fields"]))
    return f"flexmoe expert parallelism: ranks of the EP group disagree on {extra or 'their fields'} (this rank {rank})"

