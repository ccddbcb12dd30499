"""Unit tests of status.py: (OnlineModel, pod, /train/status, now) -> status, every condition reason.

`compute` returns what the API receives: the OnlineModelStatus as the camelCase dict the operator patches.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import pytest

from onlinemodel_operator import SPEC_HASH_ANNOTATION
from onlinemodel_operator.models_status import (
    PHASES,
    CheckpointStatus,
    ModelChangedStatus,
    OnlineModelStatus,
    SecretKeyStatus,
)
from onlinemodel_protocol.api import CheckpointRecord, TrainStatus
from onlinemodel_protocol.rpc import EXIT_MODEL_CHANGED
from onlinemodel_operator.events import transitions
from onlinemodel_operator.status import (
    PHASE_OF_REASON,
    RuntimeUnavailable,
    compute_status,
    merge_patch,
    previous_status,
    with_saved_checkpoint,
)
from operator_kubelet import VLLM_REFUSES_TP_2

NOW = dt.datetime(2026, 11, 26, 5, 0, 0, tzinfo=dt.timezone.utc)
LATER = NOW + dt.timedelta(minutes=5)
HASH = "abc123"


def om(generation: int = 3, status: Optional[dict[str, Any]] = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ns", "generation": generation},
            "spec": {"model": {"source": {"image": {"path": "/m"}}}, "image": "i", **spec},
            "status": status or {}}


def pod(*, phase: str = "Running", ready: bool = True, state: Optional[dict[str, Any]] = None,
        last_state: Optional[dict[str, Any]] = None, spec_hash: str = HASH, deleting: bool = False,
        conditions: Optional[list[dict[str, Any]]] = None, **status: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "namespace": "ns", "annotations": {SPEC_HASH_ANNOTATION: spec_hash}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T04:59:00Z"
    container: dict[str, Any] = {"name": "runtime", "ready": ready, "restartCount": 2,
                                 "state": state if state is not None else {"running": {"startedAt": "2026-11-26T04:00:00Z"}}}
    if last_state:
        container["lastState"] = last_state
    return {"metadata": meta, "status": {"phase": phase, "podIP": "10.0.0.5", "containerStatuses": [container],
                                         "conditions": conditions or [], **status}}


def runtime(state: str = "idle", **extra: Any) -> TrainStatus:
    """GET /train/status's answer, as the runtime client returns it."""
    return TrainStatus.model_validate({
        "state": state, "steps": 12, "tokens_trained": 636, "last_loss": 0.02, "weight_version": 12,
        "last_step_time": "2026-11-26T04:59:00Z", "last_error": None,
        "checkpoint": {"state": "idle", "last": None, "last_error": None}, **extra})


