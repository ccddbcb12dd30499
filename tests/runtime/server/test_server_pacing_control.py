"""The API server's controller: vLLM's latency histogram read in-process, the duty cycle steered under the
budget (converging on a simulated GPU), probes for a baseline, everything published in the load signal."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_runtime.server import pacing_control as pc
from onlinemodel_runtime.server.inflight import InFlightRequests
from onlinemodel_runtime.server.load_signal import LoadSignalReader

BASE = 0.005  # seconds per token without training


@pytest.mark.parametrize("budget,duty", [(1.25, 0.2), (2.0, 0.5), (1.0, pc.DUTY_MIN), (100.0, 0.99)])
def test_fixed_duty(budget, duty):
    assert pc.fixed_duty(budget) == pytest.approx(duty)


def test_probe_then_steer():
    c = pc.DutyController(1.25)
    assert c.duty == pytest.approx(0.2) and c.baseline is None
    # Training under load with no baseline: the trainer is held for PROBE_WINDOWS windows, the last measures.
    assert c.observe(BASE * 2, True, now=0.0) == 0.0 and c.probing
    assert c.observe(BASE * 1.5, True, now=0.5) == 0.0  # draining: not measured
    assert c.observe(BASE, True, now=1.0) == pytest.approx(0.2) and not c.probing
    assert c.baseline == BASE
    c.observe(BASE * 1.5, True, now=1.5)  # over the target: multiplicative decrease
    assert (c.slowdown, c.duty) == (pytest.approx(1.5), pytest.approx(0.2 * pc.DECREASE))
    c.observe(BASE * 1.05, True, now=2.0)  # under it: additive increase
    assert c.duty == pytest.approx(0.2 * pc.DECREASE + pc.INCREASE)


def test_windows_that_say_nothing_change_nothing():
    c = pc.DutyController(1.25)
    c.observe(BASE, False, now=0.0)
    before = (c.duty, c.baseline, c.slowdown)
    c.observe(None, True, now=1.0)  # too few tokens
    c.observe(BASE * 3, None, now=1.5)  # training started or stopped during the window
    assert (c.duty, c.baseline, c.slowdown) == before


def test_baseline_is_an_ewma_of_windows_without_training_and_goes_stale():
    c = pc.DutyController(1.25)
    c.observe(BASE, False, now=0.0)
    c.observe(2 * BASE, False, now=1.0)
    assert c.baseline == pytest.approx(BASE * (1 + pc.BASELINE_EWMA))
    c.observe(1.1 * c.baseline, True, now=2.0)
    assert not c.probing and c.slowdown == pytest.approx(1.1)
    assert c.observe(BASE, True, now=2.0 + pc.BASELINE_MAX_AGE + 1) == 0.0 and c.probing


def test_no_tokens_in_a_probe_waits_before_probing_again():
    c = pc.DutyController(1.25)
    for now in (0.0, 0.5, 1.0):
        c.observe(BASE if now == 0.0 else None, True, now=now)
    assert c.baseline is None and not c.probing
    assert c.observe(BASE, True, now=2.0) == pytest.approx(0.2)  # too soon for another probe
    assert c.observe(BASE, True, now=pc.PROBE_MIN_INTERVAL + 0.1) == 0.0


@pytest.mark.parametrize("budget,sensitivity", [(1.25, 1.5), (1.25, 0.2), (1.5, 3.0)])
def test_converges_on_a_simulated_gpu(budget, sensitivity):
    """Decode slows by 1 + sensitivity x duty; the controller finds the duty that keeps it under budget."""
    c = pc.DutyController(budget)
    published, slowdowns = c.duty, []
    for window in range(1200):  # ten minutes of windows
        itl = BASE * (1 + sensitivity * published)
        published = c.observe(itl, True, now=window * pc.WINDOW_SECONDS)
        if window >= 600 and published > 0:
            slowdowns.append(itl / BASE)
    assert statistics.fmean(slowdowns) <= c.target + 0.01
    assert max(slowdowns) <= budget + 0.02
    best = min(1.0, (c.target - 1) / sensitivity)  # the largest duty that meets the target
    assert statistics.fmean([s - 1 for s in slowdowns]) / sensitivity >= 0.7 * best  # training is not starved


def histogram(registry: CollectorRegistry, name: str) -> Histogram:
    return Histogram(name, "test", labelnames=["model_name", "engine"], registry=registry)


def test_meter_reads_vllms_histogram_from_the_registry():
    registry = CollectorRegistry()
    assert pc.ItlMeter(registry).read() is None
    h = histogram(registry, "vllm:inter_token_latency_seconds")
    histogram(registry, "vllm:e2e_request_latency_seconds").labels("m", "0").observe(9.0)  # not read
    meter = pc.ItlMeter(registry)
    h.labels("m", "0").observe(0.004)
    h.labels("m", "1").observe(0.006)
    sample = meter.read()
    assert (sample.seconds, sample.tokens) == (pytest.approx(0.010), 2)


def test_meter_falls_back_to_the_older_name():
    registry = CollectorRegistry()
    histogram(registry, "vllm:time_per_output_token_seconds").labels("m", "0").observe(0.003)
    assert pc.ItlMeter(registry).read() == pc.ItlSample(pytest.approx(0.003), 1)


class FakeMeter:
    def __init__(self, available: bool = True):
        self.sample = pc.ItlSample(0.0, 0.0) if available else None

    def read(self):
        return self.sample

    def tokens(self, n: int, itl: float) -> None:
        self.sample = pc.ItlSample(self.sample.seconds + n * itl, self.sample.tokens + n)


def config(tmp_path: Path, **kw) -> RuntimeConfig:
    return RuntimeConfig(model="/m", base_model="/m", state_dir=tmp_path, **kw)


def test_governor_publishes_what_it_measures(tmp_path):
    requests, meter, training = InFlightRequests(), FakeMeter(), {"now": False}
    clock = iter(range(1000)).__next__
    registry = CollectorRegistry()
    gov = pc.PacingGovernor(config(tmp_path), requests, training=lambda: training["now"], meter=meter, clock=clock,
                            registry=registry)
    reader = LoadSignalReader(tmp_path / "load-signal")
    snap = reader.snapshot()
    assert (gov.mode, snap.mode, snap.duty, snap.max_decode_slowdown) == ("measured", "measured", pytest.approx(0.2),
                                                                         1.25)
    requests.add(2)
    assert reader.in_flight == 2
    gov.tick()  # the first window only starts the count
    meter.tokens(50, BASE)
    gov.tick()
    assert reader.snapshot().baseline_itl_seconds == pytest.approx(BASE)
    training["now"] = True
    meter.tokens(50, 2 * BASE)
    gov.tick()  # training started during this window: ignored
    assert reader.snapshot().measured_slowdown is None
    meter.tokens(50, 2 * BASE)
    gov.tick()
    snap = reader.snapshot()
    assert snap.measured_slowdown == pytest.approx(2.0) and snap.duty == pytest.approx(0.2 * pc.DECREASE)
    # The same figures on vLLM's /metrics.
    metric = registry.get_sample_value
    assert (metric("onlinemodel_trainer_duty_cycle"), metric("onlinemodel_decode_slowdown_measured"),
            metric("onlinemodel_decode_slowdown_budget"), metric("onlinemodel_generation_requests_in_flight")) == (
        pytest.approx(0.2 * pc.DECREASE), pytest.approx(2.0), 1.25, 2)


def test_without_the_histogram_the_duty_is_fixed(tmp_path):
    gov = pc.PacingGovernor(config(tmp_path, max_decode_slowdown=2.0), InFlightRequests(), training=lambda: True,
                            meter=FakeMeter(available=False), registry=CollectorRegistry())
    snap = LoadSignalReader(tmp_path / "load-signal").snapshot()
    assert (gov.mode, snap.mode, snap.duty) == ("fixed", "fixed", 0.5)
    gov.tick()  # nothing to measure, nothing changes
    assert LoadSignalReader(tmp_path / "load-signal").snapshot() == snap


def test_budget_off(tmp_path):
    requests = InFlightRequests()
    gov = pc.PacingGovernor(config(tmp_path, max_decode_slowdown=0), requests, training=lambda: True,
                            meter=FakeMeter(), registry=CollectorRegistry())
    requests.add(1)
    snap = LoadSignalReader(tmp_path / "load-signal").snapshot()
    assert (gov.mode, snap.mode, snap.duty, snap.max_decode_slowdown, snap.in_flight) == ("off", "off", 1.0, None, 1)
