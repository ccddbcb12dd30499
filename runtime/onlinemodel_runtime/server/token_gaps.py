"""The gaps between a stream's tokens, as vLLM's API server sees them, and where they go.

vLLM's output handler times every token it receives from the engine; its stat loggers get the gap between
each stream's consecutive tokens (``vllm_plugins/stat_logger.py`` receives them). ``FEED`` is this
process's hand-off: the stat logger writes into the sink the pacing governor attached
(``pacing_control.py``), and does nothing while none is attached, so a vLLM that merely has this package
installed records nothing. Both sides run on the API server's event loop: no lock.

``GapRing`` keeps the newest values of such a stream in a preallocated array, so the per-token path never
grows memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class GapRing:
    """The newest `capacity` values of a stream (seconds), in a fixed array; ``count`` counts every value
    ever added, so a reader remembers a count and later takes what came after it (``since``)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity {capacity} is below 1")
        self.capacity = capacity
        self._buf = np.zeros(capacity)
        self.count = 0

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def extend(self, values: Sequence[float] | np.ndarray) -> None:
        n = len(values)
        if n > self.capacity:  # only the newest fit
            self.count += n - self.capacity
            values, n = values[n - self.capacity:], self.capacity
        start = self.count % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start:start + first] = values[:first]
        if first < n:
            self._buf[:n - first] = values[first:]
        self.count += n

    def since(self, count: int) -> np.ndarray:
        """A copy of the values added after the ring held `count` in all (the newest `capacity` at most),
        oldest first."""
        n = min(self.count - count, len(self))
        if n <= 0:
            return np.empty(0)
        end = self.count % self.capacity
        if n <= end:
            return self._buf[end - n:end].copy()
        return np.concatenate((self._buf[self.capacity - (n - end):], self._buf[:end]))

    def values(self) -> np.ndarray:
        return self.since(self.count - len(self))

    def clear(self) -> None:
        self.count = 0


class TokenGapFeed:
    """This process's stat loggers (``loggers``: how many vLLM instantiated) and the sink they write to."""

    def __init__(self) -> None:
        self.loggers = 0
        self.sink: GapRing | None = None

    def add(self, gaps: Sequence[float]) -> None:
        sink = self.sink
        if sink is not None and gaps:
            sink.extend(gaps)


FEED = TokenGapFeed()