def compute(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return compute_status(*args, **kwargs).to_dict()


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def reasons(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_all_conditions_always_present_with_generation() -> None:
    status = compute(om(), None, None, NOW)
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Serving", "Training", "Checkpointed", "Degraded"]
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == "2026-11-26T05:00:00Z"
               and c["reason"] and c["message"] for c in status["conditions"])


def test_ready_when_serving_and_trainer_idle() -> None:
    status = compute(om(), pod(), runtime("idle"), NOW, desired_hash=HASH, endpoint="http://m.ns.svc:8000")
    assert reasons(status) == {"Ready": ("True", "Idle"), "Serving": ("True", "Serving"),
                               "Training": ("True", "Idle"), "Checkpointed": ("False", "NoCheckpoint"),
                               "Degraded": ("False", "Healthy")}
    assert status["phase"] == "Ready"
    assert status["training"] == {"state": "idle", "steps": 12, "tokensTrained": 636, "lastLoss": 0.02,
                                  "weightVersion": 12, "lastStepTime": "2026-11-26T04:59:00Z", "trainerRestarts": 0,
                                  "jobs": []}
    assert status["endpoint"] == "http://m.ns.svc:8000" and status["podName"] == "m"
    assert status["podSpecHash"] == HASH


def test_training_state_reported() -> None:
    status = compute(om(), pod(), runtime("training"), NOW, desired_hash=HASH)
    assert reasons(status)["Ready"] == ("True", "Training")
    assert reasons(status)["Training"] == ("True", "Training")


def test_training_disabled_still_ready_as_serving() -> None:
    status = compute(om(training={"enabled": False}), pod(), None, NOW, desired_hash=HASH)
    assert reasons(status)["Training"] == ("False", "TrainingDisabled")
    assert reasons(status)["Ready"] == ("True", "Serving")
    assert status["training"]["state"] == "disabled"


@pytest.mark.parametrize("the_pod,reason,degraded", [
    (None, "PodPending", False),
    (pod(phase="Pending", ready=False, state={"waiting": {"reason": "ContainerCreating"}}), "PodPending", False),
    (pod(phase="Pending", ready=False, state={}, containerStatuses=None,
         conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes have nvidia.com/gpu"}]), "Unschedulable", False),
    (pod(phase="Pending", ready=False, state={"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}),
     "ImagePullBackOff", True),
    (pod(phase="Pending", ready=False, state={"waiting": {"reason": "ErrImagePull"}}), "ImagePullBackOff", True),
    (pod(ready=False, state={"waiting": {"reason": "CrashLoopBackOff"}},
         last_state={"terminated": {"exitCode": 1, "reason": "Error"}}), "CrashLoopBackOff", True),
    (pod(phase="Pending", ready=False, state={"waiting": {"reason": "CreateContainerConfigError",
                                                          "message": "secret \"tok\" not found"}}),
     "ContainerConfigError", True),
    (pod(ready=False), "ModelLoading", False),
    (pod(ready=False, state={"terminated": {"exitCode": 2, "reason": "Error"}}), "ContainerRestarting", False),
    (pod(phase="Failed", ready=False, reason="Evicted", message="The node was low on memory."), "PodFailed", True),
    (pod(deleting=True), "PodTerminating", False),
])
def test_pod_states(the_pod: Optional[dict[str, Any]], reason: str, degraded: bool) -> None:
    status = compute(om(), the_pod, None, NOW, desired_hash=HASH)
    assert reasons(status)["Ready"] == ("False", reason)
    assert reasons(status)["Serving"] == ("False", reason)
    assert reasons(status)["Training"] == ("False", reason)
    assert cond(status, "Degraded")["status"] == ("True" if degraded else "False")
    if degraded:
        assert cond(status, "Degraded")["reason"] == reason
    assert status["phase"] in {"Pending", "Loading", "Failed"}


def test_crash_loop_message_and_last_failure() -> None:
    the_pod = pod(ready=False, state={"waiting": {"reason": "CrashLoopBackOff"}},
                  last_state={"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                             "finishedAt": "2026-11-26T04:58:00Z", "message": "killed"}})
    status = compute(om(), the_pod, None, NOW)
    assert "exit code 137 (OOMKilled)" in cond(status, "Ready")["message"]
    assert status["lastFailure"] == {"exitCode": 137, "reason": "OOMKilled", "message": "killed",
                                     "time": "2026-11-26T04:58:00Z"}
    # Kept when the next pod is healthy.
    later = compute(om(status=status), pod(), runtime(), LATER, desired_hash=HASH)
    assert later["lastFailure"] == status["lastFailure"]


def test_a_gpu_count_vllm_cannot_split_the_model_by_is_a_crash_loop_with_vllms_reason() -> None:
    """The operator does not read the model's config (docs/operator.md, "Tensor parallelism"): vLLM refuses
    the tensor parallel size when the pod starts, and its reason reaches status.lastFailure the usual way."""
    the_pod = pod(ready=False, state={"waiting": {"reason": "CrashLoopBackOff"}},
                  last_state={"terminated": {"exitCode": 1, "reason": "Error", "message": VLLM_REFUSES_TP_2,
                                             "finishedAt": "2026-11-26T04:58:00Z"}})
    status = compute(om(resources={"gpus": 2}), the_pod, None, NOW, desired_hash=HASH)
    assert reasons(status)["Ready"] == ("False", "CrashLoopBackOff")
    assert reasons(status)["Degraded"] == ("True", "CrashLoopBackOff") and status["phase"] == "Failed"
    assert "exit code 1 (Error)" in cond(status, "Degraded")["message"]
    assert status["lastFailure"]["exitCode"] == 1
    assert "attention heads (9) must be divisible by tensor parallel size (2)" in status["lastFailure"]["message"]
    posted = transitions(OnlineModelStatus(), compute_status(om(resources={"gpus": 2}), the_pod, None, NOW,
                                                             desired_hash=HASH))
    assert ("Warning", "CrashLoopBackOff") in {(t.type, t.reason) for t in posted}


def test_evicted_pod_failure() -> None:
    status = compute(om(), pod(phase="Failed", ready=False, state={}, reason="Evicted",
                                      message="low on memory"), None, NOW)
    assert status["lastFailure"] == {"reason": "Evicted", "message": "low on memory"}


@pytest.mark.parametrize("answer,reason,training_status", [
    (runtime("error", last_error="CUDA out of memory"), "TrainerError", "False"),
    (runtime("starting"), "TrainerStarting", "False"),
    (RuntimeUnavailable("connection refused"), "RuntimeUnreachable", "Unknown"),
    (None, "NotPolled", "Unknown"),
    (runtime("disabled"), "TrainingDisabled", "False"),  # the pod still runs a spec without training
])
def test_trainer_states_make_ready_false(answer: Any, reason: str, training_status: str) -> None:
    status = compute(om(), pod(), answer, NOW, desired_hash=HASH)
    assert reasons(status)["Serving"] == ("True", "Serving")
    assert reasons(status)["Training"] == (training_status, reason)
    assert reasons(status)["Ready"] == ("False", reason)
    assert reasons(status)["Degraded"] == (("True", "TrainerError") if reason == "TrainerError"
                                           else ("False", "Healthy"))


def test_trainer_error_message() -> None:
    status = compute(om(), pod(), runtime("error", last_error="CUDA out of memory"), NOW, desired_hash=HASH)
    assert cond(status, "Training")["message"] == "CUDA out of memory"
    assert status["phase"] == "Degraded"


def test_unreachable_runtime_keeps_last_training_numbers() -> None:
    first = compute(om(), pod(), runtime("training"), NOW, desired_hash=HASH)
    second = compute(om(status=first), pod(), RuntimeUnavailable("timeout"), LATER, desired_hash=HASH)
    assert second["training"]["steps"] == 12 and second["training"]["state"] == "unavailable"


def test_checkpointed_from_runtime() -> None:
    last = {"step": 12, "weight_version": 12, "time": "2026-11-26T04:59:30Z", "path": "/ck/step-000012"}
    status = compute(om(), pod(), runtime(checkpoint={"state": "idle", "last": last}), NOW, desired_hash=HASH)
    assert reasons(status)["Checkpointed"] == ("True", "Checkpointed")
    assert status["checkpoint"] == {"step": 12, "weightVersion": 12, "time": "2026-11-26T04:59:30Z",
                                    "path": "/ck/step-000012"}
    # Known while the pod is gone (e.g. suspended).
    gone = compute(om(status=status, suspend=True), None, None, LATER)
    assert reasons(gone)["Checkpointed"] == ("True", "Checkpointed")
    assert gone["checkpoint"]["step"] == 12


def test_checkpoint_failed_in_runtime() -> None:
    answer = runtime(checkpoint={"state": "failed", "last": None, "last_error": "No space left on device"})
    status = compute(om(), pod(), answer, NOW, desired_hash=HASH)
    assert reasons(status)["Checkpointed"] == ("False", "CheckpointFailed")
    assert reasons(status)["Degraded"] == ("True", "CheckpointFailed")
    assert reasons(status)["Ready"] == ("True", "Idle")  # still serves and learns
    assert "No space left" in cond(status, "Degraded")["message"]


def test_failed_checkpoint_request_until_a_newer_checkpoint() -> None:
    previous = {"checkpoint": {"step": 5, "time": "2026-11-26T04:00:00Z", "path": "/ck/5", "requested": "r1",
                               "requestResult": "Failed", "requestMessage": "HTTP 500: disk full",
                               "requestTime": "2026-11-26T04:30:00Z"}}
    status = compute(om(status=previous), pod(), runtime(), NOW, desired_hash=HASH)
    assert reasons(status)["Checkpointed"] == ("False", "CheckpointFailed")
    assert "disk full" in cond(status, "Checkpointed")["message"]
    newer = runtime(checkpoint={"state": "idle", "last": {"step": 9, "time": "2026-11-26T04:45:00Z", "path": "/ck/9"}})
    status = compute(om(status=previous), pod(), newer, NOW, desired_hash=HASH)
    assert reasons(status)["Checkpointed"] == ("True", "Checkpointed")
    assert status["checkpoint"]["requested"] == "r1"  # the handled request value is kept


def test_suspended() -> None:
    status = compute(om(suspend=True), None, None, NOW, desired_hash=HASH)
    assert reasons(status) == {"Ready": ("False", "Suspended"), "Serving": ("False", "Suspended"),
                               "Training": ("False", "Suspended"), "Checkpointed": ("False", "NoCheckpoint"),
                               "Degraded": ("False", "Suspended")}
    assert status["phase"] == "Suspended"


def test_invalid_spec_keeps_reporting_the_running_pod() -> None:
    status = compute(om(), pod(), runtime(), NOW, spec_error="spec.training.learningRate: too big")
    assert reasons(status)["Ready"] == ("False", "InvalidSpec")
    assert reasons(status)["Degraded"] == ("True", "InvalidSpec")
    assert reasons(status)["Serving"] == ("True", "Serving")
    assert "learningRate" in cond(status, "Ready")["message"]
    assert status["phase"] == "Invalid"


def test_outdated_pod_is_updating() -> None:
    status = compute(om(), pod(spec_hash="old"), runtime(), NOW, desired_hash=HASH)
    assert reasons(status)["Ready"] == ("False", "Updating")
    assert status["phase"] == "Updating"


def test_last_transition_time_kept_while_status_unchanged() -> None:
    first = compute(om(generation=1), pod(), runtime("idle"), NOW, desired_hash=HASH)
    # Same statuses (reason changes Idle -> Training), new generation: times kept, generation updated.
    second = compute(om(generation=2, status=first), pod(), runtime("training"), LATER, desired_hash=HASH)
    assert len(second["conditions"]) == 5
    assert all(c["lastTransitionTime"] == "2026-11-26T05:00:00Z" for c in second["conditions"])
    assert all(c["observedGeneration"] == 2 for c in second["conditions"])
    # A status flip moves the time.
    third = compute(om(generation=2, status=second), pod(ready=False), None, LATER, desired_hash=HASH)
    assert cond(third, "Ready")["lastTransitionTime"] == "2026-11-26T05:05:00Z"
    assert cond(third, "Degraded")["lastTransitionTime"] == "2026-11-26T05:00:00Z"


def test_merge_patch_removes_vanished_keys() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    new = {"a": 1, "b": {"c": 2}, "e": [1, 2], "f": None}
    assert merge_patch(old, new) == {"b": {"d": None}, "e": [1, 2], "f": None}
    assert merge_patch(new, new) == {}


def test_every_phase_is_a_documented_one() -> None:
    assert set(PHASE_OF_REASON.values()) | {"Ready"} == set(PHASES)


def test_saved_checkpoint_updates_only_what_the_runtime_says() -> None:
    before = CheckpointStatus(step=5, path="/ck/5", requested="r1", request_result="Failed")
    saved = CheckpointRecord(step=9, weight_version=9, path="/ck/9", size_bytes=10, content_hash="sha256:0")
    after = with_saved_checkpoint(before, saved, requested="r2", request_result="Succeeded")
    assert after.to_dict() == {"step": 9, "weightVersion": 9, "path": "/ck/9", "requested": "r2",
                               "requestResult": "Succeeded"}
    assert with_saved_checkpoint(None, None) == CheckpointStatus()


def test_a_status_that_does_not_parse_is_replaced_whole() -> None:
    body = om(status={"phase": "Ready", "conditions": [{"type": "Ready", "status": "Maybe"}], "endpoint": "x"})
    assert previous_status(body) == OnlineModelStatus()
    status = compute(body, None, None, NOW)
    assert "endpoint" not in status and len(status["conditions"]) == 5
    assert merge_patch(body["status"], status)["endpoint"] is None


# --- a changed model, the API token ----------------------------------------------------------------------

REFUSED = "checkpoint base model Qwen/Qwen3-0.6B differs from --model Qwen/Qwen3-1.7B"


def refused_pod(*, backing_off: bool) -> dict[str, Any]:
    exit_3 = {"terminated": {"exitCode": EXIT_MODEL_CHANGED, "reason": "Error", "message": REFUSED + "\n"}}
    if backing_off:
        return pod(ready=False, state={"waiting": {"reason": "CrashLoopBackOff"}}, last_state=exit_3)
    return pod(ready=False, state=exit_3)


@pytest.mark.parametrize("backing_off", [False, True])
def test_a_refused_model_change_is_reported_not_a_crash_loop(backing_off: bool) -> None:
    status = compute(om(), refused_pod(backing_off=backing_off), None, NOW, desired_hash=HASH)
    assert reasons(status) == {"Ready": ("False", "ModelChanged"), "Serving": ("False", "ModelChanged"),
                               "Training": ("False", "ModelChanged"), "Checkpointed": ("False", "NoCheckpoint"),
                               "Degraded": ("True", "ModelChanged")}
    message = cond(status, "Ready")["message"]
    assert REFUSED in message and "spec.checkpoint.startOver: true" in message
    assert status["phase"] == "Failed"
    assert status["lastFailure"]["exitCode"] == EXIT_MODEL_CHANGED


def test_other_exits_are_not_a_model_change() -> None:
    crashed = pod(ready=False, state={"waiting": {"reason": "CrashLoopBackOff"}},
                  last_state={"terminated": {"exitCode": 1, "reason": "Error", "message": REFUSED}})
    assert reasons(compute(om(), crashed, None, NOW))["Ready"] == ("False", "CrashLoopBackOff")
    # Running again: the runtime got past its check (someone moved the checkpoints by hand).
    running = pod(ready=False, last_state=refused_pod(backing_off=True)["status"]["containerStatuses"][0]["lastState"])
    assert reasons(compute(om(), running, None, NOW))["Ready"] == ("False", "ModelLoading")


HELD = ModelChangedStatus(spec_hash=HASH, message=REFUSED, time="2026-11-26T04:59:00Z")


def test_held_model_change_is_kept_while_no_pod_runs() -> None:
    status = compute(om(), None, None, NOW, desired_hash=HASH, model_changed=HELD)
    assert reasons(status)["Ready"] == ("False", "ModelChanged") and reasons(status)["Degraded"][0] == "True"
    assert status["modelChanged"] == {"specHash": HASH, "message": REFUSED, "time": "2026-11-26T04:59:00Z"}
    later = compute(om(status=status), None, None, LATER, desired_hash=HASH)
    assert later["modelChanged"] == status["modelChanged"] and reasons(later)["Ready"][1] == "ModelChanged"
    invalid = compute(om(status=status), None, None, LATER, spec_error="bad")  # no hash known: kept
    assert invalid["modelChanged"] == status["modelChanged"]


@pytest.mark.parametrize("change", ["spec", "suspend"])
def test_held_model_change_ends_when_the_user_decides(change: str) -> None:
    held = compute(om(), None, None, NOW, desired_hash=HASH, model_changed=HELD)
    if change == "spec":  # e.g. checkpoint.startOver: true
        status = compute(om(status=held), None, None, LATER, desired_hash="other")
        assert reasons(status)["Ready"] == ("False", "PodPending")
    else:
        status = compute(om(status=held, suspend=True), None, None, LATER, desired_hash=HASH)
        assert reasons(status)["Ready"] == ("False", "Suspended")
    assert "modelChanged" not in status
    assert merge_patch(held, status)["modelChanged"] is None


def test_api_token_secret_is_named_and_kept() -> None:
    ref = SecretKeyStatus(name="m-api-token", key="token")
    status = compute(om(), pod(), runtime(), NOW, desired_hash=HASH, api_token_secret=ref)
    assert status["apiTokenSecret"] == {"name": "m-api-token", "key": "token"}
    assert compute(om(status=status), None, None, LATER, spec_error="bad")["apiTokenSecret"] == status["apiTokenSecret"]


def rollback(rollbacks: int, time: str, source: str = "guard") -> dict[str, Any]:
    last = {"time": time, "source": source, "weight_version": 30 + rollbacks, "reason": "the guard found regressions",
            "regressed": ["capital"], "job_id": "job-1" if source == "guard" else None,
            "checkpoint": "step-00000012" if source == "request" else None}
    return {"guard": {"enabled": True, "rollbacks": rollbacks, "last_rollback": last}}


def test_rollbacks_reach_the_status_and_one_event_each() -> None:
    first = compute_status(om(), pod(), runtime(guard={"enabled": True}), NOW)
    assert first.training.guard.rollbacks == 0 and first.training.guard.last_rollback_time is None
    one = compute_status(om(status=first.to_dict()), pod(), runtime(**rollback(1, "2026-11-26T05:00:00Z")), LATER)
    assert one.training.guard.model_dump(exclude_none=True) == {
        "enabled": True, "rollbacks": 1, "last_rollback_time": "2026-11-26T05:00:00Z", "last_rollback_source": "guard",
        "last_rollback_job": "job-1", "last_rollback_reason": "the guard found regressions"}
    (event,) = [e for e in transitions(first, one) if e.reason == "RolledBack"]
    assert event.type == "Warning" and "job-1" in event.message
    assert [e for e in transitions(one, one) if e.reason == "RolledBack"] == []  # the next poll: no duplicate
    three = compute_status(om(status=one.to_dict()), pod(),
                           runtime(**rollback(3, "2026-11-26T05:01:00Z", source="request")), LATER)
    (event,) = [e for e in transitions(one, three) if e.reason == "RolledBack"]
    assert event.type == "Normal" and "step-00000012" in event.message and "1 more" in event.message


def test_a_runtime_without_a_guard_section_has_no_guard_status() -> None:
    status = compute_status(om(), pod(), runtime(), NOW)
    assert status.training.guard is None and "guard" not in status.to_dict()["training"]
