"""The HTTP bodies: one /train/status shape whoever answers, and readers that tolerate newer runtimes."""

from __future__ import annotations

import re

from onlinemodel_protocol.api import CheckpointStatus, Job, TrainStatus, utc_timestamp

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
        "last_error": None, "checkpoint": None, "optimizer": None, "trainer_restarts": 0, "scheduler": None,
        "memory": None}


def test_non_finite_loss_is_written_as_null():
    status = TrainStatus(state="idle", last_loss=float("inf"),
                         jobs=[JOB.model_copy(update={"last_loss": float("nan")})])
    again = TrainStatus.model_validate_json(status.model_dump_json())
    assert again.last_loss is None and again.jobs[0].last_loss is None


def test_readers_ignore_fields_they_do_not_know():
    body = {**TrainStatus(state="idle").model_dump(), "added_later": {"x": 1}}
    assert TrainStatus.model_validate(body) == TrainStatus(state="idle")


def test_timestamps_are_utc_with_z():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_timestamp())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_timestamp("milliseconds"))
