"""Serving first, the API server's half: measure how much training slows the tokens' tail, set the trainer's
duty cycle and slice length.

Every gap between a stream's consecutive tokens reaches this process through vLLM's stat-logger plugin
(``vllm_plugins/stat_logger.py`` -> ``token_gaps.FEED``). Every ``WINDOW_SECONDS`` the governor takes the
window's gaps and whether the trainer was training at both of its ends, and ``TailController`` steers:

- gaps without training (between jobs, or while a probe holds the trainer) make the baseline: their mean
  and their tail, the ``DECODE_SLOWDOWN_QUANTILE`` (p99) of the newest ``TAIL_WINDOW_TOKENS``;
- gaps while training, at the duty cycle and slice now published, are pooled (again the newest
  ``TAIL_WINDOW_TOKENS``, a sliding window); once the pool holds ``MIN_TAIL_TOKENS`` (or already more gaps
  over the budget than the quantile allows in that many), its tail / the baseline's tail is the measured
  slowdown the budget bounds. Over ``1 + BAND[1] x (budget - 1)``: the duty cycle shrinks; under
  ``1 + BAND[0] x (budget - 1)``: it grows; in between it holds, so a settled load changes nothing. A step
  is the secant of "tail slowdown - 1 grows with the duty cycle" aimed at the band's middle, bounded to
  [``STEP_MIN``, ``STEP_MAX``]; every change starts a fresh pool, so the tail of one setting never judges
  another.
- When the tail is over and it grew more than the mean did (tail ratio - mean ratio > mean ratio - 1), the
  cause is the length of what the trainer does between rests, not how often it computes: the slice is
  halved (down to ``SLICE_SCALE_MIN``) before the duty cycle is touched. If a halving did not cut that
  excess by ``SHRINK_HELPED``, it is undone and the slice stays there (docs/serving-first.md says why).
  The slice never grows back: a longer slice that broke the tail once would again at the same load.

Without a baseline younger than ``BASELINE_MAX_AGE`` (or one measured at less than half or more than twice
the requests now in flight) while training runs under load, the controller probes: duty 0 until
``MIN_TAIL_TOKENS`` idle gaps are in (the first window only drains the trainer's queued work), at most
``PROBE_MAX_WINDOWS`` windows, at most once per ``PROBE_MIN_INTERVAL``. The result goes into the load signal
(``load_signal.py``), where the trainer's pacer reads it at every yield point. Without the stat logger
(``VLLM_PLUGINS`` leaving it out, a vLLM whose stats we cannot read) the duty cycle is fixed at
``fixed_duty(budget)`` and the status says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import DECODE_SLOWDOWN_QUANTILE
from onlinemodel_runtime.server.inflight import InFlightRequests
from onlinemodel_runtime.server.load_signal import LoadSignalWriter
from onlinemodel_runtime.server.token_gaps import FEED, GapRing, TokenGapFeed

log = logging.getLogger(__name__)

WINDOW_SECONDS = 0.5
TAIL_WINDOW_TOKENS = 2048  # the newest gaps a tail is read over
MIN_TAIL_TOKENS = 400  # gaps before a tail counts: the p99 is then the 4th-5th largest
BASELINE_MIN_TOKENS = 100  # a probe that saw fewer idle gaps measures nothing
FEED_CAPACITY = 16384  # gaps one window may bring (more: the newest are kept)
BAND = (0.5, 0.8)  # the tail slowdown is held within 1 + BAND x (budget - 1)
STEP_MIN, STEP_MAX = 0.5, 1.5  # bounds of one duty-cycle step (a factor)
DUTY_MIN = 0.05  # a training step always finishes, however busy serving is
SLICE_SCALE_MIN = 0.25
SHRINK_HELPED = 0.8  # a halved slice must cut the tail's excess over the mean to this share, or is undone
BASELINE_MAX_AGE = 60.0  # seconds; an older baseline is re-measured by a probe
LOAD_CHANGE = 2.0  # ... and so is one measured at another load (requests in flight, this factor apart)
CLOSE_ENOUGH = 0.02  # a duty cycle this close under the one found over the band is where it stays
PROBE_MAX_WINDOWS = 8
PROBE_MIN_INTERVAL = 10.0  # seconds between probes, so a window without tokens cannot stall training


def fixed_duty(budget: float) -> float:
    """The duty cycle that slows decode by `budget` if the two simply took turns on the GPU:
    decode gets 1 - d of the time, so a step takes 1 / (1 - d) as long."""
    return min(1.0, max(DUTY_MIN, 1.0 - 1.0 / budget))


@dataclass(frozen=True)
class GapStats:
    mean: float  # seconds
    tail: float  # the DECODE_SLOWDOWN_QUANTILE, seconds
    tokens: int


def gap_stats(gaps: np.ndarray) -> GapStats:
    return GapStats(float(gaps.mean()), float(np.quantile(gaps, DECODE_SLOWDOWN_QUANTILE)), len(gaps))


class TailController:
    """The feedback loop, one window at a time (pure: time and load come in as arguments)."""

    def __init__(self, budget: float):
        if budget < 1:
            raise ValueError(f"budget {budget} is below 1")
        self.budget = budget
        self.band = (1.0 + BAND[0] * (budget - 1.0), 1.0 + BAND[1] * (budget - 1.0))
        self.duty = fixed_duty(budget)  # the start, before anything is measured
        self.slice_scale = 1.0
        self.baseline: GapStats | None = None
        self.tail_slowdown: float | None = None  # tail while training / the baseline's tail
        self.mean_slowdown: float | None = None
        self._idle = GapRing(TAIL_WINDOW_TOKENS)  # gaps without training: the baseline's pool
        self._busy = GapRing(TAIL_WINDOW_TOKENS)  # gaps while training at the current duty and slice
        self._baseline_at: float | None = None
        self._baseline_load = 0
        self._probe_left = 0
        self._last_probe_at: float | None = None
        self._scale_floor = SLICE_SCALE_MIN
        self._excess_before_shrink: float | None = None
        self._ceiling: float | None = None  # the lowest duty cycle found over the band, at this slice and baseline

    @property
    def probing(self) -> bool:
        return self._probe_left > 0

    def observe(self, gaps: np.ndarray, training: bool | None, now: float, in_flight: int) -> float:
        """One window: its token gaps (seconds), whether training ran through it (None: it started or
        stopped during it), the requests in flight. Returns the duty cycle to publish (0 while probing)."""
        if self._probe_left:
            self._probe_left -= 1
            if self._probe_left < PROBE_MAX_WINDOWS - 1:  # the first window drains the trainer's queued work
                self._idle.extend(gaps)
            if len(self._idle) >= MIN_TAIL_TOKENS or not self._probe_left:
                self._probe_left = 0
                self._set_baseline(now, in_flight)
        elif training is False and len(gaps):
            self._idle.extend(gaps)
            self._set_baseline(now, in_flight)
        elif training and len(gaps):
            if self._baseline_stale(now, in_flight) and (
                    self._last_probe_at is None or now - self._last_probe_at >= PROBE_MIN_INTERVAL):
                self._idle.clear()
                self._busy.clear()
                self._probe_left, self._last_probe_at = PROBE_MAX_WINDOWS, now
            elif self.baseline is not None:
                self._busy.extend(gaps)
                self._steer()
        return 0.0 if self._probe_left else self.duty

    def _set_baseline(self, now: float, in_flight: int) -> None:
        if len(self._idle) >= BASELINE_MIN_TOKENS:
            self.baseline = gap_stats(self._idle.values())
            self._baseline_at, self._baseline_load = now, in_flight
            self._ceiling = None

    def _baseline_stale(self, now: float, in_flight: int) -> bool:
        if self._baseline_at is None or now - self._baseline_at > BASELINE_MAX_AGE:
            return True
        low, high = sorted((self._baseline_load, in_flight))
        return high > LOAD_CHANGE * max(1, low)

    def _steer(self) -> None:
        gaps = self._busy.values()
        over = int(np.count_nonzero(gaps > self.budget * self.baseline.tail))
        # Past this many gaps over the budget, the quantile of MIN_TAIL_TOKENS gaps cannot be under it.
        certain_over = over > (1.0 - DECODE_SLOWDOWN_QUANTILE) * max(len(gaps), MIN_TAIL_TOKENS)
        judging_shrink = self._excess_before_shrink is not None  # compares two tails: each needs its tokens
        if len(gaps) < MIN_TAIL_TOKENS and (judging_shrink or not certain_over):
            return
        stats = gap_stats(gaps)
        tail, mean = stats.tail / self.baseline.tail, stats.mean / self.baseline.mean
        self.tail_slowdown, self.mean_slowdown = tail, mean
        if judging_shrink:  # the first verdict on a halved slice
            helped = tail - mean < SHRINK_HELPED * self._excess_before_shrink
            self._excess_before_shrink = None
            if not helped:
                self._set_slice(min(1.0, 2 * self.slice_scale))
                self._scale_floor = self.slice_scale
                return
        if certain_over or tail > self.band[1]:
            if tail - mean > mean - 1.0 and self.slice_scale / 2 >= self._scale_floor:
                self._excess_before_shrink = tail - mean
                self._set_slice(self.slice_scale / 2)
            else:
                self._ceiling = self.duty if self._ceiling is None else min(self._ceiling, self.duty)
                self._set_duty(max(DUTY_MIN, self.duty * self._step(tail)))
        elif tail < self.band[0] and self.duty < 1.0:
            duty = min(1.0, self.duty * self._step(tail))
            if self._ceiling is not None:  # bisect towards the duty found over, never back to it
                duty = min(duty, math.sqrt(self.duty * self._ceiling))
            if duty > self.duty * (1 + CLOSE_ENOUGH):
                self._set_duty(duty)

    def _set_duty(self, duty: float) -> None:
        self.duty = duty
        self._busy.clear()  # a new setting is judged by its own gaps

    def _set_slice(self, scale: float) -> None:
        self.slice_scale, self._ceiling = scale, None
        self._busy.clear()

    def _step(self, tail: float) -> float:
        """The duty factor that would bring `tail` to the band's middle if tail - 1 grew in proportion."""
        aim = sum(self.band) / 2 - 1.0
        return STEP_MAX if tail <= 1.0 else min(STEP_MAX, max(STEP_MIN, aim / (tail - 1.0)))


