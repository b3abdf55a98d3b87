"""Host <-> device copies that never make the host wait for the device's queued work.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronizes the
stream: the host stops until every kernel already queued has run. The engine's step queues its
forward and sampling, then builds the next inputs; a hidden sync there leaves the GPU idle while
the host works. Here copies go through pinned memory with ``non_blocking=True`` (PyTorch's
caching host allocator keeps a pinned block until its copy has run), and results come back to
the host behind a CUDA event, so the host waits for exactly the work it needs. On the CPU both
are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``, without a stream sync."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class ToHost:
    """A device tensor on its way to the host: the copy is queued now, ``wait()`` returns it as a
    list once the work queued before it (and only that) has run."""

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = t, None

    def wait(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
