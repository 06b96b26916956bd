"""Slot transfer: copy slot rows of several tensors between ranks, issued and landed separately.

Legend: S slots per rank; a *field* is one tensor ``[S, ...]`` with a row per physical slot (an
expert parameter or one of its optimizer states); a *transfer* copies the rows of every field from
``src = (rank, slot)`` to ``dst = (rank, slot)``.

``SlotTransfer.issue`` reads every source row into staging buffers (local copies and one packed
buffer per peer and dtype) and posts the remote rows as one non-blocking ``batch_isend_irecv``;
``land`` waits for them (at most ``timeout_s``) and only then writes the destination rows. So a
slot may be the source and the destination of one change (two experts can swap), the fields may
be read (not written) while the rows are in flight, and a failed wait writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .. import collectives
from ..parallel.agreement import wait
from ..placement.moves import Transfer


@dataclasses.dataclass
class Field:
    """One tensor with a slot row per physical slot. ``owner`` is the object whose in-place
    writes count as a change (the Parameter for a parameter's ``.data``; the tensor itself for an
    optimizer state); ``locate`` finds the tensor the field stands for now (an optimizer's
    ``load_state_dict`` replaces its state tensors)."""

    name: str
    tensor: torch.Tensor
    owner: torch.Tensor
    locate: Callable[[], torch.Tensor | None] | None = None

    def changed_since(self, version: int) -> bool:
        """Written in place since ``owner._version`` was ``version``, or replaced."""
        return self.owner._version != version or (self.locate is not None and self.locate() is not self.owner)

    @property
    def row_bytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()


class SlotTransfer:
    """The rows of ``fields`` along ``transfers`` on this rank, in flight between ``issue`` and ``land``."""

    def __init__(self, transfers: Sequence[Transfer], fields: list[Field], rank: int, group) -> None:
        self.fields = fields
        self.group = group
        self.local = [t for t in transfers if t.src[0] == rank and t.dst[0] == rank]
        self.sends: dict[int, list[Transfer]] = {}
        self.recvs: dict[int, list[Transfer]] = {}
        for t in transfers:
            if t.src[0] == rank and t.dst[0] != rank:
                self.sends.setdefault(t.dst[0], []).append(t)
            elif t.dst[0] == rank and t.src[0] != rank:
                self.recvs.setdefault(t.src[0], []).append(t)
        self.dtypes = list(dict.fromkeys(f.tensor.dtype for f in fields))
        self.works: list = []
        self._settle: tuple = ([], None)  # buffers in flight and their owner counts (collectives.settle)
        self._staged_local: list[torch.Tensor] = []
        self._send_bufs: dict = {}
        self._recv_bufs: dict = {}
        self._index: dict = {}  # (transfer group, "src" | "dst", device) -> slot indices

    @property
    def rows_sent(self) -> int:
        return sum(map(len, self.sends.values()))

    @property
    def rows_received(self) -> int:
        return sum(map(len, self.recvs.values()))

    def issue(self) -> "SlotTransfer":
        """Stage every source row and post the remote ones; returns without waiting."""
        fields = self.fields
        # Slot indices, one host-to-device copy per group of transfers and device (not per field);
        # the destination ones too, so that landing (in a forward pre-hook) copies nothing.
        devices = list(dict.fromkeys(f.tensor.device for f in fields))
        groups = [("local", self.local)] + [(("send", p), ts) for p, ts in self.sends.items()] \
            + [(("recv", p), ts) for p, ts in self.recvs.items()]
        self._index = {(key, which, d): torch.tensor([getattr(t, which)[1] for t in ts], dtype=torch.long, device=d)
                       for key, ts in groups if ts for which in ("src", "dst") for d in devices}
        rows = lambda key, which, f: self._index[(key, which, f.tensor.device)]  # noqa: E731
        self._staged_local = [f.tensor.index_select(0, rows("local", "src", f)) for f in fields] if self.local else []
        self._send_bufs = {peer: _pack(fields, self.dtypes, lambda f, peer=peer: f.tensor.index_select(0, rows(("send", peer), "src", f)))
                           for peer in sorted(self.sends)}
        self._recv_bufs = {peer: _empty_like_pack(fields, self.dtypes, len(ts)) for peer, ts in sorted(self.recvs.items())}
        ops = []
        for peer in sorted(set(self.sends) | set(self.recvs)):
            global_peer = dist.get_global_rank(self.group, peer) if self.group is not None else peer
            for tag, dtype in enumerate(self.dtypes):
                if peer in self.sends:
                    ops.append(dist.P2POp(dist.isend, self._send_bufs[peer][dtype], global_peer, self.group, tag))
                if peer in self.recvs:
                    ops.append(dist.P2POp(dist.irecv, self._recv_bufs[peer][dtype], global_peer, self.group, tag))
        buffers = [b for bufs in (self._send_bufs, self._recv_bufs) for per in bufs.values() for b in per.values()]
        self._settle = (buffers, collectives.use_counts(buffers)) if buffers else ([], None)
        self.works = list(dist.batch_isend_irecv(ops)) if ops else []
        return self

    def wait(self, timeout_s: float) -> None:
        """Finish the posted sends and receives (TimeoutError after ``timeout_s``); writes nothing.
        With NCCL the current stream waits for them, the host does not (the process group's
        watchdog bounds them)."""
        works, self.works = self.works, []
        on_stream = bool(works) and dist.get_backend(self.group) == "nccl"
        try:
            for work in works:
                if on_stream:
                    work.wait()
                else:
                    wait(work, timeout_s, "a placement move's slot transfer")
        finally:  # a failed wait too: what gloo still holds is kept, not left to it
            work = works = None  # the works hold the buffers: drop them before settling
            collectives.settle(*self._settle)
            self._settle = ([], None)
        self._send_bufs = {}

    def land(self, timeout_s: float) -> None:
        """Wait for the remote rows, then write every destination row."""
        self.wait(timeout_s)
        with torch.no_grad():
            for f, staged in zip(self.fields, self._staged_local):
                f.tensor.index_copy_(0, self._index[("local", "dst", f.tensor.device)], staged)
            for peer, ts in sorted(self.recvs.items()):
                for f, block in zip(self.fields, _unpack(self.fields, self.dtypes, self._recv_bufs[peer], len(ts))):
                    f.tensor.index_copy_(0, self._index[(("recv", peer), "dst", f.tensor.device)], block)
        self._staged_local, self._recv_bufs, self._index = [], {}, {}


def _pack(fields: list[Field], dtypes: list[torch.dtype], take) -> dict[torch.dtype, torch.Tensor]:
    """One flat buffer per dtype: the selected rows of each field of that dtype, in field order."""
    out = {}
    for dtype in dtypes:
        parts = [take(f).reshape(-1) for f in fields if f.tensor.dtype == dtype]
        out[dtype] = torch.cat(parts)
    return out


def _empty_like_pack(fields: list[Field], dtypes: list[torch.dtype], n: int) -> dict[torch.dtype, torch.Tensor]:
    out = {}
    for dtype in dtypes:
        same = [f for f in fields if f.tensor.dtype == dtype]
        numel = n * sum(f.tensor[0].numel() for f in same)
        out[dtype] = torch.empty(numel, dtype=dtype, device=same[0].tensor.device)
    return out


def _unpack(fields: list[Field], dtypes, bufs: dict[torch.dtype, torch.Tensor], n: int) -> list[torch.Tensor]:
    """Inverse of ``_pack``: the ``[n, *row shape]`` block of each field, in field order."""
    offsets = {dtype: 0 for dtype in dtypes}
    blocks = []
    for f in fields:
        row_shape = tuple(f.tensor.shape[1:])
        numel = n * f.tensor[0].numel()
        start = offsets[f.tensor.dtype]
        blocks.append(bufs[f.tensor.dtype][start:start + numel].view(n, *row_shape))
        offsets[f.tensor.dtype] = start + numel
    return blocks
