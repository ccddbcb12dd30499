"""Reading a live Pod back: its runtime container, address, API token, state and last failure.

Pure: raw pod dicts in (as the API server returns them), plain values out. `render.py` writes the pod;
this module is the one place that reads one, so the runtime container is looked up in one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from onlinemodel_operator import SPEC_HASH_ANNOTATION
from onlinemodel_operator.models_spec import API_TOKEN_ENV
from onlinemodel_operator.models_status import FailureStatus
from onlinemodel_operator.render import CONTAINER_NAME, PORT_NAME
from onlinemodel_protocol.rpc import EXIT_MODEL_CHANGED

IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERROR_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Pod reasons that mean "broken until someone acts" (Degraded), as opposed to "not there yet".
FAILING_POD_REASONS = {"ImagePullBackOff", "CrashLoopBackOff", "PodFailed", "ContainerConfigError", "ModelChanged"}
FINISHED_PHASES = ("Failed", "Succeeded")
DEFAULT_PORT = 8000


def _runtime_entry(entries: Optional[Iterable[Mapping[str, Any]]]) -> Mapping[str, Any]:
    for entry in entries or ():
        if entry.get("name") == CONTAINER_NAME:
            return entry
    return {}


def runtime_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The runtime container of the pod's spec ({} when there is none)."""
    return _runtime_entry((pod.get("spec") or {}).get("containers"))


def runtime_container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The runtime container's entry in status.containerStatuses ({} before the kubelet reports one)."""
    return _runtime_entry((pod.get("status") or {}).get("containerStatuses"))


def spec_hash_of(pod: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The spec hash the pod was rendered from (None for no pod, or one without the annotation)."""
    return (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def finished_phase(pod: Mapping[str, Any]) -> Optional[str]:
    """"Failed" or "Succeeded" when the pod is over for good (restartPolicy cannot bring it back)."""
    phase = (pod.get("status") or {}).get("phase")
    return phase if phase in FINISHED_PHASES else None


def runtime_url(pod: Mapping[str, Any]) -> Optional[str]:
    """http://<podIP>:<the runtime container's http port>, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    ports = [p for p in runtime_container(pod).get("ports") or [] if p.get("name") == PORT_NAME]
    port = ports[0].get("containerPort") if ports else None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port or DEFAULT_PORT}"


def api_token_ref(pod: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """(Secret, key) the pod's runtime takes its API token from: the pod's, not the current spec's."""
    for env in runtime_container(pod).get("env") or []:
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if env.get("name") == API_TOKEN_ENV and ref:
            return ref["name"], ref.get("key", "token")
    return None


def model_changed(pod: Mapping[str, Any]) -> Optional[str]:
    """What the runtime said when it refused to start because the checkpoints hold another base model
    (exit code EXIT_MODEL_CHANGED), or None. Read while the container is down: the exit itself, or the
    back-off after it; a container that runs again got past the check."""
    container = runtime_container_status(pod)
    state = container.get("state") or {}
    if state.get("terminated") is not None:
        term = state["terminated"]
    elif state.get("waiting") is not None:
        term = (container.get("lastState") or {}).get("terminated") or {}
    else:
        return None
    if term.get("exitCode") != EXIT_MODEL_CHANGED:
        return None
    return (term.get("message") or "").strip()[-2048:] or "the checkpoints were made from another model"


@dataclass(frozen=True)
class PodView:
    """What the pod says: a CamelCase reason, a message, whether it serves, whether it is failing."""

    reason: str
    message: str
    serving: bool = False
    failing: bool = False


def analyze_pod(pod: Optional[Mapping[str, Any]]) -> PodView:
    if pod is None:
        return PodView("PodPending", "the pod does not exist yet")
    name = pod.get("metadata", {}).get("name", "")
    if is_terminating(pod):
        return PodView("PodTerminating", f"pod {name} is terminating")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    container = runtime_container_status(pod)
    if phase in FINISHED_PHASES:
        detail = status.get("message") or status.get("reason") or _terminated_text(container)
        return PodView("PodFailed", f"pod {name} {phase.lower()}: {detail}".rstrip(": "), failing=True)
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    reason = waiting.get("reason") or ""
    refused = model_changed(pod)
    if refused is not None:
        return PodView("ModelChanged", model_changed_message(refused), failing=True)
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


def model_changed_message(runtime_message: str) -> str:
    return (f"the runtime refused the checkpoints on the volume: {runtime_message.rstrip('.')}. Set "
            "spec.checkpoint.startOver: true to move them aside and start from spec.model, or set spec.model back")


def answers(pod: Mapping[str, Any]) -> bool:
    """The runtime can be asked: the pod serves (its /health answers) and has an address."""
    return analyze_pod(pod).serving and runtime_url(pod) is not None


def _terminated_text(container: Mapping[str, Any], last: bool = False) -> str:
    term = (container.get("lastState" if last else "state") or {}).get("terminated") or {}
    if not term:
        return "unknown"
    return f"exit code {term.get('exitCode')} ({term.get('reason') or 'Error'})"


def pod_failure(pod: Optional[Mapping[str, Any]]) -> Optional[FailureStatus]:
    """The newest failure the pod shows (a terminated container, or a failed/evicted pod), or None."""
    if pod is None:
        return None
    container = runtime_container_status(pod)
    for key in ("state", "lastState"):
        term = (container.get(key) or {}).get("terminated")
        if term and (term.get("exitCode") not in (0, None) or term.get("reason") not in (None, "Completed")):
            return FailureStatus(exit_code=term.get("exitCode"), reason=term.get("reason") or "Error",
                                 message=(term.get("message") or "")[-1024:] or None, time=term.get("finishedAt"))
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return FailureStatus(reason=status.get("reason") or "PodFailed", message=status.get("message"))
    return None
