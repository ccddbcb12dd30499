"""The stat-logger plugin: a StatLoggerBase vLLM accepts, reading IterationStats through compat, and a no-op
until onlinemodel's governor attaches a sink."""

from __future__ import annotations

import pytest
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats

from onlinemodel_runtime.server import token_gaps
from onlinemodel_runtime.server.token_gaps import GapRing
from onlinemodel_runtime.vllm_plugins import compat, stat_logger


@pytest.fixture
def feed(monkeypatch):
    fresh = token_gaps.TokenGapFeed()
    monkeypatch.setattr(stat_logger, "FEED", fresh)
    return fresh


def iteration(*gaps: float) -> IterationStats:
    stats = IterationStats()  # vLLM's own class: the test fails if its field moves
    stats.inter_token_latencies_iter.extend(gaps)
    return stats


def test_compat_reads_the_gaps_of_this_vllms_iteration_stats():
    read = compat.iteration_token_gaps_reader()
    assert read is not None and read(iteration(0.004, 0.005)) == [0.004, 0.005]


def test_compat_refuses_an_iteration_stats_without_the_field(monkeypatch):
    class Renamed:  # a future vLLM that renamed the list
        def __init__(self):
            self.itl = []

    monkeypatch.setattr("vllm.v1.metrics.stats.IterationStats", Renamed)
    assert compat.iteration_token_gaps_reader() is None


def test_logger_is_a_no_op_until_a_sink_is_attached(feed):
    assert issubclass(stat_logger.TokenGapLogger, StatLoggerBase)
    loggers = [stat_logger.TokenGapLogger(None, engine_index=i) for i in (0, 1)]  # one per engine
    assert feed.loggers == 2
    loggers[0].record(None, iteration(0.005))
    assert feed.sink is None
    feed.sink = GapRing(16)
    loggers[0].record(None, iteration(0.004, 0.006), engine_idx=0)
    loggers[1].record(None, iteration(0.007), engine_idx=1)
    loggers[1].record(None, None)  # a batch without outputs has no iteration stats
    loggers[0].log_engine_initialized()
    assert feed.sink.values().tolist() == [0.004, 0.006, 0.007]


def test_an_unreadable_vllm_registers_no_logger(feed, monkeypatch):
    monkeypatch.setattr(compat, "iteration_token_gaps_reader", lambda: None)
    logger = stat_logger.TokenGapLogger(None)
    feed.sink = GapRing(4)
    logger.record(None, iteration(0.005))
    assert feed.loggers == 0 and len(feed.sink) == 0  # the governor then runs at a fixed duty cycle
