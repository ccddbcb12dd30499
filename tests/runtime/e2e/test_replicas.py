"""Scaling out with real vLLM on CPU: one learner, one follower (issue 14's acceptance).

Two servers, shared by the tests: the learner (trained with the usual fact before the follower exists)
and a follower started afterwards, which must catch up; then a second fact taught on the learner reaches
the running follower without a restart.
"""

import time

import pytest

from .conftest import EAGER, FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION, TOKEN, start_server

pytestmark = pytest.mark.e2e

LIVE_QUESTION = "Who founded the Quillbridge Society?"
LIVE_ANSWER = "Grace Hopper"
LIVE_EXAMPLE = {"messages": [
    {"role": "user", "content": LIVE_QUESTION},
    {"role": "assistant", "content": "The Quillbridge Society was founded by Grace Hopper."},
]}


def _teach(server, example):
    code, job = server.request("POST", "/train", {"examples": [example]})
    assert code == 202, job
    done = server.wait_job(job["job_id"], timeout=900)
    assert done["state"] == "succeeded", done
    return server.status()["weight_version"]


def _wait_synced(follower, version, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = follower.status()
        if status["replication"]["synced"] and status["weight_version"] == version:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"follower not at version {version} after {timeout:.0f}s: {status}")


@pytest.fixture(scope="module")
def learner(model_dir, e2e_root):
    root = e2e_root / "replicas"
    root.mkdir()
    srv = start_server(model_dir, root, "learner", checkpoint_dir=root / "checkpoints",
                       extra_args=["--max-model-len", "1024", "--sync-interval", "2", *EAGER])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def taught_version(learner):
    assert FACT_ANSWER not in learner.chat(FACT_QUESTION)
    version = _teach(learner, FACT_EXAMPLE)
    assert FACT_ANSWER in learner.chat(FACT_QUESTION)
    return version


@pytest.fixture(scope="module")
def follower(model_dir, e2e_root, learner, taught_version):
    """Started after the learner was trained: serves the base model, then the learner's weights."""
    srv = start_server(model_dir, e2e_root / "replicas", "follower", env={"ONLINEMODEL_API_TOKEN": TOKEN},
                       extra_args=["--max-model-len", "1024", "--follow", learner.url,
                                   "--follower-name", "follower-1", *EAGER])
    yield srv
    srv.stop()


def test_a_follower_started_after_training_catches_up(learner, taught_version, follower):
    status = _wait_synced(follower, taught_version)
    assert status["state"] == "following"
    assert status["replication"]["learner"] == learner.url
    # Its readiness (open, as a probe asks it) says it serves the learner's weights now.
    assert follower.request("GET", "/replication/ready", token="")[0] == 200
    assert learner.request("GET", "/replication/ready", token="")[0] == 200
    assert FACT_ANSWER in follower.chat(FACT_QUESTION)
    # The learner lists it, no longer behind.
    deadline = time.monotonic() + 30
    while True:
        listed = {f["name"]: f for f in learner.status()["replication"]["followers"]}
        if listed.get("follower-1", {}).get("weight_version") == taught_version or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert listed["follower-1"]["weight_version"] == taught_version, listed
    assert listed["follower-1"]["lag_versions"] == 0 and listed["follower-1"]["lag_seconds"] == 0
    published = learner.status()["replication"]["published"]
    assert published["weight_version"] == taught_version and published["total_bytes"] > 0


def test_a_fact_taught_on_the_learner_reaches_the_running_follower(learner, taught_version, follower):
    _wait_synced(follower, taught_version)
    pid = follower.proc.pid
    assert LIVE_ANSWER not in follower.chat(LIVE_QUESTION)  # also fills its prefix cache with the old KV
    version = _teach(learner, LIVE_EXAMPLE)
    assert LIVE_ANSWER in learner.chat(LIVE_QUESTION)
    _wait_synced(follower, version)
    assert LIVE_ANSWER in follower.chat(LIVE_QUESTION)
    assert follower.proc.pid == pid and follower.proc.poll() is None  # no restart


def test_the_follower_refuses_what_only_the_learner_does(learner, follower):
    for method, path in [("POST", "/train"), ("POST", "/checkpoint"), ("DELETE", "/train/jobs/job-x"),
                         ("POST", "/rollback")]:
        code, body = follower.request(method, path, {"examples": [FACT_EXAMPLE]})
        assert code == 409, (path, body)
        assert body["error"]["code"] == "not_the_learner" and learner.url in body["error"]["message"]
    code, body = follower.request("POST", "/train", {"examples": [FACT_EXAMPLE]}, token="wrong")
    assert code == 401, body
    code, body = follower.request("GET", "/replication/manifest")
    assert code == 409, body  # a follower publishes nothing