class PacingGovernor:
    """Owns the load signal file, the token-gap sink and the controller; one asyncio task in vLLM's API
    server. Its figures are also gauges in `registry` (default: the process's, which vLLM's /metrics serves)."""

    def __init__(self, cfg: RuntimeConfig, requests: InFlightRequests, training: Callable[[], bool],
                 feed: TokenGapFeed = FEED, clock: Callable[[], float] = time.monotonic, registry: Any = None):
        from prometheus_client import REGISTRY, Gauge

        registry = registry if registry is not None else REGISTRY
        self._requests = requests
        self._training = training
        self._clock = clock
        self.budget = cfg.max_decode_slowdown if cfg.pacing_enabled else None
        Gauge("onlinemodel_generation_requests_in_flight", "Generation requests the API server is answering.",
              registry=registry).set_function(lambda: requests.count)
        Gauge("onlinemodel_decode_slowdown_budget", "--max-decode-slowdown (0: training is not paced).",
              registry=registry).set(self.budget or 0.0)
        self._duty_gauge = Gauge("onlinemodel_trainer_duty_cycle",
                                 "Share of the time the trainer computes while requests wait.", registry=registry)
        self._slowdown_gauge = Gauge("onlinemodel_decode_slowdown_measured",
                                     "Mean gap between tokens while training / without (NaN: not measured yet).",
                                     registry=registry)
        self._tail_gauge = Gauge("onlinemodel_decode_p99_slowdown_measured",
                                 "p99 gap between tokens while training / without: what the budget bounds "
                                 "(NaN: not measured yet).", registry=registry)
        self._slowdown_gauge.set(math.nan)
        self._tail_gauge.set(math.nan)
        self.controller = TailController(self.budget) if self.budget is not None else None
        self.measuring = feed.loggers > 0
        if self.measuring:
            self._gaps = feed.sink = GapRing(FEED_CAPACITY)
            self._recent = GapRing(TAIL_WINDOW_TOKENS)
            self._seen = 0
        self._was_training: bool | None = None
        self._recent_tail: float | None = None
        self._task: asyncio.Task | None = None
        self.mode = "off" if self.controller is None else ("measured" if self.measuring else "fixed")
        if self.mode == "fixed":
            log.warning("onlinemodel: its stat-logger plugin (onlinemodel_token_gaps) is not loaded in vLLM's API "
                        "server; the trainer's duty cycle stays at %.2f while requests wait", self.controller.duty)
        self.writer = LoadSignalWriter.create(cfg.load_signal_path, mode=self.mode, duty=self._duty(),
                                              max_decode_slowdown=self.budget)
        self._duty_gauge.set(self._duty())
        requests.publish_to(self.writer)

    def _duty(self) -> float:
        return 1.0 if self.controller is None else self.controller.duty

    def start(self) -> None:
        if self.measuring:
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
        gaps, self._seen = self._gaps.since(self._seen), self._gaps.count
        training = self._training()
        was_training, self._was_training = self._was_training, training
        if len(gaps):
            self._recent.extend(gaps)
            self._recent_tail = gap_stats(self._recent.values()).tail
        c = self.controller
        if c is None:
            self.writer.publish(mode=self.mode, duty=1.0, max_decode_slowdown=None,
                                recent_tail_seconds=self._recent_tail)
            return
        through = training if training == was_training else None
        duty = c.observe(gaps, through, self._clock(), self._requests.count)
        base = c.baseline
        self.writer.publish(mode=self.mode, duty=duty, max_decode_slowdown=self.budget,
                            measured_slowdown=c.mean_slowdown,
                            baseline_itl_seconds=None if base is None else base.mean,
                            tail_slowdown=c.tail_slowdown, baseline_tail_seconds=None if base is None else base.tail,
                            recent_tail_seconds=self._recent_tail, slice_scale=c.slice_scale)
        self._duty_gauge.set(duty)
        self._slowdown_gauge.set(math.nan if c.mean_slowdown is None else c.mean_slowdown)
        self._tail_gauge.set(math.nan if c.tail_slowdown is None else c.tail_slowdown)
