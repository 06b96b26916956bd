"""Input checks that cost no host synchronisation on accelerators."""

from __future__ import annotations

import torch


def check_finite(x: torch.Tensor, message: str, device_assert: bool | None = None) -> None:
    """Fail with ``message`` when ``x`` holds a NaN or Inf.

    On CPU (``device_assert`` False) this raises ``ValueError``. On an accelerator it enqueues an
    asynchronous device assert instead: no host synchronisation, and a failure surfaces as a
    RuntimeError at a later CUDA call (the CUDA context is then unusable, as for any device
    assert). ``device_assert=None`` picks by device.
    """
    finite = torch.isfinite(x).all()
    if device_assert is None:
        device_assert = x.device.type != "cpu"
    if device_assert:
        torch._assert_async(finite, message)
    elif not finite:
        raise ValueError(message)
