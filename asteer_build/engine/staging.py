"""Host -> device staging of small per-step index arrays, safe with steps in flight.

The host writes each step's indices (capture token index, pooling slots...) into a host
buffer and the device reads them from a fixed device tensor (fixed address: CUDA graphs
and compiled graphs read it in place). On GPU the host -> device copy is non-blocking
from pinned memory, so it runs when the stream reaches it; with async scheduling the host
prepares step k+1 while step k (and its queued copy) may not have run yet. Rewriting the
one pinned buffer then would let step k read step k+1's indices. So there is one host
buffer per step in flight, each guarded by an event recorded after its copy; a buffer is
rewritten only after its event completed (the same scheme as `SteeringState`'s index).

On CPU the device tensor *is* the single host buffer: no copy, no events.

Only the first `n` entries of a step are meaningful; the rest hold each array's fill
value, so a fixed-size (graph-safe) read past `n` sees "nothing selected". Each host
buffer remembers how far it was written (its own extent, from its last use two steps
ago) and the device remembers the last step's extent, so a step clears and copies only
`max(n, previous extent)` entries, not the whole buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _copy_non_blocking(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


class StagedArrays:
    """Named int64 arrays of one length, written on the host per step, read on the device.

    `separate`, `event_factory` and `copy` exist for tests, which simulate a stream that
    runs copies late on CPU (see tests/test_staging.py); production leaves them unset.
    """

    def __init__(
        self,
        *,
        size: int,
        fills: dict[str, int],
        device: torch.device,
        depth: int = 2,
        separate: bool | None = None,
        event_factory: Callable[[], Any] | None = None,
        copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> None:
        on_cpu = device.type == "cpu"
        self.separate = (not on_cpu) if separate is None else separate
        self.fills = dict(fills)
        self.size = size
        nhosts = depth if self.separate else 1
        self.hosts: list[dict[str, torch.Tensor]] = [
            {
                k: torch.full((size,), v, dtype=torch.int64, pin_memory=not on_cpu)
                for k, v in fills.items()
            }
            for _ in range(nhosts)
        ]
        self.device_arrays: dict[str, torch.Tensor] = (
            {k: torch.full((size,), v, dtype=torch.int64, device=device) for k, v in fills.items()}
            if self.separate
            else self.hosts[0]
        )
        self._events: list[Any] = [None] * nhosts
        self._host_extent = [0] * nhosts
        self._device_extent = 0
        self._turn = 0
        self._event_factory = event_factory or (lambda: torch.cuda.Event())
        self._copy = copy or _copy_non_blocking

    def __getitem__(self, name: str) -> torch.Tensor:
        """The device tensor hooks read (fixed address for the engine's lifetime)."""
        return self.device_arrays[name]

    def write(self, n: int, values: dict[str, np.ndarray] | None = None) -> None:
        """This step's first `n` entries of every array; the rest read as the fill value.

        `n == 0` (no values) is an empty step: nothing selected, every index in bounds.
        """
        if n > self.size:
            raise ValueError(f"asteer: {n} staged entries exceed the buffer ({self.size})")
        turn = self._turn
        event = self._events[turn]
        if event is not None:
            # This buffer's previous copy (two steps ago) must have run before it is
            # rewritten. Normally long done; blocks only if the host runs ahead.
            event.synchronize()
        host = self.hosts[turn]
        extent = self._host_extent[turn]
        for name, tensor in host.items():
            a = tensor.numpy()
            if n:
                assert values is not None
                a[:n] = values[name]
            if extent > n:
                a[n:extent] = self.fills[name]
        self._host_extent[turn] = n
        if self.separate:
            upto = max(n, self._device_extent)
            if upto:
                for name, tensor in host.items():
                    self._copy(self.device_arrays[name][:upto], tensor[:upto])
                event = event or self._event_factory()
                event.record()
                self._events[turn] = event
            self._turn = (turn + 1) % len(self.hosts)
        self._device_extent = n
