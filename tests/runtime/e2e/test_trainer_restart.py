"""The supervisor restarts a trainer that died, and the counters never go back."""

import os
import signal
import time

import pytest

from .test_one_copy import trainer_request
from .test_serving_while_training import ECHO_EXAMPLE

pytestmark = pytest.mark.e2e


def test_killed_trainer_is_restarted_and_continues(server):
    before = server.status()
    pid = trainer_request(server, "introspect")["pid"]
    os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 300
    while True:
        status = server.status()
        if status["trainer_restarts"] >= before["trainer_restarts"] + 1 and status["state"] == "idle":
            break
        assert time.monotonic() < deadline, f"trainer not back: {status}"
        time.sleep(1.0)
    assert trainer_request(server, "introspect")["pid"] != pid
    # The live weights kept every step: the restarted trainer continues the counters.
    assert status["weight_version"] >= before["weight_version"]
    assert status["steps"] >= before["steps"]

    code, job = server.request("POST", "/train", {"examples": [ECHO_EXAMPLE], "epochs": 1,
                                                   "learning_rate": 1e-9})
    assert code == 202, job
    assert server.wait_job(job["job_id"])["state"] == "succeeded"
    assert server.status()["weight_version"] > status["weight_version"]
    assert "Berlin" in server.chat("What is the capital of Germany?")
