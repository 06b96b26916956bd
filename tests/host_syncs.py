"""Counting the host synchronisations a piece of code would make on a GPU, on the CPU.

On CUDA, reading a device value on the host (``.item()``, ``bool()``, ``.tolist()``, ``.numpy()``)
or an op whose output size depends on the values (``nonzero``, ``masked_select``, ``unique``)
waits for the device: the host stops queueing kernels ahead of it. ``HostSyncs`` counts them
(tensor ops through a dispatch mode, the host reads through wrapped ``Tensor`` methods) so a
test can pin "no host synchronisation in a training step" without a GPU.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
_HOST_READS = ("tolist", "numpy")


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...``; then ``s.count`` and ``s.calls`` (name -> count)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self._saved: dict = {}

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __enter__(self):
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))
