"""The API server's controller: the tail (p99) of simulated token gaps steered into the budget without
oscillating, the slice halved only where that helps, probes for a baseline, everything published in the
load signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.limits import DECODE_SLOWDOWN_QUANTILE
from onlinemodel_runtime.server import pacing_control as pc
from onlinemodel_runtime.server.inflight import InFlightRequests
from onlinemodel_runtime.server.load_signal import LoadSignalReader
from onlinemodel_runtime.server.token_gaps import TokenGapFeed

BASE = 0.005  # seconds per token without training


class SimulatedGpu:
    """Token gaps of decode sharing a GPU with a paced trainer (the shape of issue 16's H200 figures).

    A decode step takes BASE plus a little jitter. While the trainer computes at duty d, it runs bursts of
    `fixed` seconds that do not split plus `sliced` x the slice scale; a step runs into a Poisson number of
    them, as many as take `share` x d / (1 - d) of the step on average (`share` < 1: much of the trainer's
    work fits where decode leaves the GPU idle). With the defaults, duty 0.46 gives a mean slowdown of ~1.17
    and a p99 of ~1.5, like the 1-stream measurement the mean-based controller allowed.
    """

    def __init__(self, share: float = 0.2, fixed: float = 0.2e-3, sliced: float = 0.5e-3, seed: int = 0):
        self.share, self.fixed, self.sliced = share, fixed, sliced
        self.rng = np.random.default_rng(seed)

    def gaps(self, n: int, duty: float, scale: float) -> np.ndarray:
        idle = BASE * (1 + 0.03 * np.abs(self.rng.standard_normal(n)))
        if duty <= 0:
            return idle
        burst = self.fixed + self.sliced * scale
        bursts = self.rng.poisson(self.share * BASE * duty / (1 - min(duty, 0.99)) / burst, n)
        return idle + bursts * burst

    def tail_ratio(self, duty: float, scale: float, n: int = 50_000) -> float:
        q = DECODE_SLOWDOWN_QUANTILE
        return float(np.quantile(self.gaps(n, duty, scale), q) / np.quantile(self.gaps(n, 0.0, 1.0), q))


def run(c: pc.TailController, gpu: SimulatedGpu, windows: int, streams: int = 1):
    """Windows of training under load; returns per window (published duty, slice scale, gaps)."""
    history = []
    published = c.duty
    for w in range(windows):
        gaps = gpu.gaps(int(streams * pc.WINDOW_SECONDS / BASE), published, c.slice_scale)
        history.append((published, c.slice_scale, gaps))
        published = c.observe(gaps, True, now=w * pc.WINDOW_SECONDS, in_flight=streams)
    return history


@pytest.mark.parametrize("budget,duty", [(1.25, 0.2), (2.0, 0.5), (1.0, pc.DUTY_MIN), (100.0, 0.99)])
def test_fixed_duty(budget, duty):
    assert pc.fixed_duty(budget) == pytest.approx(duty)


MEASURED_SHAPE = {}  # SimulatedGpu's defaults
LONG_SLICES = {"share": 0.1, "fixed": 0.1e-3, "sliced": 2e-3}  # rare long bursts: halving them helps


def settled_run(model: dict, seed: int, streams: int):
    gpu, c = SimulatedGpu(seed=seed, **model), pc.TailController(1.25)
    history = run(c, gpu, windows=1200, streams=streams)  # ten minutes
    return gpu, c, history[400:]


@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("model", [MEASURED_SHAPE, LONG_SLICES], ids=["measured-shape", "long-slices"])
def test_holds_the_tail_under_the_budget(model, seed, streams):
    gpu, c, settled = settled_run(model, seed, streams)
    trained = np.concatenate([g for duty, _, g in settled if duty > 0])
    idle_tail = np.quantile(gpu.gaps(50_000, 0.0, 1.0), DECODE_SLOWDOWN_QUANTILE)
    # The acceptance: p99 over every token while training (probes excluded) within the budget.
    assert np.quantile(trained, DECODE_SLOWDOWN_QUANTILE) <= c.budget * idle_tail
    # Bounded: where one burst moves the p99 across the whole band (the measured shape at the full slice:
    # 0.7 ms of 5 ms), the duty saw-tooths between the duty just under it and one just over; elsewhere it
    # settles (next test). Either way within a factor 2.5, at most one change per 5 windows.
    duties = [d for d, _, _ in settled if d > 0][-400:]
    assert sum(a != b for a, b in zip(duties, duties[1:])) <= 80
    assert max(duties) <= 2.5 * min(duties)
    assert len({s for _, s, _ in settled}) == 1  # the slice is decided early, once
    # Not starved: the typical duty cycle is at least 40% of the largest whose p99 stays under the band's top.
    best = max(d for d in np.linspace(pc.DUTY_MIN, 1, 20) if gpu.tail_ratio(d, c.slice_scale) <= c.band[1])
    assert np.median(duties) >= 0.4 * best, (np.median(duties), best)


@pytest.mark.parametrize("streams", [1, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_settles_where_bursts_are_fine_against_the_band(seed, streams):
    _, c, settled = settled_run(LONG_SLICES, seed, streams)
    duties = [d for d, _, _ in settled if d > 0][-400:]
    assert sum(a != b for a, b in zip(duties, duties[1:])) <= 1 and c.slice_scale < 1.0


def test_a_halved_slice_that_does_not_help_is_undone_for_good():
    gpu = SimulatedGpu(share=0.1, fixed=1.5e-3, sliced=0.0, seed=2)  # every burst is one op that does not split
    c = pc.TailController(1.25)
    history = run(c, gpu, windows=600, streams=8)
    scales = [s for _, s, _ in history]
    assert min(scales) == 0.5 and scales[-1] == 1.0 and scales[-300:] == [1.0] * 300


def test_probe_then_steer():
    c = pc.TailController(1.25)
    assert c.duty == pytest.approx(0.2) and c.baseline is None
    idle = np.full(100, BASE)
    # Training under load with no baseline: the trainer is held (duty 0); the first window drains.
    assert c.observe(idle * 2, True, now=0.0, in_flight=1) == 0.0 and c.probing
    assert c.observe(idle * 1.5, True, now=0.5, in_flight=1) == 0.0  # draining: not measured
    for w in range(4):
        published = c.observe(idle, True, now=1.0 + w / 2, in_flight=1)
    assert published == pytest.approx(0.2) and not c.probing
    assert (c.baseline.mean, c.baseline.tail, c.baseline.tokens) == (pytest.approx(BASE), pytest.approx(BASE), 400)
    # 399 gaps while training, well within the band: no verdict yet (too few for a p99).
    c.observe(np.full(399, BASE * 1.15), True, now=3.5, in_flight=1)
    assert c.tail_slowdown is None and c.duty == pytest.approx(0.2)
    c.observe(np.full(1, BASE * 1.15), True, now=4.0, in_flight=1)
    assert c.tail_slowdown == pytest.approx(1.15) and c.duty == pytest.approx(0.2)  # in the band: held


def test_too_many_gaps_over_the_budget_decide_at_once():
    c = pc.TailController(1.25)
    c.observe(np.full(400, BASE), False, now=0.0, in_flight=1)
    gaps = np.full(50, BASE)
    gaps[:5] = BASE * 1.5  # 5 over the budget: more than 1% of 400 already
    c.observe(gaps, True, now=0.5, in_flight=1)
    assert c.duty < 0.2 and c.tail_slowdown is not None


def test_baseline_goes_stale_with_age_and_with_the_load():
    c = pc.TailController(1.25)
    c.observe(np.full(400, BASE), False, now=0.0, in_flight=2)
    assert c.observe(np.full(50, BASE), True, now=1.0, in_flight=4) > 0  # twice the load: same baseline
    assert c.observe(np.full(50, BASE), True, now=2.0, in_flight=5) == 0.0 and c.probing
    c = pc.TailController(1.25)
    c.observe(np.full(400, BASE), False, now=0.0, in_flight=1)
    assert c.observe(np.full(50, BASE), True, now=pc.BASELINE_MAX_AGE + 1, in_flight=1) == 0.0


def test_windows_that_say_nothing_change_nothing_and_probes_wait_their_interval():
    c = pc.TailController(1.25)
    c.observe(np.full(400, BASE), False, now=0.0, in_flight=1)
    before = (c.duty, c.baseline, c.tail_slowdown)
    c.observe(np.empty(0), True, now=1.0, in_flight=1)  # no tokens
    c.observe(np.full(400, BASE * 3), None, now=1.5, in_flight=1)  # training started or stopped during it
    assert (c.duty, c.baseline, c.tail_slowdown) == before
    c = pc.TailController(1.25)
    for w in range(1 + pc.PROBE_MAX_WINDOWS):  # a probe that saw no tokens measures nothing
        c.observe(np.full(10, BASE) if w == 0 else np.empty(0), True, now=w / 2, in_flight=1)
    assert c.baseline is None and not c.probing
    assert c.observe(np.full(10, BASE), True, now=5.0, in_flight=1) == pytest.approx(0.2)  # too soon
    assert c.observe(np.full(10, BASE), True, now=pc.PROBE_MIN_INTERVAL + 0.1, in_flight=1) == 0.0


# -- the governor ------------------------------------------------------------------------------------------
def config(tmp_path: Path, **kw) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path, **kw)


def measured_feed() -> TokenGapFeed:
    feed = TokenGapFeed()
    feed.loggers = 1  # as if vLLM had made one stat logger
    return feed


def test_governor_publishes_what_it_measures(tmp_path):
    requests, feed, training = InFlightRequests(), measured_feed(), {"now": False}
    clock = iter(range(1000)).__next__
    registry = CollectorRegistry()
    gov = pc.PacingGovernor(config(tmp_path), requests, training=lambda: training["now"], feed=feed, clock=clock,
                            registry=registry)
    assert feed.sink is not None  # attached: the stat logger's gaps now reach the governor
    reader = LoadSignalReader(tmp_path / "load-signal")
    snap = reader.snapshot()
    assert (gov.mode, snap.mode, snap.duty, snap.max_decode_slowdown, snap.slice_scale) == (
        "measured", "measured", pytest.approx(0.2), 1.25, 1.0)
    requests.add(2)
    assert reader.in_flight == 2
    gov.tick()  # the first window: nothing yet
    feed.add([BASE] * 400)
    gov.tick()
    snap = reader.snapshot()
    assert (snap.baseline_itl_seconds, snap.baseline_tail_seconds, snap.recent_tail_seconds) == (
        pytest.approx(BASE), pytest.approx(BASE), pytest.approx(BASE))
    training["now"] = True
    feed.add([2 * BASE] * 400)
    gov.tick()  # training started during this window: not judged
    assert reader.snapshot().tail_slowdown is None
    feed.add([2 * BASE] * 400)
    gov.tick()
    snap = reader.snapshot()
    assert (snap.tail_slowdown, snap.measured_slowdown) == (pytest.approx(2.0), pytest.approx(2.0))
    assert snap.duty == pytest.approx(0.2 * pc.STEP_MIN)  # far over: the largest step down
    assert snap.recent_tail_seconds == pytest.approx(2 * BASE)
    # The same figures on vLLM's /metrics.
    metric = registry.get_sample_value
    assert (metric("onlinemodel_trainer_duty_cycle"), metric("onlinemodel_decode_slowdown_measured"),
            metric("onlinemodel_decode_p99_slowdown_measured"), metric("onlinemodel_decode_slowdown_budget"),
            metric("onlinemodel_generation_requests_in_flight")) == (
        pytest.approx(0.2 * pc.STEP_MIN), pytest.approx(2.0), pytest.approx(2.0), 1.25, 2)


def test_without_the_stat_logger_the_duty_is_fixed(tmp_path):
    feed = TokenGapFeed()
    gov = pc.PacingGovernor(config(tmp_path, max_decode_slowdown=2.0), InFlightRequests(), training=lambda: True,
                            feed=feed, registry=CollectorRegistry())
    snap = LoadSignalReader(tmp_path / "load-signal").snapshot()
    assert (gov.mode, snap.mode, snap.duty, feed.sink) == ("fixed", "fixed", 0.5, None)


def test_budget_off_still_reports_the_tail(tmp_path):
    requests, feed = InFlightRequests(), measured_feed()
    gov = pc.PacingGovernor(config(tmp_path, max_decode_slowdown=0), requests, training=lambda: True, feed=feed,
                            registry=CollectorRegistry())
    requests.add(1)
    feed.add([BASE] * 99 + [3 * BASE])
    gov.tick()
    snap = LoadSignalReader(tmp_path / "load-signal").snapshot()
    assert (gov.mode, snap.mode, snap.duty, snap.max_decode_slowdown, snap.in_flight) == ("off", "off", 1.0, None, 1)
    assert BASE < snap.recent_tail_seconds <= 3 * BASE and snap.tail_slowdown is None
