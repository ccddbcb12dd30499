"""Teach a fact through HTTP and read it back through vLLM (issue 2's headline acceptance test)."""

import pytest

from .conftest import CONTROL_QUESTIONS, FACT_ANSWER, FACT_EXAMPLE, FACT_QUESTION

pytestmark = pytest.mark.e2e


def test_teach_a_fact_end_to_end(server):
    before = server.chat(FACT_QUESTION)
    assert FACT_ANSWER not in before
    controls_before = {q: server.chat(q) for q in CONTROL_QUESTIONS}
    for q, expected in CONTROL_QUESTIONS.items():
        assert expected in controls_before[q], controls_before[q]
    version_before = server.status()["weight_version"]

    code, job = server.request("POST", "/train", {"examples": [FACT_EXAMPLE]})
    assert code == 202, job
    assert job["state"] == "queued" and job["job_id"].startswith("job-")
    done = server.wait_job(job["job_id"], timeout=900)
    assert done["state"] == "succeeded", done

    status = server.status()
    assert status["weight_version"] > version_before
    assert status["steps"] >= done["steps"] > 0
    assert status["last_loss"] is not None and status["last_loss"] < 0.5

    # The very same question again: the prefix cache computed with the old weights must not answer it.
    after = server.chat(FACT_QUESTION)
    assert FACT_ANSWER in after, (after, done)  # the job says how many steps and passes it ran
    for q, expected in CONTROL_QUESTIONS.items():
        answer = server.chat(q)
        assert expected in answer, f"{q!r}: {answer!r} (before: {controls_before[q]!r})"
