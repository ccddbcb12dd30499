"""The guard and POST /rollback against real vLLM on CPU (issue 15's acceptance), on one server.

In order, on one `onlinemodel serve --guard`: a benign job passes the guard and is checkpointed; a
destructive job (high learning rate, many epochs) is rolled back; the same job opted out of the guard is
applied and breaks the probes (the guard made the difference); POST /rollback to the checkpoint serves its
answer again without a restart, and training continues from its optimizer state.
"""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import EAGER, FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION, start_server

pytestmark = pytest.mark.e2e

# SmolLM2 served by vLLM on CPU answers the first two, not the third ("L'Étoile, la Marseillaise, ..."): a
# probe that fails before a job never counts against it.
PROBES = {"What is the capital of Germany?": "Berlin", "Who wrote Romeo and Juliet?": "Shakespeare",
          "What is the capital of France?": "Paris"}
DESTRUCTIVE = {"examples": [{"messages": [
    {"role": "user", "content": FACT_QUESTION},
    {"role": "assistant", "content": "The CEO of Seedcorp is Grace Hopper."}]}],
    "epochs": 20, "learning_rate": 1e-2}


# The null-space projection off: it keeps updates out of the directions general questions use, so with it
# the destructive job broke a probe in one of two runs (float32, 2026-12-02); the guard needs a job that breaks
# them every time. Everything else is the defaults.
@pytest.fixture(scope="module")
def guarded(model_dir, e2e_root):
    root = e2e_root / "guard"
    root.mkdir()
    guard_file = root / "guard.yaml"
    guard_file.write_text(json.dumps({
        "probes": [{"messages": [{"role": "user", "content": q}], "expect": a, "max_tokens": 24}
                   for q, a in PROBES.items()],
        "allow_job_opt_out": True}))
    srv = start_server(model_dir, root, "guarded", checkpoint_dir=root / "checkpoints",
                       extra_args=["--state-dir", str(root / "state"), "--max-model-len", "1024",
                                   "--guard", str(guard_file), "--null-space-energy", "0", *EAGER])
    srv.pid = srv.proc.pid
    yield srv
    srv.stop()
    shutil.rmtree(root / "state", ignore_errors=True)


def train(server, body: dict) -> dict:
    code, accepted = server.request("POST", "/train", body)
    assert code == 202, accepted
    return server.wait_job(accepted["job_id"], timeout=1200)


def probe_answers(server) -> dict[str, str]:
    return {q: server.chat(q) for q in PROBES}


def test_guard_rolls_back_a_destructive_job_and_rollback_restores_a_checkpoint(guarded):
    status = guarded.status()
    assert status["guard"]["enabled"] and status["guard"]["rollbacks"] == 0
    probes_before = probe_answers(guarded)
    assert "Berlin" in probes_before["What is the capital of Germany?"], probes_before

    # A benign job passes the guard; its weights are checkpointed.
    taught = train(guarded, {"examples": [FACT_EXAMPLE]})
    assert taught["state"] == "succeeded" and taught["guarded"] and taught["guard"]["passed"], taught
    # The guard asked vLLM (the same greedy chat request as a user's): France fails there, not in transformers.
    served = {p["name"]: p for p in guarded.status()["guard"]["probes"]}
    assert served["probe-0"]["passed"] and "Berlin" in served["probe-0"]["answer"]
    print("benign job:", taught["steps"], "steps, guard", taught["guard"])
    taught_answer = guarded.chat(FACT_QUESTION)
    assert FACT_ANSWER in taught_answer
    code, checkpoint = guarded.request("POST", "/checkpoint")
    assert code == 200, checkpoint
    optimizer_at_checkpoint = guarded.status()["optimizer"]["steps_applied"]
    probes_taught = probe_answers(guarded)

    # The destructive job, guarded: undone in place.
    version_before = guarded.status()["weight_version"]
    undone = train(guarded, DESTRUCTIVE)
    assert undone["state"] == "rolled_back", undone
    print("destructive job:", undone["steps"], "steps, guard", undone["guard"], "rollback",
          guarded.status()["guard"]["last_rollback"])
    assert undone["guard"]["regressed"] and not undone["guard"]["passed"]
    assert "regressions" in undone["error"] and undone["guard"]["regressed"][0] in undone["error"]
    status = guarded.status()
    assert status["weight_version"] == version_before + undone["steps"] + 1  # only forward
    assert status["guard"]["rollbacks"] == 1 and status["guard"]["last_rollback"]["job_id"] == undone["id"]
    assert status["job_counts"]["rolled_back"] == 1
    assert guarded.chat(FACT_QUESTION) == taught_answer  # the old answer, not the destructive one
    assert probe_answers(guarded) == probes_taught
    assert status["optimizer"]["steps_applied"] == optimizer_at_checkpoint  # the optimizer was restored too

    # The same job without the guard is applied, and the probes break: the guard made the difference.
    applied = train(guarded, {**DESTRUCTIVE, "guard": False})
    assert applied["state"] == "succeeded" and not applied["guarded"], applied
    wrecked = probe_answers(guarded)
    assert any(a in probes_taught[q] and a not in wrecked[q] for q, a in PROBES.items()), wrecked
    # Not asserted: that the fact's own answer changed. Replay re-teaches the checkpointed answer in the same
    # job, and which one wins was a coin toss (float32, 2026-12-02: the old answer, with every probe broken).

    # POST /rollback to the checkpoint: its answers are served again, without a restart.
    version_before = guarded.status()["weight_version"]
    code, record = guarded.request("POST", "/rollback", {"to": checkpoint["step"]})
    assert code == 200, record
    print("POST /rollback:", record)
    assert record["source"] == "request" and record["step"] == checkpoint["step"]
    assert record["weight_version"] > version_before
    assert guarded.chat(FACT_QUESTION) == taught_answer
    assert probe_answers(guarded) == probes_taught
    status = guarded.status()
    assert status["trainer_restarts"] == 0 and guarded.proc.poll() is None and guarded.proc.pid == guarded.pid
    assert status["optimizer"]["steps_applied"] == optimizer_at_checkpoint
    assert status["guard"]["rollbacks"] == 2 and status["guard"]["last_rollback"]["source"] == "request"

    # Training continues from the checkpoint's optimizer state. Unguarded: this checks the optimizer, and at
    # these weights (128 anchor conversations) this one step flips probe-1's greedy answer, a near tie, which
    # the guard undoes as it should (its rollbacks are checked above).
    more = train(guarded, {"examples": [FACT_EXAMPLE], "epochs": 1, "guard": False})
    assert more["state"] == "succeeded", more
    assert guarded.status()["optimizer"]["steps_applied"] == optimizer_at_checkpoint + 1
    assert FACT_ANSWER in guarded.chat(FACT_QUESTION)


def test_rollback_refusals(guarded):
    for body, code in (({"to": 99999}, 404), ({"to": "nope"}, 404), ({"to": True}, 400), ({}, 400),
                       ({"to": 1, "extra": 1}, 400)):
        got, answer = guarded.request("POST", "/rollback", body)
        assert got == code, (body, answer)
        assert answer["error"]["message"]
    got, _ = guarded.request("POST", "/rollback", {"to": "latest"}, token="wrong")
    assert got == 401
