"""Every bad /train or /checkpoint request gets a clear 4xx and changes nothing."""

import http.client
import json
import time

import pytest

from onlinemodel_protocol import limits

from .conftest import FACT_EXAMPLE
from .test_serving_while_training import ECHO_EXAMPLE

pytestmark = pytest.mark.e2e

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

BAD_REQUESTS = [
    # (id, raw body or json, expected status, words the message must contain)
    ("malformed-json", b'{"examples": [', 400, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, "JSON object"),
    ("no-examples-key", {"epochs": 1}, 400, "examples"),
    ("empty-list", {"examples": []}, 400, "must not be empty"),
    ("no-assistant-turn", {"examples": [{"messages": [USER]}]}, 400, "assistant"),
    ("unknown-role", {"examples": [{"messages": [{"role": "wizard", "content": "x"}, ASSISTANT]}]}, 400, "role"),
    ("too-many-examples", {"examples": [{"messages": [USER, ASSISTANT]}] * 65}, 413, "too many examples"),
    ("too-long", {"examples": [{"messages": [USER, {"role": "assistant", "content": "word " * 2000}]}]},
     413, "long"),
    ("bad-epochs", {"examples": [{"messages": [USER, ASSISTANT]}], "epochs": 0}, 400, "epochs"),
    ("bad-learning-rate", {"examples": [{"messages": [USER, ASSISTANT]}], "learning_rate": -1}, 400,
     "learning_rate"),
    ("lone-surrogate", b'{"examples": [{"messages": [{"role": "user", "content": "\\ud800"}, '
                       b'{"role": "assistant", "content": "x"}]}]}', 400, "unicode"),
    ("deeply-nested", b"[" * 50_000 + b"]" * 50_000, 400, "nested too deeply"),
    ("too-many-characters", {"examples": [{"messages": [USER, {"role": "assistant", "content": "x" * 20_000}]}]},
     413, "characters"),
]


@pytest.mark.parametrize("body,expected,words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_train_request_is_refused_and_changes_nothing(server, body, expected, words):
    before = server.status()
    raw = body if isinstance(body, bytes) else None
    code, answer = server.request("POST", "/train", None if raw else body, raw=raw)
    assert code == expected, answer
    message = answer["error"]["message"]
    assert words.lower() in message.lower(), message
    after = server.status()
    assert after["weight_version"] == before["weight_version"]
    assert len(after["jobs"]) == len(before["jobs"])


def test_an_oversized_body_is_refused_before_it_arrives(server):
    """Content-Length over --max-body-bytes: 413 at once, without waiting for (or reading) the body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/train")
        conn.putheader("Authorization", f"Bearer {server.token}")
        conn.putheader("Content-Length", str(limits.MAX_BODY_BYTES_DEFAULT + 1))
        conn.endheaders()
        conn.send(b'{"examples": [')  # and nothing more
        response = conn.getresponse()
        assert response.status == 413
        assert "larger than" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()


@pytest.mark.parametrize("method,path", [("POST", "/train"), ("POST", "/checkpoint"), ("GET", "/train/status"),
                                         ("DELETE", "/train/jobs/job-0")])
@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_token_is_required(server, method, path, token):
    before = server.status()
    # token "" sends no Authorization header at all.
    code, answer = server.request(method, path, {"examples": [FACT_EXAMPLE]} if path == "/train" else None,
                                  token=token)
    assert code == 401, answer
    assert "token" in answer["error"]["message"]
    assert server.status()["weight_version"] == before["weight_version"]


def test_status_lists_state(server):
    status = server.status()
    for key in ("state", "steps", "tokens_trained", "last_loss", "weight_version", "jobs", "job_counts",
                "last_error", "checkpoint", "optimizer"):
        assert key in status
    assert status["state"] in ("idle", "training")


def test_cancel_queued_and_running_jobs(server):
    slow = {"examples": [ECHO_EXAMPLE], "epochs": 20, "learning_rate": 1e-9}
    code, running = server.request("POST", "/train", slow)
    assert code == 202, running
    code, queued = server.request("POST", "/train", slow)
    assert code == 202, queued
    deadline = time.monotonic() + 300
    while not any(j["id"] == running["job_id"] and j["steps"] >= 1 for j in server.status()["jobs"]):
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.2)

    code, answer = server.request("DELETE", f"/train/jobs/{queued['job_id']}")
    assert code == 200 and answer["state"] == "cancelled", answer
    code, answer = server.request("DELETE", f"/train/jobs/{running['job_id']}")
    assert code == 202 and answer["state"] == "running", answer  # stops after its current step
    done = server.wait_job(running["job_id"], timeout=120)
    assert done["state"] == "cancelled" and 1 <= done["steps"] < 20
    jobs = {j["id"]: j for j in server.status()["jobs"]}
    assert jobs[queued["job_id"]]["state"] == "cancelled" and jobs[queued["job_id"]]["steps"] == 0

    code, answer = server.request("DELETE", f"/train/jobs/{running['job_id']}")
    assert code == 409 and "already cancelled" in answer["error"]["message"]
    code, answer = server.request("DELETE", "/train/jobs/job-doesnotexist")
    assert code == 404, answer
