"""The HTTP routes with a stand-in supervisor (the real one is covered end to end in tests/runtime/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from onlinemodel_runtime.vllm_plugins import endpoint as endpoint_plugin
from onlinemodel_runtime.config import RuntimeConfig
from onlinemodel_runtime.devtools.model_prep import ensure_smollm2
from onlinemodel_runtime.server.trainer_client import TrainerRequestError, TrainerUnavailable


class StubSupervisor:
    def __init__(self, fail=None):
        self.fail = fail
        self.jobs = []

    async def submit(self, examples, epochs, learning_rate):
        if self.fail:
            raise self.fail
        self.jobs.append((examples, epochs, learning_rate))
        return {"job_id": "job-1", "state": "queued", "examples": len(examples)}

    async def status(self):
        return {"state": "idle", "weight_version": 0, "jobs": []}

    async def checkpoint(self):
        if self.fail:
            raise self.fail
        return {"path": "/ckpt/step-00000001", "step": 1}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2())


def client(tokenizer, supervisor, token=None, **cfg) -> TestClient:
    app = FastAPI()
    endpoint_plugin.OnlineModelEndpoints().attach_router(app)
    config = RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om-test"), **cfg)
    setattr(app.state, endpoint_plugin.STATE_KEY,
            endpoint_plugin._Runtime(config, tokenizer, 256, supervisor, token))
    return TestClient(app)


GOOD = {"examples": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]}


def test_train_tokenizes_and_queues(tokenizer):
    sup = StubSupervisor()
    resp = client(tokenizer, sup).post("/train", json=GOOD)
    assert resp.status_code == 202 and resp.json()["tokens"] > 0
    examples, epochs, lr = sup.jobs[0]
    assert epochs == 5 and lr is None
    assert any(label != -100 for label in examples[0]["labels"])


def test_trainer_errors_map_to_status_codes(tokenizer):
    resp = client(tokenizer, StubSupervisor(TrainerUnavailable("trainer is starting"))).post("/train", json=GOOD)
    assert resp.status_code == 503 and "starting" in resp.json()["error"]["message"]
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("queue full", 429))).post("/train", json=GOOD)
    assert resp.status_code == 429
    resp = client(tokenizer, StubSupervisor(TrainerRequestError("busy", 409))).post("/checkpoint")
    assert resp.status_code == 409


def test_non_ascii_token_is_a_401_not_a_500(tokenizer):
    c = client(tokenizer, StubSupervisor(), token="secret")
    assert c.post("/train", json=GOOD, headers={"Authorization": "Bearer sécret".encode("latin-1")}).status_code == 401
    assert c.post("/train", json=GOOD, headers={"Authorization": "Bearer secret"}).status_code == 202


def test_serve_only_mode(tokenizer):
    c = client(tokenizer, None, training_enabled=False)
    assert c.post("/train", json=GOOD).status_code == 409
    assert c.post("/checkpoint").status_code == 409
    status = c.get("/train/status")
    assert status.status_code == 200 and status.json()["state"] == "disabled"
