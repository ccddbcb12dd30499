"""The HTTP bodies: one /train/status shape whoever answers, and readers that tolerate newer runtimes."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from onlinemodel_protocol.api import (CheckpointRecord, CheckpointStatus, Job, SchedulerStatus, TrainStatus,
                                      job_eta_seconds, utc_timestamp)

JOB = Job(id="job-1", state="succeeded", examples=1, epochs=3, learning_rate=3e-5, steps=3,
          created_at="2026-11-26T05:00:00Z")


def test_placeholder_keeps_the_last_counters_and_queues_nothing():
    last = TrainStatus(state="training", steps=12, tokens_trained=636, last_loss=0.02, weight_version=12,
                       queued_jobs=2, jobs=[JOB], last_error="old", checkpoint=CheckpointStatus(),
                       optimizer={"name": "apollo"})
    placeholder = TrainStatus.placeholder("starting", last, "trainer exited with code 1", restarts=1)
    assert placeholder == last.model_copy(update={"state": "starting", "queued_jobs": 0,
                                                  "last_error": "trainer exited with code 1", "trainer_restarts": 1})
    fresh = TrainStatus.placeholder("disabled")
    assert fresh.model_dump() == {
        "state": "disabled", "steps": 0, "tokens_trained": 0, "last_loss": None, "weight_version": 0,
        "last_step_time": None, "last_step_seconds": None, "skipped_steps": 0, "queued_jobs": 0, "jobs": [],
        "job_counts": {"submitted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "rolled_back": 0},
        "last_error": None, "checkpoint": None, "optimizer": None, "trainer_restarts": 0, "scheduler": None,
        "memory": None, "guard": None, "replication": None, "replay": None,
        "anchor": None, "null_space": None}


def test_no_float_field_is_ever_non_finite():
    """JSON has no NaN: every float of the status, its jobs and checkpoints is finite or None, however the
    model was built (validated, assigned to, or read back)."""
    nan, inf = float("nan"), float("inf")
    job = JOB.model_copy()
    job.last_loss = nan  # how the trainer updates a running job
    job.eta_seconds = inf
    record = CheckpointRecord(path="/c", step=1, seconds=inf)
    status = TrainStatus(state="idle", last_loss=inf, last_step_seconds=nan, jobs=[job],
                         checkpoint=CheckpointStatus(last=record, last_unhealthy=record),
                         optimizer={"lr": 1e-5, "grad_norm": nan, "per_group": [{"scale": -inf}]},
                         scheduler=SchedulerStatus(mode="measured", max_decode_slowdown=inf, measured_slowdown=nan,
                                                   baseline_itl_ms=inf))
    assert job.last_loss is None and job.eta_seconds is None and record.seconds is None
    assert status.scheduler == SchedulerStatus(mode="measured")
    assert status.last_loss is None and status.last_step_seconds is None
    assert status.optimizer == {"lr": 1e-5, "grad_norm": None, "per_group": [{"scale": None}]}
    text = status.model_dump_json()
    assert "NaN" not in text and "Infinity" not in text
    assert TrainStatus.model_validate_json(text) == status
    floats = [name for model in (TrainStatus, Job, CheckpointRecord) for name, field in model.model_fields.items()
              if "float" in str(field.annotation)]
    assert sorted(floats) == ["eta_seconds", "last_loss", "last_loss", "last_step_seconds", "learning_rate",
                             "seconds"]
    with pytest.raises(ValidationError):  # a job's learning rate is a setting: never missing
        Job(**{**JOB.model_dump(), "learning_rate": nan})


def test_readers_ignore_fields_they_do_not_know():
    body = {**TrainStatus(state="idle").model_dump(), "added_later": {"x": 1}}
    assert TrainStatus.model_validate(body) == TrainStatus(state="idle")


def test_timestamps_are_utc_with_z():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_timestamp())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp("milliseconds"))


def test_job_eta_is_the_rest_at_the_mean_step_time():
    running = JOB.model_copy(update={"state": "running", "steps": 4, "steps_total": 10})
    assert job_eta_seconds(running, 8.0) == 12.0  # 6 steps left at 2 s each
    assert job_eta_seconds(running.model_copy(update={"steps": 0}), 8.0) is None  # no step yet: unknown
    assert job_eta_seconds(running.model_copy(update={"state": "succeeded"}), 8.0) is None
    assert running.model_dump()["steps_done"] == 4
