"""The HTTP routes with a stand-in supervisor (the real one is covered end to end in tests/runtime/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from onlinemodel_protocol.api import CheckpointRecord, TrainAccepted, TrainStatus
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_protocol.rpc import IGNORE_INDEX
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable
from onlinemodel_runtime.vllm_plugins import endpoint

RECORD = CheckpointRecord(path="/ckpt/step-00000001", step=1, weight_version=1, time="2026-11-26T05:00:00.000Z",
                          size_bytes=10, seconds=0.1, content_hash="sha256:00")


class StubSupervisor:
    def __init__(self, fail=None, status=None):
        self.fail = fail
        self.jobs = []
        self._status = status or TrainStatus(state="idle")

    async def submit(self, job):
        if self.fail:
            raise self.fail
        self.jobs.append(job)
        return TrainAccepted(job_id="job-1", state="queued", examples=len(job.examples),
                             tokens=sum(ex.num_tokens for ex in job.examples))

    async def status(self):
        return self._status

    async def checkpoint(self):
        if self.fail:
            raise self.fail
        return RECORD


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2())


def client(tokenizer, supervisor, token=None, **cfg) -> TestClient:
    app = FastAPI()
    endpoint.OnlineModelEndpoints().attach_router(app)
    config = RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om-test"), **cfg)
    setattr(app.state, endpoint.STATE_KEY,
            endpoint._Runtime(config, tokenizer, 256, supervisor, token))
    return TestClient(app)


GOOD = {"examples": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]}


def test_train_tokenizes_resolves_defaults_and_queues(tokenizer):
    sup = StubSupervisor()
    resp = client(tokenizer, sup, learning_rate=2e-5).post("/train", json=GOOD)
    (job,) = sup.jobs
    assert resp.status_code == 202
    assert resp.json() == {"job_id": "job-1", "state": "queued", "examples": 1, "tokens": job.examples[0].num_tokens}
    assert (job.epochs, job.learning_rate) == (5, 2e-5)  # the configured defaults, resolved here
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
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("queue full", 429))).post("/train", json=GOOD)
    assert resp.status_code == 429
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("busy", 409))).post("/checkpoint")
    assert resp.status_code == 409
    assert resp.json() == {"error": {"message": "busy", "type": "checkpoint_error", "param": None, "code": None}}


def test_non_ascii_token_is_a_401_not_a_500(tokenizer):
    c = client(tokenizer, StubSupervisor(), token="secret")
    assert c.post("/train", json=GOOD, headers={"Authorization": "Bearer sécret".encode("latin-1")}).status_code == 401
    assert c.post("/train", json=GOOD, headers={"Authorization": "Bearer secret"}).status_code == 202


def test_serve_only_mode(tokenizer):
    c = client(tokenizer, None, training_enabled=False)
    assert c.post("/train", json=GOOD).status_code == 409
    assert c.post("/checkpoint").status_code == 409
    status = c.get("/train/status")
    assert status.status_code == 200
    assert status.json() == TrainStatus.placeholder("disabled").model_dump()


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
