"""Serving first, the trainer's half: yield the GPU at fine grain while requests wait for tokens.

Yield points: a forward pre-hook on every ``nn.Linear``, and in backward a gradient hook on every Linear's
output (registered by a forward hook), which runs just before that Linear's backward. Both keep firing
with activation recomputation (the recomputed forward passes the pre-hooks again; its outputs are never
backpropagated, so it registers no gradient hooks) and with the optimizer's hook-mode updates (those run
between yield points; the device synchronize below waits for them too).

At a yield point:

- nobody waits for tokens (``in_flight`` of the load signal is 0): return. One memory read.
- else: synchronize the device, so at most one of the trainer's ops is ever queued ahead of vLLM's
  kernels. Once the trainer has computed for a slice (``slice_seconds`` x the controller's slice scale)
  since it last resumed, it sleeps
  ``busy * (1 - d) / d`` (at most ``max_sleep``), ``d`` the duty cycle the API server's controller
  publishes, re-reading the signal every ``POLL_SECONDS`` so that it resumes as soon as nobody waits.
  ``d == 0`` (the controller measuring its baseline) holds the trainer until ``d > 0`` or nobody waits.

An op longer than a slice is split while requests wait: dense MLPs run over token chunks (exact, they
are token-wise) of at most ``tokens_per_slice`` tokens (``slice_flops`` x the slice scale), and the loss
bounds its vocabulary chunks the same way (``loss.py``). Under activation recomputation the recomputed MLP replays the chunking its forward
chose, so both compute the same tensors. On CPU the same logic runs (the device synchronize is a no-op).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from onlinemodel_protocol.api import SchedulerStatus

# ~0.5 ms of bf16 matmul on an H100/H200-class GPU (~500 TFLOP/s achieved); a decode step of an 8B model
# is ~4.7 ms there (docs/serving-first.md).
SLICE_SECONDS = 0.5e-3
SLICE_FLOPS = 2.5e11
MIN_CHUNK_TOKENS = 16
MAX_SLEEP_SECONDS = 0.5  # one op's rest at most (a slow CPU op at a low duty cycle earns long ones)
POLL_SECONDS = 0.002  # a rest re-reads the signal this often
MAX_PAUSE_SECONDS = 5.0  # a probe lasts about a second; never hold the trainer forever on a stale signal
NOTES = {"fixed": "onlinemodel's stat-logger plugin (onlinemodel_token_gaps) is not loaded in vLLM's API server: "
                  "the gaps between tokens are not measured and the duty cycle is fixed by the budget"}


def _dense_mlp(module: nn.Module) -> nn.Linear | None:
    """The gate projection of a SwiGLU MLP (token-wise, so exact over token chunks), else None."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return parts[0] if all(isinstance(p, nn.Linear) for p in parts) else None


