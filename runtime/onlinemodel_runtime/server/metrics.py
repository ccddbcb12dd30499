"""Training metrics on vLLM's own ``/metrics`` (names under ``onlinemodel_``; table in docs/api.md).

The supervisor hands every ``/train/status`` it reads from the trainer (every 0.5 s) to
``TrainingMetrics.observe``, which turns the status's running totals into Prometheus counters, its current
values into gauges and each job seen finished into one observation of the job-duration histogram.

They are plain ``prometheus_client`` metrics in the registry vLLM's ``/metrics`` serves: the default
registry, or, when ``PROMETHEUS_MULTIPROC_DIR`` is set (``vllm serve --api-server-count N``, or by the
user), the files vLLM's multiprocess collector reads; gauges then report the most recent value written.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from onlinemodel_protocol.api import FINISHED_JOB_STATES, Job, TrainStatus

PREFIX = "onlinemodel_"
TRAINER_STATES = ("starting", "idle", "training", "error", "disabled")
JOB_OUTCOMES = ("submitted", "succeeded", "failed", "cancelled")
# Jobs run from seconds (one example) to hours (a large file at many epochs).
JOB_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return max((datetime.fromisoformat(end.replace("Z", "+00:00"))
                    - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds(), 0.0)
    except ValueError:
        return None


def _timestamp(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None
    except ValueError:
        return None


class TrainingMetrics:
    """The ``onlinemodel_*`` metrics of one API server, fed with the trainer's status."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, list(labels), registry=registry)

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, list(labels), registry=registry, multiprocess_mode="mostrecent")

        self.steps = counter("train_steps", "Optimizer steps applied to the served weights")
        self.tokens = counter("train_tokens", "Tokens trained on (applied steps)")
        self.skipped = counter("train_skipped_steps", "Steps skipped for a non-finite loss or gradient")
        self.jobs = counter("train_jobs", "Training jobs by outcome (submitted counts every accepted job)",
                            ["outcome"])
        self.restarts = counter("trainer_restarts", "Times the trainer process was restarted")
        self.paced = counter("scheduler_paced_seconds", "Seconds the trainer waited for serving")
        self.loss = gauge("train_loss", "Loss of the last training step")
        self.weight_version = gauge("weight_version", "Weight version: +1 for every step that wrote the weights")
        self.queued = gauge("train_queued_jobs", "Jobs waiting in the trainer's queue")
        self.state = gauge("trainer_state", "1 for the trainer's current state, 0 for the others", ["state"])
        self.job_seconds = Histogram(PREFIX + "train_job_duration_seconds",
                                     "Run time of finished jobs (start to end), by outcome", ["outcome"],
                                     buckets=JOB_SECONDS_BUCKETS, registry=registry)
        self.checkpoint_seconds = gauge("checkpoint_duration_seconds", "Time the last checkpoint took to write")
        self.checkpoint_bytes = gauge("checkpoint_size_bytes", "Size of the last checkpoint")
        self.checkpoint_time = gauge("checkpoint_last_success_timestamp_seconds",
                                     "Unix time of the last healthy checkpoint")
        self.checkpoint_failed = gauge("checkpoint_failed", "1 while the last checkpoint attempt failed")
        self.duty_cycle = gauge("scheduler_duty_cycle",
                                "Share of the time the trainer computes while requests wait for tokens")
        self.slowdown = gauge("scheduler_measured_slowdown",
                              "Mean inter-token latency while training divided by that without training")
        self._seen: dict[str, float] = {}  # running totals already counted
        self._finished_jobs: set[str] = set()

    def _advance(self, counter: Counter, key: str, total: float) -> None:
        """Count the growth of a running total (a total that went down, e.g. a new trainer's, counts from
        its new value on)."""
        before = self._seen.get(key)
        if before is not None and total > before:
            counter.inc(total - before)
        elif before is None and total > 0:
            counter.inc(total)
        self._seen[key] = total

    def observe(self, status: TrainStatus, restarts: int) -> None:
        self._advance(self.steps, "steps", status.steps)
        self._advance(self.tokens, "tokens", status.tokens_trained)
        self._advance(self.skipped, "skipped", status.skipped_steps)
        self._advance(self.restarts, "restarts", restarts)
        for outcome in JOB_OUTCOMES:
            self._advance(self.jobs.labels(outcome=outcome), f"jobs:{outcome}", getattr(status.job_counts, outcome))
        if status.last_loss is not None:
            self.loss.set(status.last_loss)
        self.weight_version.set(status.weight_version)
        self.queued.set(status.queued_jobs)
        for state in TRAINER_STATES:
            self.state.labels(state=state).set(1 if status.state == state else 0)
        self._observe_jobs(status.jobs)
        ck = status.checkpoint
        if ck is not None:
            self.checkpoint_failed.set(1 if ck.state == "failed" else 0)
            if ck.last is not None:
                if ck.last.seconds is not None:
                    self.checkpoint_seconds.set(ck.last.seconds)
                if ck.last.size_bytes is not None:
                    self.checkpoint_bytes.set(ck.last.size_bytes)
                when = _timestamp(ck.last.time)
                if when is not None:
                    self.checkpoint_time.set(when)
        sched = status.scheduler
        if sched is not None:
            self._advance(self.paced, "paced", sched.paced_seconds)
            self.duty_cycle.set(sched.duty_cycle)
            if sched.measured_slowdown is not None:
                self.slowdown.set(sched.measured_slowdown)

    def _observe_jobs(self, jobs: list[Job]) -> None:
        listed = {job.id for job in jobs}
        for job in jobs:
            if job.state not in FINISHED_JOB_STATES or job.id in self._finished_jobs:
                continue
            self._finished_jobs.add(job.id)
            seconds = _seconds_between(job.started_at or job.created_at, job.finished_at)
            if seconds is not None:
                self.job_seconds.labels(outcome=job.state).observe(seconds)
        self._finished_jobs &= listed  # a job no longer listed is never listed again
