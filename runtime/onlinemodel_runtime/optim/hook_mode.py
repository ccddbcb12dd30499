"""Hook mode of Apollo: updates applied during backward, bucket by bucket (a mixin of apollo.Apollo).

`attach_to_backward()` once, then per step `backward_step(loss)` (or `begin_step()`,
`loss.backward()`, `finish_step()`). Post-accumulate-grad hooks hold gradients until their bucket
(one decoder layer) is complete, update it and drop the gradients: at most one layer's gradients
exist. On CUDA a captured bucket is replayed from its plan (compiled_buckets._flush_planned), others
go through Apollo._update_bucket; the updates run on a side stream that overlaps backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .hyperparams import StepReport

Item = tuple[dict[str, Any], torch.Tensor, torch.Tensor]  # (group, param, gradient)


class HookMode:
    """The hook-mode half of Apollo; uses its state (_bucket_of, _update_bucket, _settle, ...)."""
    def attach_to_backward(self) -> None:
        """Register post-accumulate-grad hooks on every managed parameter (idempotent; groups
        added later get theirs in add_param_group)."""
        self._attached = True
        for group in self.param_groups:
            self._hook_params(group["params"])

    def _hook_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.requires_grad and p not in self._hooked:
                self._hooked[p] = p.register_post_accumulate_grad_hook(self._make_hook())
                key = self._bucket_of[p]
                self._bucket_size[key] = self._bucket_size.get(key, 0) + 1

    def detach_from_backward(self) -> None:
        """Remove the hooks; a step in progress is ended first (reported as skipped, what was
        already applied stays, counters settled)."""
        if self._armed:
            self.finish_step("detached during the step")
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        self._bucket_size = {}
        self._attached = False

    def _make_hook(self) -> Callable[[torch.Tensor], None]:
        # The group is looked up when the gradient arrives: load_state_dict replaces param_groups.
        # The lock: autograd runs the hooks of each CUDA device on that device's own thread.
        lock = self._hook_lock

        def hook(p: torch.Tensor) -> None:
            if not self._armed:
                return  # not inside begin/finish: gradients accumulate as usual
            with lock:
                grad = p.grad
                p.grad = None  # held only until its bucket (decoder layer) is complete
                key = self._bucket_of[p]
                if self._pending and key != self._pending_key:
                    self._flush_pending()  # at most one bucket's gradients exist at a time
                self._pending_key = key
                self._pending.append((self._group_of[p], p, grad))
                if len(self._pending) >= self._bucket_size.get(key, 1):
                    self._flush_pending()
        return hook

    def _flush_pending(self) -> None:
        items, self._pending, self._pending_key = self._pending, [], None
        items.sort(key=lambda it: self._order[it[1]])  # the order step() uses
        if self._flush_planned(items):
            return  # replayed its captured graph (compiled_buckets.py)
        by_device: dict[torch.device, list[Item]] = {}
        for it in items:
            by_device.setdefault(it[1].device, []).append(it)
        for device, part in by_device.items():
            side = self._side_stream(device)
            self._producer = torch.cuda.current_stream(device) if side is not None else None
            try:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    # Once one gradient is non-finite, every later bucket in this step is gated
                    # off too: each update reads and writes the device's step gate.
                    ok = self._update_bucket(part, self._gate_for(device))
                    if side is not None:  # a planned replay's host writes wait for this
                        self._events(device)[0].record(side)
            finally:
                self._producer = None
            self._flags.append(([p for _, p, _ in part], ok))

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """CUDA: the stream bucket updates run on, so they overlap the rest of backward. Its first
        use in a step waits for the main stream (the step's gate reset, earlier step() calls);
        each update then waits for everything backward has queued so far (this bucket's
        gradients, every kernel that reads these weights) right before it starts: a replayed graph
        in BucketGraph.run, after copying the gradients into its buffers on backward's own stream
        (so they need no cross-stream marking), other paths in _await_producer (and they mark the
        gradients, _mark_grads_used_here). finish_step() makes the main stream wait for it."""
        if device.type != "cuda" or not self._use_side_stream:
            return None
        side = self._side_stream_of(device)
        if device not in self._side_synced:
            side.wait_stream(torch.cuda.current_stream(device))
            self._side_synced.add(device)
        return side

    def _side_stream_of(self, device: torch.device) -> torch.cuda.Stream:
        side = self._side_streams.get(device)
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device=device)
        return side

    def _await_producer(self) -> None:
        """Uncaptured paths on the side stream: start after backward's kernels queued so far."""
        if self._producer is not None:
            torch.cuda.current_stream(self._producer.device).wait_stream(self._producer)

    def _join_side_streams(self) -> None:
        for device, side in self._side_streams.items():
            torch.cuda.current_stream(device).wait_stream(side)

    def begin_step(self) -> None:
        """Arm the hooks for one backward pass; stale gradients are dropped."""
        if not self._attached:
            raise RuntimeError("begin_step() needs attach_to_backward() first")
        if self._armed:
            raise RuntimeError("begin_step() called twice without finish_step()")
        self.zero_grad(set_to_none=True)
        self._armed = True
        self._new_step()
        self._side_synced.clear()
        self._flags = []
        self._pending, self._pending_key = [], None

    def finish_step(self, reason: str | None = None) -> StepReport:
        """Disarm the hooks and report (one device sync). `reason` marks the step skipped."""
        if not self._armed:
            raise RuntimeError("finish_step() without begin_step()")
        if reason is None and self._pending:
            self._flush_pending()  # a bucket some of whose parameters got no gradient
        self._pending, self._pending_key = [], None  # after a failed backward: not applied
        self._join_side_streams()
        self._armed = False
        flags, self._flags = self._flags, []
        applied, total = self._settle(flags)
        return self._record(applied, total, reason)

    def backward_step(self, loss: torch.Tensor) -> StepReport:
        """begin_step + loss.backward() + finish_step, skipping the backward if the loss is not
        finite (then nothing is touched)."""
        self.begin_step()
        if not bool(torch.isfinite(loss.detach()).all()):
            return self.finish_step("non-finite loss")
        try:
            loss.backward()
        except BaseException:
            self.finish_step("backward failed")
            raise
        return self.finish_step()


    def _mark_grads_used_here(self, grads: list[torch.Tensor]) -> None:
        """Gradients read on a side stream: keep their memory from being reused by backward (on
        the producer stream) before this stream is done with them."""
        if self._producer is not None:
            for g in grads:
                g.record_stream(torch.cuda.current_stream(g.device))
