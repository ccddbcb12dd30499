"""The trainer's job queue: FIFO, a blocking get, and taking a queued job out."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from onlinemodel_runtime.trainer.job_queue import JobQueue


def item(job_id: str):
    return SimpleNamespace(id=job_id), []


def test_fifo_remove_and_size():
    q = JobQueue()
    a, b, c = item("a"), item("b"), item("c")
    for x in (a, b, c):
        q.put(x)
    assert q.qsize() == 3 and not q.empty()
    assert q.remove("b") and not q.remove("b") and not q.remove("zzz")
    assert q.get() is a and q.get() is c and q.empty()


def test_get_blocks_until_put_and_the_stop_marker_is_not_a_job():
    q = JobQueue()
    got = []
    reader = threading.Thread(target=lambda: got.extend([q.get(), q.get()]))
    reader.start()
    q.put(item("a"))
    q.put(None)
    assert q.qsize() == 0 or q.qsize() == 1  # None never counts as a queued job
    reader.join(timeout=10)
    assert not reader.is_alive() and got[0][0].id == "a" and got[1] is None
