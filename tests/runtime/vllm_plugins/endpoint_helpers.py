"""The training routes on a bare FastAPI app with a stand-in supervisor, and a raw ASGI client for them.

The routes, the request parsing and the tokenizer are the real ones; only the supervisor (the trainer
behind it) stands in: it records what it was asked. The raw client sends exactly the headers and body
chunks it is given (a Content-Length that lies, or none), which HTTP client libraries do not allow.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from onlinemodel_protocol.api import CheckpointRecord, Job, RollbackRecord, TrainAccepted, TrainStatus
from onlinemodel_protocol.config import RuntimeConfig
from onlinemodel_runtime.server.trainer_client import TrainerRequestError
from onlinemodel_runtime.vllm_plugins import endpoint

RECORD = CheckpointRecord(path="/ckpt/step-00000001", step=1, weight_version=1, time="2026-11-26T05:00:00.000Z",
                          size_bytes=10, seconds=0.1, content_hash="sha256:00")
GOOD = {"examples": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]}


class StubSupervisor:
    """Records submissions; `weight_version` moves only when a job is accepted."""

    def __init__(self, fail: Exception | None = None, status: TrainStatus | None = None):
        self.fail = fail
        self.jobs = []
        self.weight_version = 0
        self._status = status or TrainStatus(state="idle")
        self.cancelled: list[str] = []
        self.answering = True

    async def submit(self, job):
        if self.fail:
            raise self.fail
        self.jobs.append(job)
        self.weight_version += 1
        return TrainAccepted(job_id=f"job-{len(self.jobs)}", state="queued", examples=len(job.examples),
                             tokens=sum(ex.num_tokens for ex in job.examples))

    async def status(self):
        return self._status

    async def cancel(self, job_id):
        if job_id == "job-missing":
            raise TrainerRequestError("no job 'job-missing'", 404)
        if job_id == "job-done":
            raise TrainerRequestError("job job-done already succeeded", 409)
        self.cancelled.append(job_id)
        return Job(id=job_id, state="running" if job_id == "job-running" else "cancelled", examples=1, epochs=1,
                   learning_rate=1e-5, created_at="2026-11-26T05:00:00Z")

    async def checkpoint(self):
        if self.fail:
            raise self.fail
        return RECORD

    async def rollback(self, to):
        if self.fail:
            raise self.fail
        if to == 404:
            raise TrainerRequestError("no checkpoint 404", 404)
        self.rolled_back_to = to
        return RollbackRecord(time="2026-11-26T05:00:00Z", source="request", weight_version=7,
                              checkpoint=f"step-{to:08d}" if isinstance(to, int) else str(to), reason=f"to {to!r}")


def make_app(tokenizer: Any, supervisor: Any, tokens: tuple[str, ...] = (), max_len: int = 256, **cfg) -> FastAPI:
    app = FastAPI()
    endpoint.OnlineModelEndpoints().attach_router(app)
    config = RuntimeConfig(model="/m", base_model="/m", state_dir=Path("/tmp/om-test"), **cfg)
    setattr(app.state, endpoint.STATE_KEY, endpoint._Runtime(config, tokenizer, max_len, supervisor, tokens))
    return app


async def asgi_request(app: FastAPI, method: str, path: str, *, headers: dict[str, str] | None = None,
                       chunks: list[bytes] = ()) -> tuple[int, dict[str, str], bytes]:
    """One request straight through the ASGI interface: (status, headers, body)."""
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    queue = queue or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # the app asked for more than the client sends: a hang, not an answer

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000), "state": {}}
    await asyncio.wait_for(app(scope, receive, send), 30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def error_of(body: bytes) -> dict:
    """The `error` object of an OpenAI-shaped error body (asserting the shape)."""
    data = json.loads(body)
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error
