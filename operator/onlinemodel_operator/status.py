"""Pure status computation: (OnlineModel, its pod, the runtime's /train/status, now) -> OnlineModelStatus.

The status tells the truth about the live pod and trainer at this moment: all five conditions are always
present (and FollowersInSync while scaled out), every condition and the status carry the generation they describe, and a condition keeps its
lastTransitionTime while its status does not change. Reads the raw OnlineModel, so an invalid spec still
gets a status; builds the `models_status.OnlineModelStatus` the API receives (its `to_dict()`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import ValidationError

from onlinemodel_operator.clock import parse_time, rfc3339
from onlinemodel_operator.models_status import (
    CONDITION_TYPES,
    FOLLOWERS_CONDITION,
    CheckpointStatus,
    Condition,
    FailureStatus,
    GuardStatus,
    JobStatus,
    ModelChangedStatus,
    OnlineModelStatus,
    ReplicasStatus,
    SecretKeyStatus,
    TrainingStatus,
)
from onlinemodel_operator.pod import (
    PodView,
    analyze_pod,
    model_changed_message,
    pod_failure,
    spec_hash_of,
)
from onlinemodel_protocol.api import CheckpointRecord, TrainStatus

PHASE_OF_REASON = {
    "PodPending": "Pending", "Unschedulable": "Pending", "PodTerminating": "Pending",
    "ModelLoading": "Loading", "TrainerStarting": "Loading", "NotPolled": "Loading", "ContainerRestarting": "Loading",
    "ImagePullBackOff": "Failed", "CrashLoopBackOff": "Failed", "PodFailed": "Failed", "ContainerConfigError": "Failed",
    "ModelChanged": "Failed",
    "TrainerError": "Degraded", "RuntimeUnreachable": "Degraded",
    "Updating": "Updating", "Suspended": "Suspended", "InvalidSpec": "Invalid",
}


@dataclass(frozen=True)
class RuntimeUnavailable:
    """The runtime could not be asked (connection refused, timeout, bad answer)."""

    message: str


# The runtime's GET /train/status answer, RuntimeUnavailable, or None when it was not asked.
RuntimeView = Union[TrainStatus, RuntimeUnavailable, None]


def previous_status(body: Mapping[str, Any]) -> OnlineModelStatus:
    """The status the OnlineModel holds now. One that does not parse (not written by this operator) counts
    as none: the next status replaces it whole."""
    try:
        return OnlineModelStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return OnlineModelStatus()


# --- the runtime's words -> the status's ---------------------------------------------------------------

def training_from_runtime(answer: TrainStatus) -> TrainingStatus:
    jobs = [JobStatus(id=job.id, state=job.state, steps_done=job.steps, steps_total=job.steps_total,
                      last_loss=job.last_loss, error=job.error) for job in answer.jobs]
    return TrainingStatus(state=answer.state, steps=answer.steps, tokens_trained=answer.tokens_trained,
                          last_loss=answer.last_loss, weight_version=answer.weight_version,
                          last_step_time=answer.last_step_time, trainer_restarts=answer.trainer_restarts,
                          jobs=jobs, guard=guard_from_runtime(answer))


def guard_from_runtime(answer: TrainStatus) -> Optional[GuardStatus]:
    guard = answer.guard
    if guard is None:  # a runtime without the guard section
        return None
    last = guard.last_rollback
    return GuardStatus(enabled=guard.enabled, rollbacks=guard.rollbacks,
                       last_rollback_time=last.time if last else None,
                       last_rollback_source=last.source if last else None,
                       last_rollback_job=last.job_id if last else None,
                       last_rollback_checkpoint=last.checkpoint if last else None,
                       last_rollback_reason=last.reason if last else None)


def with_saved_checkpoint(checkpoint: Optional[CheckpointStatus], saved: Optional[CheckpointRecord],
                          **request: Any) -> CheckpointStatus:
    """`checkpoint` updated with a checkpoint the runtime saved (POST /checkpoint's answer, or
    /train/status's checkpoint.last) and with `request` fields (requested, request_result, ...)."""
    fields = {} if saved is None else {"step": saved.step, "weight_version": saved.weight_version,
                                       "time": saved.time, "path": saved.path}
    updates = {k: v for k, v in {**fields, **request}.items() if v is not None}
    return (checkpoint or CheckpointStatus()).model_copy(update=updates)


def _last_checkpoint(runtime: RuntimeView) -> Optional[CheckpointRecord]:
    """/train/status's checkpoint.last (None when the runtime did not answer or has none)."""
    if not isinstance(runtime, TrainStatus) or runtime.checkpoint is None:
        return None
    return runtime.checkpoint.last


# --- conditions -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """One condition before its times are set: ok None is Unknown."""

    ok: Optional[bool]
    reason: str
    message: str

    @property
    def status(self) -> Literal["True", "False", "Unknown"]:
        return "Unknown" if self.ok is None else "True" if self.ok else "False"


def _training(enabled: bool, suspended: bool, pod: PodView, runtime: RuntimeView) -> Verdict:
    if suspended:
        return Verdict(False, "Suspended", "the OnlineModel is suspended")
    if not enabled:
        return Verdict(False, "TrainingDisabled", "spec.training.enabled is false")
    if not pod.serving:
        return Verdict(False, pod.reason, f"the trainer is not reachable yet: {pod.message}")
    if runtime is None:
        return Verdict(None, "NotPolled", "the trainer has not been asked yet")
    if isinstance(runtime, RuntimeUnavailable):
        return Verdict(None, "RuntimeUnreachable", f"GET /train/status failed: {runtime.message}")
    if runtime.state == "error":
        return Verdict(False, "TrainerError", runtime.last_error or "the trainer failed")
    if runtime.state == "starting":
        return Verdict(False, "TrainerStarting", "the trainer is starting")
    if runtime.state == "training":
        return Verdict(True, "Training", f"training; {runtime.steps} steps so far")
    if runtime.state == "idle":
        return Verdict(True, "Idle", "the trainer is ready; no job is running")
    # "disabled": the pod still runs a spec without training (it is being replaced).
    return Verdict(False, "TrainingDisabled", "the runtime runs without training (--no-training)")


def _checkpointed(checkpoint: CheckpointStatus, runtime: RuntimeView) -> Verdict:
    runtime_ck = runtime.checkpoint if isinstance(runtime, TrainStatus) else None
    if runtime_ck is not None and runtime_ck.state == "failed":
        return Verdict(False, "CheckpointFailed", runtime_ck.last_error or "the last checkpoint failed")
    last_time = parse_time(checkpoint.time)
    request_time = parse_time(checkpoint.request_time)
    if checkpoint.request_result == "Failed" and (last_time is None or request_time is None
                                                  or last_time <= request_time):
        return Verdict(False, "CheckpointFailed", f"requested checkpoint {checkpoint.requested!r} failed: "
                                                  f"{checkpoint.request_message or 'unknown error'}")
    if checkpoint.step is not None or checkpoint.path:
        return Verdict(True, "Checkpointed",
                       f"step {checkpoint.step} saved at {checkpoint.time} to {checkpoint.path}")
    return Verdict(False, "NoCheckpoint", "no checkpoint has been taken yet")


def _ready(spec_error: Optional[str], suspended: bool, pod: PodView, outdated: bool, training_enabled: bool,
           training: Verdict) -> Verdict:
    if spec_error:
        return Verdict(False, "InvalidSpec", f"{spec_error} (anything running keeps the last valid spec)")
    if suspended:
        return Verdict(False, "Suspended", "the OnlineModel is suspended")
    if not pod.serving:
        return Verdict(False, pod.reason, pod.message)
    if outdated:
        return Verdict(False, "Updating", "the pod runs an older spec and is being replaced")
    if training_enabled and training.ok is not True:
        return Verdict(False, training.reason, training.message)
    return Verdict(True, training.reason if training_enabled else "Serving",
                   "serving" + (" and training" if training_enabled else "; training is disabled"))


def _degraded(spec_error: Optional[str], suspended: bool, pod: PodView, training: Verdict,
              checkpointed: Verdict) -> Verdict:
    if spec_error:
        return Verdict(True, "InvalidSpec", spec_error)
    if pod.failing:
        return Verdict(True, pod.reason, pod.message)
    if training.reason == "TrainerError":
        return Verdict(True, "TrainerError", training.message)
    if checkpointed.reason == "CheckpointFailed":
        return Verdict(True, "CheckpointFailed", checkpointed.message)
    if suspended:
        return Verdict(False, "Suspended", "the OnlineModel is suspended")
    return Verdict(False, "Healthy", "nothing is failing")


def _previous_verdict(previous: OnlineModelStatus, type_: str) -> Verdict:
    before = next((c for c in previous.conditions if c.type == type_), None)
    if before is None:
        return Verdict(None, "NotPolled", "not computed yet")
    return Verdict(None if before.status == "Unknown" else before.status == "True", before.reason, before.message)


def _condition(type_: str, verdict: Verdict, previous: OnlineModelStatus, generation: Optional[int],
               now: dt.datetime) -> Condition:
    before = next((c for c in previous.conditions if c.type == type_), None)
    kept = before is not None and before.status == verdict.status
    return Condition(type=type_, status=verdict.status, reason=verdict.reason, message=verdict.message,
                     last_transition_time=before.last_transition_time if kept else rfc3339(now),
                     observed_generation=generation)


# --- the whole status -----------------------------------------------------------------------------------

def compute_status(
    body: Mapping[str, Any],
    pod: Optional[Mapping[str, Any]],
    runtime: RuntimeView,
    now: dt.datetime,
    *,
    spec_error: Optional[str] = None,
    desired_hash: Optional[str] = None,
    endpoint: Optional[str] = None,
    deleted_failure: Optional[FailureStatus] = None,
    model_changed: Optional[ModelChangedStatus] = None,
    api_token_secret: Optional[SecretKeyStatus] = None,
    replicas: Optional[tuple[ReplicasStatus, Verdict]] = None,
) -> OnlineModelStatus:
    """The full status of `body` (a raw OnlineModel) given its live pod and the runtime's answer.

    spec_error: why the spec was refused (-> InvalidSpec); desired_hash: the spec hash the pod should run
    (a pod with another hash -> Updating); endpoint: the Service URL (None when unknown); deleted_failure:
    the failure of a pod this pass deleted (it becomes lastFailure); model_changed: the pod this pass deleted
    because its runtime refused the checkpoints (kept in status until the spec changes or the OnlineModel is
    suspended); api_token_secret: where the pod's API token is (None: unchanged); replicas: status.replicas
    and the FollowersInSync verdict (replicas.py; None: the previous ones, e.g. for a refused spec).
    """
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    previous = previous_status(body)
    generation = meta.get("generation")
    suspended = bool(spec.get("suspend", False))
    training_enabled = bool((spec.get("training") or {}).get("enabled", True))
    held = model_changed or previous.model_changed
    if held is not None and (suspended or (desired_hash is not None and desired_hash != held.spec_hash)):
        held = None  # the user decided: another spec, or suspend (and resume) to try again
    view = analyze_pod(pod)
    if suspended and pod is None:
        view = PodView("Suspended", "the OnlineModel is suspended; the pod is deleted and the volume kept")
    elif held is not None and pod is None:
        view = PodView("ModelChanged", model_changed_message(held.message), failing=True)

    pod_hash = spec_hash_of(pod)
    training = _training(training_enabled, suspended, view, runtime)
    checkpoint = with_saved_checkpoint(previous.checkpoint, _last_checkpoint(runtime))
    checkpointed = _checkpointed(checkpoint, runtime)
    ready = _ready(spec_error, suspended, view, desired_hash is not None and pod_hash != desired_hash,
                   training_enabled, training)
    verdicts = {"Ready": ready, "Serving": Verdict(view.serving, view.reason, view.message), "Training": training,
                "Checkpointed": checkpointed,
                "Degraded": _degraded(spec_error, suspended, view, training, checkpointed)}
    types = CONDITION_TYPES
    if int(spec.get("replicas", 1) or 1) > 1:
        verdicts[FOLLOWERS_CONDITION] = replicas[1] if replicas else _previous_verdict(previous, FOLLOWERS_CONDITION)
        types += (FOLLOWERS_CONDITION,)

    if isinstance(runtime, TrainStatus):
        training_status = training_from_runtime(runtime)
    else:  # keep the last numbers seen
        training_status = (previous.training or TrainingStatus()).model_copy(
            update={"state": "unavailable" if training_enabled else "disabled"})
    return OnlineModelStatus(
        observed_generation=generation,
        phase="Ready" if ready.ok else PHASE_OF_REASON.get(ready.reason, "Pending"),
        conditions=[_condition(t, verdicts[t], previous, generation, now) for t in types],
        training=training_status,
        checkpoint=checkpoint if checkpoint != CheckpointStatus() else None,
        endpoint=endpoint or previous.endpoint or None,
        pod_name=pod.get("metadata", {}).get("name") if pod is not None else None,
        pod_spec_hash=pod_hash or None,
        last_failure=deleted_failure or pod_failure(pod) or previous.last_failure,
        api_token_secret=api_token_secret or previous.api_token_secret,
        model_changed=held,
        replicas=(replicas[0] if replicas else previous.replicas) if types != CONDITION_TYPES else None,
    )


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch that turns `old` into `new` (keys gone from `new` become None)."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif before != value or key not in old:
            patch[key] = value
    return patch
