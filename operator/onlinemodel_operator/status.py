"""Pure status computation: (OnlineModel, its pod, the runtime's /train/status, now) -> the whole status.

The status tells the truth about the live pod and trainer at this moment: all five conditions are always
present, every condition and the status carry the generation they describe, and a condition keeps its
lastTransitionTime while its status does not change. Reads raw dicts, so an invalid spec still gets a status.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from onlinemodel_operator import SPEC_HASH_ANNOTATION
from onlinemodel_operator.models import CONDITION_TYPES
from onlinemodel_operator.render import CONTAINER_NAME

IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERROR_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Pod reasons that mean "broken until someone acts" (Degraded), as opposed to "not there yet".
FAILING_POD_REASONS = {"ImagePullBackOff", "CrashLoopBackOff", "PodFailed", "ContainerConfigError"}
PHASES = {
    "PodPending": "Pending", "Unschedulable": "Pending", "PodTerminating": "Pending",
    "ModelLoading": "Loading", "TrainerStarting": "Loading", "NotPolled": "Loading", "ContainerRestarting": "Loading",
    "ImagePullBackOff": "Failed", "CrashLoopBackOff": "Failed", "PodFailed": "Failed", "ContainerConfigError": "Failed",
    "TrainerError": "Degraded", "RuntimeUnreachable": "Degraded",
    "Updating": "Updating", "Suspended": "Suspended", "InvalidSpec": "Invalid",
}


@dataclass(frozen=True)
class RuntimeUnavailable:
    """The runtime could not be asked (connection refused, timeout, bad answer)."""

    message: str


RuntimeView = Union[Mapping[str, Any], RuntimeUnavailable, None]


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> Optional[dt.datetime]:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class PodView:
    """What the pod says: a CamelCase reason, a message, whether it serves, whether it is failing."""

    reason: str
    message: str
    serving: bool = False
    failing: bool = False


def _runtime_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            return status
    return {}


def analyze_pod(pod: Optional[Mapping[str, Any]]) -> PodView:
    if pod is None:
        return PodView("PodPending", "the pod does not exist yet")
    name = pod.get("metadata", {}).get("name", "")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return PodView("PodTerminating", f"pod {name} is terminating")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase in ("Failed", "Succeeded"):
        detail = status.get("message") or status.get("reason") or _terminated_text(_runtime_container(pod))
        return PodView("PodFailed", f"pod {name} {phase.lower()}: {detail}".rstrip(": "), failing=True)
    container = _runtime_container(pod)
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason") or ""
    if reason in IMAGE_PULL_REASONS:
        return PodView("ImagePullBackOff", waiting.get("message") or f"cannot pull the image ({reason})", failing=True)
    if reason == "CrashLoopBackOff":
        last = _terminated_text(container, last=True)
        restarts = container.get("restartCount", 0)
        return PodView("CrashLoopBackOff", f"the runtime keeps exiting ({restarts} restarts); last: {last}", failing=True)
    if reason in CONFIG_ERROR_REASONS:
        return PodView("ContainerConfigError", waiting.get("message") or reason, failing=True)
    if state.get("running") is not None:
        if container.get("ready"):
            return PodView("Serving", f"pod {name} serves", serving=True)
        started = state["running"].get("startedAt", "")
        return PodView("ModelLoading", f"the runtime started {started} and is loading the model".replace("  ", " "))
    if state.get("terminated") is not None:
        return PodView("ContainerRestarting", f"the runtime exited: {_terminated_text(container)}")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return PodView("Unschedulable" if cond.get("reason") == "Unschedulable" else "PodPending",
                           cond.get("message") or "the pod is not scheduled yet")
    return PodView("PodPending", waiting.get("message") or reason or f"pod {name} is {phase.lower()}")


def _terminated_text(container: Mapping[str, Any], last: bool = False) -> str:
    key = "lastState" if last else "state"
    term = (container.get(key) or {}).get("terminated") or {}
    if not term:
        return "unknown"
    return f"exit code {term.get('exitCode')} ({term.get('reason') or 'Error'})"


def pod_failure(pod: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """The newest failure the pod shows (a terminated container, or a failed/evicted pod), or None."""
    if pod is None:
        return None
    status = pod.get("status") or {}
    container = _runtime_container(pod)
    for key in ("state", "lastState"):
        term = (container.get(key) or {}).get("terminated")
        if term and (term.get("exitCode") not in (0, None) or term.get("reason") not in (None, "Completed")):
            return _clean({"exitCode": term.get("exitCode"), "reason": term.get("reason") or "Error",
                           "message": (term.get("message") or "")[-1024:] or None,
                           "time": term.get("finishedAt")})
    if status.get("phase") == "Failed":
        return _clean({"reason": status.get("reason") or "PodFailed", "message": status.get("message")})
    return None


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _condition(type_: str, ok: Optional[bool], reason: str, message: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else "True" if ok else "False"
    return {"type": type_, "status": status, "reason": reason, "message": message}


def _training_condition(enabled: bool, suspended: bool, pod: PodView, runtime: RuntimeView) -> dict[str, Any]:
    if suspended:
        return _condition("Training", False, "Suspended", "the OnlineModel is suspended")
    if not enabled:
        return _condition("Training", False, "TrainingDisabled", "spec.training.enabled is false")
    if not pod.serving:
        return _condition("Training", False, pod.reason, f"the trainer is not reachable yet: {pod.message}")
    if runtime is None:
        return _condition("Training", None, "NotPolled", "the trainer has not been asked yet")
    if isinstance(runtime, RuntimeUnavailable):
        return _condition("Training", None, "RuntimeUnreachable", f"GET /train/status failed: {runtime.message}")
    state = runtime.get("state")
    if state == "error":
        return _condition("Training", False, "TrainerError", str(runtime.get("last_error") or "the trainer failed"))
    if state == "starting":
        return _condition("Training", False, "TrainerStarting", "the trainer is starting")
    if state == "training":
        return _condition("Training", True, "Training", f"training; {runtime.get('steps', 0)} steps so far")
    if state == "idle":
        return _condition("Training", True, "Idle", "the trainer is ready; no job is running")
    return _condition("Training", None, "UnknownTrainerState", f"unexpected trainer state {state!r}")


def _training_status(previous: Mapping[str, Any], enabled: bool, runtime: RuntimeView) -> dict[str, Any]:
    if isinstance(runtime, Mapping):
        return _clean({"state": runtime.get("state"), "steps": runtime.get("steps"),
                       "tokensTrained": runtime.get("tokens_trained"), "lastLoss": runtime.get("last_loss"),
                       "weightVersion": runtime.get("weight_version"), "lastStepTime": runtime.get("last_step_time")})
    kept = dict(previous.get("training") or {})
    kept["state"] = "unavailable" if enabled else "disabled"
    return kept


def _checkpoint_status(previous: Mapping[str, Any], runtime: RuntimeView) -> dict[str, Any]:
    checkpoint = dict(previous.get("checkpoint") or {})
    last = ((runtime.get("checkpoint") or {}).get("last") if isinstance(runtime, Mapping) else None) or {}
    if last:
        checkpoint.update(_clean({"step": last.get("step"), "weightVersion": last.get("weight_version"),
                                  "time": last.get("time"), "path": last.get("path")}))
    return checkpoint


def _checkpointed_condition(checkpoint: Mapping[str, Any], runtime: RuntimeView) -> dict[str, Any]:
    runtime_ck = (runtime.get("checkpoint") or {}) if isinstance(runtime, Mapping) else {}
    if runtime_ck.get("state") == "failed":
        return _condition("Checkpointed", False, "CheckpointFailed",
                          str(runtime_ck.get("last_error") or "the last checkpoint failed"))
    last_time = parse_time(checkpoint.get("time"))
    request_time = parse_time(checkpoint.get("requestTime"))
    if checkpoint.get("requestResult") == "Failed" and (last_time is None or request_time is None
                                                        or last_time <= request_time):
        return _condition("Checkpointed", False, "CheckpointFailed",
                          f"requested checkpoint {checkpoint.get('requested')!r} failed: "
                          f"{checkpoint.get('requestMessage') or 'unknown error'}")
    if checkpoint.get("step") is not None or checkpoint.get("path"):
        return _condition("Checkpointed", True, "Checkpointed",
                          f"step {checkpoint.get('step')} saved at {checkpoint.get('time')} to {checkpoint.get('path')}")
    return _condition("Checkpointed", False, "NoCheckpoint", "no checkpoint has been taken yet")


def compute_status(
    body: Mapping[str, Any],
    pod: Optional[Mapping[str, Any]],
    runtime: RuntimeView,
    now: dt.datetime,
    *,
    spec_error: Optional[str] = None,
    desired_hash: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> dict[str, Any]:
    """The full status of `body` (a raw OnlineModel) given its live pod and the runtime's answer.

    spec_error: why the spec was refused (-> InvalidSpec); desired_hash: the spec hash the pod should run
    (a pod with another hash -> Updating); endpoint: the Service URL (None when unknown).
    """
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    previous = body.get("status") or {}
    generation = meta.get("generation")
    suspended = bool(spec.get("suspend", False))
    training_enabled = bool((spec.get("training") or {}).get("enabled", True))
    view = analyze_pod(pod)
    if suspended and pod is None:
        view = PodView("Suspended", "the OnlineModel is suspended; the pod is deleted and the volume kept")

    serving = _condition("Serving", view.serving, view.reason, view.message)
    training = _training_condition(training_enabled, suspended, view, runtime)
    checkpoint = _checkpoint_status(previous, runtime)
    checkpointed = _checkpointed_condition(checkpoint, runtime)

    pod_hash = ((pod or {}).get("metadata", {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    if spec_error:
        ready = _condition("Ready", False, "InvalidSpec", f"{spec_error} (anything running keeps the last valid spec)")
    elif suspended:
        ready = _condition("Ready", False, "Suspended", "the OnlineModel is suspended")
    elif not view.serving:
        ready = _condition("Ready", False, view.reason, view.message)
    elif desired_hash is not None and pod_hash != desired_hash:
        ready = _condition("Ready", False, "Updating", "the pod runs an older spec and is being replaced")
    elif training_enabled and training["status"] != "True":
        ready = _condition("Ready", False, training["reason"], training["message"])
    else:
        ready = _condition("Ready", True, training["reason"] if training_enabled else "Serving",
                           "serving" + (" and training" if training_enabled else "; training is disabled"))

    if spec_error:
        degraded = _condition("Degraded", True, "InvalidSpec", spec_error)
    elif view.failing:
        degraded = _condition("Degraded", True, view.reason, view.message)
    elif training["reason"] == "TrainerError":
        degraded = _condition("Degraded", True, "TrainerError", training["message"])
    elif checkpointed["reason"] == "CheckpointFailed":
        degraded = _condition("Degraded", True, "CheckpointFailed", checkpointed["message"])
    elif suspended:
        degraded = _condition("Degraded", False, "Suspended", "the OnlineModel is suspended")
    else:
        degraded = _condition("Degraded", False, "Healthy", "nothing is failing")

    by_type = {c["type"]: c for c in (ready, serving, training, checkpointed, degraded)}
    old = {c.get("type"): c for c in previous.get("conditions") or []}
    conditions = []
    for type_ in CONDITION_TYPES:
        cond = by_type[type_]
        before = old.get(type_)
        keep = before is not None and before.get("status") == cond["status"] and before.get("lastTransitionTime")
        cond["lastTransitionTime"] = before["lastTransitionTime"] if keep else rfc3339(now)
        if generation is not None:
            cond["observedGeneration"] = generation
        conditions.append(cond)

    status: dict[str, Any] = {}
    if generation is not None:
        status["observedGeneration"] = generation
    status["phase"] = "Ready" if ready["status"] == "True" else PHASES.get(ready["reason"], "Pending")
    status["conditions"] = conditions
    status["training"] = _training_status(previous, training_enabled, runtime)
    if checkpoint:
        status["checkpoint"] = checkpoint
    if endpoint:
        status["endpoint"] = endpoint
    elif previous.get("endpoint"):
        status["endpoint"] = previous["endpoint"]
    if pod is not None:
        status["podName"] = pod.get("metadata", {}).get("name")
        if pod_hash:
            status["podSpecHash"] = pod_hash
    failure = pod_failure(pod) or previous.get("lastFailure")
    if failure:
        status["lastFailure"] = dict(failure)
    return status


@dataclass(frozen=True)
class Transition:
    """A change worth a Kubernetes Event."""

    type: str  # "Normal" or "Warning"
    reason: str
    message: str


def transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Transition]:
    """Events for conditions whose status or reason changed, and for a new checkpoint."""
    out: list[Transition] = []
    before = {c.get("type"): c for c in old.get("conditions") or []}
    for cond in new.get("conditions") or []:
        prev = before.get(cond["type"], {})
        if (prev.get("status"), prev.get("reason")) == (cond["status"], cond["reason"]):
            continue
        bad = (cond["type"] == "Degraded" and cond["status"] == "True") or cond["reason"] in (
            FAILING_POD_REASONS | {"TrainerError", "CheckpointFailed", "InvalidSpec", "RuntimeUnreachable"})
        out.append(Transition("Warning" if bad else "Normal", cond["reason"],
                              f"{cond['type']}={cond['status']}: {cond['message']}"))
    old_step = (old.get("checkpoint") or {}).get("step")
    new_ck = new.get("checkpoint") or {}
    if new_ck.get("step") is not None and new_ck.get("step") != old_step:
        out.append(Transition("Normal", "CheckpointSaved", f"checkpoint of step {new_ck['step']} at {new_ck.get('path')}"))
    return out


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
