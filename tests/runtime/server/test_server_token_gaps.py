"""The token-gap ring and the process's feed: fixed memory, newest values kept, nothing recorded unattached."""

from __future__ import annotations

import numpy as np
import pytest

from onlinemodel_runtime.server.token_gaps import GapRing, TokenGapFeed


def test_ring_keeps_the_newest_values_in_order():
    ring = GapRing(4)
    buffer = ring._buf
    ring.extend([1.0, 2.0, 3.0])
    assert ring.values().tolist() == [1.0, 2.0, 3.0] and len(ring) == 3
    mark = ring.count
    ring.extend([4.0, 5.0])  # wraps
    assert ring.values().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert ring.since(mark).tolist() == [4.0, 5.0]
    ring.extend(np.arange(10.0))  # more than fit: the newest
    assert ring.values().tolist() == [6.0, 7.0, 8.0, 9.0] and ring.count == 15
    assert ring.since(0).tolist() == [6.0, 7.0, 8.0, 9.0] and ring.since(15).size == 0
    assert ring._buf is buffer  # never reallocated
    ring.clear()
    assert len(ring) == 0 and ring.values().size == 0
    with pytest.raises(ValueError):
        GapRing(0)


def test_feed_records_only_while_a_sink_is_attached():
    feed = TokenGapFeed()
    feed.add([0.005])  # no governor: nothing kept anywhere
    assert feed.sink is None
    feed.sink = GapRing(8)
    feed.add([0.005, 0.006])
    feed.add([])
    assert feed.sink.values().tolist() == [0.005, 0.006]
