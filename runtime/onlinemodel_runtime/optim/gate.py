"""The step's all-or-nothing gate, kept on the device (a component of apollo.Apollo).

One 0-dim bool per device, set True at the start of each step; every bucket update reads it and
writes back `gate & bucket finite`, so once a gradient or update is non-finite every later bucket
of the step is gated off too, with no host round trip (captured CUDA graphs read and write the
same tensor in place). Each bucket's own applied flag is recorded and all are read in one
transfer per device at the end of the step (`settle`).
"""

from __future__ import annotations

import torch

from .streams import SideStreams


class StepGate:
    def __init__(self, streams: SideStreams) -> None:
        self._streams = streams  # orders a cross-device carry after the side stream's writes
        self._bufs: dict[torch.device, torch.Tensor] = {}
        self._last: torch.device | None = None  # the device whose flag holds the verdict so far
        self._flags: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (bucket's params, applied)

    @property
    def last_device(self) -> torch.device | None:
        return self._last

    def reset(self) -> None:
        """Start of a step, on the current stream (bucket updates are ordered after it)."""
        for buf in self._bufs.values():
            buf.fill_(True)
        self._last = None
        self._flags = []

    def for_device(self, device: torch.device) -> torch.Tensor:
        """The gate of `device`: a persistent 0-dim bool. When the step moves to another device,
        the verdict so far is carried over."""
        buf = self._bufs.get(device)
        if buf is None:
            buf = self._bufs[device] = torch.ones((), dtype=torch.bool, device=device)
        last = self._last
        if last is not None and last != device:
            # A cross-device copy runs on the source's current stream: order it after the
            # source's side-stream updates, which wrote the flag.
            self._streams.order_after(last)
            buf.copy_(self._bufs[last])
        self._last = device
        return buf

    def record(self, params: list[torch.Tensor], applied: torch.Tensor) -> None:
        """A bucket's applied flag (0-dim bool on its device), read at settle()."""
        self._flags.append((params, applied))

    def settle(self) -> tuple[int, list[torch.Tensor]]:
        """One host sync per device: (parameters updated, parameters whose update was gated off)."""
        flags, self._flags = self._flags, []
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, f) in enumerate(flags):
            by_device.setdefault(f.device, []).append(i)
        values = [False] * len(flags)
        for idx in by_device.values():
            for i, v in zip(idx, torch.stack([flags[i][1] for i in idx]).tolist()):
                values[i] = v
        applied, gated_off = 0, []
        for (params, _), ok in zip(flags, values):
            if ok:
                applied += len(params)
            else:
                gated_off.extend(params)
        return applied, gated_off
