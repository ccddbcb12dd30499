"""The typed client against httpx's mock transport: requests it sends, answers it parses, errors, retries."""

from __future__ import annotations

import json

import httpx
import pytest

from onlinemodel_protocol.api import TrainLimits
from onlinemodel_protocol.client import ApiError, AsyncClient, Client, Unreachable, UnexpectedAnswer

EXAMPLE = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
JOB = {"id": "job-1", "state": "running", "examples": 1, "epochs": 2, "learning_rate": 1e-5, "steps": 1,
       "steps_total": 2, "created_at": "2026-12-01T10:00:00Z", "eta_seconds": 3.0}


def error(status: int, message: str, retry_after: str | None = None, **fields) -> httpx.Response:
    body = {"error": {"message": message, "type": "x", "param": fields.get("param"), "code": fields.get("code")}}
    return httpx.Response(status, json=body, headers={"Retry-After": retry_after} if retry_after else {})


def test_train_sends_the_body_token_and_idempotency_key():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"job_id": "job-1", "state": "queued", "examples": 1, "tokens": 9})

    with Client("http://om:8000/", " tok\n", transport=httpx.MockTransport(handler)) as om:
        accepted = om.train([EXAMPLE], epochs=2, idempotency_key="k-1")
    assert accepted.job_id == "job-1" and accepted.tokens == 9
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/train")
    assert request.headers["authorization"] == "Bearer tok" and request.headers["idempotency-key"] == "k-1"
    assert json.loads(request.content) == {"examples": [EXAMPLE], "epochs": 2}


def test_errors_carry_the_servers_fields_and_bad_answers_are_unexpected():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/train/jobs/job-9":
            return error(404, "no job 'job-9'", param="job_id")
        if request.url.path == "/train/limits":
            return httpx.Response(200, json={"max_examples": 0})
        raise httpx.ConnectError("refused")

    with Client("http://om:8000", transport=httpx.MockTransport(handler)) as om:
        with pytest.raises(ApiError) as refused:
            om.job("job-9")
        assert (refused.value.status_code, refused.value.param, refused.value.retry_after) == (404, "job_id", None)
        with pytest.raises(UnexpectedAnswer) as bad:
            om.limits()
        assert bad.value.status_code == 200
        with pytest.raises(Unreachable, match="refused"):
            om.status()


async def test_async_client_honours_retry_after_until_the_trainer_answers():
    answers = [error(503, "trainer is starting", "0"), error(429, "queue full", "0"),
               httpx.Response(200, json=JOB)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async with AsyncClient("http://om:8000", retry_seconds=5, transport=httpx.MockTransport(handler)) as om:
        job = await om.job("job-1")
    assert (job.steps_done, job.steps_total, job.eta_seconds) == (1, 2, 3.0) and answers == []


async def test_without_retry_seconds_a_503_is_raised_with_its_retry_after():
    def handler(request: httpx.Request) -> httpx.Response:
        return error(503, "trainer is starting", "5")

    async with AsyncClient("http://om:8000", transport=httpx.MockTransport(handler)) as om:
        with pytest.raises(ApiError) as refused:
            await om.train([EXAMPLE])
    assert (refused.value.status_code, refused.value.retry_after) == (503, 5.0)


def test_limits_parse_into_the_protocol_model():
    limits = {"max_examples": 64, "max_messages": 256, "max_body_bytes": 8388608, "max_model_len": 2048,
              "max_chars_per_token": 16, "default_epochs": 5, "max_epochs": 20, "learning_rate": 3e-5,
              "learning_rate_max": 1.0, "max_queued_jobs": 16}

    with Client("http://om", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=limits))) as om:
        assert om.limits() == TrainLimits(**limits)


async def test_clients_reuse_one_tls_context_per_process():
    """The operator makes a client per poll of every pod: building httpx's TLS context (parsing the CA bundle)
    each time cost ~130 ms of CPU; the clients share one, built as httpx builds its own."""
    from onlinemodel_protocol import client as client_module

    with Client("https://a.example") as first, Client("https://b.example") as second:
        assert first._options["verify"] is second._options["verify"]
    async with AsyncClient("http://c.example", trust_env=False) as third:
        assert third._options["verify"] is client_module._verifying_context(False)
    assert client_module._verifying_context(True).verify_mode.name == "CERT_REQUIRED"
