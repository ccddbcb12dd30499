"""Hook mode's gradient collection (a component of apollo.Apollo): post-accumulate-grad hooks
that take each gradient off its parameter and hand a bucket's gradients to `flush` as soon as
the bucket (one decoder layer) is complete, so at most one bucket's gradients exist at a time.

The hooks act only while armed (between Apollo.begin_step() and finish_step()); disarmed, backward
accumulates `.grad` as usual. Autograd runs the hooks of each CUDA device on that device's own
thread: a lock serializes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, its gradient), in arrival order


class BackwardHooks:
    def __init__(self, flush: Callable[[str, Pairs], None]) -> None:
        self._flush = flush
        self._handles: dict[torch.Tensor, Any] = {}
        self._bucket: dict[torch.Tensor, str] = {}
        self._sizes: dict[str, int] = {}  # bucket -> parameters hooked in it
        self._lock = threading.Lock()
        self._attached = False
        self._armed = False
        self._pending: Pairs = []  # gradients of the bucket being filled
        self._pending_key: str | None = None
        self.flush_ns = 0  # host time spent in `flush` (a diagnostic: bench/gpu_step_anatomy.py)

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def bucket_sizes(self) -> dict[str, int]:
        return dict(self._sizes)

    def held(self) -> set[str]:
        """Buckets whose gradients are held right now (at most one)."""
        return {self._pending_key} if self._pending else set()

    def attach(self, params: Iterable[tuple[torch.Tensor, str]]) -> None:
        """Hook every (parameter, bucket) that requires grad; idempotent. Later calls (parameter
        groups added after attaching) hook the new ones."""
        self._attached = True
        for p, key in params:
            if p.requires_grad and p not in self._handles:
                self._handles[p] = p.register_post_accumulate_grad_hook(self._hook)
                self._bucket[p] = key
                self._sizes[key] = self._sizes.get(key, 0) + 1

    def detach(self) -> None:
        if self._armed:
            raise RuntimeError("detach() during a step: disarm() first")
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        self._bucket.clear()
        self._sizes.clear()
        self._attached = False

    def arm(self) -> None:
        self._armed = True
        self._pending, self._pending_key = [], None

    def disarm(self, flush_held: bool) -> None:
        """End of the step. flush_held: a bucket some of whose parameters got no gradient is
        flushed now; else (a failed backward) its gradients are dropped unapplied."""
        if flush_held and self._pending:
            self._flush_pending()
        self._pending, self._pending_key = [], None
        self._armed = False

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        with self._lock:
            grad = p.grad
            p.grad = None  # held only until its bucket is complete
            key = self._bucket[p]
            if self._pending and key != self._pending_key:
                self._flush_pending()  # at most one bucket's gradients exist at a time
            self._pending_key = key
            self._pending.append((p, grad))
            if len(self._pending) >= self._sizes[key]:
                self._flush_pending()

    def _flush_pending(self) -> None:
        pairs, key = self._pending, self._pending_key
        self._pending, self._pending_key = [], None
        t = time.perf_counter_ns()
        try:
            self._flush(key, pairs)
        finally:
            self.flush_ns += time.perf_counter_ns() - t
