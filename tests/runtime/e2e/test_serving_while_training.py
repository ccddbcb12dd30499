"""Training never blocks vLLM: /health and completions answer while a long job runs."""

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
