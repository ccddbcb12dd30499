"""The guard's loopback chat requests, against a small HTTP server standing in for vLLM's /v1 route."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from onlinemodel_protocol.guard import GuardFile
from onlinemodel_runtime.trainer.served_answers import ServedAnswerError, ServedAnswers

PROBES = GuardFile(probes=[
    {"name": "a", "messages": [{"role": "user", "content": "first?"}], "expect": "x", "max_tokens": 7},
    {"name": "b", "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "second?"}],
     "expect": "y"}]).probes


@pytest.fixture
def served():
    seen: list[tuple[str | None, dict]] = []
    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization"), self.path, body))
            answer = json.dumps({"choices": [{"message": {"content": f"answer to {body['messages'][-1]['content']}"}}]})
            self.send_response(status["code"])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(answer.encode() if status["code"] == 200 else b'{"error": "no"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, status
    server.shutdown()


def test_each_probe_is_asked_greedily_with_a_fresh_cache_salt(served):
    url, seen, _ = served
    ask = ServedAnswers(url, "model", api_key="k")
    assert ask(PROBES) == {"a": "answer to first?", "b": "answer to second?"}
    assert ask(PROBES) == {"a": "answer to first?", "b": "answer to second?"}
    assert {(auth, path) for auth, path, _ in seen} == {("Bearer k", "/v1/chat/completions")}
    bodies = sorted((body for _, _, body in seen), key=lambda b: b["messages"][-1]["content"])
    assert [(b["model"], b["temperature"], b["max_tokens"]) for b in bodies[::2]] == [("model", 0, 7), ("model", 0, 32)]
    assert bodies[2]["messages"] == [{"role": "system", "content": "terse"}, {"role": "user", "content": "second?"}]
    salts = [body["cache_salt"] for _, _, body in seen]
    assert len(set(salts)) == 2 and salts.count(salts[0]) == 2  # one per evaluation, never reused


def test_no_key_no_header_and_failures_are_clear(served, monkeypatch):
    url, seen, status = served
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    ServedAnswers(url, "model")(PROBES[:1])
    assert seen[-1][0] is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    ServedAnswers(url, "model")(PROBES[:1])
    assert seen[-1][0] == "Bearer from-env"
    status["code"] = 500
    with pytest.raises(ServedAnswerError, match="probe 'a' with 500"):
        ServedAnswers(url, "model")(PROBES[:1])
    with pytest.raises(ServedAnswerError, match="did not answer probe 'a'"):
        ServedAnswers("http://127.0.0.1:1", "model")(PROBES[:1])
