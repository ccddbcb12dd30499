"""Hook mode's side CUDA stream: bucket updates overlap the rest of backward (a component of
apollo.Apollo; CPU and side_stream=False: every method is a no-op or returns None).

Ordering, per device: the side stream's first use in a step waits for the main stream (the step's
gate reset, earlier step() calls); each uncaptured update then waits for everything backward has
queued so far (`await_producer`: this bucket's gradients, every kernel that reads these weights)
and marks the gradients it reads as used on the side stream (`mark_used`), so backward's allocator
does not reuse their memory early. A replayed graph instead copies the gradients into its buffers
on backward's own stream and then waits for that copy (graphs.BucketGraph.run), using the two
reused events of `events`. `join` makes the main stream wait for the side stream at finish_step().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class SideStreams:
    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"Invalid side_stream: {enabled!r} (a bool)")
        self.enabled = enabled
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._synced: set[torch.device] = set()  # side streams that waited this step
        self._events: dict[torch.device, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._producer: torch.cuda.Stream | None = None  # the stream gradients come from

    def new_step(self) -> None:
        self._synced.clear()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device=device)
        return side

    def events(self, device: torch.device) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """(side stream's last update done, main stream's gradient copy done), reused every bucket."""
        evs = self._events.get(device)
        if evs is None:
            evs = self._events[device] = (torch.cuda.Event(), torch.cuda.Event())
        return evs

    @contextlib.contextmanager
    def updating(self, device: torch.device) -> Iterator[None]:
        """Run a bucket's general-path update (compiled call, capture, eager) for `device` on its
        side stream, with the current stream recorded as the producer of the gradients."""
        if device.type != "cuda" or not self.enabled:
            yield
            return
        side = self._stream(device)
        if device not in self._synced:
            side.wait_stream(torch.cuda.current_stream(device))
            self._synced.add(device)
        self._producer = torch.cuda.current_stream(device)
        try:
            with torch.cuda.stream(side):
                yield
                self.events(device)[0].record(side)  # a planned replay's host writes wait for this
        finally:
            self._producer = None

    def await_producer(self) -> None:
        """Uncaptured paths on the side stream: start after backward's kernels queued so far."""
        if self._producer is not None:
            torch.cuda.current_stream(self._producer.device).wait_stream(self._producer)

    def mark_used(self, grads: list[torch.Tensor]) -> None:
        """Gradients read on the side stream: keep their memory from being reused by backward (on
        the producer stream) before this stream is done with them."""
        if self._producer is not None:
            for g in grads:
                g.record_stream(torch.cuda.current_stream(g.device))

    def for_capture(self, device: torch.device) -> tuple | None:
        """graphs.BucketGraph.run's `streams` for a graph run inside `updating` (None outside)."""
        if self._producer is None:
            return None
        side = torch.cuda.current_stream(device)
        return (self._producer, side, self.events(device), side)

    def for_replay(self, device: torch.device) -> tuple | None:
        """BucketGraph.run's `streams` for a planned replay, which starts on the main stream; the
        main stream first waits for the last update on the side stream (it read the shared
        buffers the replay's host steps are about to rewrite)."""
        if device.type != "cuda" or not self.enabled:
            return None
        main = torch.cuda.current_stream(device)
        evs = self.events(device)
        main.wait_event(evs[0])
        return (main, self._stream(device), evs, main)

    def order_after(self, device: torch.device) -> None:
        """The current stream of `device` waits for its side stream (a cross-device read of what
        the side stream wrote)."""
        side = self._streams.get(device)
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)

    def join(self) -> None:
        for device, side in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(side)
