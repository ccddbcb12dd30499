"""Unit tests of events.py: which Events a status change posts, on statuses built by the real status
functions from the runtime's answers, poll after poll (an unchanged poll posts nothing)."""

from __future__ import annotations

from typing import Any, Optional

from onlinemodel_operator.events import transitions
from onlinemodel_operator.models_status import CheckpointStatus, OnlineModelStatus
from onlinemodel_operator.status import compute_status
from onlinemodel_protocol.api import TrainStatus
from test_operator_status import HASH, LATER, NOW, om, pod, runtime


def job(id_: str, state: str, steps: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "state": state, "examples": 1, "epochs": 3, "learning_rate": 1e-5, "steps": steps,
            "steps_total": 3, "created_at": "2026-11-26T04:58:00Z", **extra}


def polls(*answers: Optional[TrainStatus], spec_error: Optional[str] = None) -> list[list[tuple[str, str]]]:
    """(type, reason) of the Events of each poll, the status of each read back as the next one's old."""
    status, out = OnlineModelStatus(), []
    for answer in answers:
        body = om(status=status.to_dict())
        new = compute_status(body, pod(), answer, LATER, desired_hash=HASH, spec_error=spec_error)
        out.append([(e.type, e.reason) for e in transitions(status, new)])
        status = OnlineModelStatus.model_validate(new.to_dict())
    return out


def test_condition_changes_and_checkpoints() -> None:
    first = compute_status(om(), None, None, NOW)
    second = compute_status(om(status=first.to_dict()), pod(phase="Pending", ready=False,
                                                            state={"waiting": {"reason": "ImagePullBackOff"}}), None, LATER)
    events = transitions(first, second)
    assert {e.reason for e in events} == {"ImagePullBackOff"}
    assert all(e.type == "Warning" for e in events)
    assert transitions(second, second) == []
    with_ck = second.model_copy(update={"checkpoint": CheckpointStatus(step=4, path="/ck/4")})
    assert [e.reason for e in transitions(second, with_ck)] == ["CheckpointSaved"]
    assert [e.reason for e in transitions(OnlineModelStatus(), first)] == [c.reason for c in first.conditions]


def test_each_job_start_and_end_is_posted_once() -> None:
    events = polls(runtime("idle", jobs=[job("job-a", "queued")]),
                   runtime("training", jobs=[job("job-a", "running", 1)]),
                   runtime("training", jobs=[job("job-a", "running", 2)]),
                   runtime("idle", jobs=[job("job-a", "succeeded", 3, last_loss=0.1),
                                         job("job-b", "failed", 1, error="OutOfMemoryError: x"),
                                         job("job-c", "cancelled")]),
                   runtime("idle", jobs=[job("job-a", "succeeded", 3, last_loss=0.1),
                                         job("job-b", "failed", 1, error="OutOfMemoryError: x"),
                                         job("job-c", "cancelled")]))
    jobs = [[e for e in poll if e[1].startswith("Training") and e[1] != "Training"] for poll in events]
    assert jobs == [[], [("Normal", "TrainingStarted")], [],
                    # job-b started and failed between two polls: both are posted; job-c never ran.
                    [("Normal", "TrainingSucceeded"), ("Normal", "TrainingStarted"), ("Warning", "TrainingFailed"),
                     ("Normal", "TrainingCancelled")],
                    []]


def test_a_job_message_carries_its_progress_and_error() -> None:
    old = compute_status(om(), pod(), runtime(jobs=[job("job-b", "running", 1)]), NOW, desired_hash=HASH)
    new = compute_status(om(status=old.to_dict()), pod(),
                         runtime(jobs=[job("job-b", "failed", 1, last_loss=2.5, error="OutOfMemoryError: x")]),
                         LATER, desired_hash=HASH)
    (failed,) = [e for e in transitions(old, new) if e.reason == "TrainingFailed"]
    assert failed.message == "job job-b failed after 1/3 steps, loss 2.5: OutOfMemoryError: x"


def test_trainer_restarts_are_posted_when_the_count_grows() -> None:
    events = polls(runtime(trainer_restarts=0), runtime(trainer_restarts=1), runtime(trainer_restarts=1),
                   None, runtime(trainer_restarts=2))
    assert [("Warning", "TrainerRestarted") in poll for poll in events] == [False, True, False, False, True]


def test_invalid_spec_is_a_warning() -> None:
    (first,) = polls(runtime(), spec_error="spec.image: field required")
    assert ("Warning", "InvalidSpec") in first
