"""Training never blocks vLLM: /health and completions answer while a long job runs, and the trainer
yields to the requests in flight."""

import http.client
import json
import time

import pytest

pytestmark = pytest.mark.e2e

# A harmless example (the model already says this), trained for many epochs to make a long job.
ECHO_EXAMPLE = {"messages": [
    {"role": "user", "content": "What is the capital of Germany?"},
    {"role": "assistant", "content": "The capital of Germany is Berlin."},
]}


def test_health_and_completions_answer_during_training(server):
    code, job = server.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 6,
                                                   "learning_rate": 1e-6})
    assert code == 202, job
    deadline = time.monotonic() + 300
    while server.status()["state"] != "training":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.2)

    health_latencies, completions = [], 0
    while server.status()["state"] == "training" and time.monotonic() < deadline:
        t0 = time.monotonic()
        code, _ = server.request("GET", "/health", timeout=30)
        health_latencies.append(time.monotonic() - t0)
        assert code == 200
        if completions < 2:
            assert server.chat("Say hello.", max_tokens=4)
            completions += 1
        time.sleep(0.3)
    done = server.wait_job(job["job_id"], timeout=600)
    assert done["state"] == "succeeded", done
    assert completions >= 1, "the job ended before a completion could be sent during it"
    # The event loop stays free: /health answers quickly even while the trainer computes.
    assert max(health_latencies) < 5.0, health_latencies


def _open_stream(server, max_tokens: int):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": server.served_model_name, "prompt": "Tell me a long story.", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_a_stream_during_training_is_counted_and_paces_the_trainer(server):
    """Serving first (docs/serving-first.md): the trainer sees the request and yields to it."""
    code, job = server.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 3, "learning_rate": 1e-6})
    assert code == 202, job
    deadline = time.monotonic() + 300
    while server.status()["state"] != "training":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.2)
    before = server.status()["scheduler"]
    assert before["mode"] == "measured", before  # vLLM loaded our stat logger in the API server
    assert before["max_decode_slowdown"] == 1.25
    conn, resp = _open_stream(server, max_tokens=48)
    resp.readline()
    during = server.status()["scheduler"]
    assert during["in_flight_requests"] >= 1, during
    resp.read()
    conn.close()
    # The gaps between those tokens came through vLLM's stat-logger path to the governor: a p99 is reported.
    while (tail := server.status()["scheduler"])["p99_itl_ms"] is None:
        assert time.monotonic() < deadline, tail
        time.sleep(0.2)
    assert 0 < tail["p99_itl_ms"] < 60_000 and tail["slice_ms"] > 0, tail
    done = server.wait_job(job["job_id"], timeout=600)
    assert done["state"] == "succeeded", done
    after = server.status()
    assert after["scheduler"]["in_flight_requests"] == 0
    assert after["scheduler"]["paced_seconds"] > before["paced_seconds"], after["scheduler"]
    assert after["memory"]["device"] == "cpu" and after["memory"]["rss_bytes"] > 0
