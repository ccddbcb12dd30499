"""The onlinemodel_* metrics from a sequence of /train/status answers, read back in Prometheus' text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from onlinemodel_protocol.api import CheckpointRecord, CheckpointStatus, Job, JobCounts, SchedulerStatus, TrainStatus
from onlinemodel_runtime.server.metrics import TrainingMetrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def job(state: str, **fields) -> Job:
    return Job(id="job-1", state=state, examples=2, epochs=1, learning_rate=1e-5, created_at="2026-12-01T10:00:00Z",
               started_at="2026-12-01T10:00:02Z", steps_total=2, **fields)


def test_status_becomes_counters_gauges_and_a_job_histogram():
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.observe(TrainStatus(state="training", steps=1, tokens_trained=50, last_loss=1.5, weight_version=1,
                                queued_jobs=1, jobs=[job("running", steps=1)], job_counts=JobCounts(submitted=2),
                                scheduler=SchedulerStatus(mode="measured", duty_cycle=0.4, measured_slowdown=1.2,
                                                          paced_seconds=3.0)), restarts=0)
    first = samples(registry)
    assert first[("onlinemodel_train_steps_total", ())] == 1
    assert first[("onlinemodel_train_loss", ())] == 1.5
    assert first[("onlinemodel_trainer_state", (("state", "training"),))] == 1
    assert first[("onlinemodel_trainer_state", (("state", "idle"),))] == 0
    assert first[("onlinemodel_scheduler_duty_cycle", ())] == 0.4
    assert first[("onlinemodel_train_jobs_total", (("outcome", "submitted"),))] == 2
    done = job("succeeded", steps=2, finished_at="2026-12-01T10:00:12Z")
    record = CheckpointRecord(path="/c/step-2", step=2, time="2026-12-01T10:00:13Z", size_bytes=1000, seconds=0.5)
    later = TrainStatus(state="idle", steps=2, tokens_trained=100, last_loss=0.5, weight_version=2, jobs=[done],
                        job_counts=JobCounts(submitted=2, succeeded=1), checkpoint=CheckpointStatus(last=record))
    for _ in range(3):  # polled again and again: each job and step is counted once
        metrics.observe(later, restarts=1)
    after = samples(registry)
    assert after[("onlinemodel_train_steps_total", ())] == 2
    assert after[("onlinemodel_train_tokens_total", ())] == 100
    assert after[("onlinemodel_trainer_restarts_total", ())] == 1
    assert after[("onlinemodel_weight_version", ())] == 2
    assert after[("onlinemodel_train_queued_jobs", ())] == 0
    assert after[("onlinemodel_train_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert after[("onlinemodel_train_job_duration_seconds_sum", (("outcome", "succeeded"),))] == 10.0
    assert after[("onlinemodel_checkpoint_size_bytes", ())] == 1000
    assert after[("onlinemodel_checkpoint_duration_seconds", ())] == 0.5
    assert after[("onlinemodel_checkpoint_last_success_timestamp_seconds", ())] == 1796119213.0
    assert after[("onlinemodel_checkpoint_failed", ())] == 0
