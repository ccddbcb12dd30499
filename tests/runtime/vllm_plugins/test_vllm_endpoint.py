"""The HTTP routes with a stand-in supervisor (the real one is covered end to end in tests/runtime/e2e)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from endpoint_helpers import GOOD, RECORD, StubSupervisor, asgi_request, error_of, make_app
from onlinemodel_protocol.api import Job, TrainLimits, TrainStatus
from onlinemodel_protocol.limits import (EPOCHS_DEFAULT, MAX_BODY_BYTES_MIN, MAX_CHARS_PER_TOKEN, MAX_MESSAGES,
                                         RETRY_AFTER_QUEUE_FULL_SECONDS, RETRY_AFTER_STARTING_SECONDS)
from onlinemodel_protocol.rpc import IGNORE_INDEX
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable
from onlinemodel_runtime.vllm_plugins import endpoint


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2())


def client(tokenizer, supervisor, tokens=(), **cfg) -> TestClient:
    return TestClient(make_app(tokenizer, supervisor, tokens, **cfg))


def test_train_tokenizes_resolves_defaults_and_queues(tokenizer):
    sup = StubSupervisor()
    resp = client(tokenizer, sup, learning_rate=2e-5).post("/train", json=GOOD)
    (job,) = sup.jobs
    assert resp.status_code == 202
    assert resp.json() == {"job_id": "job-1", "state": "queued", "examples": 1, "tokens": job.examples[0].num_tokens}
    assert (job.epochs, job.learning_rate) == (EPOCHS_DEFAULT, 2e-5)  # the configured defaults, resolved here
    assert any(label != IGNORE_INDEX for label in job.examples[0].labels)


def test_status_and_checkpoint_answer_the_protocol_models(tokenizer):
    status = TrainStatus(state="idle", steps=2, last_loss=float("nan"))
    c = client(tokenizer, StubSupervisor(status=status))
    body = c.get("/train/status").json()
    assert TrainStatus.model_validate(body) == status.model_copy(update={"last_loss": None})
    assert body["last_loss"] is None  # a NaN loss is written as null, not a 500
    assert c.post("/checkpoint").json() == RECORD.model_dump()


def test_trainer_errors_map_to_status_codes(tokenizer):
    resp = client(tokenizer, StubSupervisor(TrainerUnavailable("trainer is starting"))).post("/train", json=GOOD)
    assert resp.status_code == 503 and "starting" in resp.json()["error"]["message"]
    assert resp.headers["retry-after"] == str(RETRY_AFTER_STARTING_SECONDS)
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("queue full", 429))).post("/train", json=GOOD)
    assert resp.status_code == 429 and resp.headers["retry-after"] == str(RETRY_AFTER_QUEUE_FULL_SECONDS)
    resp = client(tokenizer, StubSupervisor(TrainerUnavailable("trainer is starting"))).post("/checkpoint")
    assert resp.status_code == 503 and resp.headers["retry-after"] == str(RETRY_AFTER_STARTING_SECONDS)
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("busy", 409))).post("/checkpoint")
    assert resp.status_code == 409
    assert resp.json() == {"error": {"message": "busy", "type": "checkpoint_error", "param": None, "code": None}}


def test_every_training_route_needs_the_token(tokenizer):
    sup = StubSupervisor()
    c = client(tokenizer, sup, tokens=("secret", "other"))
    calls = [("post", "/train", {"json": GOOD}), ("get", "/train/status", {}), ("post", "/checkpoint", {}),
             ("delete", "/train/jobs/job-1", {}), ("get", "/train/jobs/job-1", {}), ("get", "/train/limits", {})]
    for method, path, kwargs in calls:
        for header in (None, "Bearer wrong", "Basic secret", "Bearer", "Bearer sécret".encode("latin-1")):
            headers = {} if header is None else {"Authorization": header}
            resp = getattr(c, method)(path, headers=headers, **kwargs)
            assert resp.status_code == 401, (path, header)
            assert error_of(resp.content)["type"] == "authentication_error"
    assert sup.jobs == [] and sup.cancelled == []
    for token in ("secret", "other"):
        assert c.get("/train/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.post("/train", json=GOOD, headers={"Authorization": "bearer  secret "}).status_code == 202


def test_serve_only_mode(tokenizer):
    c = client(tokenizer, None, training_enabled=False)
    assert c.post("/train", json=GOOD).status_code == 409
    assert c.post("/checkpoint").status_code == 409
    assert c.delete("/train/jobs/job-1").status_code == 409
    status = c.get("/train/status")
    assert status.status_code == 200
    assert status.json() == TrainStatus.placeholder("disabled").model_dump()


def test_cancel_answers(tokenizer):
    sup = StubSupervisor()
    c = client(tokenizer, sup)
    resp = c.delete("/train/jobs/job-7")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    resp = c.delete("/train/jobs/job-running")
    assert resp.status_code == 202 and resp.json()["state"] == "running"  # stops after its current step
    assert error_of(c.delete("/train/jobs/job-missing").content)["param"] == "job_id"
    assert c.delete("/train/jobs/job-missing").status_code == 404
    assert c.delete("/train/jobs/job-done").status_code == 409
    assert sup.cancelled == ["job-7", "job-running"]


# --- bodies: size first, before parsing ----------------------------------------------------------

@pytest.mark.parametrize("declared", [None, "10", "99999999999", "nonsense"])
async def test_body_over_the_cap_is_a_413_whatever_content_length_says(tokenizer, declared):
    sup = StubSupervisor()
    app = make_app(tokenizer, sup, max_body_bytes=MAX_BODY_BYTES_MIN)
    headers = {} if declared is None else {"Content-Length": declared}
    chunk = json.dumps(GOOD).encode()
    status, _, body = await asgi_request(app, "POST", "/train", headers=headers,
                                         chunks=[chunk] * (MAX_BODY_BYTES_MIN // len(chunk) + 2))
    assert status == 413 and error_of(body)["code"] == "body_too_large"
    assert sup.jobs == []
    status, _, _ = await asgi_request(app, "POST", "/train", chunks=[chunk])
    assert status == 202  # below the cap, in one chunk and without Content-Length


def test_an_example_too_long_in_characters_is_refused_before_rendering(tokenizer):
    renders = []

    class CountingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            renders.append(1)
            return tokenizer.apply_chat_template(*args, **kwargs)

    sup = StubSupervisor()
    c = client(CountingTokenizer(), sup)
    huge = {"examples": [{"messages": [{"role": "user", "content": "x" * (MAX_CHARS_PER_TOKEN * 256)},
                                       {"role": "assistant", "content": "y"}]}]}
    resp = c.post("/train", json=huge)
    assert resp.status_code == 413 and error_of(resp.content)["code"] == "example_too_long"
    assert renders == [] and sup.jobs == []


@pytest.mark.parametrize("raw,code", [
    (b'{"examples": [{"messages": [{"role": "user", "content": "\\ud800"}, '
     b'{"role": "assistant", "content": "hi"}]}]}', "invalid_unicode"),
    (b'{"examples": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}], '
     b'"\\udfff": 1}]}', "invalid_unicode"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    (b'{"examples": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
])
def test_unicode_and_nesting_errors_are_400(tokenizer, raw, code):
    sup = StubSupervisor()
    resp = client(tokenizer, sup).post("/train", content=raw)
    assert resp.status_code == 400, resp.text
    assert error_of(resp.content)["code"] == code
    assert sup.jobs == []


def test_a_template_that_raises_is_a_400(tokenizer):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(ensure_smollm2())
    strict.chat_template = (
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    sup = StubSupervisor()
    c = client(strict, sup)
    out_of_order = {"examples": [{"messages": [{"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "b"},
                                               {"role": "assistant", "content": "c"}]}]}
    resp = c.post("/train", json=out_of_order)
    error = error_of(resp.content)
    assert resp.status_code == 400 and error["code"] == "template_error" and "alternate" in error["message"]
    assert error["param"] == "examples[0]" and sup.jobs == []
    assert c.post("/train", json=GOOD).status_code == 202


def test_a_256_message_example_costs_one_render(tokenizer):
    renders = []
    original = tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        renders.append(1)
        return original(*args, **kwargs)

    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "some words " * 20}
                for i in range(256)]
    sup = StubSupervisor()
    c = client(tokenizer, sup, max_len=100_000)
    tokenizer.apply_chat_template = counting
    try:
        started = time.perf_counter()
        resp = c.post("/train", json={"examples": [{"messages": messages}]})
        seconds = time.perf_counter() - started
    finally:
        del tokenizer.apply_chat_template
    assert resp.status_code == 202, resp.text
    # The template probe (four tiny renders) and the conversation once: not one render per turn.
    assert len(renders) == 5
    assert seconds < 2.0, seconds
    (example,) = sup.jobs[0].examples
    assert example.num_target_tokens > 128 * 20


# --- Idempotency-Key ------------------------------------------------------------------------------

def test_a_retry_with_the_same_key_returns_the_original_job(tokenizer):
    sup = StubSupervisor()
    c = client(tokenizer, sup)
    first = c.post("/train", json=GOOD, headers={"Idempotency-Key": "k-1"})
    again = c.post("/train", json=GOOD, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(sup.jobs) == 1 and sup.weight_version == 1  # trained once
    other = c.post("/train", json=GOOD, headers={"Idempotency-Key": "k-2"})
    assert other.json()["job_id"] == "job-2"


def test_a_key_reused_with_another_body_is_refused(tokenizer):
    sup = StubSupervisor()
    c = client(tokenizer, sup)
    assert c.post("/train", json=GOOD, headers={"Idempotency-Key": "k"}).status_code == 202
    changed = dict(GOOD, epochs=2)
    resp = c.post("/train", json=changed, headers={"Idempotency-Key": "k"})
    assert resp.status_code == 422 and error_of(resp.content)["code"] == "idempotency_key_reused"
    assert len(sup.jobs) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
def test_a_malformed_key_is_a_400(tokenizer, key):
    sup = StubSupervisor()
    resp = client(tokenizer, sup).post("/train", json=GOOD, headers={"Idempotency-Key": key.encode("latin-1")})
    assert resp.status_code == 400 and error_of(resp.content)["code"] == "invalid_idempotency_key"
    assert sup.jobs == []


def test_a_refused_request_leaves_its_key_free(tokenizer):
    sup = StubSupervisor(TrainerRequestError("queue full", 429))
    c = client(tokenizer, sup)
    assert c.post("/train", json=GOOD, headers={"Idempotency-Key": "k"}).status_code == 429
    assert c.post("/train", json={"examples": []}, headers={"Idempotency-Key": "k2"}).status_code == 400
    sup.fail = None
    assert c.post("/train", json=GOOD, headers={"Idempotency-Key": "k"}).status_code == 202
    assert c.post("/train", json=GOOD, headers={"Idempotency-Key": "k2"}).status_code == 202
    assert len(sup.jobs) == 2


# --- serving first ------------------------------------------------------------------------------

def test_generation_requests_are_counted_while_they_run():
    plugin = endpoint.OnlineModelEndpoints()
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat():
        seen.append(getattr(app.state, endpoint.IN_FLIGHT_KEY).count)
        return {}

    plugin.attach_router(app)
    assert TestClient(app).post("/v1/chat/completions").status_code == 200
    assert seen == [1] and getattr(app.state, endpoint.IN_FLIGHT_KEY).count == 0


def test_limits_are_the_servers_own(tokenizer):
    limits = TrainLimits.model_validate(
        client(tokenizer, StubSupervisor(), max_examples=7, max_body_bytes=4096, default_epochs=2,
               learning_rate=2e-5).get("/train/limits").json())
    assert (limits.max_examples, limits.max_body_bytes, limits.default_epochs, limits.learning_rate) == \
        (7, 4096, 2, 2e-5)
    assert (limits.max_model_len, limits.max_messages, limits.max_chars_per_token) == \
        (256, MAX_MESSAGES, MAX_CHARS_PER_TOKEN)


def test_get_job_answers_its_progress(tokenizer):
    job = Job(id="job-a", state="running", examples=2, epochs=3, learning_rate=1e-5, steps=2, steps_total=6,
              created_at="2026-11-26T05:00:00Z", started_at="2026-11-26T05:00:01Z", eta_seconds=8.0)
    sup = StubSupervisor(status=TrainStatus(state="training", jobs=[job]))
    c = client(tokenizer, sup)
    body = c.get("/train/jobs/job-a").json()
    assert Job.model_validate(body) == job
    assert (body["steps_done"], body["steps_total"], body["eta_seconds"]) == (2, 6, 8.0)
    missing = c.get("/train/jobs/job-b")
    assert missing.status_code == 404 and error_of(missing.content)["param"] == "job_id"
    sup.answering = False
    starting = c.get("/train/jobs/job-a")
    assert starting.status_code == 503 and starting.headers["retry-after"] == str(RETRY_AFTER_STARTING_SECONDS)
    assert client(tokenizer, None, training_enabled=False).get("/train/jobs/job-a").status_code == 409


def test_rollback_route(tokenizer):
    sup = StubSupervisor()
    c = client(tokenizer, sup, tokens=("secret",))
    auth = {"Authorization": "Bearer secret"}
    for to in (12, "step-00000012", "latest"):
        resp = c.post("/rollback", json={"to": to}, headers=auth)
        assert resp.status_code == 200 and sup.rolled_back_to == to
        assert resp.json()["source"] == "request" and resp.json()["weight_version"] == 7
    for body in ({}, {"to": True}, {"to": None}, {"to": -1}, {"to": 1, "more": 2}, [1]):
        resp = c.post("/rollback", json=body, headers=auth)
        assert resp.status_code == 400, body
        assert error_of(resp.content)["param"] == "to"
    assert c.post("/rollback", content=b"{not json", headers=auth).status_code == 400
    assert c.post("/rollback", json={"to": 404}, headers=auth).status_code == 404
    assert c.post("/rollback", json={"to": 1}).status_code == 401
    assert c.post("/rollback", content=b"x" * 2048, headers=auth).status_code == 400
    assert client(tokenizer, sup, tokens=("secret",), max_body_bytes=1024).post(
        "/rollback", content=b"{" + b" " * 2048 + b"}", headers=auth).status_code == 413
    busy = client(tokenizer, StubSupervisor(TrainerRequestError("a training job is running", 409)))
    resp = busy.post("/rollback", json={"to": 1})
    assert resp.status_code == 409 and error_of(resp.content)["type"] == "rollback_error"
    assert client(tokenizer, None, training_enabled=False).post("/rollback", json={"to": 1}).status_code == 409


@pytest.mark.parametrize("args, expected", [
    (dict(host=None, port=8000, served_model_name=["chat"], model="/m"), ("http://127.0.0.1:8000", "chat")),
    (dict(host="0.0.0.0", port=1, served_model_name=None, model="/m"), ("http://127.0.0.1:1", "/m")),
    (dict(host="::", port=2, served_model_name="one", model="/m"), ("http://[::1]:2", "one")),
    (dict(host="10.1.2.3", port=3, served_model_name=None, model="/m"), ("http://10.1.2.3:3", "/m")),
    (dict(host="fd00::5", port=4, served_model_name=None, model="/m", ssl_keyfile="k"), ("https://[fd00::5]:4", "/m")),
])
def test_the_trainer_reaches_its_own_api_server(args, expected):
    """The guard's probes go to this server over loopback (served_answers.py): its URL and model name."""
    from argparse import Namespace

    found = endpoint._serving_address(Namespace(**args))
    assert (found["serving_url"], found["served_model_name"]) == expected
    assert endpoint._serving_address(Namespace(uds="/tmp/s.sock", **args)) == {}  # no address: no guard
