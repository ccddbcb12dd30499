"""Every bad /train or /checkpoint request gets a clear 4xx and changes nothing."""

import pytest

from .conftest import FACT_EXAMPLE

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


@pytest.mark.parametrize("path", ["/train", "/checkpoint"])
@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_token_is_required(server, path, token):
    before = server.status()
    # token "" sends no Authorization header at all.
    code, answer = server.request("POST", path, {"examples": [FACT_EXAMPLE]}, token=token)
    assert code == 401, answer
    assert "token" in answer["error"]["message"]
    assert server.status()["weight_version"] == before["weight_version"]


def test_status_needs_no_token_and_lists_state(server):
    status = server.status()
    for key in ("state", "steps", "tokens_trained", "last_loss", "weight_version", "jobs", "last_error",
                "checkpoint", "optimizer"):
        assert key in status
    assert status["state"] in ("idle", "training")
