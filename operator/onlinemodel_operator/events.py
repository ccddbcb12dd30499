"""Which Kubernetes Events a status change is worth: a pure function of the status before and after.

Both statuses are what the API holds (the old one read back from the OnlineModel), so an Event is posted
once per change, whichever operator process or poll sees it: a job is reported when its state in
``status.training.jobs`` changes, a trainer restart when its counter grows, a rollback when
``status.training.guard``'s last rollback changes, a checkpoint
when its step changes, a condition when its status or reason changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from onlinemodel_operator.models_status import GuardStatus, JobStatus, OnlineModelStatus
from onlinemodel_operator.pod import FAILING_POD_REASONS

WARNING_REASONS = FAILING_POD_REASONS | {"TrainerError", "CheckpointFailed", "InvalidSpec", "RuntimeUnreachable",
                                         "FollowerBehind"}
JOB_FINISHED = {"succeeded": ("Normal", "TrainingSucceeded"), "failed": ("Warning", "TrainingFailed"),
                "cancelled": ("Normal", "TrainingCancelled")}


@dataclass(frozen=True)
class Transition:
    """A change worth a Kubernetes Event."""

    type: str  # "Normal" or "Warning"
    reason: str
    message: str


def _conditions(old: OnlineModelStatus, new: OnlineModelStatus) -> list[Transition]:
    out = []
    before = {c.type: (c.status, c.reason) for c in old.conditions}
    for cond in new.conditions:
        if before.get(cond.type) == (cond.status, cond.reason):
            continue
        bad = (cond.type == "Degraded" and cond.status == "True") or cond.reason in WARNING_REASONS
        out.append(Transition("Warning" if bad else "Normal", cond.reason,
                              f"{cond.type}={cond.status}: {cond.message}"))
    return out


def _progress(job: JobStatus) -> str:
    total = f"/{job.steps_total}" if job.steps_total is not None else ""
    loss = f", loss {job.last_loss:.4g}" if job.last_loss is not None else ""
    return f"{job.steps_done}{total} steps{loss}"


def _jobs(old: OnlineModelStatus, new: OnlineModelStatus) -> list[Transition]:
    before = {job.id: job.state for job in (old.training.jobs if old.training else [])}
    out = []
    for job in new.training.jobs if new.training else []:
        was = before.get(job.id)
        if was == job.state:
            continue
        ran = job.state == "running" or job.steps_done > 0
        if was in (None, "queued") and ran:
            out.append(Transition("Normal", "TrainingStarted", f"job {job.id} started ({_progress(job)})"))
        if job.state in JOB_FINISHED and was not in JOB_FINISHED:
            kind, reason = JOB_FINISHED[job.state]
            error = f": {job.error}" if job.error else ""
            out.append(Transition(kind, reason, f"job {job.id} {job.state} after {_progress(job)}{error}"))
    return out


def _grown(old: Optional[int], new: Optional[int]) -> int:
    return new - (old or 0) if new is not None and new > (old or 0) else 0


def _counters(old: OnlineModelStatus, new: OnlineModelStatus) -> list[Transition]:
    was, now = old.training, new.training
    if now is None:
        return []
    out = []
    restarts = _grown(was.trainer_restarts if was else None, now.trainer_restarts)
    if restarts:
        out.append(Transition("Warning", "TrainerRestarted",
                              f"the trainer process was restarted ({now.trainer_restarts} restarts in this pod)"))
    return out


def _rollback(old: OnlineModelStatus, new: OnlineModelStatus) -> list[Transition]:
    """One Event for a rollback newer than the one the status held (each is seen once: its time is kept)."""
    before = old.training.guard if old.training and old.training.guard else GuardStatus()
    after = new.training.guard if new.training and new.training.guard else None
    if after is None or after.last_rollback_time is None or after.last_rollback_time == before.last_rollback_time:
        return []
    missed = (after.rollbacks or 0) - (before.rollbacks or 0) - 1
    more = f" ({missed} more since the last poll)" if missed > 0 else ""
    if after.last_rollback_source == "guard":
        return [Transition("Warning", "RolledBack",
                           f"job {after.last_rollback_job} was rolled back: {after.last_rollback_reason}{more}")]
    return [Transition("Normal", "RolledBack",
                       f"weights rolled back to checkpoint {after.last_rollback_checkpoint} on request{more}")]


def transitions(old: OnlineModelStatus, new: OnlineModelStatus) -> list[Transition]:
    """Events for conditions whose status or reason changed, jobs that started or ended, trainer restarts,
    rollbacks, and a new checkpoint."""
    out = _conditions(old, new) + _jobs(old, new) + _counters(old, new) + _rollback(old, new)
    old_step = old.checkpoint.step if old.checkpoint else None
    new_ck = new.checkpoint
    if new_ck is not None and new_ck.step is not None and new_ck.step != old_step:
        out.append(Transition("Normal", "CheckpointSaved", f"checkpoint of step {new_ck.step} at {new_ck.path}"))
    return out
