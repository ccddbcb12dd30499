"""The trainer's job queue: FIFO, blocking ``get`` for the training thread, and removal of a queued job.

``queue.Queue`` cannot take an item out of the middle, which ``DELETE /train/jobs/{id}`` needs.
Items are ``(job, examples)``; ``None`` tells the training thread to stop.
"""

from __future__ import annotations

import collections
import threading
from typing import Any


class JobQueue:
    def __init__(self) -> None:
        self._items: collections.deque[tuple[Any, Any] | None] = collections.deque()
        self._ready = threading.Condition()

    def put(self, item: tuple[Any, Any] | None) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def get(self) -> tuple[Any, Any] | None:
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    def remove(self, job_id: str) -> bool:
        """Take the job with `job_id` out of the queue; False if it is not (or no longer) queued."""
        with self._ready:
            for item in self._items:
                if item is not None and item[0].id == job_id:
                    self._items.remove(item)
                    return True
            return False

    def qsize(self) -> int:
        with self._ready:
            return sum(item is not None for item in self._items)

    def empty(self) -> bool:
        return self.qsize() == 0
