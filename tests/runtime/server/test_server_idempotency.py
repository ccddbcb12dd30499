"""Idempotency-Key bookkeeping: one job per key, concurrent retries wait, failures leave no key."""

from __future__ import annotations

import asyncio

import pytest

from onlinemodel_protocol.api import TrainAccepted
from onlinemodel_runtime.server.idempotency import IdempotencyKeyError, IdempotencyKeys, check_key, fingerprint


class Submitter:
    def __init__(self, delay: float = 0.0, fail: Exception | None = None):
        self.calls = 0
        self.delay = delay
        self.fail = fail

    async def __call__(self) -> TrainAccepted:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return TrainAccepted(job_id=f"job-{self.calls}", state="queued", examples=1, tokens=3)


async def test_concurrent_retries_share_the_first_answer():
    keys, submit = IdempotencyKeys(), Submitter(delay=0.05)
    answers = await asyncio.gather(*(keys.submit("k", fingerprint(b"body"), submit) for _ in range(5)))
    assert submit.calls == 1
    assert {a.job_id for a, _ in answers} == {"job-1"} and sorted(r for _, r in answers) == [False] + [True] * 4


async def test_another_body_is_refused_and_a_failure_frees_the_key():
    keys = IdempotencyKeys()
    await keys.submit("k", fingerprint(b"a"), Submitter())
    with pytest.raises(IdempotencyKeyError) as exc:
        await keys.submit("k", fingerprint(b"b"), Submitter())
    assert (exc.value.status, exc.value.code) == (422, "idempotency_key_reused")
    failing = Submitter(delay=0.05, fail=RuntimeError("queue full"))
    results = await asyncio.gather(keys.submit("f", "x", failing), keys.submit("f", "x", failing),
                                   return_exceptions=True)
    assert failing.calls == 1 and all(isinstance(r, RuntimeError) for r in results)  # the retry saw the same
    ok = Submitter()
    assert (await keys.submit("f", "x", ok))[0].job_id == "job-1" and ok.calls == 1


async def test_a_cancelled_first_request_does_not_cancel_its_retries():
    keys = IdempotencyKeys()
    first = asyncio.create_task(keys.submit("k", "x", Submitter(delay=10)))
    await asyncio.sleep(0.01)
    retry = asyncio.create_task(keys.submit("k", "x", Submitter()))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(IdempotencyKeyError, match="interrupted"):
        await retry
    assert len(keys) == 0


async def test_only_the_newest_keys_are_remembered():
    keys = IdempotencyKeys(capacity=2)
    for key in ("a", "b", "c"):
        await keys.submit(key, "x", Submitter())
    again = Submitter()
    assert (await keys.submit("a", "x", again))[1] is False and again.calls == 1  # "a" was forgotten
    assert len(keys) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "new\nline", "é"])
def test_malformed_keys(key):
    with pytest.raises(IdempotencyKeyError) as exc:
        check_key(key)
    assert exc.value.status == 400
    assert check_key("order-42:retry_1") == "order-42:retry_1"
