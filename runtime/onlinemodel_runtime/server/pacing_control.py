"""Serving first, the API server's half: measure how much training slows decode, set the trainer's duty cycle.

Every ``WINDOW_SECONDS`` the governor reads vLLM's own inter-token latency histogram (``ItlMeter``: the
sum and count of ``vllm:inter_token_latency_seconds`` in this process's prometheus registry, so the delta
is the mean over the window) and whether the trainer was training at both ends of the window. Windows
with tokens but no training feed the baseline (an EWMA); windows with tokens while training give the
measured slowdown, which ``DutyController`` keeps under the budget: multiplicative decrease above it,
gentle additive increase below, bounded to [``DUTY_MIN``, 1]. With no fresh baseline while training
runs under load, it pauses the trainer for a short probe (duty 0) to measure one. The result goes into
the load signal (``load_signal.py``), where the trainer's pacer reads it at every yield point.

The histogram gives means, not percentiles (its buckets are far coarser than a decode step), so the
controller aims the mean at ``MEAN_TARGET_SHARE`` of the budget's headroom, leaving the rest for the
tail. Without the histogram (``--disable-log-stats``, another vLLM) the duty cycle is fixed at
``fixed_duty(budget)`` and the status says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_runtime.server.inflight import InFlightRequests
from onlinemodel_runtime.server.load_signal import LoadSignalWriter

log = logging.getLogger(__name__)

WINDOW_SECONDS = 0.5
MIN_TOKENS = 8  # tokens a window needs for its mean to count
DUTY_MIN = 0.05  # a training step always finishes, however busy serving is
DECREASE = 0.7  # duty factor after a window over the target
INCREASE = 0.03  # duty added after a window under it
MEAN_TARGET_SHARE = 0.8  # the mean slowdown aims at 1 + this x (budget - 1)
BASELINE_EWMA = 0.3
BASELINE_MAX_AGE = 60.0  # seconds; an older baseline is re-measured by a probe
PROBE_WINDOWS = 2  # the trainer's queued work drains during the first, the second measures
PROBE_MIN_INTERVAL = 10.0  # seconds between probes, so a window without tokens cannot stall training
# vLLM's inter-token latency histogram; older releases named it time per output token.
ITL_METRICS = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")


def fixed_duty(budget: float) -> float:
    """The duty cycle that slows decode by `budget` if the two simply took turns on the GPU:
    decode gets 1 - d of the time, so a step takes 1 / (1 - d) as long."""
    return min(1.0, max(DUTY_MIN, 1.0 - 1.0 / budget))


@dataclass(frozen=True)
class ItlSample:
    seconds: float  # the histogram's sum
    tokens: float  # its count


class ItlMeter:
    """Cumulative sum and count of vLLM's inter-token latency histogram, from this process's registry."""

    def __init__(self, registry: Any = None, names: tuple[str, ...] = ITL_METRICS):
        if registry is None:
            from prometheus_client import REGISTRY as registry
        # A restricted view collects only the named metric's collector: cheap enough for the event loop.
        self._views = [(name, registry.restricted_registry([f"{name}_sum", f"{name}_count"])) for name in names]

    def read(self) -> ItlSample | None:
        for name, view in self._views:
            total = count = 0.0
            found = False
            for metric in view.collect():
                for sample in metric.samples:
                    if sample.name == f"{name}_sum":
                        total += sample.value
                        found = True
                    elif sample.name == f"{name}_count":
                        count += sample.value
            if found:
                return ItlSample(total, count)
        return None


class DutyController:
    """The feedback loop, one window at a time (pure: time comes in as `now`)."""

    def __init__(self, budget: float):
        if budget < 1:
            raise ValueError(f"budget {budget} is below 1")
        self.budget = budget
        self.target = 1.0 + MEAN_TARGET_SHARE * (budget - 1.0)
        self.duty = fixed_duty(budget)  # the start, before anything is measured
        self.baseline: float | None = None  # seconds per token without training
        self.slowdown: float | None = None
        self._baseline_at: float | None = None
        self._probe_left = 0
        self._last_probe_at: float | None = None

    @property
    def probing(self) -> bool:
        return self._probe_left > 0

    def observe(self, itl: float | None, training: bool | None, now: float) -> float:
        """One window: its mean inter-token latency (None: too few tokens), whether training ran through it
        (None: it started or stopped during it). Returns the duty cycle to publish (0 while probing)."""
        if self._probe_left:
            self._probe_left -= 1
            if not self._probe_left and itl is not None:
                self._observe_baseline(itl, now)
        elif itl is not None and training is False:
            self._observe_baseline(itl, now)
        elif itl is not None and training:
            if self._baseline_stale(now):
                if self._last_probe_at is None or now - self._last_probe_at >= PROBE_MIN_INTERVAL:
                    self._probe_left, self._last_probe_at = PROBE_WINDOWS, now
            else:
                self._steer(itl / self.baseline)
        return 0.0 if self._probe_left else self.duty

    def _observe_baseline(self, itl: float, now: float) -> None:
        self.baseline = itl if self.baseline is None else (1 - BASELINE_EWMA) * self.baseline + BASELINE_EWMA * itl
        self._baseline_at = now

    def _baseline_stale(self, now: float) -> bool:
        return self._baseline_at is None or now - self._baseline_at > BASELINE_MAX_AGE

    def _steer(self, slowdown: float) -> None:
        self.slowdown = slowdown
        if slowdown > self.target:
            self.duty = max(DUTY_MIN, self.duty * DECREASE)
        else:
            self.duty = min(1.0, self.duty + INCREASE)


class PacingGovernor:
    """Owns the load signal file and the controller; one asyncio task in vLLM's API server. Its figures are
    also gauges in `registry` (default: the process's, which vLLM's /metrics serves)."""

    def __init__(self, cfg: RuntimeConfig, requests: InFlightRequests, training: Callable[[], bool],
                 meter: ItlMeter | None = None, clock: Callable[[], float] = time.monotonic, registry: Any = None):
        from prometheus_client import REGISTRY, Gauge

        registry = registry if registry is not None else REGISTRY
        self._training = training
        self._clock = clock
        self._meter = meter if meter is not None else ItlMeter(registry)
        self.budget = cfg.max_decode_slowdown if cfg.pacing_enabled else None
        Gauge("onlinemodel_generation_requests_in_flight", "Generation requests the API server is answering.",
              registry=registry).set_function(lambda: requests.count)
        Gauge("onlinemodel_decode_slowdown_budget", "--max-decode-slowdown (0: training is not paced).",
              registry=registry).set(self.budget or 0.0)
        self._duty_gauge = Gauge("onlinemodel_trainer_duty_cycle",
                                 "Share of the time the trainer computes while requests wait.", registry=registry)
        self._slowdown_gauge = Gauge("onlinemodel_decode_slowdown_measured",
                                     "Mean inter-token latency while training / without (NaN: not measured yet).",
                                     registry=registry)
        self._slowdown_gauge.set(math.nan)
        self.controller = DutyController(self.budget) if self.budget is not None else None
        self._last: ItlSample | None = None
        self._was_training: bool | None = None
        self._task: asyncio.Task | None = None
        self.mode = "off" if self.controller is None else ("measured" if self._meter.read() else "fixed")
        if self.mode == "fixed":
            log.warning("onlinemodel: vLLM's inter-token latency histogram is not in this process (%s); the "
                        "trainer's duty cycle stays at %.2f while requests wait", " / ".join(ITL_METRICS),
                        self.controller.duty)
        self.writer = LoadSignalWriter.create(cfg.load_signal_path, mode=self.mode, duty=self._duty(),
                                              max_decode_slowdown=self.budget)
        self._duty_gauge.set(self._duty())
        requests.publish_to(self.writer)

    def _duty(self) -> float:
        return 1.0 if self.controller is None else self.controller.duty

    def start(self) -> None:
        if self.mode == "measured":
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(WINDOW_SECONDS)
            try:
                self.tick()
            except Exception:  # keep serving whatever one window ran into; the duty stays as it was
                log.exception("onlinemodel: pacing window failed")

    def tick(self) -> None:
        """Close one window: measure, steer, publish."""
        sample, training = self._meter.read(), self._training()
        previous, self._last = self._last, sample
        was_training, self._was_training = self._was_training, training
        if sample is None or previous is None:
            return
        tokens = sample.tokens - previous.tokens
        itl = (sample.seconds - previous.seconds) / tokens if tokens >= MIN_TOKENS else None
        through = training if training == was_training else None
        c = self.controller
        duty = c.observe(itl, through, self._clock())
        self.writer.publish(mode=self.mode, duty=duty, max_decode_slowdown=self.budget,
                            measured_slowdown=c.slowdown, baseline_itl_seconds=c.baseline)
        self._duty_gauge.set(duty)
        self._slowdown_gauge.set(math.nan if c.slowdown is None else c.slowdown)
