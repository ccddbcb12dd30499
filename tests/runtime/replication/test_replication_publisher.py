"""The learner's publishing policy (a table) and its follower registry (lag in versions and seconds)."""

from __future__ import annotations

import pytest

from onlinemodel_protocol.limits import FOLLOWER_ACTIVE_SECONDS, REPLICAS_MAX
from onlinemodel_runtime.replication.publisher import FollowerRegistry, should_publish


@pytest.mark.parametrize("active,version,published,training,since,expected", [
    (False, 5, None, False, 999, False),  # nobody follows: never pay for a snapshot
    (True, 5, 5, False, 999, False),  # already published
    (True, 5, None, False, 0, True),  # first follower, learner idle: at once
    (True, 6, 5, False, 0.1, True),  # a job ended: at once, whatever the interval
    (True, 6, 5, True, 10, False),  # during a job: not before the interval...
    (True, 6, 5, True, 30, True),  # ...then yes
    (True, 3, 5, False, 0, True),  # the learner restarted from an older checkpoint: publish that
])
def test_should_publish(active, version, published, training, since, expected):
    assert should_publish(followers_active=active, weight_version=version, published_version=published,
                          training=training, seconds_since_publish=since, sync_interval=30) is expected


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lag_counts_from_the_first_version_the_follower_lacks():
    clock = Clock()
    reg = FollowerRegistry(clock)
    reg.observe_version(4)
    reg.report("f-1", 4)
    clock.now = 110
    reg.observe_version(5)
    clock.now = 115
    reg.observe_version(6)
    clock.now = 130
    (state,) = reg.states(6)
    assert (state.weight_version, state.lag_versions, state.lag_seconds) == (4, 2, 20.0)
    reg.report("f-1", 6, sync_seconds=1.5, sync_bytes=10)
    (state,) = reg.states(6)
    assert (state.lag_versions, state.lag_seconds, state.last_sync_seconds) == (0, 0.0, 1.5)
    reg.report("f-1", 6)  # a plain poll keeps the last sync's numbers
    assert reg.states(6)[0].last_sync_bytes == 10


def test_followers_go_quiet_then_are_forgotten():
    clock = Clock()
    reg = FollowerRegistry(clock)
    reg.report("f-1", 1)
    assert reg.active()
    clock.now += FOLLOWER_ACTIVE_SECONDS + 1
    assert not reg.active() and [s.name for s in reg.states(1)] == ["f-1"]  # still listed, no longer served
    clock.now += 10 * FOLLOWER_ACTIVE_SECONDS
    reg.report("f-2", 1)
    assert [s.name for s in reg.states(1)] == ["f-2"]


def test_the_registry_is_bounded():
    reg = FollowerRegistry(Clock())
    for i in range(10 * REPLICAS_MAX + 5):
        reg.clock.now += 0.001
        reg.report(f"f-{i}", 1)
    names = [s.name for s in reg.states(1)]
    assert len(names) == 10 * REPLICAS_MAX and "f-0" not in names and f"f-{10 * REPLICAS_MAX + 4}" in names