class Pacer:
    """Owns its yield points (hooks), chunking decisions and the time it has paced.

    `signal`: the load signal's reader (``in_flight``, ``duty``, ``slice_scale``, ``snapshot()``). `enabled` False: no hooks,
    status only (``--max-decode-slowdown off``). `sync`: waits for the device's queued work (None on CPU).
    """

    def __init__(self, signal: Any, *, enabled: bool = True, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 slice_seconds: float = SLICE_SECONDS, slice_flops: float = SLICE_FLOPS,
                 max_sleep: float = MAX_SLEEP_SECONDS):
        if not (slice_seconds >= 0 and slice_flops > 0 and max_sleep > 0):
            raise ValueError(f"bad pacing settings: slice_seconds={slice_seconds}, slice_flops={slice_flops}, "
                             f"max_sleep={max_sleep}")
        self.enabled = enabled
        self.slice_seconds = slice_seconds
        self.slice_flops = slice_flops
        self.max_sleep = max_sleep
        self._signal = signal
        self._sync = sync
        self._clock = clock
        self._sleep = sleep
        self.paced_seconds = 0.0
        self.phase = "idle"  # forward | backward | idle: the training loop says which
        self._pacing = False  # requests were waiting at the last yield point
        self._resume = 0.0
        self._chunks: dict[int, int] = {}  # id(module) -> token chunks its last forward used
        self._handles: list[Any] = []
        self._wrapped: list[nn.Module] = []

    @classmethod
    def for_device(cls, device: torch.device, signal: Any, *, enabled: bool) -> Pacer:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        return cls(signal, enabled=enabled, sync=sync)

    # -- state ---------------------------------------------------------------------------------
    def status(self) -> SchedulerStatus:
        snap = self._signal.snapshot()
        mode = snap.mode if self.enabled else "off"
        note = NOTES.get(mode)
        if mode == "measured" and snap.duty == 0.0:
            note = "measuring decode without training: the trainer waits while requests are in flight"

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 4)

        def ratio(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return SchedulerStatus(
            mode=mode, max_decode_slowdown=snap.max_decode_slowdown if self.enabled else None,
            in_flight_requests=max(0, snap.in_flight), duty_cycle=snap.duty if self.enabled else 1.0,
            measured_p99_slowdown=ratio(snap.tail_slowdown), baseline_p99_itl_ms=ms(snap.baseline_tail_seconds),
            p99_itl_ms=ms(snap.recent_tail_seconds), measured_slowdown=ratio(snap.measured_slowdown),
            baseline_itl_ms=ms(snap.baseline_itl_seconds),
            slice_ms=ms(self.slice_seconds * snap.slice_scale) if self.enabled else None,
            paced_seconds=round(self.paced_seconds, 3), note=note)

    # -- hooks ---------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Yield points on every Linear, token chunking on every dense MLP (nothing when disabled)."""
        if not self.enabled or self._handles:
            return
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._before_linear))
                self._handles.append(module.register_forward_hook(self._after_linear))
            gate = _dense_mlp(module)
            if gate is not None:
                # An instance attribute shadows the class's forward (nn.Module.__call__ looks it up), so the
                # parameters keep their names and the checkpoint format is untouched.
                flops = 4 * gate.in_features * gate.out_features  # backward of its largest Linear, per token
                module.forward = functools.partial(self._chunked, module, module.forward, flops)
                self._wrapped.append(module)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.forward
        self._handles, self._wrapped = [], []

    def _before_linear(self, module: nn.Module, args: Any) -> None:
        self.yield_point()

    def _after_linear(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.phase == "forward" and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._before_linear_backward)

    def _before_linear_backward(self, grad: torch.Tensor) -> None:
        self.yield_point()

    def _chunked(self, module: nn.Module, forward: Callable[..., Any], flops_per_token: int, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        if x is None or x.dim() < 2:
            return forward(*args, **kwargs)
        n = self.chunks_for(module, x.shape[-2], flops_per_token)
        if n <= 1:
            return forward(x)
        return torch.cat([forward(part) for part in x.tensor_split(n, dim=-2)], dim=-2)

    # -- decisions -----------------------------------------------------------------------------
    def begin_forward(self) -> None:
        self.phase = "forward"

    def begin_backward(self) -> None:
        self.phase = "backward"

    def end_step(self) -> None:
        self.phase = "idle"
        self._chunks.clear()

    def tokens_per_slice(self, flops_per_token: float) -> int | None:
        """The most tokens an op of `flops_per_token` may take per call now; None: no limit (idle GPU)."""
        if not self.enabled or self._signal.in_flight <= 0:
            return None
        return max(MIN_CHUNK_TOKENS, int(self.slice_flops * self._signal.slice_scale // flops_per_token))

    def chunks_for(self, module: nn.Module, tokens: int, flops_per_token: float) -> int:
        """Token chunks for `module` now. A recomputation in backward replays its forward's choice."""
        if self.phase == "backward":
            return self._chunks.get(id(module), 1)
        limit = self.tokens_per_slice(flops_per_token)
        n = 1 if limit is None else math.ceil(tokens / limit)
        self._chunks[id(module)] = n
        return n

    def yield_point(self) -> None:
        if self._signal.in_flight <= 0:  # nobody waits for tokens: full speed
            self._pacing = False
            return
        self._pace()

    def _pace(self) -> None:
        if self._sync is not None:
            self._sync()
        now = self._clock()
        if not self._pacing:  # requests just arrived; the queue has drained, count from here
            self._pacing = True
            self._resume = now
            return
        busy = now - self._resume
        if busy < self.slice_seconds * self._signal.slice_scale:
            return
        duty = self._signal.duty
        if duty >= 1.0:
            self._resume = now
        elif duty <= 0.0:  # the controller is measuring decode alone: wait for it
            self._rest(now, MAX_PAUSE_SECONDS, until_duty=True)
        else:
            self._rest(now, min(busy * (1.0 - duty) / duty, self.max_sleep), until_duty=False)

    def _rest(self, since: float, seconds: float, until_duty: bool) -> None:
        """Sleep `seconds` in short polls, ending early once nobody waits (or, `until_duty`, once the duty
        cycle is above 0), so training resumes at full speed as soon as the load is gone."""
        left = seconds
        while left > 0:
            nap = min(POLL_SECONDS, left)
            self._sleep(nap)
            left -= nap
            if self._signal.in_flight <= 0 or (until_duty and self._signal.duty > 0.0):
                break
        self._resume = self._clock()
        self.paced_seconds += self._resume - since
